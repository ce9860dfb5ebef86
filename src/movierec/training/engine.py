"""The training engine: one optimizer step and one epoch over a model, its objective and its optimizers.

It reads no file and writes none, talks to no tracking server and prints nothing: the loop policy around it
(validation, early stopping, checkpoints, MLflow, the console) is `training.run.Run`, and a benchmark times
steps by building an `Engine` alone. Everything it advances is in `TrainState`, which a checkpoint stores
and a resume restores; every random draw of a batch is seeded by (seed, epoch, batch index), so a batch
trains the same on whichever process or resumed run computes it.
"""

from __future__ import annotations

import ctypes
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext

import numpy as np
import torch

from movierec.data.layout import SequenceData
from movierec.data.negatives import SeenItems
from movierec.device import available_memory_bytes, resolve_device, resolve_precision
from movierec.errors import ConfigError
from movierec.models.base import ModelConfig, SequentialModel, build_model
from movierec.models.checkpoint import TrainState
from movierec.training import losses
from movierec.training.batches import TrainBatches
from movierec.training.config import RunConfig
from movierec.training.distributed import Distributed
from movierec.training.optim import build_optimizers, clip_grad_norm, resolve_optimizer


def keep_freed_memory_on_cpu() -> None:
    """Let glibc's malloc keep freed memory for reuse instead of returning it to the kernel.

    A training step allocates and frees the same large tensors (attention weights, dropout masks, logits)
    every step. glibc serves blocks above its mmap threshold (at most 32 MiB) with fresh mmaps and unmaps
    them on free, so every step pays page faults and kernel zeroing for them again: 3.6 M minor faults in 48
    BERT4Rec steps. Serving everything from the heap and never trimming it took a BERT4Rec pass from
    18.7-20.5 s to 12.3-12.9 s (docs/results.md, "Training throughput"). A no-op off glibc, or when the
    user set MALLOC_MMAP_MAX_.
    """
    if os.environ.get("MALLOC_MMAP_MAX_") is not None:
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_max = -1, -4  # mallopt parameters from glibc's malloc.h
    libc.mallopt(m_mmap_max, 0)
    libc.mallopt(m_trim_threshold, 2**31 - 1)


TRAINING_BYTES_PER_PARAMETER = 16  # fp32 weights, their gradients and Adam's two moments


def check_model_fits(config: ModelConfig, device: torch.device) -> None:
    """A one-line ConfigError, before any allocation, when the model's weights, gradients and optimizer state
    alone would not fit the memory `device` has available (a huge model.d_item or num_blocks would otherwise
    allocate until the machine swaps or the kernel kills the process). Counted on the meta device."""
    with torch.device("meta"):
        parameters = sum(p.numel() for p in build_model(config).parameters())
    needed, available = parameters * TRAINING_BYTES_PER_PARAMETER, available_memory_bytes(device)
    if needed > available:
        raise ConfigError(
            f"the model has {parameters:,} parameters: training needs at least {needed / 2**30:,.1f} GiB for its "
            f"weights, gradients and optimizer state, and {device.type} has {available / 2**30:,.1f} GiB available; "
            f"lower model.d_item (now {config.d_item}), model.num_blocks ({config.num_blocks}) or model.max_len "
            f"({config.max_len}), or train on a larger device"
        )


