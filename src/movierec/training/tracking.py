"""MLflow tracking: a server-less SQLite store by default, run bookkeeping, and the training-curve plot."""

from __future__ import annotations

import logging
import os
import subprocess
import threading
from pathlib import Path

from movierec.training.config import RunConfig

DEFAULT_DB = "mlflow.db"
# MLflow's usage telemetry would try to reach the internet; a training run has no business doing that.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# we log the model with pickle on purpose (it is our own class) and pin torch ourselves
logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
logging.getLogger("mlflow.utils.requirements_utils").setLevel(logging.ERROR)


def tracking_uri(configured: str | None) -> str:
    """The configured URI, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working directory.

    A relative `sqlite:///path` is made absolute: MLflow caches stores by URI string for the life of the
    process, so a relative one would stay bound to the working directory it was first used from.
    """
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / DEFAULT_DB}"
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        path, sep, query = uri.removeprefix("sqlite:///").partition("?")
        uri = f"sqlite:///{Path(path).resolve()}{sep}{query}"
    return uri


def ensure_experiment(name: str, uri: str) -> str:
    """Experiment id for `name`; a new experiment of a SQLite store keeps its artifacts beside the database.

    Uses a client bound to `uri` and sets no process-wide state, so it may run on a thread.
    """
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):
        root = Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts"
        artifact_location = root.as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


class ExperimentInBackground:
    """`ensure_experiment` on a thread, started while data and model are set up.

    Importing MLflow and migrating a fresh SQLite store take several seconds of a run's start-up; overlapped
    with the data setup they no longer delay the first optimizer step. Errors surface in `result()`.
    """

    def __init__(self, name: str, uri: str):
        self.uri = uri
        self._experiment_id: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._open, args=(name, uri), name="mlflow-setup", daemon=True)
        self._thread.start()

    def _open(self, name: str, uri: str) -> None:
        try:
            self._experiment_id = ensure_experiment(name, uri)
        except BaseException as exc:  # re-raised on the caller's thread
            self._error = exc

    def wait(self) -> None:
        """Let a store being created finish (a process that exits mid-migration leaves a broken store)."""
        self._thread.join()

    def result(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return str(self._experiment_id)


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
