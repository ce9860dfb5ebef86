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

from movierec.models.sse_pt import SSEPT, bce_from_logits

LOSSES = ("bce", "sampled-softmax", "ce")


class Objective(nn.Module):
    """A batch's training loss as one module: what DistributedDataParallel wraps, forward pass included."""

    def __init__(self, model: SSEPT, kind: str, log_q: torch.Tensor | None = None):
        super().__init__()
        self.model, self.kind, self.log_q = model, kind, log_q

    def forward(
        self, users: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, negatives: torch.Tensor
    ) -> torch.Tensor:
        user_vecs = self.model.user_vectors(users)
        hidden = self.model(inputs, user_vecs)
        if self.kind == "bce":
            return bce_loss(self.model, hidden, user_vecs, targets, negatives)
        if self.kind == "sampled-softmax":
            return sampled_softmax_loss(self.model, hidden, user_vecs, targets, negatives, self.log_q)
        return full_softmax_loss(self.model, hidden, targets)


def bce_loss(
    model: SSEPT, hidden: torch.Tensor, user_vecs: torch.Tensor | None, targets: torch.Tensor, negatives: torch.Tensor
) -> torch.Tensor:
    """Mean over positions with a target of -log σ(s_pos) - log(1 - σ(s_neg))."""
    logits = model.score(hidden, torch.stack([targets, negatives], dim=-1), user_vecs)
    mask = targets != 0
    return bce_from_logits(logits[..., 0][mask], logits[..., 1][mask])


def sampled_softmax_loss(
    model: SSEPT,
    hidden: torch.Tensor,
    user_vecs: torch.Tensor | None,
    targets: torch.Tensor,
    negatives: torch.Tensor,
    log_q: torch.Tensor | None = None,
) -> torch.Tensor:
    """Softmax over [target, shared negatives]; `log_q` (num_items + 1,) is the sampling log-probability."""
    mask = targets != 0
    h = hidden[mask]
    users = None if user_vecs is None else user_vecs.unsqueeze(1).expand(*targets.shape, -1)[mask]
    pos = model.score(h, targets[mask].unsqueeze(-1), users)  # (N, 1)
    d_i = model.config.d_item
    neg = h[:, :d_i] @ model.item_emb(negatives).t()  # (N, K)
    if users is not None:
        neg = neg + (h[:, d_i:] * users).sum(-1, keepdim=True)
    if log_q is not None:
        pos = pos - log_q[targets[mask]].unsqueeze(-1)
        neg = neg - log_q[negatives].unsqueeze(0)
    neg = neg.masked_fill(negatives.unsqueeze(0) == targets[mask].unsqueeze(-1), float("-inf"))
    logits = torch.cat([pos, neg], dim=-1)
    return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))


def full_softmax_loss(model: SSEPT, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over items 1..num_items. The user term of the score is the same for every item of a
    position, so it cancels in the softmax and is left out."""
    mask = targets != 0
    logits = hidden[mask][:, : model.config.d_item] @ model.item_emb.weight[1:].t()
    return F.cross_entropy(logits, targets[mask] - 1)


def popularity_log_q(item_counts: np.ndarray) -> np.ndarray:
    """log of the popularity sampling distribution over item ids (index 0 unused), from training counts."""
    counts = item_counts.astype(np.float64)
    counts[0] = 0
    counts[1:] += 1  # every item can be drawn
    with np.errstate(divide="ignore"):  # index 0 (padding) gets log 0 = -inf: never sampled
        return np.log(counts / counts.sum())