class Engine:
    """A model, its objective, optimizers, grad scaler and batches, built from a run config and data.

    `model` is what evaluation and checkpoints see; `train_module` is what the step calls (the objective,
    wrapped in DistributedDataParallel under torchrun). The model's `sparse_tables()` train with row-sparse
    gradients when the optimizer resolves to sparse-adam; the engine marks them so, once, here.
    """

    def __init__(
        self,
        config: RunConfig,
        data: SequenceData,
        seen: SeenItems,
        device: torch.device,
        autocast_dtype: torch.dtype | None = None,
        dist: Distributed | None = None,
        use_scaler: bool = False,
    ):
        self.config, self.data, self.device, self.autocast_dtype = config, data, device, autocast_dtype
        self.dist = dist or Distributed()
        t = config.train
        self.model_config = ModelConfig(num_users=data.num_users, num_items=data.num_items, **vars(config.model))
        check_model_fits(self.model_config, device)
        self.model: SequentialModel = build_model(self.model_config).to(device)
        self.optimizer_kind = resolve_optimizer(
            t.optimizer, (t.start_loss, t.loss), data.num_items, t.batch_size, config.model.max_len,
            self.dist.backend, t.weight_decay,
        )  # fmt: skip
        sparse = self.model.sparse_tables() if self.optimizer_kind == "sparse-adam" else []
        for table in sparse:
            table.sparse = True
        self.optimizers = build_optimizers(self.model, [t.weight for t in sparse], t.lr, tuple(t.betas), t.weight_decay)
        self.scaler = torch.amp.GradScaler(device.type, enabled=use_scaler)
        self.batches = TrainBatches(
            data, t.batch_size, config.model.max_len, t.bucket_batches, t.window_prob, self.model.uses_times
        )
        self.objective = losses.build_objective(self.model, t, data, seen).to(device)
        self.train_module: torch.nn.Module = self.objective
        self.state = TrainState()

    @classmethod
    def from_config(cls, config: RunConfig) -> Engine:
        """An engine from a config alone (its data, device and precision), with no run folder, tracking or
        console: what a benchmark times and a notebook profiles. Seeded as a run is."""
        from movierec.data.layout import load_sequences

        device = resolve_device(config.train.device)
        if device.type == "cpu":
            keep_freed_memory_on_cpu()
        autocast_dtype, use_scaler = resolve_precision(config.train.precision, device)
        data = load_sequences(config.data.path, config.data.fraction, config.data.shards, config.data.verify_checksums)
        seen = SeenItems.from_data(data)
        torch.manual_seed(config.train.seed)
        return cls(config, data, seen, device, autocast_dtype, use_scaler=use_scaler)

    def wrap_for_data_parallel(self) -> None:
        """Wrap the objective in DistributedDataParallel (after the weights are final: restored or initialised,
        since DDP starts every rank from rank 0's)."""
        if self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_module = DistributedDataParallel(self.objective, device_ids=ids)

    @property
    def batches_per_step(self) -> int:
        """Batches one optimizer step consumes over all processes: world size x grad_accumulation."""
        return self.dist.world_size * self.config.train.grad_accumulation

    @property
    def total_steps(self) -> int:
        """The step a cosine schedule ends at: train.max_steps, else train.steps, else train.epochs full epochs."""
        t = self.config.train
        return t.max_steps or t.steps or t.epochs * self.steps_per_epoch

    @property
    def steps_per_epoch(self) -> int:
        return len(self.batches) // self.batches_per_step

    def learning_rate(self, step: int) -> float:
        """train.lr x warm-up x schedule at optimizer step `step` (0-based): a pure function of the step."""
        t = self.config.train
        factor = min(1.0, (step + 1) / t.warmup_steps) if t.warmup_steps else 1.0
        if t.lr_schedule == "cosine":
            span = max(self.total_steps - 1 - t.warmup_steps, 1)  # the last step gets lr x min_lr_ratio
            progress = min(max(step - t.warmup_steps, 0) / span, 1.0)
            factor *= t.min_lr_ratio + (1 - t.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return t.lr * factor

    def batch_loss(self, index: int, users: np.ndarray) -> tuple[torch.Tensor, int]:
        """The (weighted) loss of global batch `index` of this epoch, and its number of target positions."""
        t, dev, step = self.config.train, self.device, self.state.step
        seeds = np.random.SeedSequence([t.seed, self.state.epoch, index])
        torch.manual_seed(int(seeds.generate_state(1, np.uint64)[0] >> np.uint64(1)))
        rng = np.random.default_rng(seeds)
        batch = self.batches.make_batch(users, rng)
        negatives = torch.from_numpy(self.objective.negatives(rng, batch.users, batch.targets, step)).to(dev)
        users_t, inputs, targets = (torch.from_numpy(x).to(dev) for x in (batch.users, batch.inputs, batch.targets))
        users_t, inputs, targets = self.model.training_batch(users_t, inputs, targets)
        times = None if batch.times is None else torch.from_numpy(batch.times).to(dev)
        autocast = self.autocast_dtype is not None
        with torch.autocast(dev.type, dtype=self.autocast_dtype or torch.float32, enabled=autocast):
            loss = self.train_module(users_t, inputs, targets, negatives, step, times)
            if t.token_weighting:
                loss = loss * (batch.num_tokens / self.batches.mean_tokens)
        not_finite = float(not torch.isfinite(loss))
        if self.dist.enabled:  # every rank stops together, none is left waiting in the gradient all-reduce
            not_finite = float(self.dist.all_reduce_sum(np.array([not_finite]))[0])
        if not_finite:
            raise ConfigError(
                f"training loss became {loss.item()} at step {step}; lower train.lr or use train.precision=fp32"
            )
        return loss / t.grad_accumulation, batch.num_tokens

    def optimizer_step(self, plan: list[np.ndarray], step_in_epoch: int) -> tuple[float, int, int]:
        """One optimizer step: this process's batches of it, backward, clipping, the scheduled lr, the update.
        Returns (summed loss, sequences, target positions) of this process's batches."""
        t, rank = self.config.train, self.dist.rank
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        total_loss, seqs, tokens = 0.0, 0, 0
        for micro in range(t.grad_accumulation):
            index = step_in_epoch * self.batches_per_step + rank * t.grad_accumulation + micro
            last = micro == t.grad_accumulation - 1
            with nullcontext() if last or not self.dist.enabled else self.train_module.no_sync():
                loss, batch_tokens = self.batch_loss(index, plan[index])
                self.scaler.scale(loss).backward()
            total_loss += loss.item()
            seqs += len(plan[index])
            tokens += batch_tokens
        if t.grad_clip:
            for optimizer in self.optimizers:
                self.scaler.unscale_(optimizer)
            clip_grad_norm(list(self.model.parameters()), t.grad_clip)
        lr = self.learning_rate(self.state.step)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr
            self.scaler.step(optimizer)
        self.scaler.update()
        self.state.step += 1
        return total_loss, seqs, tokens

    def train_epoch(
        self, max_steps: int | None = None, on_step: Callable[[int, int, dict], None] | None = None
    ) -> dict:
        """One pass over the training users (or its first `max_steps` optimizer steps, for benchmarks).

        Each optimizer step takes `batches_per_step` consecutive batches of the epoch's plan: process r
        computes batches r * accumulation ... (r + 1) * accumulation - 1 of them. A remainder of fewer
        batches than a step needs is left out of this epoch (the plan is reshuffled every epoch).
        `on_step(done, total, running stats)` is called after each step (progress display). The epoch counter
        is the caller's to advance: a benchmark may time several partial passes of one epoch.
        """
        self.model.train()
        plan = self.batches.plan(np.random.default_rng([self.config.train.seed, self.state.epoch]))
        steps = len(plan) // self.batches_per_step
        if max_steps is not None:
            steps = min(steps, max_steps)
        total_loss, seqs, tokens = 0.0, 0, 0
        started = time.perf_counter()
        for step_in_epoch in range(steps):
            step_loss, step_seqs, step_tokens = self.optimizer_step(plan, step_in_epoch)
            total_loss, seqs, tokens = total_loss + step_loss, seqs + step_seqs, tokens + step_tokens
            if on_step is not None:
                rate = seqs * self.dist.world_size / (time.perf_counter() - started)
                on_step(step_in_epoch + 1, steps, {"loss": total_loss / (step_in_epoch + 1), "sequences_per_s": rate})
        elapsed = time.perf_counter() - started
        totals = self.dist.all_reduce_sum(np.array([total_loss, seqs, tokens], dtype=np.float64))
        total_loss, seqs, tokens = (float(x) for x in totals)
        return {
            "train_loss": total_loss / max(steps * self.dist.world_size, 1),
            "steps": steps,
            "seconds": elapsed,
            "sequences_per_s": seqs / elapsed,
            "tokens_per_s": tokens / elapsed,
            "lr": self.learning_rate(max(self.state.step - 1, 0)),
        }

    def restore(self, model: dict, optimizers: list[dict], scaler: dict, state: TrainState) -> None:
        """Weights, optimizer moments, grad-scaler state and TrainState of a checkpoint (checked by the caller)."""
        self.model.load_state_dict(model)
        for optimizer, optimizer_state in zip(self.optimizers, optimizers, strict=True):
            optimizer.load_state_dict(optimizer_state)
        self.scaler.load_state_dict(scaler)
        self.state = state
