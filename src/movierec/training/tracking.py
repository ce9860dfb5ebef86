"""MLflow tracking: the store check, run bookkeeping, the training-curve plot, and `MlflowRecorder`, the MLflow
lifecycle of a training run."""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from rich.console import Console

from movierec.errors import TrackingError, one_line
from movierec.mlflow_store import check_server, request_deadline, request_deadline_s, sqlite_store_lock
from movierec.training import distributed
from movierec.training.config import RunConfig
from movierec.training.run import Recorder

if TYPE_CHECKING:
    from movierec.training.run import Run

# tags of every training run: which process trains it, so that a later run can tell that it was killed
HOST_TAG, PID_TAG, PROCESS_STARTED_TAG = "movierec.host", "movierec.pid", "movierec.process_started"


def ensure_experiment(name: str, uri: str) -> str:
    """Experiment id for `name`; a new experiment of a SQLite store keeps its artifacts beside the database.

    Uses a client bound to `uri` and sets no process-wide state, so it may run on a thread.
    """
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    with sqlite_store_lock(uri):  # the first call opens the store, creating or migrating its schema
        client = MlflowClient(tracking_uri=uri)
        experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):
        root = Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts"
        artifact_location = root.as_uri()
    try:
        return client.create_experiment(name, artifact_location=artifact_location)
    except MlflowException:  # another training created it meanwhile
        experiment = client.get_experiment_by_name(name)
        if experiment is None:
            raise
        return experiment.experiment_id


