"""The training loop: mixed precision, early stopping, MLflow tracking, atomic checkpoints, exact resume."""

from __future__ import annotations

import ctypes
import json
import math
import os
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from movierec.data.layout import META_FILE, SequenceData, load_sequences, read_items, read_users, sha256_file
from movierec.data.negatives import SeenItems
from movierec.errors import CheckpointError, ConfigError, TrackingError
from movierec.evaluation.evaluate import Evaluator
from movierec.files import FolderLock, atomic_path
from movierec.mlflow_store import tracking_uri
from movierec.models.base import ModelConfig, build_model
from movierec.models.checkpoint import BEST, LAST, load_checkpoint, save_checkpoint
from movierec.training import batch_size, distributed, losses
from movierec.training.batch_size import BatchSizeChoice, choose_batch_size, memory_budget_bytes
from movierec.training.batches import TrainBatches
from movierec.training.config import RunConfig, dump_config
from movierec.training.init_from import InitRow, init_model, read_init_map, read_pretrained, report_table
from movierec.training.optim import build_optimizers, clip_grad_norm, embedding_tables, resolve_optimizer
from movierec.training.tracking import (
    ExperimentInBackground,
    check_server,
    git_commit,
    is_tracking_failure,
    one_line,
    plot_curves,
    process_tags,
    run_params,
    sigterm_raises_system_exit,
)


@dataclass
class TrainResult:
    run_id: str
    run_dir: Path
    best_epoch: int
    best_metric: float
    epochs_run: int
    test_metrics: dict = field(default_factory=dict)
    history: list[dict] = field(default_factory=list)
    is_main: bool = True  # False on the ranks other than 0 of a torchrun job


def mlflow_key(name: str) -> str:
    """MLflow metric names may not contain '@'."""
    return name.replace("@", "_at_")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but CUDA is not available; use train.device=cpu or auto")
    return device


