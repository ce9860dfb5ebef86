"""A training run: set-up, the loop policy around the `Engine`, and the recorders that keep what it does.

The policy: validation at the first epoch end `eval.every_steps` optimizer steps past the previous one (and
after the last epoch), early stopping after `eval.patience_steps` without a gain of `eval.min_delta`, the
`train.max_steps` and `train.max_minutes` budgets, then the test of the best weights. What the run reports
goes to recorders, each behind the small `Recorder` interface and called in order: checkpoints first (so a
failing tracking store never loses training), then MLflow (`training.tracking.MlflowRecorder`), then the
console. A benchmark that only times steps builds an `Engine` and needs none of this.
"""

from __future__ import annotations

import json
import os
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from movierec.data.layout import META_FILE, SequenceData, load_sequences, read_items, read_users, sha256_file
from movierec.data.negatives import SeenItems
from movierec.device import resolve_device, resolve_precision
from movierec.errors import CheckpointError, ConfigError
from movierec.evaluation.evaluate import Evaluator
from movierec.files import FolderLock, atomic_path
from movierec.models.checkpoint import (
    BEST,
    LAST,
    Checkpoint,
    DatasetIdentity,
    load_checkpoint,
    save_checkpoint,
)
from movierec.training import batch_size, distributed
from movierec.training.batch_size import BatchSizeChoice, choose_batch_size, memory_budget_bytes
from movierec.training.batches import TrainBatches
from movierec.training.config import RunConfig, dump_config, resolve_schedule, run_length
from movierec.training.engine import Engine, keep_freed_memory_on_cpu
from movierec.training.init_from import InitRow, init_model, read_init_map, read_pretrained


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


class Recorder:
    """What a run reports to. Every hook is a no-op here; a recorder overrides the ones it needs."""

    @contextmanager
    def recording(self, run: Run):
        """Around the loop and the final test (an MLflow run is open while it lasts)."""
        yield

    def step_done(self, run: Run, done: int, total: int, stats: dict) -> None:
        """After each optimizer step."""

    def epoch_done(self, run: Run, record: dict, improved: bool) -> None:
        """After each epoch, with its history record (validation metrics when it validated)."""

    def run_done(self, run: Run, test_metrics: dict) -> None:
        """After the test of the best weights."""

    def abandon(self) -> None:
        """The run failed before it started (set-up): release what the recorder started."""


def dataset_identity(data: SequenceData) -> DatasetIdentity:
    """What a checkpoint records of its dataset: to check it is the same one, and to map ids across datasets."""
    items, users = read_items(data.path), read_users(data.path)
    return DatasetIdentity(
        path=str(Path(data.path).resolve()),
        name=data.meta["name"],
        meta_sha256=sha256_file(Path(data.path) / META_FILE),
        num_users=data.num_users,
        num_items=data.num_items,
        item_movie_ids=torch.from_numpy(items["movie_id"].to_numpy().astype(np.int64)),
        user_ids=torch.from_numpy(users["user_id"].to_numpy().astype(np.int64)),
        shards=list(data.shard_indices),
    )


def seconds_since_process_start() -> float:
    import psutil

    return time.time() - psutil.Process().create_time()


class CheckpointRecorder(Recorder):
    """`best.ckpt` (when validation improved) and `last.ckpt` (the commit point of a resume) after every epoch,
    with `history.json`. At the end both are marked finished and carry the test metrics of the best weights:
    `best.ckpt` holds the best weights, `last.ckpt` the last ones."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def epoch_done(self, run: Run, record: dict, improved: bool) -> None:
        state = run.checkpoint()
        if improved:  # best first: last.ckpt is the commit point a resume starts from
            save_checkpoint(self.run_dir / BEST, state)
        save_checkpoint(self.run_dir / LAST, state)
        with atomic_path(self.run_dir / "history.json") as tmp:
            tmp.write_text(json.dumps(run.engine.state.history, indent=1))

    def save_final(self, test_metrics: dict, finished: bool) -> None:
        """Mark both checkpoints, as their epochs wrote them, finished (or not, when a recorder failed: --resume
        then comes back to the final step); the run's result travels with the weights."""
        for name in (BEST, LAST):
            if not (self.run_dir / name).is_file():  # best.ckpt of a run folder someone pruned: only last.ckpt
                continue
            state = load_checkpoint(self.run_dir / name)
            save_checkpoint(self.run_dir / name, replace(state, finished=finished, test_metrics=test_metrics))


