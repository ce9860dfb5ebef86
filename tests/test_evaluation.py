"""Full-ranking exclusion and the training batch shift, on hand-built sequences."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from movierec.data.layout import load_sequences
from movierec.data.split import Interactions, write_dataset
from movierec.evaluation.evaluate import Evaluator
from movierec.models.catalog import CatalogScorer
from movierec.training.batches import TrainBatches


@pytest.fixture
def tiny(tmp_path):
    sequences = {1: [1, 2, 3, 4], 2: [2, 5, 3], 3: [1, 2, 3, 4, 5, 6, 7]}
    users = np.concatenate([[u] * len(s) for u, s in sequences.items()])
    items = np.concatenate(list(sequences.values()))
    interactions = Interactions(users=users, items=items, timestamps=np.arange(len(users)))
    path = write_dataset(
        interactions, tmp_path, "tiny", source={"kind": "test"}, min_user_interactions=0, min_item_interactions=0
    )
    return load_sequences(path)


class TableModel:
    """A stand-in for a model whose scores are a fixed (users x item ids) table, scored chunk by chunk."""

    def __init__(self, scores: torch.Tensor):
        self.scores = scores
        self.config = type("Config", (), {"num_items": scores.shape[1] - 1})()

    def score(self, queries, items):
        return self.scores[queries.long().squeeze(1)].gather(1, items)

    def score_shared(self, queries, items):
        return self.scores[queries.long().squeeze(1)][:, items].clone()


@pytest.mark.parametrize("item_chunk", [1, 3, 100])
def test_full_ranking_excludes_the_input_history_and_counts_ties_against_the_target(tiny, item_chunk):
    evaluator = Evaluator(tiny, "evaluation", ("full",), item_chunk=item_chunk)
    assert evaluator.users.tolist() == [1, 2, 3] and evaluator.targets.tolist() == [4, 3, 7]
    batch_rows, items = evaluator.history(np.arange(3))
    assert sorted(items[batch_rows == 0].tolist()) == [1, 2, 3]  # train + validation item
    scores = torch.tensor(
        [
            [0, 9, 9, 9, 5, 6, 0, 0],  # user 1: items 1-3 seen; item 5 beats target 4 -> rank 1
            [0, 1, 9, 7, 7, 9, 0, 0],  # user 2: items 2, 5 seen; item 4 ties target 3 -> rank 1
            [0, 9, 9, 9, 9, 9, 9, 2],  # user 3: everything else seen -> rank 0
        ],
        dtype=torch.float32,
    )
    queries = torch.arange(3, dtype=torch.float32)[:, None]
    scorer = CatalogScorer(TableModel(scores), evaluator.item_chunk)
    ranks, log_partition = scorer.target_ranks(queries, evaluator.targets, evaluator.history(np.arange(3)))
    assert ranks.tolist() == [1, 1, 0]
    torch.testing.assert_close(log_partition, torch.logsumexp(scores[:, 1:], dim=1))


def test_chunked_full_ranking_and_loss_match_one_chunk(tiny):
    from movierec.models.base import ModelConfig
    from movierec.models.sse_pt import SSEPT

    torch.manual_seed(0)
    model = SSEPT(ModelConfig(num_users=tiny.num_users, num_items=tiny.num_items, max_len=5, d_item=8, d_user=4))
    for loss in ("bce", "ce"):
        whole = Evaluator(tiny, "evaluation", ("full", "sampled-uniform-100"), item_chunk=10_000).run(model, loss=loss)
        chunked = Evaluator(tiny, "evaluation", ("full", "sampled-uniform-100"), item_chunk=2).run(model, loss=loss)
        assert whole == pytest.approx(chunked)


def test_max_users_is_a_fixed_sample_and_splits_across_processes_give_the_same_numbers(tmp_path):
    from movierec.data.synthetic import generate_synthetic
    from movierec.models.base import ModelConfig
    from movierec.models.sse_pt import SSEPT

    interactions, _ = generate_synthetic(seed=1, num_users=120, num_items=60, num_clusters=3)
    data = load_sequences(write_dataset(interactions, tmp_path, "syn", source={"kind": "synthetic"}, num_shards=3))
    sample = Evaluator(data, "validation", ("full",), max_users=25, seed=4)
    assert len(sample.users) == 25 and set(sample.users) <= set(Evaluator(data, "validation").users)
    assert sample.users.tolist() == Evaluator(data, "validation", max_users=25, seed=4).users.tolist()
    assert sample.users.tolist() != Evaluator(data, "validation", max_users=25, seed=5).users.tolist()

    torch.manual_seed(0)
    model = SSEPT(ModelConfig(num_users=data.num_users, num_items=data.num_items, max_len=10, d_item=8, d_user=4))
    protocols = ("full", "sampled-uniform-100", "sampled-popularity-100")
    evaluator = Evaluator(data, "evaluation", protocols, batch_size=16)
    one = evaluator.run(model)
    parts = [evaluator.run(model, part=(rank, 3), all_reduce=lambda sums: sums) for rank in range(3)]
    partial_sums = [np.array([p["loss"] * p["users"], p["users"]]) for p in parts]
    assert sum(s[1] for s in partial_sums) == one["users"]
    assert sum(s[0] for s in partial_sums) / one["users"] == pytest.approx(one["loss"])
    # a different batch size scores the same users against the same candidates
    assert Evaluator(data, "evaluation", protocols, batch_size=5).run(model) == pytest.approx(one)


def test_training_batches_pair_each_item_with_the_next_one(tiny):
    batches = TrainBatches(tiny, batch_size=2, max_len=3)
    assert batches.users.tolist() == [1, 3]  # user 2 has a single training item
    batch = batches.make_batch(np.array([1, 3]))
    # user 1 trains on [1, 2]; user 3 on [1..5], of which the last max_len transitions are kept
    np.testing.assert_array_equal(batch.inputs, [[0, 0, 1], [2, 3, 4]])
    np.testing.assert_array_equal(batch.targets, [[0, 0, 2], [3, 4, 5]])
    assert batch.num_tokens == 4


def test_sse_pt_plus_plus_windows_are_contiguous_uniform_and_only_for_long_histories(tiny):
    """train.window_prob: a history longer than max_len + 1 sometimes trains on an older contiguous window,
    drawn uniformly among the older ones; shorter histories always train on their latest items."""
    always = TrainBatches(tiny, batch_size=2, max_len=3, window_prob=1.0)
    batch = always.make_batch(np.array([1, 3]), np.random.default_rng(0))
    # user 3's training items are 1..5: four transitions, one window older than the latest three
    np.testing.assert_array_equal(batch.inputs, [[0, 0, 1], [1, 2, 3]])
    np.testing.assert_array_equal(batch.targets, [[0, 0, 2], [2, 3, 4]])
    never = TrainBatches(tiny, batch_size=2, max_len=3, window_prob=0.0)
    np.testing.assert_array_equal(never.make_batch(np.array([3]), np.random.default_rng(0)).inputs, [[2, 3, 4]])

    history = np.arange(1, 31)  # 28 training items after the validation and test items leave
    users, items = np.ones(len(history), dtype=np.int64), history
    interactions = Interactions(users=users, items=items, timestamps=np.arange(len(users)))
    path = write_dataset(interactions, tiny.path.parent / "long", "long", source={"kind": "test"},
                         min_user_interactions=0, min_item_interactions=0)  # fmt: skip
    long = load_sequences(path)
    half = TrainBatches(long, batch_size=1, max_len=5, window_prob=0.5)
    rng = np.random.default_rng(1)
    first_targets = []
    for _ in range(4000):
        batch = half.make_batch(np.array([1]), rng)
        assert np.all(np.diff(batch.inputs[0]) == 1) and np.all(batch.targets == batch.inputs + 1)
        first_targets.append(int(batch.targets[0, 0]))
    counts = np.bincount(first_targets)
    latest = counts[-1]  # the latest window: targets 24..28 of the 28 training items (ids = positions)
    assert latest == pytest.approx(2000, abs=150)  # 1 - window_prob of the draws
    older = counts[2:-1]  # 22 older windows, each ~2000 / 22 times
    assert len(older) == 22 and older.min() > 50 and older.max() < 140


def test_token_weights_give_every_target_position_the_same_weight(tiny):
    """train.token_weighting scales each batch's mean loss by num_tokens / mean_tokens: the scale averages
    1 over an epoch (the learning rate keeps its meaning) and every position gets weight 1 / mean_tokens."""
    batches = TrainBatches(tiny, batch_size=1, max_len=3)
    epoch = list(batches.epoch(np.random.default_rng(0)))
    assert sorted(b.num_tokens for b in epoch) == [1, 3]  # user 1: 1 target, user 3: 3 (capped at max_len)
    assert batches.mean_tokens == 2.0
    assert sum(b.num_tokens / batches.mean_tokens for b in epoch) == pytest.approx(len(batches))
