"""The pieces of SSE-PT that are easy to get wrong: causality, padding, SSE rates, tied scoring."""

from __future__ import annotations

import math

import pytest
import torch

from movierec.models.base import ModelConfig
from movierec.models.sse_pt import SSEPT, apply_sse


def make_model(kind: str = "sse-pt", **overrides) -> SSEPT:
    torch.manual_seed(0)
    options = {"num_users": 7, "num_items": 30, "kind": kind, "max_len": 8, "d_item": 12, "d_user": 4, "dropout": 0.0}
    options["zero_user_term"] = False  # the user term is then non-zero from the start, which these tests need
    options.update(overrides)
    return SSEPT(ModelConfig(**options)).eval()


@pytest.mark.parametrize("kind", ["sse-pt", "sasrec"])
def test_position_t_never_sees_later_positions(kind):
    model = make_model(kind)
    seqs = torch.tensor([[0, 0, 3, 5, 7, 9, 11, 13]])
    users = torch.tensor([2])
    base = model(seqs, model.user_vectors(users))
    changed = seqs.clone()
    changed[0, 5:] = torch.tensor([20, 21, 22])
    after = model(changed, model.user_vectors(users))
    torch.testing.assert_close(base[0, :5], after[0, :5])
    assert not torch.allclose(base[0, 5:], after[0, 5:])


def test_training_path_with_dropout_is_causal_too():
    model = make_model(dropout=0.3).train()
    seqs = torch.tensor([[0, 0, 3, 5, 7, 9, 11, 13]])
    changed = seqs.clone()
    changed[0, 6:] = torch.tensor([21, 22])
    users = torch.tensor([2])
    torch.manual_seed(5)  # the same dropout masks for both calls
    base = model(seqs, model.user_vectors(users))
    torch.manual_seed(5)
    after = model(changed, model.user_vectors(users))
    torch.testing.assert_close(base[0, :6], after[0, :6])
    assert not torch.allclose(base[0, 6:], after[0, 6:])


@pytest.mark.parametrize("kind", ["sse-pt", "sasrec"])
def test_padding_never_changes_non_padding_outputs(kind):
    model = make_model(kind)
    users = torch.tensor([3])
    short = torch.tensor([[4, 8, 15]])  # dynamic padding: width 3
    padded = torch.tensor([[0, 0, 0, 0, 0, 4, 8, 15]])  # full width, left padding
    out_short = model(short, model.user_vectors(users))
    out_padded = model(padded, model.user_vectors(users))
    torch.testing.assert_close(out_short[0], out_padded[0, -3:], atol=1e-5, rtol=1e-5)
    # padding rows are zeroed before the final LayerNorm, so they carry no information about the items
    other = torch.tensor([[0, 0, 0, 0, 0, 16, 23, 29]])
    out_other = model(other, model.user_vectors(users))
    torch.testing.assert_close(out_padded[0, :5], out_other[0, :5])


def test_batch_rows_are_independent():
    model = make_model()
    seqs = torch.tensor([[0, 0, 3, 5], [1, 2, 3, 4]])
    users = torch.tensor([1, 2])
    together = model(seqs, model.user_vectors(users))
    alone = model(seqs[:1], model.user_vectors(users[:1]))
    torch.testing.assert_close(together[:1], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["sse-pt", "sasrec"])
def test_last_only_computes_the_last_position_exactly(kind):
    model = make_model(kind, num_heads=2)
    seqs = torch.tensor([[0, 0, 3, 5, 7], [1, 2, 3, 4, 6], [0, 0, 0, 0, 9]])
    users = torch.tensor([1, 2, 3])
    torch.testing.assert_close(model.queries(seqs, users, last_only=True), model.queries(seqs, users)[:, -1],
                               atol=1e-5, rtol=1e-5)  # fmt: skip


def test_input_is_scaled_concatenation_of_item_and_user_embeddings():
    model = make_model()
    assert model.config.d_model == 16
    users = torch.tensor([5])
    torch.testing.assert_close(model.user_vectors(users), model.user_emb.weight[5:6] * math.sqrt(4))
    assert torch.all(model.item_emb.weight[0] == 0)  # row 0 is padding


