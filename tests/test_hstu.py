"""HSTU: one block against a hand-written reference of the paper's equations, causality, cosine scoring, the
temperature softmax against its formula, and the options it refuses."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from movierec.errors import ConfigError
from movierec.models.base import ModelConfig, build_model
from movierec.models.hstu import HSTUBlock, time_gap_buckets
from movierec.training.config import load_config
from movierec.training.losses import sampled_softmax_loss


def reference_block(
    block: HSTUBlock, x: torch.Tensor, lengths: list[int], times: list[list[int]] | None = None
) -> torch.Tensor:
    """The block written out position by position, head by head, for left-padded rows of the given lengths;
    with `times`, plus the time bias of bucket floor(2 log2(1 + t_i - t_j))."""
    batch, length, d = x.shape
    w = block.uvqk.weight.t()  # (d, 4d): U, V, Q, K
    h, hd = block.heads, block.head_dim
    out = x.clone()
    for b in range(batch):
        first = length - lengths[b]
        for i in range(first, length):

            def project(t):
                return F.silu(F.layer_norm(t, (d,), eps=1e-6) @ w)

            ui, _, qi, _ = project(x[b, i]).split(d)
            attended = torch.zeros(d)
            for head in range(h):
                sl = slice(head * hd, (head + 1) * hd)
                for j in range(first, i + 1):
                    _, vj, _, kj = project(x[b, j]).split(d)
                    bias = block.relative_bias[i - j]
                    if times is not None:
                        bias = bias + block.time_bias[min(63, math.floor(2 * math.log2(1 + times[b][i] - times[b][j])))]
                    a = F.silu(qi[sl] @ kj[sl] + bias) / block.max_len
                    attended[sl] += a * vj[sl]
            mixed = F.layer_norm(attended, (d,), eps=1e-6) * ui
            out[b, i] = x[b, i] + block.out(mixed)
    return out


def causal_mask(lengths: list[int], width: int) -> torch.Tensor:
    """(B, width, width) 1 where query i may read key j: causal, within each left-padded row's last items."""
    allowed = torch.zeros(len(lengths), width, width)
    for b, n in enumerate(lengths):
        for i in range(width - n, width):
            allowed[b, i, width - n : i + 1] = 1
    return allowed


