"""The checkpoint format, in one place: its typed, versioned schema, writing, reading, rebuilding the model,
and the dataset check.

A checkpoint file is a `torch.save` dict, loaded with `weights_only=True` (no code runs on load) and read
into a :class:`Checkpoint`: the model's weights and config, the optimizer and grad-scaler states, the run's
progress (:class:`TrainState`), the resolved run config, the dataset's identity (:class:`DatasetIdentity`)
and the run's outcome. Version 2 nests the progress under `train_state`; a version-1 file (flat keys, written
before December 2026) is read into the same schema, so old runs evaluate, serve, fine-tune and resume. Every
field is checked once, here, so a damaged or edited file is one line, wherever it is read.
Writes go to a temporary file in the same folder, then `os.replace`, so a crash or a full disk never
leaves a torn file and never damages the previous checkpoint.

Training, evaluation, serving and export all read checkpoints through :func:`load_checkpoint`,
:func:`model_from_checkpoint` and :func:`verify_dataset`, so they fail alike, on one line.
"""

from __future__ import annotations

import math
import pickle
import zipfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from movierec.data.layout import META_FILE, read_meta, sha256_file
from movierec.errors import CheckpointError, DataError, one_line
from movierec.files import GuardedWriter, atomic_path
from movierec.models.base import ModelConfig, ModelSection, SequentialModel, build_model

FORMAT = "movierec-checkpoint-v2"
FORMAT_V1 = "movierec-checkpoint-v1"  # flat keys; read, never written
LAST, BEST = "last.ckpt", "best.ckpt"


@dataclass
class TrainState:
    """Where a run stands: what an exact resume needs besides the weights and optimizer moments."""

    epoch: int = 0  # epochs completed
    step: int = 0  # optimizer steps taken
    best_metric: float = -math.inf  # best validation value so far, and its epoch
    best_epoch: int = 0
    last_eval_step: int = 0  # step of the last validation
    last_gain_step: int = 0  # step of the last gain of at least eval.min_delta, and the value it reached
    gain_reference: float = -math.inf
    elapsed: float = 0.0  # seconds of training and validation, over every resumed segment
    history: list[dict] = field(default_factory=list)  # one record per epoch


@dataclass
class DatasetIdentity:
    """What a checkpoint records of its dataset: to check it is the same one, and to map ids across datasets."""

    path: str | None = None
    name: str = "?"
    meta_sha256: str | None = None
    num_users: int | None = None
    num_items: int | None = None
    item_movie_ids: torch.Tensor | None = None  # original movieId of item 1..num_items
    user_ids: torch.Tensor | None = None  # original userId of user 1..num_users
    shards: list[int] | None = None


@dataclass
class Checkpoint:
    """A checkpoint, typed. `path` is where it was read from (not saved)."""

    model: dict[str, torch.Tensor]
    model_config: dict
    config: dict
    dataset: DatasetIdentity
    train_state: TrainState = field(default_factory=TrainState)
    optimizers: list[dict] = field(default_factory=list)
    scaler: dict = field(default_factory=dict)
    optimizer_kind: str = "adam"
    validation_loss: str = "bce"  # the loss validation reports: "bce" (one negative) or "ce" (every item)
    world_size: int = 1
    mlflow_run_id: str | None = None
    finished: bool = False
    test_metrics: dict = field(default_factory=dict)
    path: str = ""

    def to_dict(self) -> dict:
        """What `torch.save` writes (version 2)."""
        raw = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("path", "dataset", "train_state")}
        return {"format": FORMAT, **raw, "dataset": asdict(self.dataset), "train_state": asdict(self.train_state)}


def _from_v1(raw: dict) -> dict:
    """A version-1 dict in version 2's shape: the progress nested, the defaults of its older files applied."""
    raw = dict(raw)
    step = raw.get("step", 0)
    raw["train_state"] = {
        "epoch": raw.pop("epoch", 0), "step": raw.pop("step", 0), "best_metric": raw.get("best_metric", -math.inf),
        "best_epoch": raw.pop("best_epoch", 0), "last_eval_step": raw.pop("last_eval_step", step),
        "last_gain_step": raw.pop("last_gain_step", step),
        "gain_reference": raw.pop("gain_reference", raw.get("best_metric", -math.inf)),
        "elapsed": raw.pop("elapsed", 0.0), "history": raw.pop("history", []),
    }  # fmt: skip
    raw.pop("best_metric", None)
    optimizer = raw.pop("optimizer", [])
    raw["optimizers"] = optimizer if isinstance(optimizer, list) else [optimizer]
    if "validation_loss" not in raw:  # written before the evaluator reported a softmax loss
        loss = (raw.get("config") or {}).get("train", {}).get("loss", "bce")
        raw["validation_loss"] = "ce" if loss in ("ce", "sampled-softmax") else "bce"
    return raw


