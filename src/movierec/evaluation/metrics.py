"""Ranking metrics from the rank of the held-out item among its candidates.

`rank` is 0-based: the number of other candidates scored at least as high as the target (ties count
against the target, so a model that scores everything equally gets no credit).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def rank_of_target(target_scores: np.ndarray, candidate_scores: np.ndarray) -> np.ndarray:
    """Ranks for targets (N,) against other candidates (N, C); -inf candidates are excluded."""
    return (candidate_scores >= target_scores[:, None]).sum(axis=1)


def ndcg_per_user(ranks: np.ndarray, k: int) -> np.ndarray:
    """Each user's NDCG@k (one held-out item: 1 / log2(rank + 2) inside the top k, else 0); its mean is NDCG@k."""
    ranks = np.asarray(ranks, dtype=np.float64)
    return np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)


def metrics_from_ranks(ranks: np.ndarray, ks: tuple[int, ...] = (1, 5, 10, 20)) -> dict[str, float]:
    """HR@k, NDCG@k for each k and MRR, averaged over users. Empty input gives NaN."""
    ranks = np.asarray(ranks, dtype=np.float64)
    out: dict[str, float] = {}
    if len(ranks) == 0:
        return {**{f"{m}@{k}": float("nan") for k in ks for m in ("hr", "ndcg")}, "mrr": float("nan")}
    for k in ks:
        out[f"hr@{k}"] = float((ranks < k).mean())
        out[f"ndcg@{k}"] = float(ndcg_per_user(ranks, k).mean())
    out["mrr"] = float((1.0 / (ranks + 1.0)).mean())
    return out


def print_metrics(title: str, metrics: dict) -> None:
    """A table of `<protocol>/<metric>` values: one column per protocol, one row per metric."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    protocols = list(dict.fromkeys(k.split("/")[0] for k in metrics if "/" in k))
    names = list(dict.fromkeys(k.split("/", 1)[1] for k in metrics if "/" in k))
    table.add_column("metric")
    for protocol in protocols:
        table.add_column(protocol, justify="right")
    for name in names:
        table.add_row(name, *(f"{metrics.get(f'{p}/{name}', float('nan')):.4f}" for p in protocols))
    Console().print(table)


def bce_from_logits(positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """Mean of -log σ(s_pos) - log(1 - σ(s_neg)): the paper's training objective (training.losses.BCE) and
    the validation loss reported against one seeded negative per user, one formula for both."""
    return (F.softplus(-positive) + F.softplus(negative)).mean()
