"""Fine-tuning from pretrained weights (`--init-from`): a movierec checkpoint, or a plain PyTorch state dict.

A movierec checkpoint knows its dataset, so its item and user tables are matched to the new dataset's by
original movieId / userId. A foreign `.pth` / `.pt` state dict (another pipeline's, or one converted from
the official TensorFlow SSE-PT) is matched by tensor name, through an optional rename map (`--init-map`,
YAML rules, see :func:`read_init_map`). Either way a tensor whose shape does not fit is skipped, as is one
that matches nothing, and the report says what happened to every tensor. Loading never unpickles code:
every file goes through `torch.load(weights_only=True)`.

The checkpoint format itself lives in :mod:`movierec.models.checkpoint`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from rich.console import Console
from rich.table import Table

from movierec.errors import CheckpointError, ConfigError
from movierec.models.base import SequentialModel
from movierec.models.checkpoint import (
    BEST,
    Checkpoint,
    ForeignFile,
    load_checkpoint,
    resolve_checkpoint,
    torch_load_safely,
)

# the actions of a report row
LOADED, MAPPED, SKIPPED_SHAPE, SKIPPED_NO_MATCH, INITIALISED = (
    "loaded", "mapped", "skipped (shape)", "skipped (no match)", "initialised",
)  # fmt: skip
# keys under which training scripts commonly nest the state dict, and prefixes wrappers add to every name
NESTING_KEYS = ("state_dict", "model_state_dict", "model", "net")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel, torch.compile


@dataclass(frozen=True)
class InitRow:
    """What happened to one tensor: its name in the file and ours (either may be empty), action, detail."""

    source: str
    target: str
    action: str
    detail: str = ""


@dataclass(frozen=True)
class RenameRule:
    """One `--init-map` rule: a file tensor whose name fully matches `pattern` becomes `targets` (re.sub
    templates, `\\1` for groups); several targets split it into equal parts along `split_dim`. `squeeze`
    drops leading size-1 dimensions (TF conv1d kernels), `transpose` swaps the last two (TF dense kernels
    are (in, out), torch Linear weights (out, in))."""

    pattern: re.Pattern
    targets: tuple[str, ...]
    transpose: bool = False
    squeeze: bool = False
    split_dim: int = 0

    def apply(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]] | None:
        match = self.pattern.fullmatch(name)
        if match is None:
            return None
        if self.squeeze:
            while tensor.dim() > 2 and tensor.shape[0] == 1:
                tensor = tensor[0]
        if self.transpose and tensor.dim() >= 2:
            tensor = tensor.transpose(-2, -1)
        parts = [tensor] if len(self.targets) == 1 else list(tensor.chunk(len(self.targets), self.split_dim))
        if len(parts) != len(self.targets) or len({p.shape for p in parts}) != 1:
            return [(match.expand(t), torch.empty(0)) for t in self.targets]  # cannot split evenly: a shape skip
        return [(match.expand(t), part) for t, part in zip(self.targets, parts, strict=True)]


RULE_KEYS = {"from", "to", "transpose", "squeeze", "split"}


def read_init_map(path: str | Path) -> list[RenameRule]:
    """An `--init-map` YAML file: `rules:`, a list of {from: REGEX, to: NAME or [NAMES], transpose, squeeze,
    split}. The first rule whose `from` fully matches a tensor's name renames it; names no rule matches are
    tried as they are. Every problem is a one-line ConfigError naming the rule."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--init-map {path} does not exist (shipped maps are in configs/init-maps/)")
    try:
        document = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, RecursionError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"--init-map {path} is not valid YAML ({first})") from exc
    rules = document.get("rules") if isinstance(document, dict) else None
    if not isinstance(rules, list) or not rules:
        raise ConfigError(f"--init-map {path} must hold `rules:`, a list of {{from: REGEX, to: NAME}} entries")
    parsed = []
    for index, rule in enumerate(rules):
        where = f"--init-map {path}, rule {index + 1}"
        if not isinstance(rule, dict) or not {"from", "to"} <= set(rule) or set(rule) - RULE_KEYS:
            raise ConfigError(f"{where}: expected the keys from, to and optionally transpose, squeeze, split")
        targets = rule["to"] if isinstance(rule["to"], list) else [rule["to"]]
        if not targets or not all(isinstance(t, str) and t for t in targets) or not isinstance(rule["from"], str):
            raise ConfigError(f"{where}: `from` must be a regex and `to` a tensor name or a list of names")
        flags = {key: rule.get(key, False) for key in ("transpose", "squeeze")}
        if not all(isinstance(v, bool) for v in flags.values()) or not isinstance(rule.get("split", 0), int):
            raise ConfigError(f"{where}: transpose and squeeze are true/false, split a dimension number")
        try:
            pattern = re.compile(rule["from"])
        except re.error as exc:
            raise ConfigError(f"{where}: `from` {rule['from']!r} is not a valid regular expression ({exc})") from exc
        highest = max((int(g) for t in targets for g in re.findall(r"\\(\d+)", t)), default=0)
        if highest > pattern.groups:
            raise ConfigError(f"{where}: `to` uses group \\{highest}, `from` has {pattern.groups} group(s)")
        parsed.append(RenameRule(pattern, tuple(targets), flags["transpose"], flags["squeeze"], rule.get("split", 0)))
    return parsed


