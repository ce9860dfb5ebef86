"""Optimizers for large catalogs: row-sparse updates of the embedding tables.

Dense Adam updates every row of the item table (and its two moment tables) at every step, so with 855,776
items the optimizer step, not the network, dominates. With `sparse-adam` the item and user embeddings
produce row-sparse gradients and `torch.optim.SparseAdam` (a lazy Adam: moments of a row advance only on
the steps that use it) updates just those rows; every other parameter keeps dense Adam.
"""

from __future__ import annotations

import torch
from torch import nn

from movierec.errors import ConfigError

# `auto` picks sparse-adam when the item table has more rows than this many times the tokens of a batch:
# below that a batch touches most rows anyway and the sparse bookkeeping costs more than it saves
SPARSE_ROWS_PER_TOKEN = 2


def resolve_optimizer(
    name: str,
    losses: tuple[str, ...],
    num_items: int,
    batch_size: int,
    max_len: int,
    backend: str | None = None,
    weight_decay: float = 0.0,
) -> str:
    """`auto` -> adam or sparse-adam for a run training `losses` (train.start_loss, then train.loss); NCCL cannot
    all-reduce sparse gradients, so multi-GPU runs use dense Adam (on a GPU its step over the whole table is
    cheap)."""
    if name == "sparse-adam" and backend == "nccl":
        raise ConfigError("train.optimizer=sparse-adam cannot run on NCCL (no sparse all-reduce); use auto or adam")
    if name != "auto":
        return name
    if "ce" in losses or backend == "nccl":  # the full softmax gives every item row a gradient at every step
        return "adam"
    if weight_decay:  # SparseAdam has none
        return "adam"
    return "sparse-adam" if num_items + 1 > SPARSE_ROWS_PER_TOKEN * batch_size * max_len else "adam"


def build_optimizers(
    model: nn.Module, sparse: list[nn.Parameter], lr: float, betas: tuple[float, float], weight_decay: float
) -> list[torch.optim.Optimizer]:
    """[Adam] over every parameter, or [Adam over the dense ones, SparseAdam over `sparse`] (the tables the
    model declares in `sparse_tables()`, whose gradients are row-sparse under sparse-adam)."""
    if not sparse:
        return [torch.optim.Adam(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)]
    sparse_ids = {id(p) for p in sparse}
    dense = [p for p in model.parameters() if id(p) not in sparse_ids]
    return [torch.optim.Adam(dense, lr=lr, betas=betas), torch.optim.SparseAdam(sparse, lr=lr, betas=betas)]


@torch.no_grad()
def clip_grad_norm(parameters: list[torch.Tensor], max_norm: float) -> float:
    """Scale all gradients (dense or row-sparse) so that their global L2 norm is at most `max_norm`."""
    squares = [
        (p.grad.coalesce().values() if p.grad.is_sparse else p.grad).float().pow(2).sum()
        for p in parameters
        if p.grad is not None
    ]
    total = torch.stack(squares).sum().sqrt() if squares else torch.tensor(0.0)
    scale = max_norm / (float(total) + 1e-6)
    if scale < 1:
        for param in parameters:
            if param.grad is not None:
                param.grad = param.grad.coalesce() * scale if param.grad.is_sparse else param.grad.mul_(scale)
    return float(total)
