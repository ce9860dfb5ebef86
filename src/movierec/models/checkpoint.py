"""The checkpoint format, in one place: writing, reading, rebuilding the model, and the dataset check.

A checkpoint is a `torch.save` dict loaded with `weights_only=True` (no code runs on load) holding the
model, optimizer and grad-scaler states, epoch, global step, early-stopping state, the world size, the
resolved config, and the dataset's identity (path, meta.json checksum, original movie/user ids, shards).
Writes go to a temporary file in the same folder, then `os.replace`, so a crash or a full disk never
leaves a torn file and never damages the previous checkpoint.

Training, evaluation, serving and export all read checkpoints through :func:`load_checkpoint`,
:func:`model_from_checkpoint` and :func:`verify_dataset`, so they fail alike, on one line.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from movierec.data.layout import META_FILE, read_meta, sha256_file
from movierec.errors import CheckpointError, DataError
from movierec.files import GuardedWriter, atomic_path
from movierec.models.base import ModelConfig, SequentialModel, build_model

FORMAT = "movierec-checkpoint-v1"
LAST, BEST = "last.ckpt", "best.ckpt"
REQUIRED = ("model", "model_config", "dataset", "config")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` atomically. A full or read-only disk is a one-line CheckpointError that leaves the
    previous checkpoint under `path` as it was (torch writes through a Python file, so the OS error surfaces
    as itself, see GuardedWriter)."""
    path = Path(path)
    state = {k: v for k, v in state.items() if k not in ("format", "path")}  # a loaded checkpoint saves as it came
    try:
        with atomic_path(path) as tmp, GuardedWriter(tmp) as handle:
            torch.save({"format": FORMAT, **state}, handle)
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


def load_checkpoint(path: str | Path, prefer: str = LAST) -> dict:
    """The checkpoint dict of a file or run folder; anything that is not one is a one-line CheckpointError
    (ForeignFile when it is a readable file of another kind)."""
    file = resolve_checkpoint(path, prefer)
    if not zipfile.is_zipfile(file):  # torch.save writes a zip archive; an empty or random file is not one
        raise ForeignFile(f"{file} is not a movierec checkpoint (not a torch.save archive; empty or damaged?)")
    state = torch_load_safely(file)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ForeignFile(f"{file} is not a movierec checkpoint (no '{FORMAT}' marker)")
    missing = [key for key in REQUIRED if key not in state]
    if missing:
        raise CheckpointError(f"{file} is an incomplete movierec checkpoint (no {', '.join(missing)})")
    check_finite(state["model"], file)
    state["path"] = str(file)
    return state


def model_from_checkpoint(state: dict, device: str | torch.device = "cpu") -> SequentialModel:
    """The model a checkpoint holds, in eval mode; a checkpoint whose tensors do not fit its own config
    (for example an item table with the wrong number of rows) is a CheckpointError, not a traceback."""
    where = state.get("path", "checkpoint")
    try:
        model = build_model(ModelConfig(**state["model_config"]))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{where}: its model config is not valid ({exc})") from exc
    try:
        model.load_state_dict(state["model"])
    except (RuntimeError, KeyError, TypeError) as exc:
        problems = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()] or [str(exc)]
        raise CheckpointError(f"{where}: its weights do not fit its model config ({problems[0]})") from exc
    return model.to(device).eval()


def verify_dataset(state: dict, data: str | Path | None = None) -> Path:
    """The prepared dataset folder a checkpoint belongs to (`data`, else the recorded path), after checking
    that it is that dataset: its meta.json (counts, shards and their checksums) is the one recorded.

    Every stage that pairs a checkpoint with data calls this, so a wrong `--data` fails alike everywhere.
    """
    identity = state.get("dataset") or {}
    where = state.get("path", "the checkpoint")
    recorded = identity.get("path")
    if data is None and not recorded:
        raise DataError(f"{where} does not record its dataset folder; pass --data with the prepared dataset")
    path = Path(data) if data is not None else Path(recorded)
    fix = "pass --data with the prepared dataset folder the model was trained on"
    if not (path / META_FILE).is_file():
        raise DataError(f"the model's dataset {path} is missing ({path / META_FILE} not found); {fix}")
    if sha256_file(path / META_FILE) == identity.get("meta_sha256"):
        return path
    try:
        meta = read_meta(path)
        found = f"{int(meta['num_users'])} users x {int(meta['num_items'])} items, {len(meta['shards'])} shard(s)"
    except DataError as exc:
        found = str(exc)
    raise DataError(
        f"{path} is not the dataset this model was trained on (its meta.json differs: {found}); {where} was "
        f"trained on {identity.get('name', '?')} at {recorded} ({identity.get('num_users', '?')} users x "
        f"{identity.get('num_items', '?')} items, shards {identity.get('shards', '?')}); {fix}"
    )