def scored_candidates(model: SSEPT) -> tuple[torch.Tensor, ...]:
    """Two sequences' inputs and last-position outputs, and the logits of three candidates each:
    (sequences, users, user vectors, hidden states, queries, candidates, logits)."""
    seqs, users = torch.tensor([[0, 3, 4, 5, 6, 7, 8, 9], [1, 2, 3, 4, 5, 6, 7, 8]]), torch.tensor([1, 6])
    user_vecs = model.user_vectors(users)
    hidden = model(seqs, user_vecs)[:, -1]
    queries = model.queries(seqs, users, last_only=True)
    items = torch.tensor([[3, 9, 29], [1, 2, 30]])
    return seqs, users, user_vecs, hidden, queries, items, model.score(queries, items)


def test_scores_are_tied_to_the_input_tables():
    """logit(j) = h · [item_emb(j) ; user vector], whichever way the candidates are given."""
    model = make_model()
    seqs, users, user_vecs, hidden, queries, items, scores = scored_candidates(model)
    for row in range(2):
        for col in range(3):
            out_emb = torch.cat([model.item_emb.weight[items[row, col]], user_vecs[row]])
            torch.testing.assert_close(scores[row, col], hidden[row] @ out_emb, atol=1e-5, rtol=1e-5)
    every = model.next_item_scores(seqs, users)
    assert torch.all(every[:, 0] == float("-inf"))
    torch.testing.assert_close(every.gather(1, items), scores)
    torch.testing.assert_close(model.score_shared(queries, slice(3, 10)), every[:, 3:10])
    torch.testing.assert_close(model.score_shared(queries, torch.tensor([9, 3])), every[:, [9, 3]])


@pytest.mark.parametrize("kind", ["sse-pt", "sasrec"])
def test_cosine_logits_are_cosines_of_each_half(kind):
    """model.cosine: logit(j) = cos(h_i, item_emb(j)) + cos(h_u, u) (SASRec: the first term alone), whichever
    way the candidates are given; and still affine in the query, which the approximate index relies on."""
    from movierec.models.catalog import affine_item_table

    model = make_model(kind, cosine=True)
    seqs, users, user_vecs, hidden, queries, items, scores = scored_candidates(model)
    d_i, cos = model.config.d_item, torch.nn.functional.cosine_similarity
    for row in range(2):
        for col in range(3):
            expected = cos(hidden[row, :d_i], model.item_emb.weight[items[row, col]], dim=0)
            if kind == "sse-pt":
                expected = expected + cos(hidden[row, d_i:], user_vecs[row], dim=0)
            torch.testing.assert_close(scores[row, col], expected, atol=1e-5, rtol=1e-5)
    every = model.next_item_scores(seqs, users)
    torch.testing.assert_close(every.gather(1, items), scores)
    torch.testing.assert_close(model.score_shared(queries, slice(3, 10)), every[:, 3:10])
    assert every[:, 1:].abs().max() <= (2 if kind == "sse-pt" else 1) + 1e-5
    table = affine_item_table(model)
    augmented = torch.cat([queries, torch.ones(2, 1)], 1)
    torch.testing.assert_close(augmented @ torch.from_numpy(table).t(), every[:, 1:], atol=1e-5, rtol=1e-5)


def test_cosine_is_an_option_of_sasrec_and_sse_pt_only():
    from movierec.errors import ConfigError
    from movierec.training.config import load_config

    assert load_config(None, ["model.kind=sasrec", "model.cosine=true"]).model.cosine
    for kind in ("bert4rec", "hstu"):  # HSTU always scores by cosine; BERT4Rec has its item bias
        with pytest.raises(ConfigError, match=rf"model\.cosine does not apply to model\.kind {kind}"):
            load_config(None, [f"model.kind={kind}", "model.cosine=true"])