def _typed(raw: dict, where: Path) -> Checkpoint:
    """A Checkpoint from a loaded dict, each field checked: a wrong type is one line naming it."""
    expected = {
        "model": dict, "model_config": dict, "config": dict, "dataset": dict, "train_state": dict, "optimizers": list,
        "scaler": dict, "optimizer_kind": str, "validation_loss": str, "world_size": int, "finished": bool,
        "test_metrics": (dict, type(None)), "mlflow_run_id": (str, type(None)),
    }  # fmt: skip
    missing = [key for key in ("model", "model_config", "dataset", "config") if key not in raw]
    if missing:
        raise CheckpointError(f"{where} is an incomplete movierec checkpoint (no {', '.join(missing)})")
    for key, kind in expected.items():
        if key in raw and (not isinstance(raw[key], kind) or (kind is int and isinstance(raw[key], bool))):
            raise CheckpointError(f"{where} is damaged: its field {key!r} is a {type(raw[key]).__name__}")
    if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in raw["model"].items()):
        raise CheckpointError(f"{where} is damaged: its model weights are not a dict of named tensors")
    if not isinstance(raw["model_config"].get("kind"), str):
        raise CheckpointError(f"{where} is damaged: its model config names no model kind")
    try:
        state = TrainState(**raw.get("train_state", {}))
        numbers = [state.epoch, state.step, state.best_epoch, state.last_eval_step, state.last_gain_step]
        if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in numbers):
            raise TypeError("epochs and steps must be counts")
        float(state.best_metric), float(state.gain_reference), float(state.elapsed)
        if not isinstance(state.history, list) or not all(isinstance(r, dict) for r in state.history):
            raise TypeError("history must be a list of records")
        dataset = DatasetIdentity(**raw["dataset"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where} is damaged: its run state is not valid ({exc})") from exc
    known = {f.name for f in fields(Checkpoint)} - {"path", "dataset", "train_state"}
    values = {k: v for k, v in raw.items() if k in known}
    values["test_metrics"] = values.get("test_metrics") or {}
    # a model option added after the checkpoint was written takes its default: the behaviour it was trained with
    values["model_config"] = {**asdict(ModelSection()), **raw["model_config"]}
    return Checkpoint(**values, dataset=dataset, train_state=state, path=str(where))


def save_checkpoint(path: str | Path, checkpoint: Checkpoint) -> Path:
    """Write `checkpoint` atomically (version 2). A full or read-only disk is a one-line CheckpointError that
    leaves the previous checkpoint under `path` as it was (torch writes through a Python file, so the OS error
    surfaces as itself, see GuardedWriter)."""
    path = Path(path)
    try:
        with atomic_path(path) as tmp, GuardedWriter(tmp) as handle:
            torch.save(checkpoint.to_dict(), handle)
    except OSError as exc:
        kept = " (the previous checkpoint there is intact)" if path.exists() else ""
        raise CheckpointError(f"cannot write checkpoint {path}: {exc.strerror or exc}{kept}") from exc
    return path


def resolve_checkpoint(path: str | Path, prefer: str = LAST) -> Path:
    """A checkpoint file, or a run folder (its `last.ckpt`, or `best.ckpt` when asked)."""
    path = Path(path)
    if path.is_dir():
        for name in (prefer, LAST, BEST):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path} is a folder without {LAST} or {BEST}; pass a run folder or a .ckpt file")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    return path


class ForeignFile(CheckpointError):
    """A readable file that is not a movierec checkpoint (no format marker, or not a torch zip archive):
    `--init-from` reads it as a plain state dict instead."""


def torch_load_safely(file: Path, what: str = "movierec checkpoint") -> Any:
    """`torch.load` with weights_only (no code runs on load) and mmap for zip archives; every failure is one
    CheckpointError line, and a pickle that asks for anything but tensors is named as refused."""
    is_zip = zipfile.is_zipfile(file)
    if is_zip:  # torch.load does not check the archive's CRCs: a flipped bit would load as a changed weight
        try:
            damaged = zipfile.ZipFile(file).testzip()
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
            raise CheckpointError(f"{file} is not a readable {what} ({exc})") from exc
        if damaged is not None:
            raise CheckpointError(
                f"{file} is damaged: its member {damaged} fails its CRC check (a flipped bit or a partial copy); "
                "use another copy or checkpoint"
            )
    try:
        # mmap: tensors are read from the file as they are used, so loading the weights of a large model
        # does not also bring its optimizer moments into memory
        return torch.load(file, map_location="cpu", weights_only=True, mmap=is_zip)
    except Exception as exc:  # torch raises many types for damaged archives (RuntimeError, IndexError, ...)
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        if isinstance(exc, pickle.UnpicklingError) and any("GLOBAL" in line for line in lines):
            raise CheckpointError(
                f"{file} was refused: it holds Python objects other than tensors, and loading them would run "
                "code from the file (only tensors and plain containers are read)"
            ) from exc
        # the weights-only unpickler's first line is generic advice; the line naming the problem is the useful one
        specific = [line for line in lines if line.startswith("Unsupported")]
        message = (specific or lines or [type(exc).__name__])[0]
        raise CheckpointError(f"{file} is not a readable {what} ({message})") from exc


