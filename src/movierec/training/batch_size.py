"""`train.batch_size: auto`: the largest batch that fits, found by halving from `train.max_batch_size`.

Each candidate size runs one trial: a full training step (forward, backward, optimizer step) on the
`size` longest training sequences, and one full-ranking evaluation batch of the longest validation
histories, on a throwaway copy of the model, so the run itself starts from the same weights and random
state as with a fixed size. A size does not fit when CUDA runs out of memory, or, on CPU, when the
process's resident memory before the trial plus the peak of the tensor memory the trial allocated
exceeds `train.memory_limit_gb` (default: what is resident plus 90 % of the memory available at start).
The learning rate follows the chosen size by `train.lr_scaling`: none, linear or sqrt, relative to
`train.max_batch_size` (the size `train.lr` is meant for).
"""

from __future__ import annotations

import copy
import gc
import math
import weakref
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
import psutil
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from movierec.data.layout import SequenceData
from movierec.data.negatives import SeenItems
from movierec.errors import ConfigError
from movierec.evaluation.evaluate import Evaluator
from movierec.training.config import RunConfig

CPU_BUDGET_SHARE = 0.9  # of the memory available at start, when train.memory_limit_gb is not set


class OutOfMemoryBudget(MemoryError):
    """A CPU trial's peak exceeded train.memory_limit_gb: what CUDA's OutOfMemoryError is on a GPU."""


def is_out_of_memory(exc: BaseException) -> bool:
    """CUDA OOM, Python's MemoryError, our CPU budget, or torch's CPU allocator failing."""
    if isinstance(exc, torch.cuda.OutOfMemoryError | MemoryError):
        return True
    return isinstance(exc, RuntimeError) and "can't allocate memory" in str(exc)


class PeakTensorMemory(TorchDispatchMode):
    """Bytes of the tensor storages created while active that are still alive, and their peak.

    Every op's outputs pass through `__torch_dispatch__` (backward's too: the mode is thread state the
    autograd engine carries); a storage is counted once, when first seen, and uncounted when freed.
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._counted: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.layout == torch.strided and tensor.device.type == "cpu":
                self._count(tensor.untyped_storage())
        return out

    def _count(self, storage: torch.UntypedStorage) -> None:
        key, size = storage.data_ptr(), storage.nbytes()
        if size == 0 or key in self._counted:
            return
        self._counted.add(key)
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self._counted.discard(key)
        self.live -= size


@dataclass
class BatchSizeChoice:
    """The outcome of the search: the chosen size, the learning rate for it, and every size tried."""

    size: int
    lr: float
    tried: list[tuple[int, str]] = field(default_factory=list)  # (size, "fits: ..." or "out of memory: ...")

    def summary(self) -> str:
        return ", ".join(f"{size} {outcome}" for size, outcome in self.tried)


def scaled_lr(lr: float, size: int, reference: int, scaling: str) -> float:
    """`lr`, meant for batches of `reference`, for batches of `size`."""
    ratio = size / reference
    return lr * {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[scaling]


def choose_batch_size(
    trial: Callable[[int], str], largest: int, lr: float, scaling: str, all_ranks_min: Callable[[int], int] = int
) -> BatchSizeChoice:
    """Halve from `largest` until `trial(size)` returns (it raises an out-of-memory error when the size does
    not fit); under torchrun every rank takes the smallest size any rank could fit."""
    tried: list[tuple[int, str]] = []
    size = largest
    while True:
        try:
            tried.append((size, f"fits ({trial(size)})"))
            break
        except Exception as exc:
            if not is_out_of_memory(exc):
                raise
            tried.append((size, f"out of memory ({str(exc).strip().splitlines()[0][:80] if str(exc) else 'OOM'})"))
            if size == 1:
                raise ConfigError(
                    f"train.batch_size auto: nothing fits in memory, not even the smallest size tried, {size} "
                    f"(tried {', '.join(str(s) for s, _ in tried)}); use a smaller model (model.max_len, "
                    "model.d_item), a larger train.memory_limit_gb, or another device"
                ) from exc
            size //= 2
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    chosen = all_ranks_min(size)
    return BatchSizeChoice(chosen, scaled_lr(lr, chosen, largest, scaling), tried)


def memory_budget_bytes(limit_gb: float | None) -> int:
    """The CPU budget of the whole process: train.memory_limit_gb, else what is resident plus 90 % of the
    memory available now."""
    if limit_gb is not None:
        return int(limit_gb * 1e9)
    return int(psutil.Process().memory_info().rss + CPU_BUDGET_SHARE * psutil.virtual_memory().available)


def trial_step(
    size: int,
    config: RunConfig,
    data: SequenceData,
    seen: SeenItems,
    validator: Evaluator,
    device: torch.device,
    autocast_dtype: torch.dtype | None,
    budget_bytes: int,
) -> str:
    """One training step of the `size` longest sequences and one full-ranking batch of the longest validation
    histories, on a throwaway engine; returns the peak memory, or raises when it does not fit."""
    from movierec.training.engine import Engine

    trial = copy.deepcopy(config)
    trial.train.batch_size, trial.train.grad_accumulation = size, 1
    engine = Engine(trial, data, seen, device, autocast_dtype, use_scaler=autocast_dtype == torch.float16)
    users = engine.batches.users[np.argsort(engine.batches.lengths, kind="stable")[-size:]]
    eval_rows = np.argsort(validator.lengths, kind="stable")[-min(validator.batch_size, size) :]
    resident = psutil.Process().memory_info().rss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    tracker = PeakTensorMemory() if device.type == "cpu" else None
    with tracker or nullcontext():
        engine.model.train()
        engine.optimizer_step([users], 0)
        for rows, sequences in validator.batches(engine.model_config.max_len, eval_rows):
            validator.batch_ranks(engine.model.eval(), rows, sequences, device, autocast_dtype, "bce")
    if tracker is None:
        return f"peak {torch.cuda.max_memory_allocated(device) / 1e9:.2f} GB on {device}"
    peak = resident + tracker.peak
    if peak > budget_bytes:
        raise OutOfMemoryBudget(f"peak {peak / 1e9:.2f} GB > train.memory_limit_gb {budget_bytes / 1e9:.2f} GB")
    return f"peak {peak / 1e9:.2f} GB of {budget_bytes / 1e9:.2f} GB"