def test_an_hstu_block_computes_the_papers_equations():
    torch.manual_seed(0)
    block = HSTUBlock(d=6, heads=2, dropout=0.0, max_len=8).eval()
    with torch.no_grad():
        block.relative_bias.normal_(std=0.5)
    lengths = [5, 2]
    x = torch.randn(2, 5, 6)
    allowed = causal_mask(lengths, 5)
    got = block(x, allowed)
    expected = reference_block(block, x, lengths)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(got[b, 5 - n :], expected[b, 5 - n :], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(block(x, allowed, last_only=True)[:, 0], got[:, -1], rtol=1e-5, atol=1e-6)


def test_the_time_bias_adds_a_bias_per_log_bucket_of_the_gap():
    torch.manual_seed(0)
    block = HSTUBlock(d=6, heads=2, dropout=0.0, max_len=8, time_bias=True).eval()
    with torch.no_grad():
        block.relative_bias.normal_(std=0.5)
        block.time_bias.normal_(std=1.0)
    times = [[0, 100, 101, 5000, 90000], [0, 0, 0, 7, 7 + 86400 * 400]]  # row 1: 2 items (left padding)
    lengths = [5, 2]
    x = torch.randn(2, 5, 6)
    allowed = causal_mask(lengths, 5)
    gaps = time_gap_buckets(torch.tensor(times))
    assert gaps[0, 4].tolist() == [32, 32, 32, 32, 0]  # 90,000 s, ..., 84,999 s, 0 s: floor(2 log2(1 + gap))
    assert gaps[0, 2, :3].tolist() == [13, 2, 0]  # 101 s, 1 s, 0 s
    got = block(x, allowed, gaps=gaps)
    expected = reference_block(block, x, lengths, times)
    for b, n in enumerate(lengths):
        torch.testing.assert_close(got[b, 5 - n :], expected[b, 5 - n :], rtol=1e-5, atol=1e-6)
    without = block(x, allowed)
    assert not torch.allclose(got[0, 1:], without[0, 1:])


def test_a_query_never_sees_the_time_of_the_item_it_predicts():
    """Query i predicts item i + 1: the times of items i + 1, ... (the target's included) never change it; the
    times of items 0..i do. Without times (a served history) the time bias is left out."""
    model = hstu(time_bias=True)
    with torch.no_grad():
        for block in model.blocks:
            block.time_bias.normal_(std=1.0)
    sequences = torch.tensor([[0, 0, 3, 7, 9, 4, 2, 11]])
    times = torch.tensor([[0, 0, 10, 500, 90000, 90060, 10**6, 10**7]])
    later = times.clone()
    later[0, -1] = 10**8  # the time of the last position: the target of query 6
    earlier = times.clone()
    earlier[0, 3] = 20  # the time of position 3
    with torch.no_grad():
        base, moved_late, moved_early = (
            model.queries(sequences, torch.zeros(1), times=t) for t in (times, later, earlier)
        )
        untimed = model.queries(sequences, torch.zeros(1))
        plain = hstu().queries(sequences, torch.zeros(1))
    torch.testing.assert_close(base[:, :-1], moved_late[:, :-1], rtol=0, atol=1e-6)
    torch.testing.assert_close(base[:, :3], moved_early[:, :3], rtol=0, atol=1e-6)
    assert not torch.allclose(base[:, 3], moved_early[:, 3])
    torch.testing.assert_close(untimed, plain)  # same seed, same weights but the (unused) time bias
    last = model.queries(sequences, torch.zeros(1), last_only=True, times=times)
    torch.testing.assert_close(last, base[:, -1], rtol=1e-5, atol=1e-6)
    assert model.uses_times and not hstu().uses_times


def test_the_time_bias_trains_on_timestamped_data_and_is_refused_without(trained_run, tmp_path):
    import json
    import shutil

    from movierec.data.layout import load_sequences
    from movierec.models.checkpoint import load_checkpoint
    from movierec.serving.recommender import Recommender
    from movierec.training.run import train

    overrides = ["model.kind=hstu", "model.time_bias=true", "model.max_len=20", "model.d_item=16",
                 "model.num_heads=2", "train.loss=sampled-softmax", "train.temperature=0.05",
                 "train.num_negatives=32", "train.batch_size=64", "train.epochs=2", "tracking.log_model=false",
                 "tracking.system_metrics=false", "eval.ks=[10]", "eval.protocol=full"]  # fmt: skip
    config = load_config(None, overrides)
    config.data.path, config.run_dir = str(trained_run.data_dir), str(tmp_path / "run")
    config.tracking.uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = train(config)
    assert 0 < result.test_metrics["test_full/ndcg@10"] <= 1
    state = load_checkpoint(tmp_path / "run" / "best.ckpt").model
    assert any(state[f"blocks.{b}.time_bias"].abs().max() > 0 for b in range(2))  # it learned from the gaps
    data = load_sequences(trained_run.data_dir)
    assert data.train_times is not None and data.valid_time[data.users].min() > 0

    # serving a known user reads their timestamps too: the top 5 is the model's own, with times, seen items out
    recommender = Recommender.from_checkpoint(load_checkpoint(tmp_path / "run" / "best.ckpt"))
    user = 7
    _, items = recommender.histories.gather(np.array([user]))
    times = recommender.history_times.gather(np.array([user]))[1]
    assert len(times) == len(items) and np.all(np.diff(times) >= 0)
    window = slice(-config.model.max_len, None)
    with torch.no_grad():
        query = recommender.model.queries(torch.from_numpy(items[window])[None], torch.tensor([user]), last_only=True,
                                          times=torch.from_numpy(times[window])[None])  # fmt: skip
        scores = recommender.model.score_shared(query, slice(0, data.num_items + 1))[0]
    scores[0], scores[torch.from_numpy(items)] = -math.inf, -math.inf
    best = scores.topk(5)
    expected = recommender.item_movie_ids[best.indices.numpy() - 1].tolist()
    with torch.no_grad():
        untimed = recommender.model.queries(torch.from_numpy(items[window])[None], torch.tensor([user]), last_only=True)
        untimed_scores = recommender.model.score(untimed, best.indices[None])[0]
    assert not torch.allclose(untimed_scores, best.values, rtol=0, atol=1e-6)  # the times do change the scores
    user_id = int(recommender.user_ids[user - 1])
    for batching in (False, True):
        if batching:
            recommender.enable_batching(window_s=0.01)
        got = recommender.recommend_user(user_id, k=5)
        assert [r.movie_id for r in got] == expected
        np.testing.assert_allclose([r.score for r in got], best.values.numpy(), rtol=0, atol=1e-5)

    untimed = tmp_path / "untimed"  # the same shards, as SASRec's text format would give: times are line numbers
    shutil.copytree(trained_run.data_dir, untimed)
    meta = json.loads((untimed / "meta.json").read_text())
    meta["source"]["kind"] = "sasrec-text"
    (untimed / "meta.json").write_text(json.dumps(meta))
    assert load_sequences(untimed).train_times is None
    config.data.path, config.run_dir = str(untimed), str(tmp_path / "run-untimed")
    with pytest.raises(ConfigError, match=r"reads timestamps \(model\.time_bias\).*has none"):
        train(config)
    with pytest.raises(ConfigError, match=r"model\.time_bias does not apply to model\.kind sse-pt"):
        load_config(None, ["model.time_bias=true"])


def hstu(**overrides) -> torch.nn.Module:
    values = {"kind": "hstu", "num_users": 5, "num_items": 30, "max_len": 8, "d_item": 8, "num_blocks": 2,
              "num_heads": 2, "dropout": 0.0, **overrides}  # fmt: skip
    torch.manual_seed(1)
    return build_model(ModelConfig(**values)).eval()


def test_a_later_item_never_changes_an_earlier_query():
    model = hstu()
    sequences = torch.tensor([[0, 0, 3, 7, 9, 4, 2, 11]])
    changed = sequences.clone()
    changed[0, -1] = 29
    with torch.no_grad():
        a, b = model.queries(sequences, torch.zeros(1)), model.queries(changed, torch.zeros(1))
    torch.testing.assert_close(a[:, :-1], b[:, :-1], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, -1], b[:, -1])