class ExperimentInBackground:
    """`ensure_experiment` and `end_dead_runs` on a thread, started while data and model are set up.

    Importing MLflow and migrating a fresh SQLite store take several seconds of a run's start-up; overlapped
    with the data setup they no longer delay the first optimizer step. Errors surface in `result()`; the runs
    found dead are in `ended` (and a failure to look for them, which does not stop training, in `warning`).
    """

    def __init__(self, name: str, uri: str):
        self.uri = uri
        self.ended: list[str] = []
        self.warning: str | None = None
        self._experiment_id: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._open, args=(name, uri), name="mlflow-setup", daemon=True)
        self._thread.start()

    def _open(self, name: str, uri: str) -> None:
        try:
            self._experiment_id = ensure_experiment(name, uri)
        except BaseException as exc:  # re-raised on the caller's thread
            self._error = exc
            return
        try:
            self.ended = end_dead_runs(uri, self._experiment_id)
        except Exception as exc:  # only bookkeeping: the run itself can still be tracked
            self.warning = f"could not look for runs of dead processes: {one_line(exc)}"

    def wait(self) -> None:
        """Let a store being created finish (a process that exits mid-migration leaves a broken store)."""
        self._thread.join()

    def result(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return str(self._experiment_id)


def is_tracking_failure(exc: BaseException) -> bool:
    """Whether `exc` comes from MLflow or its HTTP client (as opposed to a bug or a training error)."""
    import requests
    from mlflow.exceptions import MlflowException

    return isinstance(exc, MlflowException | requests.RequestException)


def process_tags() -> dict[str, str]:
    """Tags naming the training process (host, pid, its start time, so that a reused pid is not mistaken)."""
    import psutil

    return {
        HOST_TAG: socket.gethostname(),
        PID_TAG: str(os.getpid()),
        PROCESS_STARTED_TAG: f"{psutil.Process().create_time():.3f}",
    }


def process_alive(pid: int, started: float | None) -> bool:
    """Whether process `pid` of this host still runs and is the one started at `started` (epoch seconds)."""
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(process.create_time() - started) < 1.0
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:  # it exists; we cannot tell more
        return True


def end_dead_runs(uri: str, experiment_id: str) -> list[str]:
    """Mark KILLED the runs of the experiment still RUNNING whose training process on this host is gone.

    A SIGKILLed (or OOM-killed, or powered-off) training cannot end its own run; the next training on the same
    host against the same experiment does it. Runs of other hosts and runs without the tags are left alone.
    Resuming such a run sets it back to RUNNING. Returns the ids of the runs ended.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    host = socket.gethostname().replace("'", "")
    runs = client.search_runs(
        [experiment_id], filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'"
    )
    ended = []
    for run in runs:
        tags = run.data.tags
        try:
            pid = int(tags[PID_TAG])
            started = float(tags[PROCESS_STARTED_TAG]) if PROCESS_STARTED_TAG in tags else None
        except (KeyError, ValueError):
            continue
        if not process_alive(pid, started):
            client.set_terminated(run.info.run_id, "KILLED")
            ended.append(run.info.run_id)
    return ended


def end_killed(uri: str, run_id: str, timeout_s: float = 10.0) -> str:
    """End MLflow run `run_id` KILLED for its process, which died (rank 0 of a torchrun job: a survivor does it,
    rather than leave it RUNNING until the next run on that host). On a thread, so that a store that does not
    answer costs `timeout_s`, not MLflow's minutes of retries. Returns what became of the run, for the user."""
    outcome: list[str] = []

    def end() -> None:
        from mlflow.tracking import MlflowClient

        try:
            client = MlflowClient(tracking_uri=uri)
            status = client.get_run(run_id).info.status
            if status == "RUNNING":
                client.set_terminated(run_id, "KILLED")
                status = "KILLED"
            outcome.append(f"MLflow run {run_id} ended {status}")
        except Exception as exc:
            outcome.append(f"MLflow run {run_id} could not be ended KILLED ({one_line(exc, 120)})")

    thread = threading.Thread(target=end, name="mlflow-end-killed", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return outcome[0] if outcome else f"MLflow run {run_id} could not be ended KILLED (no answer in {timeout_s:g} s)"


@contextmanager
def sigterm_raises_system_exit():
    """While inside, SIGTERM raises SystemExit(143) in the main thread instead of ending the process at once.

    So a run stopped by `kill`, `docker stop` or a scheduler ends its MLflow run KILLED and leaves its last
    checkpoint intact. Only installed from the main thread and over the default handler; a second SIGTERM
    kills at once.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is handler:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def run_params(config: RunConfig, extra: dict) -> dict[str, str]:
    params = {key: str(value) for key, value in config.flat().items()}
    params.update({key: str(value) for key, value in extra.items()})
    return params


def plot_curves(history: list[dict], path: Path, metric: str) -> Path:
    """PNG of train/validation loss and the validation ranking metric per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [h["epoch"] for h in history]
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train")
    val = [h for h in history if "val_loss" in h]
    ax_loss.plot([h["epoch"] for h in val], [h["val_loss"] for h in val], marker="o", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend()
    ax_metric.plot([h["epoch"] for h in val], [h.get(f"val_{metric}", float("nan")) for h in val], marker="o")
    ax_metric.set(xlabel="epoch", ylabel=metric, title=f"validation {metric}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _not_the_gpu_metrics_notice(record: logging.LogRecord) -> bool:
    return "Skip logging GPU metrics" not in record.getMessage()


def quiet_gpu_metrics_notice() -> None:
    """MLflow's system-metrics monitor says at INFO level, on every run without a GPU, that it skips GPU
    metrics: a line that tells a CPU user nothing. Drop that one line (its other messages stay)."""
    logger = logging.getLogger("mlflow.system_metrics.system_metrics_monitor")
    if _not_the_gpu_metrics_notice not in logger.filters:
        logger.addFilter(_not_the_gpu_metrics_notice)


def mlflow_key(name: str) -> str:
    """MLflow metric names may not contain '@'."""
    return name.replace("@", "_at_")


class MlflowRecorder(Recorder):
    """A run's MLflow lifecycle (rank 0): the run created with its params, or re-opened on resume and tagged
    with this process; a metric record per epoch; at the end the test metrics, artifacts and the model.

    It ends FINISHED, FAILED on an exception, KILLED on Ctrl-C or SIGTERM (which raises SystemExit while the
    run is open). An MLflow failure is one TrackingError line naming the store: the checkpoints keep what was
    trained, and `--resume` continues the same MLflow run, logging the epochs it missed.
    """

    def __init__(self, config: RunConfig, console: Console):
        from movierec.mlflow_store import tracking_uri

        self.config, self.console = config, console
        uri = tracking_uri(config.tracking.uri)
        check_server(uri, config.tracking.experiment)  # seconds, not minutes, to learn that the server is down
        self.experiment = ExperimentInBackground(config.tracking.experiment, uri)
        self.final_logged = False
        self.run: Run | None = None

    def abandon(self) -> None:
        self.experiment.wait()

    @contextmanager
    def recording(self, run: Run):
        import mlflow

        self.run = run
        resumed = run.run_id is not None
        try:
            with self._deadline("opening the run" if resumed else "creating the run"):
                mlflow_run = self._start(resumed)
        except Exception as exc:
            raise self._error(exc, "opening the run" if resumed else "creating the run") from exc
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
                    with self._deadline("logging the epochs it missed"):
                        self._log_missing_epochs()
                else:
                    run.run_id = mlflow_run.info.run_id
                    with self._deadline("logging the run's parameters"):
                        self._log_params()
                yield
            except Exception as exc:
                self._end("KILLED" if distributed.is_peer_failure(exc) else "FAILED")  # a peer was killed
                raise self._error(exc, f"at epoch {run.engine.state.epoch}") from exc
            except BaseException as exc:  # KeyboardInterrupt, SystemExit (SIGTERM)
                self._end("KILLED")
                if not distributed.is_peer_failure(exc):  # else training.run.peer_lost says it, in one line
                    self.console.print(
                        f"stopped: MLflow run {run.run_id} ended KILLED{self._resume_hint()}", soft_wrap=True
                    )
                raise
        try:
            with self._deadline("marking the run FINISHED"):
                mlflow.end_run("FINISHED")
        except Exception as exc:
            raise self._error(exc, "marking the finished run FINISHED (all else is logged)") from exc

    def _start(self, resumed: bool):
        import mlflow

        c = self.config
        experiment_id = self.experiment.result()
        mlflow.set_tracking_uri(self.experiment.uri)
        if c.tracking.system_metrics:
            if self.run.device.type != "cuda":
                quiet_gpu_metrics_notice()
            mlflow.set_system_metrics_sampling_interval(c.tracking.system_metrics_interval)
            mlflow.set_system_metrics_samples_before_logging(1)
        return mlflow.start_run(
            run_id=self.run.run_id,
            experiment_id=None if resumed else experiment_id,
            run_name=None if resumed else c.tracking.run_name,
            log_system_metrics=c.tracking.system_metrics,
            tags=process_tags(),  # on resume: the new process
        )

    def _log_params(self) -> None:
        import mlflow

        run, c = self.run, self.config
        engine = run.engine
        extra = {
            "dataset.name": run.identity.name,
            "dataset.meta_sha256": run.identity.meta_sha256,
            "dataset.num_users": run.data.num_users,
            "dataset.num_items": run.data.num_items,
            "dataset.shards": ",".join(map(str, run.data.shard_indices)),
            "model.num_parameters": sum(p.numel() for p in engine.model.parameters()),
            "train.optimizer_resolved": engine.optimizer_kind,
            "train.world_size": run.dist.world_size,
            "train.global_batch_size": c.train.batch_size * engine.batches_per_step,
            "eval.validated_users": run.validator.num_users,
            "device": str(run.device),
            "git_commit": git_commit(),
            "torch_version": torch.__version__,
        }
        if run.batch_size_choice is not None:
            extra.update(
                {"train.batch_size_requested": "auto", "train.batch_size_tried": run.batch_size_choice.summary()}
            )
        mlflow.log_params(run_params(c, extra))
        if run.init_report is not None:
            from movierec.training.init_from import report_table

            mlflow.log_text(report_table(run.init_report, self.console), "init_from.tsv")

    def _deadline(self, what: str, upload_bytes: int = 0):
        """A total deadline for one step of logging (see `request_deadline`), scaled for uploads."""
        return request_deadline(self.experiment.uri, what, request_deadline_s(upload_bytes))

    def _error(self, exc: BaseException, when: str) -> BaseException:
        """`exc` as a one-line TrackingError naming the store if it is an MLflow failure (with the resume
        command when there is something to resume), else `exc` itself."""
        if isinstance(exc, TrackingError):
            return TrackingError(f"{exc}{self._resume_hint()}")
        if not is_tracking_failure(exc):
            return exc
        return TrackingError(
            f"MLflow tracking at {self.experiment.uri} failed {when}: {one_line(exc)}{self._resume_hint()}"
        )

    def _resume_hint(self) -> str:
        run_dir = Path(self.config.run_dir)
        if self.run is None or self.run.run_id is None or not (run_dir / "last.ckpt").is_file() or self.final_logged:
            return ""
        return (
            f"; the checkpoints in {run_dir} hold epoch {self.run.engine.state.epoch}: "
            f"`movierec train --resume {run_dir}` continues MLflow run {self.run.run_id}"
        )

    def _end(self, status: str) -> None:
        """End the active MLflow run as `status`; if the store is gone, a warning (a later run on this host
        marks the run KILLED)."""
        import mlflow

        try:
            with request_deadline(self.experiment.uri, f"marking the run {status}", 15.0):
                mlflow.end_run(status)
        except Exception as exc:
            self.console.print(f"warning: could not mark MLflow run {self.run.run_id} {status}: {one_line(exc)}")

    def epoch_done(self, run: Run, record: dict, improved: bool) -> None:
        import mlflow

        metrics = {mlflow_key(k): v for k, v in record.items() if k != "epoch"}
        with self._deadline(f"logging epoch {record['epoch']}"):
            mlflow.log_metrics(metrics, step=record["epoch"])

    def _log_missing_epochs(self) -> None:
        """On resume: log the epochs of the checkpoint's history that never reached MLflow (its store failed,
        or the process was killed, after the checkpoint was written)."""
        from mlflow.tracking import MlflowClient

        history = MlflowClient(self.experiment.uri).get_metric_history(self.run.run_id, "train_loss")
        logged = {metric.step for metric in history}
        for record in self.run.engine.state.history:
            if record["epoch"] not in logged:
                self.epoch_done(self.run, record, False)

    def run_done(self, run: Run, test_metrics: dict) -> None:
        import mlflow

        run_dir, state = Path(self.config.run_dir), run.engine.state
        with self._deadline("logging the test metrics"):
            mlflow.log_metrics({mlflow_key(k): v for k, v in test_metrics.items()}, step=state.best_epoch)
            mlflow.log_metric("best_epoch", state.best_epoch)
        artifacts = [(run_dir / "best.ckpt", "checkpoints"), (run_dir / "config.yaml", None)]
        artifacts.append((run_dir / "history.json", None))
        if state.history:
            artifacts.append((plot_curves(state.history, run_dir / "curves.png", run.metric_name), None))
        for path, folder in artifacts:
            with self._deadline(f"uploading {path.name}", path.stat().st_size):
                mlflow.log_artifact(str(path), artifact_path=folder)
        if self.config.tracking.log_model:
            from movierec.models.base import build_model
            from movierec.serving.pyfunc import log_pyfunc_model

            model = build_model(run.engine.model_config)  # plain tables (no sparse gradients), on the CPU
            model.load_state_dict({k: v.cpu() for k, v in run.engine.model.state_dict().items()})
            size = sum(t.numel() * t.element_size() for t in model.state_dict().values())
            with self._deadline("logging the model", 2 * size):  # weights and the items table, a few requests
                log_pyfunc_model(model.eval(), self.config.data.path)
        self.final_logged = True
