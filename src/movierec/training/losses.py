"""Training objectives: one class per `train.loss`, each owning its negatives, its loss over the model's
queries, and which validation loss the evaluator reports for it.

- `bce` (the paper): the next item against one sampled negative the user has not seen, binary cross-entropy.
- `gbce` (gSASRec, Petrov & Macdonald, RecSys 2023): the next item against `num_negatives` unseen items,
  drawn once per sequence and shared by its positions, with the calibrated generalised BCE: the positive's
  log-sigmoid is weighted by beta = alpha (t (1 - 1/alpha) + 1/alpha), alpha = num_negatives / (items - 1),
  t = `gbce_t`, which undoes the over-confidence that many negatives give BCE.
- `sampled-softmax`: the next item against N negatives shared by the batch (or, with `train.negatives_per:
  sequence`, drawn for each sequence and shared by its positions), softmax cross-entropy; with
  popularity sampling the logits are corrected by log Q (Yi et al., RecSys 2019) so the estimate is unbiased.
- `ce`: softmax over all items ("SASRec+", Klenitskiy & Vasilev, RecSys 2023).

`train.start_loss` trains the first `train.start_loss_steps` optimizer steps with another of these (`StagedObjective`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from movierec.data.layout import SequenceData
from movierec.data.negatives import SeenItems, draw_by_weight, sample_training_negatives
from movierec.evaluation.metrics import bce_from_logits
from movierec.models.base import SequentialModel


class Objective(nn.Module):
    """A batch's training loss as one module (what DistributedDataParallel wraps, forward pass included).

    Subclasses set `validation_loss`, the loss the evaluator reports at validation: "bce" (against one
    seeded negative per user) or "ce" (softmax over every item)."""

    validation_loss = "bce"

    def __init__(self, model: SequentialModel, train, data: SequenceData, seen: SeenItems):
        super().__init__()
        self.model, self.train_config, self.data, self.seen = model, train, data, seen

    def negatives(self, rng: np.random.Generator, users: np.ndarray, targets: np.ndarray, step: int = 0) -> np.ndarray:
        """The batch's negative items at optimizer step `step` (drawn with `rng`, seeded per batch); none by
        default."""
        return np.zeros(0, dtype=np.int64)

    def loss(self, queries: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self,
        users: torch.Tensor,
        inputs: torch.Tensor,
        targets: torch.Tensor,
        negatives: torch.Tensor,
        step: int = 0,
        times: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The loss of a batch at optimizer step `step` (only a staged objective's choice depends on it);
        `times`: the inputs' timestamps, for a model that reads them (`uses_times`)."""
        extra = {"times": times} if times is not None else {}
        return self.loss(self.model.queries(inputs, users, **extra), targets, negatives)


class BCE(Objective):
    def negatives(self, rng, users, targets, step=0):
        return sample_training_negatives(rng, self.seen, users[:, None], targets.shape, self.data.num_items)

    def loss(self, queries, targets, negatives):
        return bce_loss(self.model, queries, targets, negatives)


class GBCE(Objective):
    def __init__(self, model, train, data, seen):
        super().__init__(model, train, data, seen)
        alpha = train.num_negatives / max(data.num_items - 1, 1)
        self.beta = alpha * (train.gbce_t * (1 - 1 / alpha) + 1 / alpha)

    def negatives(self, rng, users, targets, step=0):
        shape = (len(users), self.train_config.num_negatives)
        return sample_training_negatives(rng, self.seen, users[:, None], shape, self.data.num_items)

    def loss(self, queries, targets, negatives):
        return gbce_loss(self.model, queries, targets, negatives, self.beta)


class SampledSoftmax(Objective):
    validation_loss = "ce"

    def __init__(self, model, train, data, seen):
        super().__init__(model, train, data, seen)
        self.sample_cdf = None
        log_q = None
        if train.negative_sampling == "popularity":  # a buffer, so it moves with .to(device)
            log_q_64 = popularity_log_q(data.item_counts())
            self.sample_cdf = np.cumsum(np.exp(log_q_64))
            log_q = torch.from_numpy(log_q_64).float()
        self.register_buffer("log_q", log_q, persistent=False)

    def negatives(self, rng, users, targets, step=0):
        """(K,) ids shared by the batch, or (B, K) with `train.negatives_per: sequence`."""
        count = self.train_config.num_negatives
        if self.train_config.negatives_per == "sequence":
            count = len(users) * count
        if self.sample_cdf is not None:
            drawn = draw_by_weight(rng, self.sample_cdf, count)
        else:
            drawn = rng.integers(1, self.data.num_items + 1, size=count)
        return drawn.reshape(len(users), -1) if self.train_config.negatives_per == "sequence" else drawn

    def loss(self, queries, targets, negatives):
        return sampled_softmax_loss(self.model, queries, targets, negatives, self.log_q, self.train_config.temperature)


class FullSoftmax(Objective):
    validation_loss = "ce"

    def loss(self, queries, targets, negatives):
        return full_softmax_loss(self.model, queries, targets, self.train_config.temperature)