class ConsoleRecorder(Recorder):
    """The progress bar during an epoch, the first step's time, and one line per epoch."""

    def __init__(self, console: Console):
        self.console = console
        self.progress: Progress | None = None
        self.task = None

    @contextmanager
    def recording(self, run: Run):
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with Progress(*columns, console=self.console, transient=True) as self.progress:
            yield

    def step_done(self, run: Run, done: int, total: int, stats: dict) -> None:
        if run.time_to_first_step is None:
            run.time_to_first_step = seconds_since_process_start()
            self.console.print(f"first optimizer step after {run.time_to_first_step:.1f} s", soft_wrap=True)
        if self.progress is None:
            return
        epoch = run.engine.state.epoch + 1
        if self.task is None:
            self.task = self.progress.add_task(f"epoch {epoch}", total=total)
        description = f"epoch {epoch} loss {stats['loss']:.4f} {stats['sequences_per_s']:,.0f} seq/s"
        self.progress.update(self.task, completed=done, description=description)
        if done == total:
            self.progress.remove_task(self.task)
            self.task = None

    def epoch_done(self, run: Run, record: dict, improved: bool) -> None:
        line = (
            f"epoch {record['epoch']:4d}  loss {record['train_loss']:.4f}  {record['seconds']:.1f}s  "
            f"{record['sequences_per_s']:,.0f} seq/s"
        )
        if "val_loss" in record:
            metric = run.metric_name
            line += f"  val loss {record['val_loss']:.4f}  val {metric} {record[f'val_{metric}']:.4f}"
            line += f"  full ndcg@10 {record.get('val_full/ndcg@10', float('nan')):.4f}" + ("  *" if improved else "")
        self.console.print(line, soft_wrap=True)


