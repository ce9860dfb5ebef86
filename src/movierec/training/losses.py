"""Training objectives over the hidden states of non-padding positions.

- `bce` (the paper): the next item against one sampled negative the user has not seen, binary cross-entropy.
- `sampled-softmax`: the next item against N negatives shared by the batch, softmax cross-entropy; with
  popularity sampling the logits are corrected by log Q (Yi et al., RecSys 2019) so the estimate is unbiased.
- `ce`: softmax over all items ("SASRec+", Klenitskiy & Vasilev, RecSys 2023).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from movierec.models.base import SequentialModel
from movierec.models.sse_pt import bce_from_logits

LOSSES = ("bce", "sampled-softmax", "ce")


class Objective(nn.Module):
    """A batch's training loss as one module: what DistributedDataParallel wraps, forward pass included."""

    def __init__(self, model: SequentialModel, kind: str, log_q: torch.Tensor | None = None):
        super().__init__()
        self.model, self.kind, self.log_q = model, kind, log_q

    def forward(
        self, users: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor
    ) -> torch.Tensor:
        queries = self.model.queries(inputs, users)
        if self.kind == "bce":
            return bce_loss(self.model, queries, targets, negatives)
        if self.kind == "sampled-softmax":
            return sampled_softmax_loss(self.model, queries, targets, negatives, self.log_q)
        return full_softmax_loss(self.model, queries, targets)


def bce_loss(
    model: SequentialModel, queries: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor
) -> torch.Tensor:
    """Mean over positions with a target of -log σ(s_pos) - log(1 - σ(s_neg))."""
    logits = model.score(queries, torch.stack([targets, negatives], dim=-1))
    mask = targets != 0
    return bce_from_logits(logits[..., 0][mask], logits[..., 1][mask])


def sampled_softmax_loss(
    model: SequentialModel,
    queries: torch.Tensor,
    targets: torch.Tensor,
    negatives: torch.Tensor,
    log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax over [target, shared negatives]; `log_q` (num_items + 1,) is the sampling log-probability."""
    mask = targets != 0
    q = queries[mask]
    pos = model.score(q, targets[mask].unsqueeze(-1))  # (N, 1)
    neg = model.score_shared(q, negatives)  # (N, K)
    if log_q is not None:
        pos = pos - log_q[targets[mask]].unsqueeze(-1)
        neg = neg - log_q[negatives].unsqueeze(0)
    neg = neg.masked_fill(negatives.unsqueeze(0) == targets[mask].unsqueeze(-1), float("-inf"))
    logits = torch.cat([pos, neg], dim=-1)
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def full_softmax_loss(model: SequentialModel, queries: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over items 1..num_items."""
    mask = targets != 0
    logits = model.score_shared(queries[mask], slice(1, model.config.num_items + 1))
    return F.cross_entropy(logits, targets[mask] - 1)


def popularity_log_q(item_counts: np.ndarray) -> np.ndarray:
    """log of the popularity sampling distribution over item ids (index 0 unused), from training counts."""
    counts = item_counts.astype(np.float64)
    counts[0] = 0
    counts[1:] += 1  # every item can be drawn
    with np.errstate(divide="ignore"):  # index 0 (padding) gets log 0 = -inf: never sampled
        return np.log(counts / counts.sum())