def test_the_user_term_starts_at_zero_unless_the_paper_init_is_asked_for():
    """model.zero_user_term: the user half of the output (a bias shared by every item at a position) starts
    at 0, so the first BCE loss is 2 log 2 like SASRec's; with the official init it starts positive."""
    seqs, users = torch.randint(1, 31, (16, 8)), torch.randint(1, 8, (16,))
    for zero, expected in ((True, lambda t: torch.all(t == 0)), (False, lambda t: t.mean() > 0.1)):
        model = make_model(d_user=12, zero_user_term=zero)
        user_term = model.queries(seqs, users)[..., model.config.d_item :]
        assert expected(user_term), (zero, user_term.mean())
    model = make_model(d_user=12, zero_user_term=True).train()
    with torch.no_grad():
        model.final_norm.weight.add_(0.5)  # training moves it: the user term is learnt like any weight
    assert model.queries(seqs, users)[..., model.config.d_item :].abs().sum() > 0


def test_a_person_without_an_embedding_gets_the_mean_user_vector():
    model = make_model()
    seqs = torch.tensor([[0, 0, 3, 5, 7, 9, 11, 13]] * 2)
    mean = model.user_emb.weight[1:].mean(0) * math.sqrt(4)
    new_person = model.queries(seqs, torch.tensor([0, 3]), last_only=True)[0]
    expected = model(seqs[:1], mean.unsqueeze(0))[0, -1]
    torch.testing.assert_close(new_person[:12], expected[:12])
    torch.testing.assert_close(new_person[12], expected[12:] @ mean)
    with torch.no_grad():
        model.user_emb.weight[1:] += 1.0  # the cached mean follows the weights
    assert not torch.allclose(model.queries(seqs, torch.tensor([0, 3]), last_only=True)[0], new_person)


def test_sasrec_has_no_user_embedding_and_no_user_sse():
    model = make_model("sasrec", d_item=16)
    assert model.user_emb is None and model.user_vectors(torch.tensor([1])) is None
    assert model.config.keep_user == 1.0 and model.config.d_model == 16


def test_sse_replacement_rates():
    config = ModelConfig(num_users=1000, num_items=1000, keep_user=0.08, keep_item=0.9)
    gen = torch.Generator().manual_seed(0)
    users = torch.full((20000,), 7)
    items = torch.randint(1, 1001, (400, 101), generator=gen)
    items[:, :30] = 0  # left padding
    inputs, targets = items[:, :-1], items[:, 1:].clone()
    new_users, new_inputs, new_targets = apply_sse(users, inputs, targets, config, gen)
    user_rate = (new_users != users).float().mean().item()
    assert abs(user_rate - 0.92 * 999 / 1000) < 0.01
    real = inputs != 0
    input_rate = (new_inputs != inputs)[real].float().mean().item()
    assert abs(input_rate - 0.1 * 999 / 1000) < 0.01
    # a target is replaced with its own position, or with the next position's input (official sampler)
    target_rate = (new_targets != targets)[real].float().mean().item()
    assert abs(target_rate - (1 - 0.9**2) * 999 / 1000) < 0.01
    assert torch.all(new_inputs[~real] == 0) and torch.all(new_targets[targets == 0] == 0)  # padding stays
    # where position t was not drawn (its input kept), its target is the possibly replaced input at t + 1
    undrawn = real[:, :-1] & (new_inputs[:, :-1] == inputs[:, :-1])
    consistent = (new_targets[:, :-1] == new_inputs[:, 1:])[undrawn].float().mean().item()
    assert consistent > 0.998  # a drawn position keeps its input only if the random item equals it
    assert new_users.min() >= 1 and new_users.max() <= 1000


def test_config_rejects_inconsistent_shapes():
    with pytest.raises(ValueError, match="divisible"):
        ModelConfig(num_users=2, num_items=2, d_item=10, d_user=3, num_heads=2)
    with pytest.raises(ValueError, match="d_user"):
        ModelConfig(num_users=2, num_items=2, d_user=0)


def make_bert4rec(**overrides):
    from movierec.models.base import build_model

    torch.manual_seed(0)
    options = {"kind": "bert4rec", "num_users": 3, "num_items": 30, "max_len": 8, "d_item": 16, "num_heads": 2}
    return build_model(ModelConfig(**{**options, **overrides})).eval()