class Run:
    """Set up from a config (optionally resuming a checkpoint), then `fit()`: the loop policy and the test."""

    def __init__(
        self,
        config: RunConfig,
        resume: str | Path | None = None,
        console: Console | None = None,
        recorders: list[Recorder] | None = None,
    ):
        self.console = console or Console()
        self.resume_state = self._resumable(config, resume)
        self.config = c = config
        # read the weights to start from before anything is set up, so that a bad file fails in a second
        pretrained = c.init.from_checkpoint if self.resume_state is None else None
        self.pretrained = read_pretrained(pretrained) if pretrained else None
        self.init_rules = read_init_map(c.init.map) if pretrained and c.init.map else []
        if c.train.num_threads:
            torch.set_num_threads(c.train.num_threads)
        self.dist, device_name = distributed.setup(c.train.device)
        if not self.dist.is_main:  # rank 0 alone prints, tracks and writes
            self.console = Console(quiet=True)
        self.run_id: str | None = self.resume_state.mlflow_run_id if self.resume_state else None
        self.time_to_first_step: float | None = None
        self.recorders = self._default_recorders() if recorders is None else recorders
        self.checkpoints = next((r for r in self.recorders if isinstance(r, CheckpointRecorder)), None)
        try:
            self._set_up(device_name)
        except BaseException:
            for recorder in self.recorders:
                recorder.abandon()
            raise

    @staticmethod
    def _resumable(config: RunConfig, resume: str | Path | None) -> Checkpoint | None:
        """The checkpoint to resume, checked to be unfinished and to belong to `config.run_dir`."""
        if not resume:
            return None
        state = load_checkpoint(resume)
        if state.finished:
            raise CheckpointError(f"{state.path} is from a finished run; use --init-from to start a new run from it")
        resumed_dir = Path(state.path).parent
        if resumed_dir.resolve() != Path(config.run_dir).resolve():
            raise ConfigError(
                f"resuming {resumed_dir} would write to run_dir {config.run_dir}: a resumed run writes to its own "
                f"folder; set run_dir to {resumed_dir}"
            )
        return state

    def _default_recorders(self) -> list[Recorder]:
        """Checkpoints, MLflow and the console on rank 0 (MLflow's store is checked and its experiment created
        now, on a thread, while the data is set up); the console alone (quiet) on the other ranks."""
        if not self.dist.is_main:
            return [ConsoleRecorder(self.console)]
        from movierec.training.tracking import MlflowRecorder

        checkpoints = CheckpointRecorder(Path(self.config.run_dir))
        return [checkpoints, MlflowRecorder(self.config, self.console), ConsoleRecorder(self.console)]

    # ------------------------------------------------------------------ set-up

    @contextmanager
    def _stage(self, name: str):
        """Print one line per setup stage with its duration, so minutes of setup are never silent."""
        started, notes = time.perf_counter(), []
        yield notes.append
        detail = f": {notes[0]}" if notes else ""
        self.console.print(f"[dim]setup[/] {name}{detail} ({time.perf_counter() - started:.1f} s)", soft_wrap=True)

    def _set_up(self, device_name: str) -> None:
        """Device, data, negative index, validation users, batch size, the engine, and its starting weights."""
        c = self.config
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
        with self._stage("negative index") as note:
            self.seen = SeenItems.from_data(self.data)
            copied = sum(not isinstance(p, np.memmap) for p in self.seen.items.parts)
            note(f"{copied} shards sorted" if copied else "the mapped shards (already sorted)")
        with self._stage("validation") as note:
            protocols = tuple(dict.fromkeys([c.eval.protocol, "full"]))
            self.validator = self.evaluator("validation", protocols)
            note(f"{self.validator.num_users:,} users, protocols {', '.join(protocols)}")
        self.batch_size_choice: BatchSizeChoice | None = None
        if c.train.batch_size == "auto":
            with self._stage("batch size") as note:
                self._choose_batch_size()
                choice = self.batch_size_choice
                note(f"auto: {choice.size} (tried {choice.summary()}); train.lr {choice.lr:g}")
        with self._stage("schedule") as note:
            steps_per_epoch = TrainBatches.count(self.data, c.train.batch_size) // (
                self.dist.world_size * c.train.grad_accumulation)  # fmt: skip
            warnings = resolve_schedule(c, steps_per_epoch)
            length = run_length(c, steps_per_epoch)
            epochs = length / max(steps_per_epoch, 1)
            note(f"{length:,} steps ({epochs:.1f} epochs of {steps_per_epoch:,}), warm-up {c.train.warmup_steps}, "
                 f"validation every {c.eval.every_steps}, patience {c.eval.patience_steps}")  # fmt: skip
        if warnings:
            self.console.print(f"warning: {'; '.join(warnings)}", soft_wrap=True)
        torch.manual_seed(c.train.seed)
        with self._stage("model, optimizer and batches") as note:
            self.engine = Engine(c, self.data, self.seen, self.device, self.autocast_dtype, self.dist, use_scaler)
            if len(self.engine.batches) == 0:
                raise ConfigError(f"{c.data.path}: no user has two or more training items in the selected shards")
            if len(self.engine.batches) < self.engine.batches_per_step:
                raise ConfigError(
                    f"an epoch has {len(self.engine.batches)} batches, fewer than one optimizer step takes "
                    f"({self.engine.batches_per_step} = world size x train.grad_accumulation); lower train.batch_size"
                )
            parameters = sum(p.numel() for p in self.engine.model.parameters())
            note(f"{parameters:,} parameters, optimizer {self.engine.optimizer_kind}, "
                 f"{len(self.engine.batches):,} batches per epoch of {c.train.batch_size}")  # fmt: skip
        self.metric_name = f"{c.eval.protocol}/{c.eval.metric}"
        self.test_curve = self.evaluator("evaluation", (c.eval.protocol,)) if c.eval.test_curve else None
        self.init_report: list[InitRow] | None = None
        if self.resume_state is not None:
            self._restore(self.resume_state)
        elif self.pretrained is not None:
            ids = (self.identity.item_movie_ids.numpy(), self.identity.user_ids.numpy())
            self.init_report = init_model(self.engine.model, self.pretrained, self.init_rules, *ids, c.init.map_by_id)
        self.engine.wrap_for_data_parallel()  # after restore / init-from: DDP starts every rank from rank 0's

    def _choose_batch_size(self) -> None:
        """Resolve train.batch_size auto: the checkpoint's size and lr on resume, else the search (see
        training/batch_size.py). The config then holds the numbers, so config.yaml, MLflow and a resume see them."""
        c = self.config
        if self.resume_state is not None:
            saved = self.resume_state.config["train"]
            c.train.batch_size, c.train.lr = int(saved["batch_size"]), float(saved["lr"])
            self.batch_size_choice = BatchSizeChoice(c.train.batch_size, c.train.lr, [(c.train.batch_size, "resumed")])
            return
        budget = memory_budget_bytes(c.train.memory_limit_gb)

        def trial(size: int) -> str:
            return batch_size.trial_step(size, c, self.data, self.seen, self.validator, self.device,
                                         self.autocast_dtype, budget)  # fmt: skip

        t = c.train
        choice = choose_batch_size(trial, t.max_batch_size, t.lr, t.lr_scaling, self.dist.all_reduce_min)
        c.train.batch_size, c.train.lr = choice.size, choice.lr
        c.eval.batch_size = self.validator.batch_size = min(c.eval.batch_size, choice.size)  # as tried
        self.batch_size_choice = choice

    def evaluator(self, split: str, protocols: tuple[str, ...]) -> Evaluator:
        e = self.config.eval
        max_users = (e.validation_users or e.max_users) if split == "validation" else e.max_users
        return Evaluator(
            self.data, split, protocols, tuple(e.ks), e.seed, e.batch_size,
            max_users=max_users, item_chunk=e.item_chunk, seen=self.seen,
        )  # fmt: skip

    # ------------------------------------------------------------------ checkpoints

    def _restore(self, state: Checkpoint) -> None:
        engine, where = self.engine, state.path
        if state.model_config != engine.model_config.to_dict():
            raise CheckpointError(
                f"{where} was trained with model {state.model_config}, this run builds "
                f"{engine.model_config.to_dict()}; resume with the checkpoint's own config (omit --config)"
            )
        if state.dataset.meta_sha256 != self.identity.meta_sha256:
            raise CheckpointError(f"{where} was trained on another dataset ({state.dataset.path}); pass --data with it")
        if list(state.dataset.shards or []) != list(self.identity.shards):
            raise CheckpointError(
                f"{where} was trained on shards {state.dataset.shards}, this run selects {self.identity.shards}; "
                "resume without --fraction/--shards"
            )
        if len(state.optimizers) != len(engine.optimizers):
            raise CheckpointError(
                f"{where} was trained with optimizer {state.optimizer_kind}, this run resolves train.optimizer="
                f"{self.config.train.optimizer} to {engine.optimizer_kind}; resume with "
                f"train.optimizer={state.optimizer_kind}"
            )
        try:
            engine.restore(state.model, state.optimizers, state.scaler, state.train_state)
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(
                f"{where} cannot be resumed: its saved state does not fit this run ({first})"
            ) from exc
        if state.world_size != self.dist.world_size:
            self.console.print(
                f"notice: {where} was trained by {state.world_size} process(es), this run has "
                f"{self.dist.world_size}: it continues, but not bit-identically to an uninterrupted run"
            )

    def checkpoint(self, finished: bool = False) -> Checkpoint:
        engine = self.engine
        return Checkpoint(
            model=engine.model.state_dict(),
            model_config=engine.model_config.to_dict(),
            config=json.loads(json.dumps(self.config.to_dict())),
            dataset=self.identity,
            train_state=engine.state,
            optimizers=[optimizer.state_dict() for optimizer in engine.optimizers],
            scaler=engine.scaler.state_dict(),
            optimizer_kind=engine.optimizer_kind,
            validation_loss=engine.objective.validation_loss,
            world_size=self.dist.world_size,
            mlflow_run_id=self.run_id,
            finished=finished,
        )

    # ------------------------------------------------------------------ the loop

    def fit(self) -> TrainResult:
        c, run_dir = self.config, Path(self.config.run_dir)
        if self.dist.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            with atomic_path(run_dir / "config.yaml") as tmp:
                tmp.write_text(dump_config(c))
        with ExitStack() as stack:
            for recorder in self.recorders:
                stack.enter_context(recorder.recording(self))
            self.run_id = self.dist.from_main(self.run_id)  # so a survivor of rank 0 can end its MLflow run
            world = f", {self.dist.world_size} processes ({self.dist.backend})" if self.dist.enabled else ""
            self.console.print(
                f"[bold]run {self.run_id}[/] on {self.device} ({c.train.precision}{world}); {self.data.meta['name']}: "
                f"{len(self.engine.batches.users):,} training users, {self.data.num_items:,} items; "
                f"{sum(p.numel() for p in self.engine.model.parameters()):,} parameters; run dir {run_dir}",
                soft_wrap=True,
            )
            while not self.done:
                self._epoch()
            return self._finish()

    @property
    def done(self) -> bool:
        """The run's length (epochs or steps), early stopping or the time budget ends the run."""
        s, t, e = self.engine.state, self.config.train, self.config.eval
        patience = e.patience_steps
        out_of_patience = patience is not None and s.step >= e.min_steps and s.step - s.last_gain_step >= patience
        out_of_time = t.max_minutes is not None and s.elapsed >= 60 * t.max_minutes
        return self.reached_length or out_of_patience or out_of_time

    @property
    def reached_length(self) -> bool:
        """train.epochs epochs, or train.steps steps, or the train.max_steps cap."""
        s, t = self.engine.state, self.config.train
        return (t.epochs is not None and s.epoch >= t.epochs) or s.step >= self.steps_limit

    @property
    def steps_limit(self) -> float:
        """The step budget: train.steps and train.max_steps, the smaller (inf when neither is set)."""
        t = self.config.train
        return min(x for x in (t.steps, t.max_steps, float("inf")) if x is not None)

    def _epoch(self) -> None:
        """One epoch, validated when it is `eval.every_steps` past the last validation or the run's last."""
        c, s = self.config, self.engine.state
        started = time.perf_counter()
        remaining = None if self.steps_limit == float("inf") else int(self.steps_limit) - s.step

        def step_done(done: int, total: int, stats: dict) -> None:
            for recorder in self.recorders:
                recorder.step_done(self, done, total, stats)

        record = {"epoch": s.epoch + 1, **self.engine.train_epoch(remaining, step_done)}
        s.epoch += 1
        record["step"] = s.step
        if self.time_to_first_step is not None and s.epoch == 1:
            record["time_to_first_step_s"] = self.time_to_first_step
        budget = c.train.max_minutes
        out_of_time = budget is not None and s.elapsed + time.perf_counter() - started >= 60 * budget
        last = self.reached_length or out_of_time
        improved = False
        if s.step - s.last_eval_step >= c.eval.every_steps or last:
            improved, curve_seconds = self._validate(record)
            started += curve_seconds  # the test curve is not part of the run's own time
        s.elapsed += time.perf_counter() - started
        record["elapsed_s"] = s.elapsed
        s.history.append(record)
        for recorder in self.recorders:
            recorder.epoch_done(self, record, improved)

    def _validate(self, record: dict) -> tuple[bool, float]:
        """Validation metrics into `record` and the early-stopping state; (improved, seconds of the test curve)."""
        c, s = self.config, self.engine.state
        started = time.perf_counter()
        metrics = self.evaluate(self.validator)
        record["val_loss"] = metrics.pop("loss")
        metrics.pop("users")
        record.update({f"val_{k}": v for k, v in metrics.items()})
        record["eval_seconds"] = time.perf_counter() - started
        value = metrics[self.metric_name]
        s.last_eval_step = s.step
        improved = value > s.best_metric
        if improved:
            s.best_metric, s.best_epoch = value, s.epoch
        if value >= s.gain_reference + c.eval.min_delta:
            s.gain_reference, s.last_gain_step = value, s.step
        if self.test_curve is None:
            return improved, 0.0
        curve_started = time.perf_counter()
        record[f"curve_test_{self.metric_name}"] = self.evaluate(self.test_curve)[self.metric_name]
        return improved, time.perf_counter() - curve_started

    def evaluate(self, evaluator: Evaluator) -> dict:
        """Every process scores its share of the users; the totals are summed, so all ranks agree."""
        return evaluator.run(
            self.engine.model, self.device, self.autocast_dtype, self.engine.objective.validation_loss,
            part=(self.dist.rank, self.dist.world_size), all_reduce=self.dist.all_reduce_sum,
        )  # fmt: skip

    def _finish(self) -> TrainResult:
        """Test the best weights; checkpoints then recorders keep the result (a recorder that fails leaves the
        checkpoints unfinished, so --resume comes straight back to this step)."""
        c, s, model = self.config, self.engine.state, self.engine.model
        best_path = Path(c.run_dir) / BEST
        if self.dist.is_main and best_path.is_file():
            model.load_state_dict(load_checkpoint(best_path).model)
        if self.dist.enabled:  # the best weights reach every rank without a shared file system
            for tensor in model.state_dict().values():
                torch.distributed.broadcast(tensor, src=0)
        test = self.evaluate(self.evaluator("evaluation", tuple(c.eval.protocols)))
        test_metrics = {f"test_{k}": v for k, v in test.items() if k != "users"}
        if self.checkpoints is not None:
            self.checkpoints.save_final(test_metrics, finished=True)
            try:
                for recorder in self.recorders:
                    recorder.run_done(self, test_metrics)
            except BaseException:
                self.checkpoints.save_final(test_metrics, finished=False)
                raise
        return TrainResult(
            run_id=self.run_id or "", run_dir=Path(c.run_dir), best_epoch=s.best_epoch, best_metric=s.best_metric,
            epochs_run=s.epoch, test_metrics=test_metrics, history=s.history, is_main=self.dist.is_main,
        )  # fmt: skip


