"""Human-readable summary of a prepared dataset, from its meta.json."""

from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.table import Table

from movierec.data.layout import read_meta


def summary_rows(meta: dict) -> list[tuple[str, str]]:
    counts = meta.get("split_counts", {})
    return [
        ("dataset", str(meta["name"])),
        ("source", str(meta.get("source", {}).get("kind", "?"))),
        ("users", f"{meta['num_users']:,}"),
        ("items", f"{meta['num_items']:,}"),
        ("interactions", f"{meta.get('num_interactions', 0):,}"),
        ("tested users", f"{meta.get('num_evaluated_users', 0):,}"),
        ("shards", str(len(meta["shards"]))),
        ("training pairs", f"{counts.get('training', 0):,}"),
        ("validation pairs", f"{counts.get('validation', 0):,}"),
        ("evaluation pairs", f"{counts.get('evaluation', 0):,}"),
        ("time ordered", "yes" if meta.get("time_ordered", True) else "no (items within a user in id order)"),
    ]


def print_summary(path: str | Path) -> None:
    meta = read_meta(path)
    table = Table(title=f"{Path(path)}", show_header=False)
    for key, value in summary_rows(meta):
        table.add_row(key, value)
    Console().print(table)
