"""Scale benchmark: ml-20mx16x32-shaped data (one full file, a fraction of one) next to ML-20M-sized data.

Datasets (`--datasets`, inputs generated once, then cached under `--cache`):
- `file`: file 0 of the full ml-20mx16x32 shape (movierec.data.mlperf_synthetic.FULL_SHAPE): 137,327
  users, 76.5 M training pairs, 855,776 items;
- `quarter`: file 0 of `scaled_shape(--fraction-of-file)`, i.e. that fraction of a full file's users;
- `ml-20m`: bench/prepare.py's ML-20M-sized ratings.csv (138,493 users, 26,744 items, 20 M rows).

Measurements (`--only`), each in its own subprocess so its peak RSS (os.wait4's rusage) is its own:
- `prepare`: wall/CPU time and peak RSS of `movierec prepare --dataset ml-20mx16x32|ml-20m --input DIR`;
- `first-step`: seconds from process start to the first optimizer step (the trainer's console line
  `first optimizer step after X s`) and peak RSS of `movierec train --config CONFIG --max-steps 2`, run to
  its end (validation, test, checkpoints) unless `--stop-after-first-step`;
- `throughput`: training tokens/s in a worker process (bench/common.py's `time_steps`: 3 warm-up steps, then
  --steps timed), with the 855,776-item catalog and with 26,744 items. The 26,744-item
  twin is a second generated + prepared file with the same users and pair count drawn from a 26,744-item
  catalog (folding ids modulo 26,744 would create duplicate pairs per user and break the file format;
  the twin caps a user at 13,372 items, half its catalog, and spreads the excess over the other users);
- `eval`: ms per user of `Evaluator.run` for `sampled-uniform-100` and `full` on `--eval-users` users.
Nothing is asserted on times; the script prints one table (and `--json` writes its rows).

    python bench/scale.py                           # everything, cache under $TMPDIR/movierec-bench
    python bench/scale.py --only prepare --datasets file,ml-20m
    python bench/scale.py --tiny                    # smoke run: tiny `file` shape, few steps, < 1 minute
    python bench/scale.py --tiny --datasets file,quarter,ml-20m --only prepare   # what the test runs
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import prepare as prepare_bench  # bench/prepare.py: the ML-20M-sized ratings.csv
from common import (
    FIRST_STEP,
    ROOT,
    Finished,
    cli,
    is_fresh,
    log,
    machine,
    machine_line,
    parse_first_step,
    prepare_command,
    run_child,
    run_worker,
    time_job,
    work,
)

if TYPE_CHECKING:
    from movierec.data.mlperf_synthetic import MlperfShape

PARTS = ("prepare", "first-step", "throughput", "eval")
DATASETS = ("file", "quarter", "ml-20m")
CONFIG = ROOT / "configs" / "ml-20mx16x32-sse-pt.yaml"
FALLBACK_CONFIG = ROOT / "configs" / "ml-20m-sse-pt.yaml"  # until the ml-20mx16x32 config exists
SMALL_CATALOG = 26_744  # ML-20M's item count
TINY_FRACTION = 1e-3  # --tiny: file 0 of scaled_shape(1e-3): 138 users, ~77 k pairs
TINY_ITEMS = 100_000  # --tiny: a smaller catalog than 855,776 (model setup and full ranking scale with it)
TINY_OVERRIDES = ["train.batch_size=32", "model.max_len=50", "eval.max_users=64", "tracking.system_metrics=false"]
TINY_ML20M = prepare_bench.Shape(users=600, items=900, rows=60_000, max_movie_id=4_000)  # --tiny


@dataclasses.dataclass
class Dataset:
    key: str
    label: str
    kind: str  # "ml-20mx16x32" or "ml-20m": the name given to `movierec prepare --dataset`
    input_dir: Path
    out_dir: Path  # prepare writes out_dir/kind
    input_pairs: int
    shape: MlperfShape | None = None  # the generator's shape of an ml-20mx16x32-like input
    twin: Dataset | None = None  # the same users and pairs with a 26,744-item catalog (throughput)

    @property
    def prepared(self) -> Path:
        return self.out_dir / self.kind


# --------------------------------------------------------------------------- inputs


def mlperf_dataset(key: str, label: str, shape: MlperfShape, cache: Path, folder: str) -> Dataset:
    """File 0 of `shape`, with its twin of the same users and pairs over a 26,744-item catalog."""

    def make(key: str, label: str, folder: str, shape: MlperfShape) -> Dataset:
        prepared = cache / "prepared" / folder
        return Dataset(key, label, "ml-20mx16x32", cache / folder, prepared, shape.train_pairs_of(0), shape)

    dataset = make(key, label, folder, shape)
    small = dataclasses.replace(shape, items=SMALL_CATALOG)
    twin_label = f"{label}, {SMALL_CATALOG:,} items"
    dataset.twin = make(f"{key}-{SMALL_CATALOG}", twin_label, f"{folder}-i{SMALL_CATALOG}", small)
    return dataset


def datasets(args: argparse.Namespace) -> list[Dataset]:
    from movierec.data.mlperf_synthetic import FULL_SHAPE, scaled_shape

    suffix = "-tiny" if args.tiny else ""
    items = TINY_ITEMS if args.tiny else FULL_SHAPE.items
    out = []
    for key in args.datasets:
        if key == "file":
            shape = scaled_shape(TINY_FRACTION, items) if args.tiny else FULL_SHAPE
            out.append(mlperf_dataset(key, "ml-20mx16x32 file 0", shape, args.cache, f"mlperf-full{suffix}"))
        elif key == "quarter":
            f = args.fraction_of_file
            shape = scaled_shape(f * (TINY_FRACTION if args.tiny else 1.0), items)
            out.append(
                mlperf_dataset(key, f"{f:g} of ml-20mx16x32 file 0", shape, args.cache, f"mlperf-f{f:g}{suffix}")
            )
        else:
            rows = (TINY_ML20M if args.tiny else prepare_bench.ML20M).rows
            folder = f"ml-20m-synth{suffix}"
            label = "ML-20M-sized ratings.csv"
            out.append(Dataset(key, label, "ml-20m", args.cache / folder, args.cache / "prepared" / folder, rows))
    return out


def make_input(dataset: Dataset, args: argparse.Namespace) -> None:
    """Generate the input files unless cached (file 0 only for ml-20mx16x32 shapes)."""
    started = time.perf_counter()
    if dataset.kind == "ml-20mx16x32":
        from movierec.data.mlperf_synthetic import generate_mlperf_files

        generate_mlperf_files(dataset.input_dir, dataset.shape, files=[0])
    else:
        prepare_bench.generate(dataset.input_dir, TINY_ML20M if args.tiny else prepare_bench.ML20M)
    log(f"input {dataset.input_dir} ready ({time.perf_counter() - started:.1f} s)")


# --------------------------------------------------------------------------- subprocesses


def prepare(dataset: Dataset) -> Finished:
    return run_child(prepare_command(dataset.kind, dataset.input_dir, dataset.out_dir))


def ensure_prepared(dataset: Dataset) -> None:
    """Prepare (untimed) unless a prepared copy newer than its input exists."""
    if is_fresh(dataset.prepared, dataset.input_dir):
        return
    log(f"preparing {dataset.input_dir} (untimed)")
    finished = prepare(dataset)
    if not finished.ok:
        raise RuntimeError(f"prepare of {dataset.input_dir}: {finished.why()}\n{finished.output[-4000:]}")


def first_step(dataset: Dataset, args: argparse.Namespace, overrides: list[str], run_dir: Path) -> Finished:
    """`movierec train --max-steps 2` in a subprocess, run to its end or stopped at its first-step line."""
    command = cli(
        "train", "--config", str(args.config), "--data", str(dataset.prepared), "--max-steps", "2",
        "--run-dir", str(run_dir), "--tracking-uri", f"sqlite:///{run_dir}/mlflow.db", *overrides,
    )  # fmt: skip
    return run_child(command, stop_on=FIRST_STEP if args.stop_after_first_step else None)


def eval_worker(job: dict) -> dict:
    """ms per user of `Evaluator.run` for two protocols, an untrained SSE-PT of the config's shape."""
    import torch

    from movierec.data.layout import load_sequences
    from movierec.evaluation.evaluate import Evaluator
    from movierec.models.base import ModelConfig
    from movierec.models.sse_pt import SSEPT
    from movierec.training.config import load_config

    config = load_config(job["config"], job["overrides"])
    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    data = load_sequences(job["data"])
    torch.manual_seed(0)
    model = SSEPT(ModelConfig(num_users=data.num_users, num_items=data.num_items, **vars(config.model)))
    out = {}
    for protocol in ("sampled-uniform-100", "full"):
        evaluator = Evaluator(data, "evaluation", (protocol,), (10,), seed=0, batch_size=256, max_users=job["users"])
        started = time.perf_counter()
        evaluator.run(model, "cpu")
        seconds = time.perf_counter() - started
        out[protocol] = {"users": evaluator.num_users, "ms_per_user": seconds * 1000 / max(evaluator.num_users, 1)}
    return out