def read_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """The tensors of a plain PyTorch state dict file, loaded with weights_only (a pickle that would build
    anything but tensors and containers is refused, never run). A dict nested under one of NESTING_KEYS is
    unwrapped, and the prefixes DDP and torch.compile add to every name are removed."""
    loaded = torch_load_safely(file, "movierec checkpoint or PyTorch state dict")
    while isinstance(loaded, dict):
        nested = [key for key in NESTING_KEYS if isinstance(loaded.get(key), dict)]
        if not nested or any(isinstance(v, torch.Tensor) for v in loaded.values()):
            break
        loaded = loaded[nested[0]]
    tensors = {k: v for k, v in loaded.items() if isinstance(k, str) and isinstance(v, torch.Tensor)} if isinstance(
        loaded, dict) else {}  # fmt: skip
    if not tensors:
        raise CheckpointError(f"{file} holds no named tensors: it is not a state dict (torch.save(model.state_dict()))")
    for prefix in WRAPPER_PREFIXES:
        if all(name.startswith(prefix) for name in tensors):
            tensors = {name.removeprefix(prefix): t for name, t in tensors.items()}
    return tensors


def init_from_state_dict(
    model: SequentialModel, tensors: dict[str, torch.Tensor], rules: list[RenameRule] = ()
) -> list[InitRow]:
    """Copy the file's tensors into `model` by (renamed) name where the shapes match; report every tensor."""
    own = model.state_dict()
    report: list[InitRow] = []
    loaded: set[str] = set()
    with torch.no_grad():
        for name, tensor in tensors.items():
            renamed = next((out for rule in rules if (out := rule.apply(name, tensor)) is not None), None)
            for target, value in renamed or [(name, tensor)]:
                if target not in own:
                    report.append(InitRow(name, "", SKIPPED_NO_MATCH, "no tensor of ours has this name"))
                elif value.shape != own[target].shape:
                    shapes = f"{tuple(value.shape)} in the file, {tuple(own[target].shape)} here"
                    report.append(InitRow(name, target, SKIPPED_SHAPE, shapes))
                else:
                    own[target].copy_(value.to(own[target].dtype))
                    loaded.add(target)
                    report.append(InitRow(name, target, LOADED, str(tuple(value.shape))))
    report.extend(InitRow("", name, INITIALISED, "not loaded: keeps its fresh initialisation")
                  for name in own if name not in loaded)  # fmt: skip
    model.load_state_dict(own)
    return report


