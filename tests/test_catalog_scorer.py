"""One catalogue scorer for evaluation and serving: today's figures pinned, and the scorer against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from movierec.evaluation.evaluate import evaluate_checkpoint
from movierec.models.base import ModelConfig
from movierec.models.catalog import NOTHING_SEEN, BF16Screen, CatalogScorer, length_sorted_batches, row_item_pairs
from movierec.models.sse_pt import SSEPT
from movierec.serving.loader import load_model

# what the tiny `trained_run` model scored before evaluation and serving shared one scorer: they must not move
PINNED_METRICS = {
    "loss": 1.414045459429423,
    "users": 300.0,
    "full/hr@1": 0.01,
    "full/ndcg@1": 0.01,
    "full/hr@5": 0.05333333333333334,
    "full/ndcg@5": 0.030396943237024198,
    "full/hr@10": 0.1,
    "full/ndcg@10": 0.04523683431800262,
    "full/hr@20": 0.17,
    "full/ndcg@20": 0.06237311626706731,
    "full/mrr": 0.04859630094168837,
    "sampled-uniform-100/hr@1": 0.023333333333333334,
    "sampled-uniform-100/ndcg@1": 0.023333333333333334,
    "sampled-uniform-100/hr@5": 0.06666666666666667,
    "sampled-uniform-100/ndcg@5": 0.04396135471011289,
    "sampled-uniform-100/hr@10": 0.12333333333333334,
    "sampled-uniform-100/ndcg@10": 0.062143031409262736,
    "sampled-uniform-100/hr@20": 0.23333333333333334,
    "sampled-uniform-100/ndcg@20": 0.08930798405349567,
    "sampled-uniform-100/mrr": 0.06653870854251233,
    "sampled-popularity-100/hr@1": 0.023333333333333334,
    "sampled-popularity-100/ndcg@1": 0.023333333333333334,
    "sampled-popularity-100/hr@5": 0.06333333333333334,
    "sampled-popularity-100/ndcg@5": 0.04238149201022239,
    "sampled-popularity-100/hr@10": 0.10333333333333333,
    "sampled-popularity-100/ndcg@10": 0.05532571586206378,
    "sampled-popularity-100/hr@20": 0.22,
    "sampled-popularity-100/ndcg@20": 0.08423431035950678,
    "sampled-popularity-100/mrr": 0.06410293937792275,
}
# (movieId, score) of the top 10 of the first, eighth and last known users, seen items excluded
PINNED_USER_TOP10 = {
    1007: [(153, 0.926694), (63, 0.6513827), (473, 0.6342885), (1123, 0.6054357), (13, 0.5974773),
           (1363, 0.5631383), (1433, 0.5629283), (813, 0.5487277), (923, 0.5456544), (973, 0.5424898)],
    1056: [(1403, 1.0151663), (133, 0.7817891), (263, 0.685082), (723, 0.6781462), (1063, 0.580678),
           (283, 0.5266749), (343, 0.5111827), (903, 0.4798747), (1223, 0.4747573), (1383, 0.4517274)],
    3100: [(333, 0.9561877), (933, 0.9281175), (153, 0.9131101), (913, 0.877519), (1483, 0.8314112),
           (1333, 0.7960907), (1033, 0.7951922), (113, 0.7273542), (963, 0.6873268), (1123, 0.6497156)],
}  # fmt: skip
PINNED_USER_1007_WITH_SEEN = [
    (1483, 1.1820861), (203, 0.9707922), (153, 0.926694), (63, 0.6513827), (943, 0.6459365),
    (473, 0.6342885), (1123, 0.6054357), (13, 0.5974773), (683, 0.5684015), (833, 0.5683623),
]  # fmt: skip
PINNED_HISTORY = [53, 13, 103, 233]  # movieIds of our items 5, 1, 10, 23
PINNED_HISTORY_TOP10 = [
    (393, 1.1487848), (1273, 0.8990011), (1253, 0.8521934), (493, 0.7514485), (93, 0.7473397),
    (1343, 0.7393867), (523, 0.7343579), (1043, 0.7278078), (823, 0.689289), (883, 0.6860279),
]  # fmt: skip


def assert_recommendations(got, expected: list[tuple[int, float]]) -> None:
    assert [r.movie_id for r in got] == [movie_id for movie_id, _ in expected]
    assert [r.score for r in got] == pytest.approx([score for _, score in expected], abs=1e-6)


# --------------------------------------------------------------------------- the pinned figures


def test_evaluation_figures_do_not_move(trained_run):
    protocols = ("full", "sampled-uniform-100", "sampled-popularity-100")
    metrics = evaluate_checkpoint(trained_run.run_dir, protocols=protocols, ks=(1, 5, 10, 20))
    assert metrics.keys() == PINNED_METRICS.keys()
    for name, value in PINNED_METRICS.items():
        assert metrics[name] == pytest.approx(value, abs=1e-9), name


def test_recommendations_do_not_move(trained_run):
    rec = load_model(trained_run.run_dir)
    assert rec.known_user_ids[[0, 7, -1]].tolist() == list(PINNED_USER_TOP10)
    for user_id, expected in PINNED_USER_TOP10.items():
        assert_recommendations(rec.recommend_user(user_id, 10), expected)
    for user_id, got in rec.recommend_users(list(PINNED_USER_TOP10), 10).items():  # one length-sorted batch
        assert_recommendations(got, PINNED_USER_TOP10[user_id])
    assert_recommendations(rec.recommend_user(1007, 10, include_seen=True), PINNED_USER_1007_WITH_SEEN)
    result = rec.recommend_history([*PINNED_HISTORY, 999], 10)
    assert result.unknown_movie_ids == [999]
    assert_recommendations(result.recommendations, PINNED_HISTORY_TOP10)


# --------------------------------------------------------------------------- the scorer against brute force

NUM_ITEMS = 23
SEQUENCES = np.array([[0, 0, 3, 5, 8], [0, 0, 0, 0, 2], [1, 4, 4, 9, 23]])  # left-padded inputs of three rows
USERS = np.array([1, 0, 4])  # user 0: a person without a user embedding
# (row, item): row 0 has seen 3, 5, 8; row 1 nothing; row 2 has seen 1, 4 (twice), 9, 23 and 12
SEEN = (np.array([0, 0, 0, 2, 2, 2, 2, 2, 2]), np.array([3, 5, 8, 1, 4, 4, 9, 23, 12]))
TARGETS = np.array([7, 2, 15])


@pytest.fixture(scope="module")
def model() -> SSEPT:
    torch.manual_seed(0)
    config = ModelConfig(num_users=4, num_items=NUM_ITEMS, max_len=5, d_item=8, d_user=4, dropout=0.0)
    return SSEPT(config).eval()


@pytest.fixture(scope="module")
def full_scores(model) -> torch.Tensor:
    """(rows, NUM_ITEMS + 1) scores of the whole catalogue in one piece; column 0 (padding) is -inf."""
    with torch.inference_mode():
        return model.next_item_scores(torch.from_numpy(SEQUENCES), torch.from_numpy(USERS))


def without_seen(scores: torch.Tensor, seen=SEEN) -> torch.Tensor:
    masked = scores.clone()
    masked[torch.from_numpy(seen[0]), torch.from_numpy(seen[1])] = float("-inf")
    return masked


@pytest.mark.parametrize("item_chunk", [1, 7, 1000])
@pytest.mark.parametrize("k", [1, 10, NUM_ITEMS])  # 10 and 23: k larger than a chunk of 1 or 7 items
def test_top_k_is_torch_topk_of_the_whole_catalogue_without_seen_items(model, full_scores, item_chunk, k):
    scorer = CatalogScorer(model, item_chunk)
    with torch.inference_mode():
        scores, items = scorer.top_k(scorer.queries(SEQUENCES, USERS), k, SEEN)
    expected_scores, expected_items = torch.topk(without_seen(full_scores), k, dim=1)
    finite = torch.isfinite(expected_scores)
    assert torch.equal(torch.isfinite(scores), finite)
    assert torch.equal(items[finite], expected_items[finite])
    torch.testing.assert_close(scores[finite], expected_scores[finite])
    assert finite.sum(1).tolist() == [min(k, NUM_ITEMS - 3), k, min(k, NUM_ITEMS - 5)]  # row 1 has seen nothing


def test_top_k_without_seen_items_may_offer_every_item(model, full_scores):
    scorer = CatalogScorer(model, 7)
    with torch.inference_mode():
        scores, items = scorer.top_k(scorer.queries(SEQUENCES, USERS), NUM_ITEMS, NOTHING_SEEN)
    assert torch.isfinite(scores).all()
    assert (items.sort(1).values == torch.arange(1, NUM_ITEMS + 1)).all()
    torch.testing.assert_close(scores, full_scores[:, 1:].sort(1, descending=True).values)


@pytest.mark.parametrize("item_chunk", [1, 7, 1000])
def test_target_ranks_are_brute_force_ranks_and_the_log_partition_counts_every_item(model, full_scores, item_chunk):
    scorer = CatalogScorer(model, item_chunk)
    with torch.inference_mode():
        ranks, log_partition = scorer.target_ranks(scorer.queries(SEQUENCES, USERS), TARGETS, SEEN)
    rows = torch.arange(len(TARGETS))
    target_scores = full_scores[rows, torch.from_numpy(TARGETS)]
    competitors = without_seen(
        full_scores, (np.concatenate([SEEN[0], rows.numpy()]), np.concatenate([SEEN[1], TARGETS]))
    )
    assert ranks.tolist() == (competitors >= target_scores[:, None]).sum(1).tolist()
    torch.testing.assert_close(log_partition, torch.logsumexp(full_scores[:, 1:], dim=1))  # seen items included


def test_queries_are_float32_last_positions_whatever_the_autocast(model):
    with torch.inference_mode():
        expected = model.queries(torch.from_numpy(SEQUENCES), torch.from_numpy(USERS), last_only=True)
        plain = CatalogScorer(model).queries(SEQUENCES, USERS)
        autocast = CatalogScorer(model, autocast_dtype=torch.bfloat16).queries(SEQUENCES, USERS)
    torch.testing.assert_close(plain, expected)
    assert plain.dtype == autocast.dtype == torch.float32 and autocast.shape == plain.shape


def test_batches_group_rows_by_length_and_pad_to_the_longest_of_the_batch():
    lengths = np.array([3, 0, 5, 1, 2])
    batches = list(length_sorted_batches(np.array([0, 1, 2, 3]), lengths, 2, 4, lambda rows, width: (rows, width)))
    assert [(rows.tolist(), inputs[1]) for rows, inputs in batches] == [([1, 3], 1), ([0, 2], 4)]  # row 4 not asked


# --------------------------------------------------------------------------- the bfloat16 screen of top_k

SCREEN_ITEMS = 3000


def screen_model(seed: int, scale: float = 1.0) -> SSEPT:
    torch.manual_seed(seed)
    config = ModelConfig(num_users=4, num_items=SCREEN_ITEMS, max_len=5, d_item=16, d_user=4, dropout=0.0)
    model = SSEPT(config).eval()
    with torch.no_grad():
        model.item_emb.weight.mul_(scale)
    return model


def brute_force_top_k(model: SSEPT, queries: torch.Tensor, k: int, seen) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.inference_mode():
        scores = model.score(queries, torch.arange(1, SCREEN_ITEMS + 1).expand(len(queries), -1))
        scores[torch.from_numpy(seen[0]), torch.from_numpy(seen[1] - 1)] = float("-inf")
        return torch.topk(scores, k, dim=1)


@pytest.mark.parametrize("seed, scale", [(0, 1.0), (1, 1e-3), (2, 1e3)])
def test_the_screen_error_is_within_its_bound_for_every_item(seed, scale):
    model = screen_model(seed, scale)
    screen = BF16Screen(model)
    with torch.inference_mode():
        queries = model.queries(torch.randint(1, SCREEN_ITEMS + 1, (64, 5)), torch.randint(0, 5, (64,)), True)
        queries[:8, :16] = torch.randn(8, 16) * 1e4  # large queries: cancellation between terms
        rows, bound = screen.rows(queries)
        screened = (rows @ screen.table.t()).double()[:, screen.position]  # item j at column j - 1
        exact = model.score_shared(queries, slice(1, SCREEN_ITEMS + 1)).double()
    row_constant = queries[:, 16:].double()  # SSE-PT's user term: the same for every item of a row
    error = (screened - (exact - row_constant)).abs()
    assert (error <= bound[:, None]).all()
    assert (error.amax(1) > bound / 100).all(), "the bound is not vacuous"
    ceiling = screen.ceilings(rows)[:, None] * screen.norms[screen.position] + (rows.shape[1] + 1) * 2.0**-124
    assert (screened <= ceiling).all(), "no item screens above the early stop's ceiling"
    assert (screen.norms[:-1] >= screen.norms[1:]).all()


@pytest.mark.parametrize("k", [1, 10, 100])
def test_screened_top_k_is_the_float32_top_k(k):
    model = screen_model(0)
    users = np.arange(32) % 5
    sequences = np.random.default_rng(0).integers(1, SCREEN_ITEMS + 1, (32, 5))
    seen = row_item_pairs(sequences.ravel(), np.arange(32) * 5, np.full(32, 5))
    scorer = CatalogScorer(model, 700, screen=True)
    with torch.inference_mode():
        queries = scorer.queries(sequences, users)
        scores, items = scorer.top_k(queries, k, seen)
    expected_scores, expected_items = brute_force_top_k(model, queries, k, seen)
    assert scorer.bf16_screen is not None
    assert torch.equal(items, expected_items + 1)
    torch.testing.assert_close(scores, expected_scores)


def test_the_norm_ordered_screen_stops_early_and_still_returns_the_float32_top_k():
    model = screen_model(4)
    with torch.no_grad():  # a popular head (items 1..150) far from the origin, a long tail close to it
        model.item_emb.weight[151:] *= 0.01
    rng = np.random.default_rng(4)
    sequences = rng.integers(1, 151, (40, 5))  # seen items among the head, so the early stop skips masked ones
    sequences[:5] = rng.integers(151, SCREEN_ITEMS + 1, (5, 5))
    users = np.arange(40) % 5
    seen = row_item_pairs(sequences.ravel(), np.arange(40) * 5, np.full(40, 5))
    scorer = CatalogScorer(model, 256, screen=True)
    with torch.inference_mode():
        queries = scorer.queries(sequences, users)
        scores, items = scorer.top_k(queries, 10, seen)
    expected_scores, expected_items = brute_force_top_k(model, queries, 10, seen)
    assert torch.equal(items, expected_items + 1)
    torch.testing.assert_close(scores, expected_scores)
    assert scorer.screened_rows == 40
    assert scorer.screened_scores <= 40 * 512, "every row stopped after the first two chunks of 256 items"


def near_tie_scorer(ties: int) -> tuple[CatalogScorer, torch.Tensor]:
    """A scorer whose catalogue has `ties` items scoring 3 +- ~1e-4 for its one query (bfloat16 steps there are
    1.6e-2), well above the other items (random, |score| < ~0.5)."""
    model = screen_model(3)
    scorer = CatalogScorer(model, 1000, screen=True)
    with torch.inference_mode():
        queries = scorer.queries(np.array([[1, 2, 3, 4, 5]]), np.array([0]))
        direction = queries[0, :16] / queries[0, :16].norm() ** 2
        tied = torch.randperm(SCREEN_ITEMS)[:ties] + 1
        model.item_emb.weight[tied] = 3 * direction + 1e-5 * torch.randn(ties, 16)
    return scorer, queries


def test_near_ties_the_screen_cannot_tell_apart_come_out_in_float32_order(monkeypatch):
    scorer, queries = near_tie_scorer(20)  # fewer than the screen keeps: found by it, ordered in float32
    monkeypatch.setattr(scorer, "_chunks", None)  # the float32 pass over the catalogue is not needed
    with torch.inference_mode():
        scores, items = scorer.top_k(queries, 10)
    expected_scores, expected_items = brute_force_top_k(scorer.model, queries, 10, NOTHING_SEEN)
    assert torch.equal(items, expected_items + 1) and torch.equal(scores, expected_scores)


def test_a_row_with_more_near_ties_than_the_screen_keeps_is_scored_in_float32(monkeypatch):
    scorer, queries = near_tie_scorer(500)
    passes = []
    chunks = scorer._chunks
    monkeypatch.setattr(scorer, "_chunks", lambda rows: passes.append(len(rows)) or chunks(rows))
    with torch.inference_mode():
        scores, items = scorer.top_k(queries, 10)
    expected_scores, expected_items = brute_force_top_k(scorer.model, queries, 10, NOTHING_SEEN)
    assert passes == [1]
    assert torch.equal(items, expected_items + 1)
    torch.testing.assert_close(scores, expected_scores)
