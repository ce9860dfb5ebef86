"""The training objectives against their definitions, written out by hand on a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from movierec.models.base import ModelConfig, build_model
from movierec.training.config import load_config
from movierec.training.losses import (
    bce_loss,
    build_objective,
    full_softmax_loss,
    gbce_loss,
    popularity_log_q,
    sampled_softmax_loss,
)


@pytest.fixture
def setup():
    torch.manual_seed(0)
    config = ModelConfig(num_users=4, num_items=12, max_len=5, d_item=8, d_user=4, dropout=0.0)
    model = build_model(config).eval()
    inputs = torch.tensor([[0, 0, 3, 4, 5], [1, 2, 3, 4, 6]])
    targets = torch.tensor([[0, 0, 4, 5, 9], [2, 3, 4, 6, 7]])
    users = torch.tensor([1, 3])
    return model, model.queries(inputs, users), inputs, targets, users


def logit(model, queries, row, col, item) -> torch.Tensor:
    return model.score(queries[row, col], torch.tensor([item]))[0]


def test_bce_is_the_mean_over_target_positions(setup):
    model, queries, _, targets, _ = setup
    negatives = torch.tensor([[1, 1, 7, 8, 10], [11, 12, 1, 2, 3]])
    expected = []
    for row, col in zip(*torch.nonzero(targets, as_tuple=True), strict=True):
        pos = logit(model, queries, row, col, int(targets[row, col]))
        neg = logit(model, queries, row, col, int(negatives[row, col]))
        expected.append(-F.logsigmoid(pos) - F.logsigmoid(-neg))
    torch.testing.assert_close(bce_loss(model, queries, targets, negatives), torch.stack(expected).mean())


def test_sampled_softmax_with_log_q_and_the_target_among_the_negatives(setup):
    model, queries, _, targets, _ = setup
    negatives = torch.tensor([4, 10, 11])  # item 4 is also a target: it must not count against itself
    log_q = torch.log(torch.linspace(0.01, 0.2, 13))
    rows = []
    for row, col in zip(*torch.nonzero(targets, as_tuple=True), strict=True):
        target = int(targets[row, col])
        pos = logit(model, queries, row, col, target) - log_q[target]
        negs = [logit(model, queries, row, col, int(n)) - log_q[n] for n in negatives if int(n) != target]
        rows.append(-F.log_softmax(torch.stack([pos, *negs]), dim=0)[0])
    got = sampled_softmax_loss(model, queries, targets, negatives, log_q)
    torch.testing.assert_close(got, torch.stack(rows).mean())


def test_sampled_softmax_with_negatives_per_sequence(setup):
    """`train.negatives_per: sequence`: row b's positions compete with row b's negatives only."""
    model, queries, _, targets, _ = setup
    negatives = torch.tensor([[4, 10, 11], [1, 6, 12]])  # 4 and 6 are targets of their own rows
    log_q = torch.log(torch.linspace(0.01, 0.2, 13))
    rows = []
    for row, col in zip(*torch.nonzero(targets, as_tuple=True), strict=True):
        target = int(targets[row, col])
        pos = logit(model, queries, row, col, target) - log_q[target]
        negs = [logit(model, queries, row, col, int(n)) - log_q[n] for n in negatives[row] if int(n) != target]
        rows.append(-F.log_softmax(torch.stack([pos, *negs]), dim=0)[0])
    got = sampled_softmax_loss(model, queries, targets, negatives, log_q)
    torch.testing.assert_close(got, torch.stack(rows).mean())


def test_full_softmax_is_cross_entropy_over_every_item(setup):
    model, queries, _, targets, _ = setup
    rows = []
    for row, col in zip(*torch.nonzero(targets, as_tuple=True), strict=True):
        logits = torch.stack([logit(model, queries, row, col, item) for item in range(1, 13)])
        rows.append(-F.log_softmax(logits, dim=0)[int(targets[row, col]) - 1])
    torch.testing.assert_close(full_softmax_loss(model, queries, targets), torch.stack(rows).mean())


def test_gbce_weights_the_positive_by_beta_and_sums_the_shared_negatives(setup):
    model, queries, _, targets, _ = setup
    negatives = torch.tensor([[7, 8, 10], [11, 12, 1]])  # per sequence, shared by its positions
    beta = 0.4
    rows = []
    for row, col in zip(*torch.nonzero(targets, as_tuple=True), strict=True):
        pos = logit(model, queries, row, col, int(targets[row, col]))
        negs = torch.stack([logit(model, queries, row, col, int(n)) for n in negatives[row]])
        rows.append(-beta * F.logsigmoid(pos) - F.logsigmoid(-negs).sum())
    torch.testing.assert_close(gbce_loss(model, queries, targets, negatives, beta), torch.stack(rows).mean())


@pytest.mark.parametrize("kind", ["bce", "gbce", "sampled-softmax", "ce"])
def test_each_objective_draws_its_negatives_and_takes_the_models_queries(setup, tmp_path, kind):
    from data_builders import ratings

    from movierec.data.layout import load_sequences
    from movierec.data.negatives import SeenItems
    from movierec.data.split import Interactions, write_dataset

    model, queries, inputs, targets, users = setup
    rows = ratings(num_users=4, per_user=8, num_items=12)
    path = write_dataset(Interactions(users=rows[:, 0], items=rows[:, 1], timestamps=rows[:, 3]), tmp_path, "t",
                         source={}, min_user_interactions=0, min_item_interactions=0)  # fmt: skip
    data = load_sequences(path)
    train = load_config(None, [f"train.loss={kind}", "train.num_negatives=3", "train.gbce_t=0.5"]).train
    objective = build_objective(model, train, data, SeenItems.from_data(data))
    negatives = objective.negatives(np.random.default_rng(0), users.numpy(), targets.numpy())
    expected_shape = {"bce": targets.shape, "gbce": (2, 3), "sampled-softmax": (3,), "ce": (0,)}[kind]
    assert negatives.shape == tuple(expected_shape)
    if kind in ("bce", "gbce"):  # never an item the user has seen
        for row, user in enumerate(users.tolist()):
            seen = set(data.train_sequence(user).tolist())
            assert not seen & set(negatives[row].ravel().tolist())
    negatives_t = torch.from_numpy(negatives)
    expected = {
        "bce": lambda: bce_loss(model, queries, targets, negatives_t),
        "gbce": lambda: gbce_loss(model, queries, targets, negatives_t, objective.beta),
        "sampled-softmax": lambda: sampled_softmax_loss(model, queries, targets, negatives_t),
        "ce": lambda: full_softmax_loss(model, queries, targets),
    }[kind]()
    torch.testing.assert_close(objective(users, inputs, targets, negatives_t), expected)
    assert objective.validation_loss == ("ce" if kind in ("ce", "sampled-softmax") else "bce")
    if kind == "gbce":  # alpha = 3 / 11 sampled of the other items, t = 0.5
        alpha = 3 / 11
        assert objective.beta == pytest.approx(alpha * (0.5 * (1 - 1 / alpha) + 1 / alpha))


def test_start_loss_trains_the_first_steps_then_switches(setup, tmp_path):
    from data_builders import ratings

    from movierec.data.layout import load_sequences
    from movierec.data.negatives import SeenItems
    from movierec.data.split import Interactions, write_dataset

    model, queries, inputs, targets, users = setup
    rows = ratings(num_users=4, per_user=8, num_items=12)
    path = write_dataset(Interactions(users=rows[:, 0], items=rows[:, 1], timestamps=rows[:, 3]), tmp_path, "t",
                         source={}, min_user_interactions=0, min_item_interactions=0)  # fmt: skip
    data = load_sequences(path)
    overrides = ["train.start_loss=bce", "train.start_loss_steps=3", "train.loss=gbce", "train.num_negatives=3"]
    objective = build_objective(model, load_config(None, overrides).train, data, SeenItems.from_data(data))
    rng = np.random.default_rng(0)
    for step, shape, loss in [(0, targets.shape, "bce"), (2, targets.shape, "bce"), (3, (2, 3), "gbce")]:
        negatives = torch.from_numpy(objective.negatives(rng, users.numpy(), targets.numpy(), step))
        assert negatives.shape == tuple(shape)
        expected = (
            bce_loss(model, queries, targets, negatives)
            if loss == "bce"
            else gbce_loss(model, queries, targets, negatives, objective.then.beta)
        )
        torch.testing.assert_close(objective(users, inputs, targets, negatives, step), expected)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.start_loss=hinge", "train.start_loss_steps=3"], "train.start_loss must be one of"),
        (["train.start_loss=bce"], "train.start_loss_steps > 0"),
        (["train.start_loss=ce", "train.start_loss_steps=3", "train.optimizer=sparse-adam"], "sparse-adam"),
    ],
)
def test_a_bad_start_loss_is_a_config_error(overrides, message):
    from movierec.training.config import ConfigError, validate

    with pytest.raises(ConfigError, match=message):
        validate(load_config(None, overrides))


def test_popularity_log_q_is_a_distribution_with_padding_never_drawn():
    log_q = popularity_log_q(np.array([5, 0, 3, 9]))
    assert log_q[0] == -np.inf
    np.testing.assert_allclose(np.exp(log_q[1:]).sum(), 1.0)
    np.testing.assert_allclose(np.exp(log_q[1:]), np.array([1, 4, 10]) / 15)  # +1 smoothing: item 1 drawable


def test_auto_optimizer_is_dense_when_either_stage_trains_the_full_softmax():
    from movierec.training.optim import resolve_optimizer

    big_catalog = {"num_items": 10**7, "batch_size": 2, "max_len": 2}
    assert resolve_optimizer("auto", (None, "bce"), **big_catalog) == "sparse-adam"
    assert resolve_optimizer("auto", ("ce", "bce"), **big_catalog) == "adam"
    assert resolve_optimizer("auto", ("bce", "ce"), **big_catalog) == "adam"