def check_finite(tensors: Any, where: str | Path) -> None:
    """Weights with NaN or Inf score every item NaN, so rankings come out empty or arbitrary: refuse them."""
    if not isinstance(tensors, dict):
        raise CheckpointError(f"{where}: its model weights are not a dict of tensors")
    for name, tensor in tensors.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{where} holds non-finite weights (NaN or Inf in {name}); use another checkpoint")


def load_checkpoint(path: str | Path, prefer: str = LAST) -> Checkpoint:
    """The checkpoint of a file or run folder, version 1 or 2; anything that is not one is a one-line
    CheckpointError (ForeignFile when it is a readable file of another kind)."""
    file = resolve_checkpoint(path, prefer)
    if not zipfile.is_zipfile(file):  # torch.save writes a zip archive; an empty or random file is not one
        raise ForeignFile(f"{file} is not a movierec checkpoint (not a torch.save archive; empty or damaged?)")
    raw = torch_load_safely(file)
    version = raw.get("format") if isinstance(raw, dict) else None
    if version not in (FORMAT, FORMAT_V1):
        raise ForeignFile(f"{file} is not a movierec checkpoint (no '{FORMAT}' marker)")
    checkpoint = _typed(_from_v1(raw) if version == FORMAT_V1 else raw, file)
    check_finite(checkpoint.model, file)
    return checkpoint


def model_from_checkpoint(checkpoint: Checkpoint, device: str | torch.device = "cpu") -> SequentialModel:
    """The model a checkpoint holds, in eval mode. Its config is first built on the meta device (no memory),
    so a config whose tables would not fit the weights (an edited num_items of 10^11, a table with extra rows)
    is a CheckpointError before anything is allocated."""
    where = checkpoint.path or "checkpoint"
    try:
        config = ModelConfig(**checkpoint.model_config)
        with torch.device("meta"):
            shapes = {name: tuple(t.shape) for name, t in build_model(config).state_dict().items()}
    except (TypeError, ValueError, RuntimeError) as exc:  # RuntimeError: a negative size, say
        raise CheckpointError(f"{where}: its model config is not valid ({one_line(exc)})") from exc
    for name, shape in shapes.items():
        found = checkpoint.model.get(name)
        if found is None or tuple(found.shape) != shape:
            got = "missing" if found is None else f"{tuple(found.shape)}"
            raise CheckpointError(
                f"{where}: its weights do not fit its model config ({name}: {got}, the config builds {shape})"
            )
    model = build_model(config)
    model.load_state_dict(checkpoint.model)
    return model.to(device).eval()


def verify_dataset(checkpoint: Checkpoint, data: str | Path | None = None) -> Path:
    """The prepared dataset folder a checkpoint belongs to (`data`, else the recorded path), after checking
    that it is that dataset: its meta.json (counts, shards and their checksums) is the one recorded.

    Every stage that pairs a checkpoint with data calls this, so a wrong `--data` fails alike everywhere.
    """
    identity, where = checkpoint.dataset, checkpoint.path or "the checkpoint"
    if data is None and not identity.path:
        raise DataError(f"{where} does not record its dataset folder; pass --data with the prepared dataset")
    path = Path(data) if data is not None else Path(identity.path)
    fix = "pass --data with the prepared dataset folder the model was trained on"
    if not (path / META_FILE).is_file():
        raise DataError(f"the model's dataset {path} is missing ({path / META_FILE} not found); {fix}")
    if sha256_file(path / META_FILE) == identity.meta_sha256:
        return path
    try:
        meta = read_meta(path)
        found = f"{int(meta['num_users'])} users x {int(meta['num_items'])} items, {len(meta['shards'])} shard(s)"
    except DataError as exc:
        found = str(exc)
    raise DataError(
        f"{path} is not the dataset this model was trained on (its meta.json differs: {found}); {where} was "
        f"trained on {identity.name} at {identity.path} ({identity.num_users} users x {identity.num_items} items, "
        f"shards {identity.shards}); {fix}"
    )