def match_ids(new_ids: np.ndarray, old_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions (in new_ids, in old_ids) of the ids both arrays contain."""
    order = np.argsort(old_ids)
    pos = np.minimum(np.searchsorted(old_ids[order], new_ids), max(len(old_ids) - 1, 0))
    found = old_ids[order][pos] == new_ids if len(old_ids) else np.zeros(len(new_ids), bool)
    return np.flatnonzero(found), order[pos[found]]


def init_from_checkpoint(
    model: SequentialModel,
    state: Checkpoint,
    item_movie_ids: np.ndarray | None = None,
    user_ids: np.ndarray | None = None,
    map_by_id: bool = True,
) -> list[InitRow]:
    """Load the tensors of a movierec checkpoint that fit `model`; report every tensor.

    With `map_by_id`, the item and user tables are matched by original MovieLens movieId / userId, whatever
    their shapes: rows of ids both datasets share are copied, the others keep their fresh initialisation
    (two preparations of the same release can number the same movies differently). Every other tensor
    is loaded when its name and shape match (the Transformer encoder), and skipped otherwise.
    """
    old_kind = state.model_config["kind"]
    if old_kind != model.config.kind:
        raise CheckpointError(
            f"{state.path} holds a {old_kind} model, this run trains {model.config.kind}; "
            f"use a {model.config.kind} checkpoint or set model.kind={old_kind}"
        )
    pretrained = state.model
    id_maps = {
        "item_emb.weight": (item_movie_ids, state.dataset.item_movie_ids, "movieId"),
        "user_emb.weight": (user_ids, state.dataset.user_ids, "userId"),
    }
    report: list[InitRow] = []
    own = model.state_dict()
    with torch.no_grad():
        for name, tensor in own.items():
            old = pretrained.get(name)
            new_ids, old_ids, label = id_maps.get(name, (None, None, ""))
            if old is None:
                report.append(InitRow("", name, INITIALISED, "not in the checkpoint: keeps its fresh initialisation"))
            elif map_by_id and new_ids is not None and old_ids is not None and old.shape[1:] == tensor.shape[1:]:
                if old.dim() != 2 or old.shape[0] < len(old_ids) + 1:
                    detail = f"{tuple(old.shape)} holds fewer rows than its {len(old_ids)} {label}s"
                    report.append(InitRow(name, name, SKIPPED_SHAPE, detail))
                    continue
                new_rows, old_rows = match_ids(np.asarray(new_ids), np.asarray(old_ids))
                tensor[torch.from_numpy(new_rows + 1)] = old[torch.from_numpy(old_rows + 1)].to(tensor.dtype)
                detail = (
                    f"{len(new_rows)} of {len(new_ids)} rows by {label}; {tuple(old.shape)} -> {tuple(tensor.shape)}"
                )
                report.append(InitRow(name, name, MAPPED, detail))
            elif old.shape == tensor.shape:
                tensor.copy_(old)
                report.append(InitRow(name, name, LOADED, str(tuple(tensor.shape))))
            else:
                shapes = f"{tuple(old.shape)} in the checkpoint, {tuple(tensor.shape)} here"
                report.append(InitRow(name, name, SKIPPED_SHAPE, shapes))
    report.extend(InitRow(name, "", SKIPPED_NO_MATCH, "no tensor of ours has this name")
                  for name in sorted(set(pretrained) - set(own)))  # fmt: skip
    model.load_state_dict(own)
    return report


@dataclass
class Pretrained:
    """Weights to start from: a movierec checkpoint (`state`) or a foreign state dict (`tensors`)."""

    path: Path
    state: Checkpoint | None = None
    tensors: dict[str, torch.Tensor] | None = None


def read_pretrained(path: str | Path) -> Pretrained:
    """A movierec checkpoint or run folder (its best.ckpt), else a plain PyTorch state dict file."""
    file = resolve_checkpoint(path, prefer=BEST)
    try:
        return Pretrained(file, state=load_checkpoint(file, prefer=BEST))
    except ForeignFile:
        return Pretrained(file, tensors=read_state_dict(file))


def init_model(
    model: SequentialModel,
    pretrained: Pretrained,
    rules: list[RenameRule] = (),
    item_movie_ids: np.ndarray | None = None,
    user_ids: np.ndarray | None = None,
    map_by_id: bool = True,
) -> list[InitRow]:
    """Initialise `model` from `pretrained`; a file of which nothing fits is a one-line CheckpointError (a
    fine-tuning run never silently starts cold)."""
    if pretrained.state is not None:
        if rules:
            raise ConfigError(f"--init-map renames a foreign state dict's tensors; {pretrained.path} is a movierec "
                              "checkpoint, whose tensors already have our names")  # fmt: skip
        report = init_from_checkpoint(model, pretrained.state, item_movie_ids, user_ids, map_by_id)
    else:
        report = init_from_state_dict(model, pretrained.tensors, rules)
    if not any(row.action in (LOADED, MAPPED) for row in report):
        counts = {action: sum(row.action == action for row in report) for action in (SKIPPED_SHAPE, SKIPPED_NO_MATCH)}
        hint = "" if rules else "; map its names to ours with --init-map FILE (configs/init-maps/)"
        raise CheckpointError(
            f"--init-from {pretrained.path}: none of its tensors fits this model ({counts[SKIPPED_SHAPE]} skipped "
            f"for their shape, {counts[SKIPPED_NO_MATCH]} match no tensor of ours){hint}"
        )
    return report


def report_table(report: list[InitRow], console: Console | None = None) -> str:
    """Print the report (a count per action, then every row) and return it as TSV for MLflow."""
    table = Table(title="init-from: pretrained tensors")
    for column in ("in the file", "ours", "action", "detail"):
        table.add_column(column, overflow="fold")  # long tensor names wrap whole, never cut to "…"
    for row in report:
        table.add_row(row.source, row.target, row.action, row.detail)
    console = console or Console()
    console.print(table)
    counts = ", ".join(
        f"{sum(r.action == action for r in report)} {action}"
        for action in (LOADED, MAPPED, SKIPPED_SHAPE, SKIPPED_NO_MATCH, INITIALISED)
    )
    console.print(f"init-from: {counts}", soft_wrap=True)
    lines = ["source\ttarget\taction\tdetail"] + ["\t".join((r.source, r.target, r.action, r.detail)) for r in report]
    return "\n".join(lines) + "\n"
