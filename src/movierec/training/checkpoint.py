"""Fine-tuning from a checkpoint (`--init-from`): which pretrained tensors a new model takes, and the report.

The checkpoint format itself lives in :mod:`movierec.models.checkpoint`.
"""

from __future__ import annotations

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from movierec.errors import CheckpointError
from movierec.models.base import SequentialModel


def match_ids(new_ids: np.ndarray, old_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions (in new_ids, in old_ids) of the ids both arrays contain."""
    order = np.argsort(old_ids)
    pos = np.minimum(np.searchsorted(old_ids[order], new_ids), max(len(old_ids) - 1, 0))
    found = old_ids[order][pos] == new_ids if len(old_ids) else np.zeros(len(new_ids), bool)
    return np.flatnonzero(found), order[pos[found]]


def init_from_pretrained(
    model: SequentialModel,
    state: dict,
    item_movie_ids: np.ndarray | None = None,
    user_ids: np.ndarray | None = None,
    map_by_id: bool = True,
) -> list[tuple[str, str, str]]:
    """Load the tensors of `state` that fit `model`; report (name, action, detail) per tensor.

    With `map_by_id`, the item and user tables are matched by original MovieLens movieId / userId, whatever
    their shapes: rows of ids both datasets share are copied, the others keep their fresh initialisation
    (two preparations of the same release can number the same movies differently). Every other tensor
    is loaded when its name and shape match (the Transformer encoder), and re-initialised otherwise.
    """
    old_kind = state["model_config"]["kind"]
    if old_kind != model.config.kind:
        raise CheckpointError(
            f"{state.get('path', 'checkpoint')} holds a {old_kind} model, this run trains {model.config.kind}; "
            f"use a {model.config.kind} checkpoint or set model.kind={old_kind}"
        )
    pretrained = state["model"]
    old_dataset = state.get("dataset", {})
    id_maps = {
        "item_emb.weight": (item_movie_ids, old_dataset.get("item_movie_ids"), "movieId"),
        "user_emb.weight": (user_ids, old_dataset.get("user_ids"), "userId"),
    }
    report: list[tuple[str, str, str]] = []
    own = model.state_dict()
    with torch.no_grad():
        for name, tensor in own.items():
            old = pretrained.get(name)
            new_ids, old_ids, label = id_maps.get(name, (None, None, ""))
            detail = f"{tuple(old.shape)} -> {tuple(tensor.shape)}" if old is not None else ""
            if old is None:
                report.append((name, "new", "not in the checkpoint, initialised"))
            elif map_by_id and new_ids is not None and old_ids is not None and old.shape[1] == tensor.shape[1]:
                new_rows, old_rows = match_ids(np.asarray(new_ids), np.asarray(old_ids))
                tensor[torch.from_numpy(new_rows + 1)] = old[torch.from_numpy(old_rows + 1)].to(tensor.dtype)
                report.append((name, "mapped", f"{len(new_rows)} of {len(new_ids)} rows by {label}; {detail}"))
            elif old.shape == tensor.shape:
                tensor.copy_(old)
                report.append((name, "loaded", str(tuple(tensor.shape))))
            else:
                report.append((name, "skipped", f"shape {detail}, re-initialised"))
    unused = sorted(set(pretrained) - set(own))
    report.extend((name, "unused", "in the checkpoint only") for name in unused)
    model.load_state_dict(own)
    return report


def print_init_report(report: list[tuple[str, str, str]], console: Console | None = None) -> str:
    table = Table(title="init-from: pretrained tensors")
    for column in ("tensor", "action", "detail"):
        table.add_column(column)
    for row in report:
        table.add_row(*row)
    (console or Console()).print(table)
    return "\n".join("\t".join(row) for row in report) + "\n"