def test_bert4rec_attends_both_ways_and_ignores_padding():
    model = make_bert4rec()
    seqs = torch.tensor([[0, 0, 3, 5, 7, 9, 11, 13]])
    users = torch.tensor([1])
    base = model.queries(seqs, users)
    later = seqs.clone()
    later[0, 6:] = torch.tensor([20, 21])
    assert not torch.allclose(model.queries(later, users)[0, 3], base[0, 3])  # position 3 sees the future
    unpadded = model.queries(seqs[:, 2:], users)
    torch.testing.assert_close(unpadded[0, -1], base[0, -1], atol=1e-5, rtol=1e-5)


def test_bert4rec_without_head_transform_scores_states_against_the_item_table():
    with_transform, plain = make_bert4rec(), make_bert4rec(head_transform=False)
    assert {"head.weight", "head_norm.weight", "item_bias"} <= set(with_transform.state_dict())
    assert not any(name.startswith(("head", "item_bias")) for name in plain.state_dict())
    seqs, users = torch.tensor([[0, 0, 3, 5, 7, 9, 11, 13]]), torch.tensor([1])
    states = plain.queries(seqs, users, last_only=True)
    torch.testing.assert_close(plain.score_shared(states, slice(1, 31)), states @ plain.item_emb.weight[1:31].t())
    items = torch.tensor([[2, 4, 6]])
    torch.testing.assert_close(plain.score(states, items), (states.unsqueeze(1) * plain.item_emb(items)).sum(-1))


def test_bert4rec_cloze_batch_and_the_appended_mask():
    model = make_bert4rec(mask_prob=0.3, max_len=50)
    torch.manual_seed(1)
    inputs = torch.randint(1, 31, (400, 50))
    inputs[:5, :10] = 0  # some left padding
    targets = torch.cat([inputs[:, 1:], torch.randint(1, 31, (400, 1))], dim=1)
    _, cloze, hidden = model.training_batch(torch.ones(400, dtype=torch.long), inputs, targets)
    masked = cloze == model.mask_id
    window = torch.cat([inputs[:, 1:], targets[:, -1:]], dim=1)
    assert torch.equal(hidden[masked], window[masked]) and torch.all(hidden[~masked] == 0)
    assert torch.all(masked[:, -1]) and not torch.any(masked & (window == 0))
    assert abs(masked[:, :-1].float().mean().item() - 0.3) < 0.02
    # inference: a full window drops its oldest item to make room for the [mask]
    full = torch.randint(1, 31, (2, 50))
    expected = model._encode(torch.cat([full[:, 1:], torch.full((2, 1), model.mask_id)], dim=1))[:, -1]
    torch.testing.assert_close(model.queries(full, torch.tensor([1, 2]), last_only=True), expected)
    scores = model.next_item_scores(full, torch.tensor([0, 0]))
    assert scores.shape == (2, 31) and torch.all(scores[:, 0] == float("-inf"))  # the [mask] is never scored


def test_bert4rec_without_mask_last_masks_the_last_item_like_the_others():
    model = make_bert4rec(mask_prob=0.3, max_len=50, mask_last=False)
    torch.manual_seed(1)
    inputs = torch.randint(1, 31, (2000, 50))
    targets = torch.cat([inputs[:, 1:], torch.randint(1, 31, (2000, 1))], dim=1)
    _, cloze, _ = model.training_batch(torch.ones(2000, dtype=torch.long), inputs, targets)
    masked = cloze == model.mask_id
    assert abs(masked[:, -1].float().mean().item() - 0.3) < 0.04
    assert abs(masked.float().mean().item() - 0.3) < 0.01


def test_bert4rec_batch_that_draws_no_mask_still_has_a_target():
    """With mask_last off a short batch can draw no item at all; its loss would be the mean of nothing (NaN)."""
    model = make_bert4rec(mask_prob=1e-9, max_len=8, mask_last=False)
    inputs = torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4], [0, 0, 0, 0, 0, 0, 5, 6]])
    targets = torch.tensor([[0, 0, 0, 1, 2, 3, 4, 7], [0, 0, 0, 0, 0, 5, 6, 8]])
    _, cloze, cloze_targets = model.training_batch(torch.tensor([1, 2]), inputs, targets)
    assert cloze[:, -1].tolist() == [model.mask_id, model.mask_id]
    assert cloze_targets[:, -1].tolist() == [7, 8]
    assert (cloze_targets[:, :-1] == 0).all()
