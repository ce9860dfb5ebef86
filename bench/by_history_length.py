"""Test metrics by history length: do long-history users gain from a model or recipe (SSE-PT++'s windows)?

    python bench/by_history_length.py runs/a runs/b [--edges 100,200,400] \
        [--protocol sampled-uniform-100,full] [--k 10] [--data data/ml-1m-sasrec]

Each checkpoint (a run folder means its best.ckpt) is scored on the test split, all users, then per bucket of
history length (the items its input is cut from: training items plus the validation item). Sampled negatives
are seeded per user, so a bucket's users meet the same candidates as in `movierec evaluate`, and the
user-weighted mean of the buckets is the all-users figure. Prints one table: bucket, users, and NDCG@k / HR@k
per protocol and checkpoint, with the standard error of each NDCG (per-user spread / sqrt(users)), and each
later checkpoint's NDCG minus the first's with its paired standard error (the same users and candidates, so
far tighter than the two errors apart): the number that says whether a difference is noise.
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
from rich.console import Console
from rich.table import Table

from movierec.data.layout import load_sequences
from movierec.evaluation.evaluate import Evaluator
from movierec.evaluation.metrics import metrics_from_ranks, ndcg_per_user
from movierec.models.checkpoint import BEST, load_checkpoint, model_from_checkpoint, verify_dataset


def per_user_ranks(evaluator: Evaluator, model) -> dict[str, np.ndarray]:
    """0-based rank of each evaluated user's target under each of the evaluator's protocols."""
    ranks = {protocol: np.zeros(evaluator.num_users, dtype=np.int64) for protocol in evaluator.protocols}
    for rows, sequences in evaluator.batches(model.config.max_len):
        for protocol, batch in evaluator.batch_ranks(model, rows, sequences)[0].items():
            ranks[protocol][rows] = batch
    return ranks


def standard_error(values: np.ndarray) -> float:
    return float(values.std(ddof=1) / np.sqrt(len(values))) if len(values) > 1 else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--edges", default="100,200,400", help="history-length bucket edges, ascending")
    parser.add_argument("--protocol", default="sampled-uniform-100,full")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--data", default=None, help="prepared dataset (default: the first checkpoint's)")
    args = parser.parse_args()
    edges = [0, *(int(e) for e in args.edges.split(",")), np.iinfo(np.int64).max]
    protocols = tuple(args.protocol.split(","))

    states = [load_checkpoint(c, prefer=BEST) for c in args.checkpoints]
    data_path = verify_dataset(states[0], args.data)
    for state in states[1:]:
        verify_dataset(state, data_path)
    evaluator = Evaluator(load_sequences(data_path), "evaluation", protocols)
    lengths = evaluator.lengths
    columns: dict[str, np.ndarray] = {}  # (checkpoint, protocol) -> per-user ranks
    for number, state in enumerate(states, start=1):
        model = model_from_checkpoint(state, "cpu").eval()
        for protocol, ranks in per_user_ranks(evaluator, model).items():
            columns[f"#{number} {protocol}"] = ranks

    names = list(columns)
    paired = [(names.index(f"#1 {p}"), names.index(n)) for n in names for p in protocols
              if n.endswith(f" {p}") and not n.startswith("#1 ")]  # fmt: skip
    table = Table(title=f"test NDCG@{args.k} ± s.e. / HR@{args.k} by history length ({data_path})")
    table.add_column("history")
    table.add_column("users", justify="right")
    for column in names:
        table.add_column(column, justify="right")
    for _, other in paired:
        table.add_column(f"{names[other]} − #1: Δ NDCG@{args.k} ± paired s.e.", justify="right")
    ndcg = {name: ndcg_per_user(ranks, args.k) for name, ranks in columns.items()}
    for lo, hi in [*itertools.pairwise(edges), (0, edges[-1])]:
        keep = (lengths >= lo) & (lengths < hi)
        label = "all" if (lo, hi) == (0, edges[-1]) else f"≥ {lo}" if hi == edges[-1] else f"{lo}–{hi - 1}"
        cells = []
        for name, ranks in columns.items():
            metrics = metrics_from_ranks(ranks[keep], (args.k,))
            cells.append(f"{metrics[f'ndcg@{args.k}']:.4f} ± {standard_error(ndcg[name][keep]):.4f} / "
                         f"{metrics[f'hr@{args.k}']:.4f}")  # fmt: skip
        for first, other in paired:
            delta = ndcg[names[other]][keep] - ndcg[names[first]][keep]
            cells.append(f"{delta.mean():+.4f} ± {standard_error(delta):.4f}")
        table.add_row(label, f"{int(keep.sum()):,}", *cells)
    console = Console(width=250)
    for number, checkpoint in enumerate(args.checkpoints, start=1):
        console.print(f"#{number}: {checkpoint}")
    console.print(table)


if __name__ == "__main__":
    main()
