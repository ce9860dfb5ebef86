"""Export the scoring function to ONNX or TorchScript, and register a run's model in the MLflow Model Registry.

The exported function is the whole model at inference time, with no Python from this package:

    scores = f(history, users)

- `history`: int64 (B, max_len), each row a user's item indices (1..num_items) in viewing order, the most
  recent last, **left-padded with 0** to exactly `max_len` (keep the last `max_len` items of a longer history);
- `users`: int64 (B,), user indices (1..num_users), or 0 for a person the model has no embedding for (SSE-PT
  then uses the mean of all user vectors, as `movierec recommend --history` does). SASRec has no
  user embedding: the input is accepted and ignored (pass zeros), so both kinds have the same signature;
- `scores`: float32 (B, num_items + 1), the score of every item index as the next item; column 0 (padding) is
  -inf so it never ranks.

Item and user indices are the prepared dataset's; the export carries the maps back to MovieLens ids as JSON
metadata (`item_movie_ids[i - 1]` is the movieId of item index i, `user_ids[u - 1]` the userId of user index
u): ONNX in the model's `metadata_props["movierec"]`, TorchScript in the extra file `movierec.json`.
Both formats have a dynamic batch dimension. Files are written to a temporary name, then renamed.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from movierec.errors import CheckpointError, ConfigError, MovierecError
from movierec.files import GuardedWriter, atomic_path
from movierec.models.base import SequentialModel
from movierec.models.checkpoint import DatasetIdentity

FORMATS = ("onnx", "torchscript")
METADATA_KEY = "movierec"
TORCHSCRIPT_EXTRA_FILE = "movierec.json"
EXPORT_FORMAT = "movierec-export-v1"
INPUT_NAMES = ("history", "users")
OUTPUT_NAME = "scores"
ONNX_OPSET = 18


class ScoringModule(nn.Module):
    """(history (B, max_len), users (B,)) -> scores over every item index (B, num_items + 1): the model's
    `next_item_scores`. User index 0 is a person the model has no embedding for (SSE-PT: the mean user
    vector, as `movierec recommend --history`); SASRec ignores `users`."""

    def __init__(self, model: SequentialModel):
        super().__init__()
        self.model = model.eval()

    def forward(self, history: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
        return self.model.next_item_scores(history, users)


@dataclass
class ExportSource:
    """A model to export and what is known about where it came from."""

    model: SequentialModel
    dataset: DatasetIdentity | None = None
    run_id: str | None = None
    tracking_uri: str | None = None
    origin: str = ""


def load_source(ref: str | Path, tracking_uri: str | None = None) -> ExportSource:
    """A checkpoint file or run folder (its best.ckpt), or an MLflow `runs:/...` / `models:/NAME/VERSION` ref.

    MLflow references are resolved by :func:`movierec.serving.loader.load_state` (the run's logged
    `checkpoints/best.ckpt`) in the store `tracking_uri` names; no dataset files are needed to export.
    """
    from movierec.models.checkpoint import BEST, load_checkpoint, model_from_checkpoint

    if str(ref).startswith(("runs:", "models:")):
        from movierec.mlflow_store import tracking_uri as resolve_uri
        from movierec.serving.loader import load_state

        tracking_uri = resolve_uri(tracking_uri)  # the store to register in, too
        state = load_state(str(ref), tracking_uri)
    else:
        state = load_checkpoint(ref, prefer=BEST)
    return ExportSource(
        model=model_from_checkpoint(state),
        dataset=state.dataset,
        run_id=state.mlflow_run_id,
        tracking_uri=tracking_uri or state.config.get("tracking", {}).get("uri"),
        origin=state.path or str(ref),
    )


def metadata(source: ExportSource, fmt: str) -> dict:
    c = source.model.config
    meta = {
        "format": EXPORT_FORMAT,
        "export_format": fmt,
        "kind": c.kind,
        "max_len": c.max_len,
        "num_items": c.num_items,
        "num_users": c.num_users,
        "inputs": {
            "history": f"int64 (batch, {c.max_len}): item indices 1..{c.num_items}, oldest first, left-padded with 0",
            "users": f"int64 (batch,): user indices 1..{c.num_users}, 0 for a person the model has no embedding "
            "for (SSE-PT: the mean user vector; a model without user embeddings ignores it)",
        },
        "output": f"float32 (batch, {c.num_items + 1}): score of each item index; column 0 (padding) is -inf",
        "model_config": c.to_dict(),
        "mlflow_run_id": source.run_id,
        "source": source.origin,
        "torch_version": torch.__version__,
    }
    if source.dataset:
        meta["dataset"] = {k: getattr(source.dataset, k) for k in ("name", "meta_sha256", "num_users", "num_items")}
        for key in ("item_movie_ids", "user_ids"):
            if getattr(source.dataset, key) is not None:
                meta[key] = [int(v) for v in np.asarray(getattr(source.dataset, key)).tolist()]
    return meta


def example_inputs(model: SequentialModel, batch: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random left-padded histories of varied length (one empty), random users and one new person (0)."""
    c = model.config
    generator = torch.Generator().manual_seed(seed)
    history = torch.randint(1, c.num_items + 1, (batch, c.max_len), generator=generator)
    lengths = torch.randint(0, c.max_len + 1, (batch,), generator=generator)
    lengths[0], lengths[-1] = 0, c.max_len
    history[torch.arange(c.max_len).unsqueeze(0) < (c.max_len - lengths).unsqueeze(1)] = 0
    users = torch.randint(1, c.num_users + 1, (batch,), generator=generator)
    if batch > 1:
        users[-1] = 0  # a new person
    return history, users


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """The exporters print progress and deprecation notes; keep the command's output to its result."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def export_onnx(module: ScoringModule, out: Path, meta: dict) -> Path:
    try:
        import onnx
        import onnxscript  # noqa: F401  (the exporter needs it)
    except ImportError as exc:
        raise ConfigError(f"ONNX export needs the export extra: pip install 'movierec[export]' ({exc})") from exc
    history, users = example_inputs(module.model)
    batch = torch.export.Dim("batch", min=1)
    with _quiet():
        program = torch.onnx.export(
            module,
            (history, users),
            input_names=list(INPUT_NAMES),
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"history": {0: batch}, "users": {0: batch}},
            opset_version=ONNX_OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    proto = program.model_proto
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    proto.doc_string = "movierec scoring function: " + meta["output"]
    with atomic_path(out) as tmp:
        onnx.save_model(proto, str(tmp))
    return out


def export_torchscript(module: ScoringModule, out: Path, meta: dict) -> Path:
    with _quiet(), torch.no_grad():
        traced = torch.jit.trace(module, example_inputs(module.model), check_trace=True)
    with atomic_path(out) as tmp, GuardedWriter(tmp) as handle, _quiet():
        torch.jit.save(traced, handle, _extra_files={TORCHSCRIPT_EXTRA_FILE: json.dumps(meta)})
    return out


def export_model(source: ExportSource, fmt: str, out: str | Path) -> Path:
    """Write the scoring function of `source.model` to `out` as `fmt` (onnx or torchscript)."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format {fmt!r}: choose from {', '.join(FORMATS)}")
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name, e.g. {out / ('model.' + _suffix(fmt))}")
    module = ScoringModule(source.model.cpu().eval())
    meta = metadata(source, fmt)
    return export_onnx(module, out, meta) if fmt == "onnx" else export_torchscript(module, out, meta)