def train(config: RunConfig, resume: str | Path | None = None, console: Console | None = None) -> TrainResult:
    """Train (or resume) a model as configured; returns the MLflow run id and test metrics of the best model.
    Under torchrun, the loss of a peer process is one PeerLostError (see `peer_lost`)."""
    # the run folder is rank 0's: a second run on it is refused at once, before any setup or MLflow call
    is_main = int(os.environ.get("RANK", "0")) == 0
    lock = FolderLock(config.run_dir, "train") if is_main else nullcontext()
    with lock, distributed.sigterm_raises_system_exit():
        finished, run = False, None
        try:
            run = Run(config, resume=resume, console=console)
            result = run.fit()
            finished = True
            return result
        except (Exception, SystemExit) as exc:
            if not distributed.is_peer_failure(exc):
                raise
            raise peer_lost(config, run) from exc
        finally:
            distributed.teardown(finished)


def peer_lost(config: RunConfig, run: Run | None) -> distributed.PeerLostError:
    """The one line of a survivor: the rank lost, how to resume. A survivor of rank 0, which cannot end its
    MLflow run any more, ends it KILLED (rank 0 itself ends it KILLED when it survives: MlflowRecorder)."""
    group = distributed.joined()
    lost = group.lost_peers()
    run_dir = Path(config.run_dir)
    if (run_dir / LAST).is_file():
        resume = f"torchrun <same options> -m movierec train --resume {run_dir}"
        hint = f"the last checkpoint is kept: resume with `{resume}`"
    else:
        hint = "no checkpoint was written yet, so a new run starts over"
    message = f"{group.describe_lost(lost)} (its process ended or stopped answering); {hint}"
    if 0 in lost and run is not None and run.run_id:
        from movierec.mlflow_store import tracking_uri
        from movierec.training.tracking import end_killed

        message += f"; {end_killed(tracking_uri(config.tracking.uri), run.run_id)}"
    return distributed.PeerLostError(message)