WORKERS = {"throughput": time_job, "eval": eval_worker}  # a worker job's "kind" -> what the worker runs


# --------------------------------------------------------------------------- measurements


@dataclasses.dataclass
class Context:
    args: argparse.Namespace
    steps: int
    warmup: int
    eval_users: int
    overrides: list[str]
    rows: list[dict] = dataclasses.field(default_factory=list)
    failed: bool = False

    def job(self, kind: str, dataset: Dataset, **extra) -> dict:
        """A worker job of `kind` on the dataset, with the config and overrides of this run."""
        return {"kind": kind, "config": str(self.args.config), "data": str(dataset.prepared),
                "overrides": self.overrides, **extra}  # fmt: skip

    def run_job(self, dataset: Dataset, measurement: str, job: dict) -> dict | None:
        """One worker job in a process of its own: its result with that process's peak RSS, or None after a
        failed row."""
        finished, (result,) = run_worker(__file__, [job])
        if result is None or "error" in result:
            self.fail(dataset, measurement, result["error"] if result else finished.why(), finished.peak_rss_mib)
            return None
        return {**result, "peak_rss_mib": finished.peak_rss_mib}

    def add(self, dataset: Dataset, measurement: str, result: str, rss: float | None, **values) -> None:
        """One table row; `values` (numbers) also go to --json."""
        meta_file = dataset.prepared / "meta.json"
        meta = json.loads(meta_file.read_text()) if meta_file.is_file() else None
        row = {"dataset": dataset.label, "shape": shape_cells(dataset, meta), "measurement": measurement}
        self.rows.append({**row, "result": result, "peak_rss_mib": rss, **values})
        log(f"{dataset.label}: {measurement}: {result}")

    def fail(self, dataset: Dataset, measurement: str, why: str, rss: float | None) -> None:
        self.failed = True
        self.add(dataset, measurement, f"failed: {why}", rss)