class StagedObjective(Objective):
    """`first` for optimizer steps 0 .. `switch_step` - 1, then `then`: one module over one model, so
    DistributedDataParallel wraps it once. The step arrives as an argument; since the choice is a function
    of it, a resumed run switches at the same step."""

    def __init__(self, first: Objective, then: Objective, switch_step: int):
        super().__init__(then.model, then.train_config, then.data, then.seen)
        self.first, self.then, self.switch_step = first, then, switch_step
        self.validation_loss = then.validation_loss

    def at(self, step: int) -> Objective:
        return self.first if step < self.switch_step else self.then

    def negatives(self, rng, users, targets, step=0):
        return self.at(step).negatives(rng, users, targets, step)

    def forward(self, users, inputs, targets, negatives, step=0, times=None):
        return self.at(step)(users, inputs, targets, negatives, step, times)


OBJECTIVES: dict[str, type[Objective]] = {
    "bce": BCE,
    "gbce": GBCE,
    "sampled-softmax": SampledSoftmax,
    "ce": FullSoftmax,
}
LOSSES = tuple(OBJECTIVES)


def build_objective(model: SequentialModel, train, data: SequenceData, seen: SeenItems) -> Objective:
    """The objective `train.loss` names, for `model` on `data` (`train`: the config's train section), after
    `train.start_loss` for the first `train.start_loss_steps` steps when that is set."""
    objective = OBJECTIVES[train.loss](model, train, data, seen)
    if train.start_loss is None:
        return objective
    return StagedObjective(OBJECTIVES[train.start_loss](model, train, data, seen), objective, train.start_loss_steps)


def bce_loss(
    model: SequentialModel, queries: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor
) -> torch.Tensor:
    """Mean over positions with a target of -log σ(s_pos) - log(1 - σ(s_neg))."""
    logits = model.score(queries, torch.stack([targets, negatives], dim=-1))
    mask = targets != 0
    return bce_from_logits(logits[..., 0][mask], logits[..., 1][mask])


def gbce_loss(
    model: SequentialModel, queries: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor, beta: float
) -> torch.Tensor:
    """Mean over positions with a target of -beta log σ(s_pos) - Σ_k log(1 - σ(s_k)); `negatives` (B, K) are
    shared by the positions of each sequence (one batched product instead of B x L x K gathers)."""
    mask = targets != 0
    positive = model.score(queries, targets.unsqueeze(-1))[..., 0][mask]
    negative = torch.stack([model.score_shared(q, n) for q, n in zip(queries, negatives, strict=True)])[mask]
    return (beta * F.softplus(-positive) + F.softplus(negative).sum(-1)).mean()


def sampled_softmax_loss(
    model: SequentialModel,
    queries: torch.Tensor,
    targets: torch.Tensor,
    negatives: torch.Tensor,
    log_q: torch.Tensor | None = None,
    temperature: float | None = None,
) -> torch.Tensor:
    """Softmax over [target, negatives]: the model's scores divided by `temperature`, then corrected by
    `log_q` (num_items + 1,), the sampling log-probability; a negative that is the target is left out.
    `negatives` is (K,), shared by every position of the batch, or (B, K), shared by the positions of a
    sequence."""
    mask = targets != 0
    q = queries[mask]
    pos = model.score(q, targets[mask].unsqueeze(-1)) / (temperature or 1.0)  # (N, 1)
    if negatives.dim() == 1:
        neg = model.score_shared(q, negatives)  # (N, K)
        per_position = negatives.unsqueeze(0).expand(len(q), -1)
    else:  # one product per sequence, (B, L, K), then the positions with a target
        neg = torch.stack([model.score_shared(qs, ns) for qs, ns in zip(queries, negatives, strict=True)])[mask]
        per_position = negatives.unsqueeze(1).expand(-1, targets.shape[1], -1)[mask]
    neg = neg / (temperature or 1.0)
    if log_q is not None:
        pos = pos - log_q[targets[mask]].unsqueeze(-1)
        neg = neg - log_q[per_position]
    neg = neg.masked_fill(per_position == targets[mask].unsqueeze(-1), float("-inf"))
    logits = torch.cat([pos, neg], dim=-1)
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def full_softmax_loss(
    model: SequentialModel, queries: torch.Tensor, targets: torch.Tensor, temperature: float | None = None
) -> torch.Tensor:
    """Cross-entropy over items 1..num_items, the model's scores divided by `temperature`."""
    mask = targets != 0
    logits = model.score_shared(queries[mask], slice(1, model.config.num_items + 1)) / (temperature or 1.0)
    return F.cross_entropy(logits, targets[mask] - 1)


def popularity_log_q(item_counts: np.ndarray) -> np.ndarray:
    """log of the popularity sampling distribution over item ids (index 0 unused), from training counts."""
    counts = item_counts.astype(np.float64)
    counts[0] = 0
    counts[1:] += 1  # every item can be drawn
    with np.errstate(divide="ignore"):  # index 0 (padding) gets log 0 = -inf: never sampled
        return np.log(counts / counts.sum())