def _suffix(fmt: str) -> str:
    return "onnx" if fmt == "onnx" else "pt"


def load_metadata(path: str | Path) -> dict:
    """The movierec metadata of an exported file (ONNX or TorchScript)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist")
    if _is_zip(path):  # TorchScript archives are zip files
        extra = {TORCHSCRIPT_EXTRA_FILE: ""}
        with _quiet():
            torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
        return json.loads(extra[TORCHSCRIPT_EXTRA_FILE])
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    for entry in model.metadata_props:
        if entry.key == METADATA_KEY:
            return json.loads(entry.value)
    raise ConfigError(f"{path} has no movierec metadata")


def _is_zip(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(4) == b"PK\x03\x04"


def run_export(path: str | Path, fmt: str, history: np.ndarray, users: np.ndarray) -> np.ndarray:
    """Score with an exported file, as a consumer without this package would (onnxruntime / torch.jit)."""
    if fmt == "onnx":
        try:
            import onnxruntime
        except ImportError as exc:
            raise ConfigError("checking an ONNX export needs onnxruntime: pip install 'movierec[export]'") from exc

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run([OUTPUT_NAME], {"history": history, "users": users})[0]
    with _quiet():
        scripted = torch.jit.load(str(path), map_location="cpu")
    with torch.inference_mode():
        return scripted(torch.from_numpy(history), torch.from_numpy(users)).numpy()


def verify_export(path: str | Path, fmt: str, model: SequentialModel, batch_sizes: tuple[int, ...] = (1, 7)) -> float:
    """Largest |export - PyTorch| over the finite scores of random batches of each size."""
    module = ScoringModule(model.cpu().eval())
    worst = 0.0
    for seed, batch in enumerate(batch_sizes):
        history, users = example_inputs(model, batch, seed=seed + 1)
        with torch.inference_mode():
            expected = module(history, users).numpy()
        got = run_export(path, fmt, history.numpy(), users.numpy())
        if got.shape != expected.shape:
            raise MovierecError(f"{path}: export returned shape {got.shape}, PyTorch {expected.shape}")
        worst = max(worst, float(np.abs(got[:, 1:] - expected[:, 1:]).max()))
    return worst


# --------------------------------------------------------------------------- MLflow Model Registry


def register(run_id: str | None, name: str, tracking_uri: str | None) -> tuple[str, str]:
    """Register `runs:/<run_id>/model` (the model the trainer logs) as `name`; returns (name, version)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from movierec.mlflow_store import check_server
    from movierec.mlflow_store import tracking_uri as resolve_uri

    if not run_id:
        raise CheckpointError("this model has no MLflow run id (it was not trained with tracking); cannot register it")
    if not name or "/" in name:
        raise ConfigError(f"--register {name!r}: give a registered-model name without '/'")
    uri = resolve_uri(tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise ConfigError(f"no MLflow store at {uri}; pass --tracking-uri of the store run {run_id} was logged to")
    check_server(uri)
    mlflow.set_tracking_uri(uri)
    logging.getLogger("mlflow.tracking._model_registry.fluent").setLevel(logging.ERROR)
    try:
        run = mlflow.get_run(run_id)
        version = mlflow.register_model(
            f"runs:/{run_id}/model",
            name,
            tags={"movierec.run_name": run.info.run_name or "", "movierec.experiment_id": run.info.experiment_id},
        )
    except MlflowException as exc:
        message = str(exc).splitlines()[0]
        raise ConfigError(
            f"cannot register run {run_id} at {mlflow.get_tracking_uri()}: {message} "
            "(pass --tracking-uri of the store the run was logged to; the run must have logged its model)"
        ) from exc
    return version.name, str(version.version)