def measure_prepare(dataset: Dataset, ctx: Context) -> None:
    r = prepare(dataset)
    if not r.ok:
        return ctx.fail(dataset, "prepare", r.why(), r.peak_rss_mib)
    shards = len(json.loads((dataset.prepared / "meta.json").read_text())["shards"])
    result = f"{r.wall_s:.1f} s wall, {r.cpu_s:.1f} s CPU, {shards} shards"
    ctx.add(dataset, "prepare", result, r.peak_rss_mib, wall_s=r.wall_s, cpu_s=r.cpu_s)


def measure_first_step(dataset: Dataset, ctx: Context) -> None:
    with tempfile.TemporaryDirectory(prefix="movierec-bench-run-") as run_dir:
        r = first_step(dataset, ctx.args, ctx.overrides, Path(run_dir))
    name = "first step (train --max-steps 2)"
    seconds = parse_first_step(r.output)
    if not r.ok or seconds is None:
        why = r.why() if not r.ok else "no 'first optimizer step after X s' line in the output"
        return ctx.fail(dataset, name, why, r.peak_rss_mib)
    ran = "stopped there" if ctx.args.stop_after_first_step else f"whole run {r.wall_s:.1f} s"
    result = f"{seconds:.1f} s after start ({ran})"
    ctx.add(dataset, name, result, r.peak_rss_mib, first_step_s=seconds, wall_s=r.wall_s)


def measure_throughput(dataset: Dataset, ctx: Context) -> None:
    rates = []
    for variant in [dataset] + ([dataset.twin] if dataset.twin else []):
        if variant is not dataset:
            make_input(variant, ctx.args)
            ensure_prepared(variant)
        job = ctx.job("throughput", variant, warmup=ctx.warmup, steps=ctx.steps)
        if (r := ctx.run_job(variant, "training tokens/s", job)) is None:
            continue
        rates.append(r["tokens_per_s"])
        ratio = ""
        if variant is not dataset and len(rates) == 2:
            ratio = f"; full catalog / {SMALL_CATALOG:,} items: {rates[0] / rates[1]:.2f}"
        result = f"{r['tokens_per_s']:,.0f} ({r['steps']} steps, {r['optimizer']}, {r['threads']} threads{ratio})"
        ctx.add(variant, "training tokens/s", result, r["peak_rss_mib"], tokens_per_s=r["tokens_per_s"])


def measure_eval(dataset: Dataset, ctx: Context) -> None:
    if (r := ctx.run_job(dataset, "eval ms/user", ctx.job("eval", dataset, users=ctx.eval_users))) is None:
        return
    for protocol in ("sampled-uniform-100", "full"):
        e = r[protocol]
        result = f"{e['ms_per_user']:.2f} ({e['users']:,} users)"
        ctx.add(dataset, f"eval {protocol} ms/user", result, r["peak_rss_mib"], ms_per_user=e["ms_per_user"])


