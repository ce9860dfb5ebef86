"""Benchmark `movierec prepare` on an ML-20M-sized ratings.csv: wall time, CPU time and peak RSS.

Generates (once, then cached) a ratings.csv with ML-20M's shape and layout: 138,493 users, 26,744 items,
20,000,263 rows, header `userId,movieId,rating,timestamp`, sorted by userId then movieId like the real
file, every user with >= 20 ratings, Zipf-like item popularity, sparse movieIds up to 131,262, half-star
ratings and timestamps from 1995 to 2015. A user may rate an item twice (prepare keeps every row).

Then runs `movierec prepare --dataset ml-20m --input DIR` (default 5-core) in a subprocess and reads its
peak RSS: per run from os.wait4's rusage of that child, over all runs from
resource.getrusage(RUSAGE_CHILDREN).ru_maxrss.

    python bench/prepare.py                  # cache under $TMPDIR/movierec-bench
    python bench/prepare.py --repeat 3 --cache /some/dir
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from common import machine, machine_line, prepare_command, run_child


class Shape(NamedTuple):
    """The size of a generated ratings.csv."""

    users: int
    items: int
    rows: int
    max_movie_id: int


ML20M = Shape(users=138_493, items=26_744, rows=20_000_263, max_movie_id=131_262)
HEADER = b"userId,movieId,rating,timestamp\n"


def generate(folder: Path, shape: Shape = ML20M, seed: int = 0) -> Path:
    """Write folder/ratings.csv (and a small movies.csv) of `shape` unless they exist; return the ratings path.
    (bench/scale.py --tiny asks for a smaller shape than ML-20M's.)"""
    users, items, rows, max_movie_id = shape
    ratings = folder / "ratings.csv"
    if ratings.is_file():
        return ratings
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    # ratings per user: 20 + a heavy tail, summing exactly to `rows`
    extra = rng.pareto(1.2, users)
    counts = 20 + np.floor(extra / extra.sum() * (rows - 20 * users)).astype(np.int64)
    counts[rng.choice(users, rows - int(counts.sum()), replace=False)] += 1
    user_ids = np.repeat(np.arange(1, users + 1, dtype=np.int32), counts)
    # items: every item once, the rest Zipf-like by popularity rank
    popularity = 1.0 / np.arange(1, items + 1) ** 0.9
    rest = rng.choice(items, rows - items, p=popularity / popularity.sum())
    item_index = rng.permutation(np.concatenate([np.arange(items), rest]))
    movie_ids = np.sort(rng.choice(np.arange(1, max_movie_id + 1), items, replace=False)).astype(np.int32)
    movies = movie_ids[item_index]
    order = np.lexsort((movies, user_ids))  # the real file is sorted by userId, then movieId
    movies = movies[order]
    del order, item_index, rest
    stars = pa.array(["0.5", "1.0", "1.5", "2.0", "2.5", "3.0", "3.5", "4.0", "4.5", "5.0"])
    rating = pc.take(
        stars, pa.array(rng.choice(10, rows, p=[0.01, 0.03, 0.02, 0.07, 0.05, 0.2, 0.11, 0.27, 0.08, 0.16]))
    )
    start = rng.integers(789_652_009, 1_400_000_000, users)
    timestamps = np.repeat(start, counts) + rng.integers(0, 20_000_000, rows)
    table = pa.table({"userId": user_ids, "movieId": movies, "rating": rating, "timestamp": timestamps})
    part = ratings.with_suffix(".csv.part")
    with open(part, "wb") as handle:
        handle.write(HEADER)
        pacsv.write_csv(table, handle, pacsv.WriteOptions(include_header=False, quoting_style="none"))
    part.replace(ratings)
    titles = "".join(f'{m},"Movie {m}, The ({1900 + m % 115})",Drama|Comedy\n' for m in movie_ids.tolist())
    (folder / "movies.csv").write_text("movieId,title,genres\n" + titles)
    return ratings


def run_prepare(input_dir: Path, out: Path) -> dict:
    """`movierec prepare --dataset ml-20m` in a child: its wall and CPU seconds and its own peak RSS."""
    command = prepare_command("ml-20m", input_dir, out)
    finished = run_child(command)
    if not finished.ok:
        raise SystemExit(f"prepare failed: {finished.why()}\n{finished.output}")
    meta = json.loads((out / "ml-20m" / "meta.json").read_text())
    return {
        "wall_s": finished.wall_s,
        "cpu_s": finished.cpu_s,
        "peak_rss_mib": finished.peak_rss_mib,
        "meta": meta,
        "command": " ".join(["movierec", *command[3:]]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "movierec-bench" / "ml-20m-synth")
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()

    t0 = time.perf_counter()
    ratings = generate(args.cache)
    print(f"input: {ratings} ({ratings.stat().st_size / 1e6:,.0f} MB, ready in {time.perf_counter() - t0:.1f} s)")
    runs = []
    with tempfile.TemporaryDirectory(prefix="movierec-bench-out-") as out:
        for _ in range(args.repeat):
            runs.append(run_prepare(args.cache, Path(out)))
    print(f"machine: {machine_line(machine(with_gpus=False))}")
    print(f"command: {runs[-1]['command'].replace(str(args.cache), 'DIR').replace(out, 'OUT')}")
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(f"peak RSS of all prepare runs (getrusage(RUSAGE_CHILDREN).ru_maxrss): {children:,.0f} MiB")
    print()
    print("| run | rows in | users | items | interactions | shards | wall s | CPU s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for k, run in enumerate(runs, 1):
        m = run["meta"]
        counts = (
            f"{ML20M.rows:,} | {m['num_users']:,} | {m['num_items']:,} | {m['num_interactions']:,} | {len(m['shards'])}"
        )
        print(f"| {k} | {counts} | {run['wall_s']:.1f} | {run['cpu_s']:.1f} | {run['peak_rss_mib']:,.0f} |")


if __name__ == "__main__":
    main()