def test_outputs_and_items_are_unit_length_and_scores_are_cosines():
    model = hstu()
    with torch.no_grad():
        queries = model.queries(torch.tensor([[0, 1, 2, 3], [5, 6, 7, 8]]), torch.zeros(2), last_only=True)
        assert torch.allclose(queries.norm(dim=-1), torch.ones(2), atol=1e-5)
        scores = model.score_shared(queries, slice(1, 31))
        table = F.normalize(model.item_emb.weight[1:31], dim=-1)
        torch.testing.assert_close(scores, queries @ table.t())
        assert scores.abs().max() <= 1 + 1e-5
        dynamic = model.queries(torch.tensor([[1, 2, 3]]), torch.zeros(1), last_only=True)
        padded = model.queries(torch.tensor([[0, 0, 1, 2, 3]]), torch.zeros(1), last_only=True)
        torch.testing.assert_close(dynamic, padded, rtol=1e-5, atol=1e-6)  # padding width does not matter


def test_the_temperature_softmax_is_the_formula():
    model = hstu()
    torch.manual_seed(2)
    queries = F.normalize(torch.randn(2, 3, 8), dim=-1)
    targets = torch.tensor([[0, 4, 5], [6, 7, 8]])
    negatives = torch.tensor([1, 2, 5, 9])
    loss = sampled_softmax_loss(model, queries, targets, negatives, temperature=0.05)
    table = F.normalize(model.item_emb.weight, dim=-1)
    terms = []
    for q, t in zip(queries[targets != 0], targets[targets != 0], strict=True):
        logits = torch.cat([(q @ table[t]).view(1), q @ table[negatives].t()]) / 0.05
        logits[1:][negatives == t] = -math.inf  # a negative that is the target does not compete
        terms.append(-(logits[0] - torch.logsumexp(logits, 0)))
    torch.testing.assert_close(loss, torch.stack(terms).mean())


def test_options_hstu_does_not_use_are_errors():
    for option in ("model.d_user=50", "model.keep_item=0.5", "model.mask_prob=0.3", "model.zero_user_term=false"):
        with pytest.raises(ConfigError, match=r"does not apply to model\.kind hstu"):
            load_config(None, ["model.kind=hstu", option])
    with pytest.raises(ConfigError, match=r"does not apply to model\.kind sse-pt"):
        load_config(None, ["model.mask_prob=0.3"])
    with pytest.raises(ConfigError, match=r"model\.d_user does not apply to model\.kind bert4rec"):
        load_config(None, ["model.kind=bert4rec", "model.d_user=50"])
    with pytest.raises(ConfigError, match=r"train\.temperature must be in"):
        load_config(None, ["train.temperature=0"])


def test_a_recipe_for_another_kind_is_ablated_by_naming_the_kind(tmp_path):
    """`--config ml-1m-sse-pt.yaml model.kind=sasrec` is the paper's ablation: the file's SSE-PT-only options
    go back to their defaults (what SASRec forces); the same options given on the command line are still errors."""
    recipe = tmp_path / "sse-pt.yaml"
    recipe.write_text("model: {kind: sse-pt, d_item: 40, d_user: 24, keep_user: 0.5}\n")
    ablation = load_config(recipe, ["model.kind=sasrec"])
    assert (ablation.model.kind, ablation.model.d_item) == ("sasrec", 40)
    assert ablation.model == load_config(None, ["model.kind=sasrec", "model.d_item=40"]).model  # nothing of SSE-PT left
    with pytest.raises(ConfigError, match=r"model\.d_user does not apply to model\.kind sasrec"):
        load_config(recipe, ["model.kind=sasrec", "model.d_user=8"])
    (tmp_path / "sasrec.yaml").write_text("model: {kind: sasrec, d_user: 24}\n")
    with pytest.raises(ConfigError, match=r"model\.d_user does not apply to model\.kind sasrec"):
        load_config(tmp_path / "sasrec.yaml")