def resolve_precision(name: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None for fp32, whether to use a GradScaler)."""
    if name == "auto":
        name = "fp16" if device.type == "cuda" else "fp32"
    if name == "fp16":
        if device.type != "cuda":
            raise ConfigError("train.precision=fp16 needs a CUDA device; on CPU use fp32 or bf16")
        return torch.float16, True
    if name == "bf16":
        return torch.bfloat16, False
    return None, False


def seconds_since_process_start() -> float:
    import psutil

    return time.time() - psutil.Process().create_time()


def dataset_identity(data: SequenceData) -> dict:
    items, users = read_items(data.path), read_users(data.path)
    return {
        "path": str(Path(data.path).resolve()),
        "name": data.meta["name"],
        "meta_sha256": sha256_file(Path(data.path) / META_FILE),
        "num_users": data.num_users,
        "num_items": data.num_items,
        "item_movie_ids": torch.from_numpy(items["movie_id"].to_numpy().astype(np.int64)),
        "user_ids": torch.from_numpy(users["user_id"].to_numpy().astype(np.int64)),
        "shards": list(data.shard_indices),
    }


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


class Trainer:
    def __init__(self, config: RunConfig, resume: str | Path | None = None, console: Console | None = None):
        self.console = console or Console()
        self.resume_state = load_checkpoint(resume) if resume else None
        if self.resume_state is not None and self.resume_state.get("finished"):
            raise CheckpointError(
                f"{self.resume_state['path']} is from a finished run; use --init-from to start a new run from it"
            )
        if self.resume_state is not None:
            resumed_dir = Path(self.resume_state["path"]).parent
            if resumed_dir.resolve() != Path(config.run_dir).resolve():
                raise ConfigError(
                    f"resuming {resumed_dir} would write to run_dir {config.run_dir}: a resumed run writes to its "
                    f"own folder; set run_dir to {resumed_dir}"
                )
        self.config = config
        c = config
        # read the checkpoint to start from before anything is set up, so that a bad one fails in a second
        pretrained = c.init.from_checkpoint if self.resume_state is None else None
        self.pretrained = read_pretrained(pretrained) if pretrained else None
        self.init_rules = read_init_map(c.init.map) if pretrained and c.init.map else []
        if c.train.num_threads:
            torch.set_num_threads(c.train.num_threads)
        self.dist, device_name = distributed.setup(c.train.device)
        if not self.dist.is_main:  # rank 0 alone prints, tracks and writes
            self.console = Console(quiet=True)
        self.experiment = None
        if self.dist.is_main:
            uri = tracking_uri(c.tracking.uri)
            check_server(uri, c.tracking.experiment)  # seconds, not minutes, to learn that the server is down
            self.experiment = ExperimentInBackground(c.tracking.experiment, uri)
        try:
            self._set_up(c, device_name)
        except BaseException:
            if self.experiment is not None:
                self.experiment.wait()
            raise

    def _set_up(self, c: RunConfig, device_name: str) -> None:
        """Device, data, model, optimizers, batches, evaluator, and the state to resume or start from."""
        self.device = resolve_device(device_name)
        if self.device.type == "cpu":
            keep_freed_memory_on_cpu()
        self.autocast_dtype, use_scaler = resolve_precision(c.train.precision, self.device)

        with self._stage("data") as note:
            self.data = load_sequences(c.data.path, c.data.fraction, c.data.shards, verify=c.data.verify_checksums)
            self.identity = dataset_identity(self.data)
            note(
                f"{self.data.meta['name']}: {len(self.data.shard_indices)} shards mapped, "
                f"{len(self.data.train_items):,} training pairs, {self.data.num_items:,} items"
            )
        self.model_config = ModelConfig(num_users=self.data.num_users, num_items=self.data.num_items, **vars(c.model))
        with self._stage("negative index") as note:
            self.seen = SeenItems.from_data(self.data)
            copied = sum(not isinstance(p, np.memmap) for p in self.seen.items.parts)
            note(f"{copied} shards sorted" if copied else "the mapped shards (already sorted)")
        with self._stage("validation") as note:
            protocols = tuple(dict.fromkeys([c.eval.protocol, "full"]))
            self.validator = self._evaluator("validation", protocols)
            note(f"{self.validator.num_users:,} users, protocols {', '.join(protocols)}")
        self.batch_size_choice: BatchSizeChoice | None = None
        if c.train.batch_size == "auto":
            with self._stage("batch size") as note:
                self._choose_batch_size(c)
                choice = self.batch_size_choice
                note(f"auto: {choice.size} (tried {choice.summary()}); train.lr {choice.lr:g}")
        torch.manual_seed(c.train.seed)
        with self._stage("model") as note:
            self.model = build_model(self.model_config).to(self.device)
            self.optimizer_kind = resolve_optimizer(
                c.train.optimizer, (c.train.start_loss, c.train.loss), self.data.num_items, c.train.batch_size,
                c.model.max_len, self.dist.backend, c.train.weight_decay,
            )  # fmt: skip
            self.optimizers = build_optimizers(
                self.model, self.optimizer_kind, c.train.lr, tuple(c.train.betas), c.train.weight_decay
            )
            note(f"{sum(p.numel() for p in self.model.parameters()):,} parameters, optimizer {self.optimizer_kind}")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=use_scaler)
        with self._stage("batches") as note:
            self.batches = TrainBatches(
                self.data, c.train.batch_size, c.model.max_len, c.train.bucket_batches, c.train.window_prob
            )
            if len(self.batches) == 0:
                raise ConfigError(f"{c.data.path}: no user has two or more training items in the selected shards")
            if len(self.batches) < self.batches_per_step:
                raise ConfigError(
                    f"an epoch has {len(self.batches)} batches, fewer than one optimizer step takes "
                    f"({self.batches_per_step} = world size x train.grad_accumulation); lower train.batch_size"
                )
            note(f"{len(self.batches):,} batches per epoch of {c.train.batch_size}")
        self.metric_name = f"{c.eval.protocol}/{c.eval.metric}"
        self.test_curve = self._evaluator("evaluation", (c.eval.protocol,)) if c.eval.test_curve else None
        self.time_to_first_step: float | None = None

        self.epoch, self.step = 0, 0
        self.best_metric, self.best_epoch = -math.inf, 0
        # early stopping: the last validation, the last gain of at least eval.min_delta and its value
        self.last_eval_step, self.last_gain_step, self.gain_reference = 0, 0, -math.inf
        self.elapsed = 0.0  # seconds of training and validation so far, over every resumed segment
        self.history: list[dict] = []
        self.run_id: str | None = None
        self.init_report: list[InitRow] | None = None
        if self.resume_state is not None:
            self._restore(self.resume_state)
        elif self.pretrained is not None:
            self.init_report = init_model(
                self.model,
                self.pretrained,
                self.init_rules,
                self.identity["item_movie_ids"].numpy(),
                self.identity["user_ids"].numpy(),
                c.init.map_by_id,
            )
        self.objective = losses.build_objective(self.model, c.train, self.data, self.seen).to(self.device)
        self.train_module: torch.nn.Module = self.objective
        if self.dist.enabled:  # after restore / init-from: DDP starts every rank from rank 0's weights
            from torch.nn.parallel import DistributedDataParallel

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.train_module = DistributedDataParallel(self.objective, device_ids=ids)

    def _choose_batch_size(self, c: RunConfig) -> None:
        """Resolve train.batch_size auto: the checkpoint's size and lr on resume, else the search (see
        training/batch_size.py). The config then holds the numbers, so config.yaml, MLflow and a resume see them."""
        if self.resume_state is not None:
            saved = self.resume_state["config"]["train"]
            c.train.batch_size, c.train.lr = int(saved["batch_size"]), float(saved["lr"])
            self.batch_size_choice = BatchSizeChoice(c.train.batch_size, c.train.lr, [(c.train.batch_size, "resumed")])
            return
        budget = memory_budget_bytes(c.train.memory_limit_gb)

        def trial(size: int) -> str:
            return batch_size.trial_step(
                size, self.model_config, c.train, self.data, self.seen, self.validator, self.device,
                self.autocast_dtype, budget,
            )  # fmt: skip

        choice = choose_batch_size(
            trial, c.train.max_batch_size, c.train.lr, c.train.lr_scaling, self.dist.all_reduce_min
        )
        c.train.batch_size, c.train.lr = choice.size, choice.lr
        c.eval.batch_size = self.validator.batch_size = min(c.eval.batch_size, choice.size)  # as tried
        self.batch_size_choice = choice

    def _batch_size_params(self) -> dict:
        """MLflow params of train.batch_size auto: what was asked for and every size tried."""
        choice = self.batch_size_choice
        if choice is None:
            return {}
        return {"train.batch_size_requested": "auto", "train.batch_size_tried": choice.summary()}

    @property
    def batches_per_step(self) -> int:
        """Batches one optimizer step consumes over all processes: world size x grad_accumulation."""
        return self.dist.world_size * self.config.train.grad_accumulation

    @contextmanager
    def _stage(self, name: str):
        """Print one line per setup stage with its duration, so minutes of setup are never silent."""
        started, notes = time.perf_counter(), []
        yield notes.append
        detail = f": {notes[0]}" if notes else ""
        self.console.print(f"[dim]setup[/] {name}{detail} ({time.perf_counter() - started:.1f} s)", soft_wrap=True)

    def _evaluator(self, split: str, protocols: tuple[str, ...]) -> Evaluator:
        e = self.config.eval
        max_users = (e.validation_users or e.max_users) if split == "validation" else e.max_users
        return Evaluator(
            self.data, split, protocols, tuple(e.ks), e.seed, e.batch_size,
            max_users=max_users, item_chunk=e.item_chunk, seen=self.seen,
        )  # fmt: skip

    # ------------------------------------------------------------------ state

    def _restore(self, state: dict) -> None:
        if state["model_config"] != self.model_config.to_dict():
            raise CheckpointError(
                f"{state['path']} was trained with model {state['model_config']}, this run builds "
                f"{self.model_config.to_dict()}; resume with the checkpoint's own config (omit --config)"
            )
        if state["dataset"]["meta_sha256"] != self.identity["meta_sha256"]:
            raise CheckpointError(
                f"{state['path']} was trained on another dataset ({state['dataset']['path']}); "
                "pass --data with that one"
            )
        if list(state["dataset"].get("shards", [])) != list(self.identity["shards"]):
            raise CheckpointError(
                f"{state['path']} was trained on shards {state['dataset'].get('shards')}, this run selects "
                f"{self.identity['shards']}; resume without --fraction/--shards"
            )
        self.model.load_state_dict(state["model"])
        saved = state["optimizer"] if isinstance(state["optimizer"], list) else [state["optimizer"]]
        if len(saved) != len(self.optimizers):
            saved_kind = state.get("optimizer_kind", "adam")
            raise CheckpointError(
                f"{state['path']} was trained with optimizer {saved_kind}, this run resolves train.optimizer="
                f"{self.config.train.optimizer} to {self.optimizer_kind}; resume with train.optimizer={saved_kind}"
            )
        for optimizer, optimizer_state in zip(self.optimizers, saved, strict=True):
            optimizer.load_state_dict(optimizer_state)
        self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.best_metric, self.best_epoch = state["best_metric"], state["best_epoch"]
        self.last_eval_step = state.get("last_eval_step", state["step"])
        self.last_gain_step = state.get("last_gain_step", state["step"])
        self.gain_reference = state.get("gain_reference", state["best_metric"])
        self.elapsed = state.get("elapsed", 0.0)
        self.history = list(state["history"])
        self.run_id = state.get("mlflow_run_id")
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.dist.world_size:
            self.console.print(
                f"notice: {state['path']} was trained by {saved_world} process(es), this run has "
                f"{self.dist.world_size}: it continues, but not bit-identically to an uninterrupted run"
            )

    def state(self, finished: bool = False) -> dict:
        return {
            "model": self.model.state_dict(),
            "model_config": self.model_config.to_dict(),
            "optimizer": [optimizer.state_dict() for optimizer in self.optimizers],
            "scaler": self.scaler.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "best_metric": self.best_metric,
            "best_epoch": self.best_epoch,
            "last_eval_step": self.last_eval_step,
            "last_gain_step": self.last_gain_step,
            "gain_reference": self.gain_reference,
            "elapsed": self.elapsed,
            "history": self.history,
            "world_size": self.dist.world_size,
            "optimizer_kind": self.optimizer_kind,
            "validation_loss": self.objective.validation_loss,
            "config": json.loads(json.dumps(self.config.to_dict())),
            "dataset": self.identity,
            "mlflow_run_id": self.run_id,
            "finished": finished,
        }

    # ------------------------------------------------------------------ one epoch

    def _batch_loss(self, index: int, users: np.ndarray) -> tuple[torch.Tensor, int]:
        """The (weighted) loss of global batch `index` of this epoch, and its number of target positions.

        All randomness of a batch (negatives, SSE, dropout) is seeded by (seed, epoch, batch index), so a
        batch trains the same whichever process or resumed run computes it.
        """
        c, dev = self.config.train, self.device
        seeds = np.random.SeedSequence([c.seed, self.epoch, index])
        torch.manual_seed(int(seeds.generate_state(1, np.uint64)[0] >> np.uint64(1)))
        rng = np.random.default_rng(seeds)
        batch = self.batches.make_batch(users, rng)
        self.objective.step = self.step
        negatives = torch.from_numpy(self.objective.negatives(rng, batch.users, batch.targets)).to(dev)
        users_t, inputs, targets = (torch.from_numpy(x).to(dev) for x in (batch.users, batch.inputs, batch.targets))
        users_t, inputs, targets = self.model.training_batch(users_t, inputs, targets)
        autocast = torch.autocast(
            dev.type, dtype=self.autocast_dtype or torch.float32, enabled=self.autocast_dtype is not None
        )
        with autocast:
            loss = self.train_module(users_t, inputs, targets, negatives)
            if c.token_weighting:
                loss = loss * (batch.num_tokens / self.batches.mean_tokens)
        not_finite = float(not torch.isfinite(loss))
        if self.dist.enabled:  # every rank stops together, none is left waiting in the gradient all-reduce
            not_finite = float(self.dist.all_reduce_sum(np.array([not_finite]))[0])
        if not_finite:
            raise ConfigError(
                f"training loss became {loss.item()} at step {self.step}; lower train.lr or use train.precision=fp32"
            )
        return loss / c.grad_accumulation, batch.num_tokens

    @property
    def total_steps(self) -> int:
        """The step a cosine schedule ends at: train.max_steps, else train.epochs full epochs."""
        c = self.config.train
        return c.max_steps or c.epochs * (len(self.batches) // self.batches_per_step)

    def learning_rate(self, step: int) -> float:
        """train.lr x warm-up x schedule at optimizer step `step` (0-based): a pure function of the step."""
        c = self.config.train
        factor = min(1.0, (step + 1) / c.warmup_steps) if c.warmup_steps else 1.0
        if c.lr_schedule == "cosine":
            span = max(self.total_steps - 1 - c.warmup_steps, 1)  # the last step gets lr x min_lr_ratio
            progress = min(max(step - c.warmup_steps, 0) / span, 1.0)
            factor *= c.min_lr_ratio + (1 - c.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return c.lr * factor

    def train_epoch(self, progress: Progress | None = None, max_steps: int | None = None) -> dict:
        """One pass over the training users (or its first `max_steps` optimizer steps, for benchmarks).

        Each optimizer step takes `batches_per_step` consecutive batches of the epoch's plan: process r
        computes batches r * accumulation ... (r + 1) * accumulation - 1 of them. A remainder of fewer
        batches than a step needs is left out of this epoch (the plan is reshuffled every epoch).
        """
        self.model.train()
        c = self.config.train
        accumulation, rank = c.grad_accumulation, self.dist.rank
        plan = self.batches.plan(np.random.default_rng([c.seed, self.epoch]))  # the same on every process
        steps_in_epoch = len(plan) // self.batches_per_step
        if max_steps is not None:
            steps_in_epoch = min(steps_in_epoch, max_steps)
        task = progress.add_task(f"epoch {self.epoch + 1}", total=steps_in_epoch) if progress else None
        total_loss, seqs, tokens = 0.0, 0, 0
        started = time.perf_counter()
        for step in range(steps_in_epoch):
            for optimizer in self.optimizers:
                optimizer.zero_grad(set_to_none=True)
            for micro in range(accumulation):
                index = step * self.batches_per_step + rank * accumulation + micro
                last = micro == accumulation - 1
                sync = nullcontext() if last or not self.dist.enabled else self.train_module.no_sync()
                with sync:
                    loss, batch_tokens = self._batch_loss(index, plan[index])
                    self.scaler.scale(loss).backward()
                total_loss += loss.item()
                seqs += len(plan[index])
                tokens += batch_tokens
            if c.grad_clip:
                for optimizer in self.optimizers:
                    self.scaler.unscale_(optimizer)
                clip_grad_norm(list(self.model.parameters()), c.grad_clip)
            lr = self.learning_rate(self.step)
            for optimizer in self.optimizers:
                for group in optimizer.param_groups:
                    group["lr"] = lr
                self.scaler.step(optimizer)
            self.scaler.update()
            self.step += 1
            if self.time_to_first_step is None:
                self.time_to_first_step = seconds_since_process_start()
                self.console.print(f"first optimizer step after {self.time_to_first_step:.1f} s", soft_wrap=True)
            if progress is not None:
                rate = seqs * self.dist.world_size / (time.perf_counter() - started)
                description = f"epoch {self.epoch + 1} loss {total_loss / (step + 1):.4f} {rate:,.0f} seq/s"
                progress.update(task, advance=1, description=description)
        elapsed = time.perf_counter() - started
        if progress is not None:
            progress.remove_task(task)
        totals = self.dist.all_reduce_sum(np.array([total_loss, seqs, tokens], dtype=np.float64))
        total_loss, seqs, tokens = (float(x) for x in totals)
        return {
            "train_loss": total_loss / max(steps_in_epoch * self.dist.world_size, 1),
            "steps": steps_in_epoch,
            "seconds": elapsed,
            "sequences_per_s": seqs / elapsed,
            "tokens_per_s": tokens / elapsed,
            "lr": self.learning_rate(max(self.step - 1, 0)),
        }

    # ------------------------------------------------------------------ the run

    def fit(self) -> TrainResult:
        c = self.config
        run_dir = Path(c.run_dir)
        if self.dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(run_dir / "config.yaml") as tmp:
                tmp.write_text(dump_config(c))
        with self._tracking() if self.dist.is_main else nullcontext():
            world = f", {self.dist.world_size} processes ({self.dist.backend})" if self.dist.enabled else ""
            self.console.print(
                f"[bold]run {self.run_id}[/] on {self.device} ({c.train.precision}{world}); {self.data.meta['name']}: "
                f"{len(self.batches.users):,} training users, {self.data.num_items:,} items; "
                f"{sum(p.numel() for p in self.model.parameters()):,} parameters; run dir {run_dir}",
                soft_wrap=True,
            )
            self._loop(run_dir)
            return self._finish(run_dir)

    @contextmanager
    def _tracking(self):
        """The MLflow run (rank 0 only): created with its params, or re-opened on resume; tagged with this process.

        It ends FINISHED, FAILED on an exception, KILLED on Ctrl-C or SIGTERM (which raises SystemExit while the
        run is open). An MLflow failure is one TrackingError line naming the store: the checkpoints keep what was
        trained, and `--resume` continues the same MLflow run, logging the epochs it missed.
        """
        import mlflow

        c, uri = self.config, self.experiment.uri
        resumed = self.run_id is not None
        try:
            experiment_id = self.experiment.result()
            mlflow.set_tracking_uri(uri)
            if c.tracking.system_metrics:
                mlflow.set_system_metrics_sampling_interval(c.tracking.system_metrics_interval)
                mlflow.set_system_metrics_samples_before_logging(1)
            run = mlflow.start_run(
                run_id=self.run_id,
                experiment_id=None if resumed else experiment_id,
                run_name=None if resumed else c.tracking.run_name,
                log_system_metrics=c.tracking.system_metrics,
                tags=process_tags(),  # on resume: the new process
            )
        except Exception as exc:
            error = self._tracking_error(exc, "opening the run" if resumed else "creating the run")
            if error is exc:
                raise
            raise error from exc
        for run_id in self.experiment.ended:
            self.console.print(
                f"notice: MLflow run {run_id} was RUNNING, but its process on this host is gone: marked KILLED",
                soft_wrap=True,
            )
        if self.experiment.warning:
            self.console.print(f"warning: {self.experiment.warning}", soft_wrap=True)
        with sigterm_raises_system_exit():
            try:
                if resumed:
                    self._log_missing_epochs()
                else:
                    self.run_id = run.info.run_id
                    mlflow.log_params(
                        run_params(
                            c,
                            {
                                "dataset.name": self.identity["name"],
                                "dataset.meta_sha256": self.identity["meta_sha256"],
                                "dataset.num_users": self.data.num_users,
                                "dataset.num_items": self.data.num_items,
                                "dataset.shards": ",".join(map(str, self.data.shard_indices)),
                                "model.num_parameters": sum(p.numel() for p in self.model.parameters()),
                                "train.optimizer_resolved": self.optimizer_kind,
                                "train.world_size": self.dist.world_size,
                                "train.global_batch_size": c.train.batch_size * self.batches_per_step,
                                "eval.validated_users": self.validator.num_users,
                                **self._batch_size_params(),
                                "device": str(self.device),
                                "git_commit": git_commit(),
                                "torch_version": torch.__version__,
                            },
                        )
                    )
                    if self.init_report is not None:
                        mlflow.log_text(report_table(self.init_report, self.console), "init_from.tsv")
                yield run
            except Exception as exc:
                self._end_run("FAILED")
                error = self._tracking_error(exc, f"at epoch {self.epoch}")
                if error is exc:
                    raise
                raise error from exc
            except BaseException:  # KeyboardInterrupt, SystemExit (SIGTERM)
                self._end_run("KILLED")
                resume = self._resume_hint()
                self.console.print(f"stopped: MLflow run {self.run_id} ended KILLED{resume}", soft_wrap=True)
                raise
        try:
            mlflow.end_run("FINISHED")
        except Exception as exc:
            error = self._tracking_error(exc, "marking the finished run FINISHED (all else is logged)")
            if error is exc:
                raise
            raise error from exc

    def _tracking_error(self, exc: BaseException, when: str) -> BaseException:
        """`exc` as a one-line TrackingError naming the store if it is an MLflow failure, else `exc` itself."""
        if not is_tracking_failure(exc):
            return exc
        return TrackingError(
            f"MLflow tracking at {self.experiment.uri} failed {when}: {one_line(exc)}{self._resume_hint()}"
        )

    def _resume_hint(self) -> str:
        if self.run_id is None or not (Path(self.config.run_dir) / LAST).is_file():
            return ""
        if getattr(self, "_final_logged", False):  # its checkpoints are marked finished
            return ""
        return (
            f"; the checkpoints in {self.config.run_dir} hold epoch {self.epoch}: "
            f"`movierec train --resume {self.config.run_dir}` continues MLflow run {self.run_id}"
        )

    def _end_run(self, status: str) -> None:
        """End the active MLflow run as `status`; if the store is gone, a warning (a later run on this host
        marks the run KILLED)."""
        import mlflow

        try:
            mlflow.end_run(status)
        except Exception as exc:
            self.console.print(f"warning: could not mark MLflow run {self.run_id} {status}: {one_line(exc)}")

    def _log_epoch(self, record: dict) -> None:
        import mlflow

        metrics = {mlflow_key(k): v for k, v in record.items() if k != "epoch"}
        mlflow.log_metrics(metrics, step=record["epoch"])

    def _log_missing_epochs(self) -> None:
        """On resume: log the epochs of the checkpoint's history that never reached MLflow (its store failed,
        or the process was killed, after the checkpoint was written)."""
        from mlflow.tracking import MlflowClient

        history = MlflowClient(self.experiment.uri).get_metric_history(self.run_id, "train_loss")
        logged = {metric.step for metric in history}
        for record in self.history:
            if record["epoch"] not in logged:
                self._log_epoch(record)

    def _evaluate(self, evaluator: Evaluator) -> dict:
        """Every process scores its share of the users; the totals are summed, so all ranks agree."""
        return evaluator.run(
            self.model, self.device, self.autocast_dtype, self.objective.validation_loss,
            part=(self.dist.rank, self.dist.world_size), all_reduce=self.dist.all_reduce_sum,
        )  # fmt: skip

    def _loop(self, run_dir: Path) -> None:
        c = self.config
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=self.console, transient=True) as progress:
            while self.epoch < c.train.epochs and not (
                self.reached_max_steps or self.out_of_patience or self.out_of_time
            ):
                started = time.perf_counter()
                remaining = None if c.train.max_steps is None else c.train.max_steps - self.step
                record = {"epoch": self.epoch + 1, **self.train_epoch(progress, max_steps=remaining)}
                self.epoch += 1
                record["step"] = self.step
                if self.time_to_first_step is not None and self.epoch == 1:
                    record["time_to_first_step_s"] = self.time_to_first_step
                improved = False
                last = self.epoch == c.train.epochs or self.reached_max_steps or self.out_of_time_after(started)
                if self.step - self.last_eval_step >= c.eval.every_steps or last:
                    eval_started = time.perf_counter()
                    metrics = self._evaluate(self.validator)
                    record["val_loss"] = metrics.pop("loss")
                    metrics.pop("users")
                    record.update({f"val_{k}": v for k, v in metrics.items()})
                    record["eval_seconds"] = time.perf_counter() - eval_started
                    value = metrics[self.metric_name]
                    self.last_eval_step = self.step
                    improved = value > self.best_metric
                    if improved:
                        self.best_metric, self.best_epoch = value, self.epoch
                    if value >= self.gain_reference + c.eval.min_delta:
                        self.gain_reference, self.last_gain_step = value, self.step
                    if c.eval.test_curve:
                        curve_started = time.perf_counter()
                        test = self._evaluate(self.test_curve)
                        record[f"curve_test_{self.metric_name}"] = test[self.metric_name]
                        started += time.perf_counter() - curve_started  # not part of the run's own time
                self.elapsed += time.perf_counter() - started
                record["elapsed_s"] = self.elapsed
                self.history.append(record)
                if self.dist.is_main:
                    state = self.state()
                    if improved:  # best first: last.ckpt is the commit point a resume starts from
                        save_checkpoint(run_dir / BEST, state)
                    save_checkpoint(run_dir / LAST, state)
                    with atomic_path(run_dir / "history.json") as tmp:
                        tmp.write_text(json.dumps(self.history, indent=1))
                    self._log_epoch(record)  # after the checkpoint: a failing store loses no training
                self.console.print(self._summary_line(record, improved), soft_wrap=True)

    @property
    def out_of_time(self) -> bool:
        """train.max_minutes of the run's clock are spent."""
        budget = self.config.train.max_minutes
        return budget is not None and self.elapsed >= 60 * budget

    def out_of_time_after(self, epoch_started: float) -> bool:
        """Whether the epoch that started at `epoch_started` (perf_counter) ends the time budget, so that
        the last epoch is validated before the run stops."""
        budget = self.config.train.max_minutes
        return budget is not None and self.elapsed + time.perf_counter() - epoch_started >= 60 * budget

    @property
    def out_of_patience(self) -> bool:
        """Early stopping: eval.patience_steps steps without a validation gain of eval.min_delta."""
        e = self.config.eval
        return self.step >= e.min_steps and self.step - self.last_gain_step >= e.patience_steps

    @property
    def reached_max_steps(self) -> bool:
        return self.config.train.max_steps is not None and self.step >= self.config.train.max_steps

    def _summary_line(self, r: dict, improved: bool) -> str:
        line = (
            f"epoch {r['epoch']:4d}  loss {r['train_loss']:.4f}  {r['seconds']:.1f}s  {r['sequences_per_s']:,.0f} seq/s"
        )
        if "val_loss" in r:
            line += f"  val loss {r['val_loss']:.4f}  val {self.metric_name} {r[f'val_{self.metric_name}']:.4f}"
            line += f"  full ndcg@10 {r.get('val_full/ndcg@10', float('nan')):.4f}" + ("  *" if improved else "")
        return line

    def _finish(self, run_dir: Path) -> TrainResult:
        c = self.config
        best_path = run_dir / BEST
        if self.dist.is_main and best_path.is_file():
            self.model.load_state_dict(load_checkpoint(best_path)["model"])
        if self.dist.enabled:  # the best weights reach every rank without a shared file system
            for tensor in self.model.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)
        test = self._evaluate(self._evaluator("evaluation", tuple(c.eval.protocols)))
        test_metrics = {f"test_{k}": v for k, v in test.items() if k != "users"}
        if self.dist.is_main:
            self._log_final(run_dir, test_metrics)
        return TrainResult(
            run_id=self.run_id or "",
            run_dir=run_dir,
            best_epoch=self.best_epoch,
            best_metric=self.best_metric,
            epochs_run=self.epoch,
            test_metrics=test_metrics,
            history=self.history,
            is_main=self.dist.is_main,
        )

    def _log_final(self, run_dir: Path, test_metrics: dict) -> None:
        import mlflow

        c, best_path = self.config, run_dir / BEST
        final = self.state(finished=True)  # the best weights, marked finished so --resume refuses it
        final["test_metrics"] = test_metrics  # the run's result travels with its weights
        for path in (best_path, run_dir / LAST):
            save_checkpoint(path, final)
        try:
            mlflow.log_metrics({mlflow_key(k): v for k, v in test_metrics.items()}, step=self.best_epoch)
            mlflow.log_metric("best_epoch", self.best_epoch)
            mlflow.log_artifact(str(best_path), artifact_path="checkpoints")
            mlflow.log_artifact(str(run_dir / "config.yaml"))
            mlflow.log_artifact(str(run_dir / "history.json"))
            if self.history:
                mlflow.log_artifact(str(plot_curves(self.history, run_dir / "curves.png", self.metric_name)))
            if c.tracking.log_model:
                import mlflow.pytorch

                tables = embedding_tables(self.model)
                for table in tables:  # the logged model is for inference and fine-tuning: plain embeddings
                    table.sparse = False
                mlflow.pytorch.log_model(self.model.cpu().eval(), name="model", serialization_format="pickle")
                for table in tables:
                    table.sparse = self.optimizer_kind == "sparse-adam"
                self.model.to(self.device)
        except BaseException:  # not all of it reached MLflow: --resume goes straight to this final step again
            unfinished = {**final, "finished": False}
            for path in (best_path, run_dir / LAST):
                save_checkpoint(path, unfinished)
            raise
        self._final_logged = True


def train(config: RunConfig, resume: str | Path | None = None, console: Console | None = None) -> TrainResult:
    """Train (or resume) a model as configured; returns the MLflow run id and test metrics of the best model."""
    # the run folder is rank 0's: a second run on it is refused at once, before any setup or MLflow call
    is_main = int(os.environ.get("RANK", "0")) == 0
    with FolderLock(config.run_dir, "train") if is_main else nullcontext():
        finished = False
        try:
            result = Trainer(config, resume=resume, console=console).fit()
            finished = True
            return result
        finally:
            distributed.teardown(finished)
