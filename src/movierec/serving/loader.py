"""Load a trained model for serving from a checkpoint path, an MLflow run, or the MLflow Model Registry.

MODEL references:

- a ``.ckpt`` file, or a run folder (its ``best.ckpt``, else ``last.ckpt``);
- ``runs:/<run_id>`` (the run's ``checkpoints/best.ckpt`` artifact) or ``runs:/<run_id>/<artifact path>``
  (a checkpoint file, or a folder holding ``best.ckpt``/``last.ckpt``);
- ``models:/<name>/<version>`` or ``models:/<name>@<alias>``: a registered model version. Its source is
  the training run's artifacts; we load that run's ``checkpoints/best.ckpt`` (found through the version's
  ``run_id``), so what serves is exactly the checkpoint the run logged.

Only the tracking store the caller names (``--tracking-uri``, else ``$MLFLOW_TRACKING_URI``, else
``sqlite:///mlflow.db`` in the working directory) is contacted; nothing is registered or written there.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from movierec.errors import CheckpointError
from movierec.models.checkpoint import BEST, Checkpoint, load_checkpoint
from movierec.serving.recommender import Recommender

RUN_CHECKPOINT = "checkpoints/best.ckpt"


def _mlflow_error(ref: str, exc: Exception) -> CheckpointError:
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return CheckpointError(f"cannot load {ref} from MLflow: {message}")


def _download_run_checkpoint(run_id: str, artifact: str, tracking_uri: str, ref: str) -> Checkpoint:
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    artifact = artifact.strip("/") or RUN_CHECKPOINT
    with tempfile.TemporaryDirectory(prefix="movierec-model-") as tmp:
        try:
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=f"runs:/{run_id}/{artifact}", dst_path=tmp, tracking_uri=tracking_uri
            )
        except (MlflowException, OSError) as exc:
            raise _mlflow_error(ref, exc) from exc
        state = load_checkpoint(local, prefer=BEST)
    state.path = ref
    return state


def _registered_run_id(name_version: str, tracking_uri: str, ref: str) -> str:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        if "@" in name_version:
            name, alias = name_version.rsplit("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, _, number = name_version.rpartition("/")
            if not name or not number:
                raise CheckpointError(f"{ref}: expected models:/<name>/<version> or models:/<name>@<alias>")
            if number == "latest":
                versions = client.search_model_versions(f"name = '{name}'")
                if not versions:
                    raise CheckpointError(f"{ref}: the registered model {name!r} has no versions")
                version = max(versions, key=lambda v: int(v.version))
            else:
                version = client.get_model_version(name, number)
    except MlflowException as exc:
        raise _mlflow_error(ref, exc) from exc
    if not version.run_id:
        raise CheckpointError(f"{ref} was registered without a source run; register it from a training run")
    return version.run_id


def load_state(ref: str | Path, tracking_uri: str | None = None) -> Checkpoint:
    """The checkpoint dict behind a MODEL reference (see the module docstring)."""
    from movierec.mlflow_store import check_server
    from movierec.mlflow_store import tracking_uri as resolve_uri

    text = str(ref)
    if text.startswith(("runs:/", "models:/")):
        tracking_uri = resolve_uri(tracking_uri)  # sqlite paths come back absolute
        if tracking_uri.startswith("sqlite:///"):
            store = Path(tracking_uri.removeprefix("sqlite:///").partition("?")[0])
            if not store.is_file():
                raise CheckpointError(f"cannot load {text}: no MLflow store at {store}; pass --tracking-uri")
        check_server(tracking_uri)  # seconds, not MLflow's minutes of retries, to learn that a server is down
    if text.startswith("runs:/"):
        run_id, _, artifact = text.removeprefix("runs:/").partition("/")
        if not run_id:
            raise CheckpointError(f"{text}: expected runs:/<run_id> or runs:/<run_id>/<artifact path>")
        return _download_run_checkpoint(run_id, artifact, tracking_uri, text)
    if text.startswith("models:/"):
        run_id = _registered_run_id(text.removeprefix("models:/").strip("/"), tracking_uri, text)
        return _download_run_checkpoint(run_id, RUN_CHECKPOINT, tracking_uri, text)
    if "://" in text or text.startswith(("runs:", "models:")):
        raise CheckpointError(f"{text}: MODEL is a checkpoint file, a run folder, runs:/<run_id> or models:/<name>/<v>")
    return load_checkpoint(text, prefer=BEST)


def load_model(
    ref: str | Path, data: str | Path | None = None, tracking_uri: str | None = None, batch_size: int = 256
) -> Recommender:
    """A :class:`Recommender` for a checkpoint path, run folder, ``runs:/...`` or ``models:/...`` reference.

    ``data`` replaces the dataset folder recorded in the checkpoint (for a model trained elsewhere).
    """
    state = load_state(ref, tracking_uri)
    recommender = Recommender.from_checkpoint(state, data=data, source=str(ref))
    recommender.batch_size = batch_size
    return recommender