MEASUREMENTS = {  # --only names, in the order they run; each needs the dataset prepared except "prepare"
    "prepare": measure_prepare,
    "first-step": measure_first_step,
    "throughput": measure_throughput,
    "eval": measure_eval,
}


# --------------------------------------------------------------------------- the table


def shape_cells(dataset: Dataset, meta: dict | None) -> list[str]:
    """users, items (of the prepared data when there is one, else of the generator's shape), input pairs."""
    users = meta["num_users"] if meta else (dataset.shape.user_range(0)[1] if dataset.shape else None)
    items = meta["num_items"] if meta else (dataset.shape.items if dataset.shape else None)
    return [f"{users:,}" if users else "?", f"{items:,}" if items else "?", f"{dataset.input_pairs:,}"]


def print_table(rows: list[dict], notes: list[str]) -> None:
    print()
    print("| dataset | users | items | pairs in | measurement | result | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        rss = f"{row['peak_rss_mib']:,.0f}" if row.get("peak_rss_mib") is not None else ""
        cells = [row["dataset"], *row["shape"], row["measurement"], row["result"], rss]
        print("| " + " | ".join(cells) + " |")
    for line in notes:
        print(line)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "movierec-bench")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument(
        "--datasets", default=None, help=f"comma-separated subset of {', '.join(DATASETS)} (default: all; --tiny: file)"
    )
    parser.add_argument("--fraction-of-file", type=float, default=0.25, help="users of the `quarter` dataset")
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (default 20, --tiny 2)")
    parser.add_argument("--eval-users", type=int, default=None, help="users evaluated (default 1000, --tiny 32)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--config", type=Path, default=None, help=f"run config (default {CONFIG.relative_to(ROOT)})")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides")
    parser.add_argument(
        "--stop-after-first-step",
        action="store_true",
        help="first-step: stop `train` at its first step (implied by --tiny); RSS is then the peak up to there",
    )
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="tiny shapes, few steps, first-step stopped there: a < 1 min smoke run of every part",
    )
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.only = [p for p in args.only.split(",") if p]
    args.datasets = [d for d in (args.datasets or ("file" if args.tiny else ",".join(DATASETS))).split(",") if d]
    for name, chosen, known in (("--only", args.only, PARTS), ("--datasets", args.datasets, DATASETS)):
        if unknown := sorted(set(chosen) - set(known)):
            parser.error(f"{name}: unknown {', '.join(unknown)}; known: {', '.join(known)}")
    args.stop_after_first_step = args.stop_after_first_step or args.tiny
    return args


def main() -> None:
    args = parse_args()
    if args.worker:
        work(json.loads(args.worker), lambda job: WORKERS[job["kind"]](job))
        return
    notes = []
    if args.config is None:
        args.config = CONFIG if CONFIG.is_file() else FALLBACK_CONFIG
        if args.config == FALLBACK_CONFIG:  # its validation would rank all items for every user: sample
            notes.append(
                f"note: {CONFIG.relative_to(ROOT)} is missing; used {FALLBACK_CONFIG.relative_to(ROOT)} "
                "with eval.max_users=1000"
            )
            args.set = ["eval.max_users=1000", *args.set]
    if args.tiny:  # small batches of short sequences: the run checks the plumbing, not the speed
        args.set = [*TINY_OVERRIDES, *args.set]
    ctx = Context(
        args,
        steps=args.steps or (2 if args.tiny else 20),
        warmup=1 if args.tiny else 3,
        eval_users=args.eval_users or (32 if args.tiny else 1000),
        overrides=[*args.set, *([f"train.num_threads={args.threads}"] if args.threads else [])],
    )
    for dataset in datasets(args):
        make_input(dataset, args)
        for part, measure in MEASUREMENTS.items():
            if part not in args.only:
                continue
            if part != "prepare":
                try:
                    ensure_prepared(dataset)
                except RuntimeError as exc:
                    ctx.fail(dataset, part, str(exc).splitlines()[0], None)
                    break
            measure(dataset, ctx)

    info = machine(with_gpus=False)
    config = args.config.relative_to(ROOT) if args.config.is_relative_to(ROOT) else args.config
    print(f"machine: {machine_line(info)}")
    print(
        f"config: {config}{' ' + ' '.join(ctx.overrides) if ctx.overrides else ''}; steps {ctx.steps} "
        f"(warm-up {ctx.warmup}); eval users {ctx.eval_users}; threads {args.threads or 'default'}"
        f"{'; --tiny' if args.tiny else ''}"
    )
    print_table(ctx.rows, notes)
    if args.json:
        saved = {"machine": machine_line(info), "date": info["date"], "rows": ctx.rows}
        args.json.write_text(json.dumps(saved, indent=1))
    if ctx.failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
