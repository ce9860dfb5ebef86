"""GPU check: every CUDA path of training in one prepared run of at most --budget-s seconds, one table at the end.

    bash bench/gpu_check.sh                       # on a machine with CUDA: the whole check (about 8 minutes)
    bash bench/gpu_check.sh --cpu --out /tmp/gc   # reduced CPU mode (forced when CUDA is unavailable), < 3 min

Rows (column `check`):
- `train-throughput`: the ML-1M recipes (bench/common.py's RECIPES: sasrec d 50, sse-pt 100+50) at fp32,
  fp16 (autocast + GradScaler, what `train.precision=fp16` means here) and bf16: tokens/s, seconds per
  ML-1M pass and peak GPU memory (torch.cuda.max_memory_allocated), each in its own worker process
  (bench/common.py's `time_steps`: 3 warm-up steps, then one pass of 48 steps timed); on CUDA each row says
  its attention path, and sse-pt at fp16 and bf16 is timed twice: fused (`scaled_dot_product_attention`,
  the default) and with MOVIEREC_ATTENTION=unfused (the explicit math) in its worker's environment;
- `mlperf-throughput`: SSE-PT (configs/ml-20mx16x32-sse-pt.yaml) on an ml-20mx16x32-shaped file generated
  here: file 0 of `scaled_shape(--mlperf-fraction)`, the full 855,776-item catalog, at the same precisions;
- `batch-size-auto`: `movierec train --batch-size auto --max-steps 1` of configs/ml-20mx16x32-sse-pt.yaml on
  that file: the size it chooses, halving from train.max_batch_size (2048) on CUDA out-of-memory, and every
  size it tried;
- `torchrun-scaling`: `movierec train --max-steps S` of the SSE-PT recipe as one process and under
  `torchrun --nproc_per_node gpu` (every visible GPU, nccl), tokens/s of each from history.json and the
  ratio (bench/ddp_throughput.py does the runs; the per-rank batch stays 128, so the global batch grows);
- `time-to-quality`: bench/time_to_quality.py's `movierec train --config configs/ml-1m-sse-pt.yaml` on CUDA
  with the budget left as its time budget (train.max_minutes, less a margin for its set-up and its test):
  wall time, epochs, the test NDCG@10 (100 uniform negatives) of its best weights as best.ckpt keeps it, and
  whether it reached 0.62.

A row that fails reads FAILED with a one-line reason (its output is kept under OUT/logs); the others still
run, and the script exits 1 if any row failed. `--cpu` (forced, with a line saying so, when CUDA is not
available) runs the same rows small: synthetic data instead of ML-1M, fp32 and bf16, a 100,000-item
ml-20mx16x32-shaped file of 138 users, all throughput rows in one worker process, 2 gloo processes
against 1 (one thread each), and a 2-epoch "time to quality" on the synthetic data without threshold;
it takes 1-2 minutes on 2 cores.
ML-1M comes from --ml1m, else data/ml-1m-sasrec, else is prepared from ../shared/data/ml-1m-sasrec/ml-1m.txt;
without any of them the ML-1M rows are SKIPPED (say so, and carry data/ to the GPU machine).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import ddp_throughput as ddp  # the torchrun runs
import time_to_quality as ttq  # the time-to-quality run and its result
from common import (
    ML1M_CONFIG,
    RECIPES,
    ROOT,
    cli,
    is_fresh,
    is_prepared,
    log,
    machine,
    prepare_command,
    run_child,
    run_worker,
    steps_job,
    time_job,
    work,
)

MLPERF_CONFIG = ROOT / "configs" / "ml-20mx16x32-sse-pt.yaml"
SYNTHETIC_CONFIG = ROOT / "configs" / "synthetic.yaml"
SHARED_ML1M = ROOT.parent / "shared" / "data" / "ml-1m-sasrec" / "ml-1m.txt"
CHECKS = ("train-throughput", "mlperf-throughput", "batch-size-auto", "torchrun-scaling", "time-to-quality")
TARGET = 0.62
QUIET = ["tracking.log_model=false", "tracking.system_metrics=false"]
ATTENTION_CASES = {"auto": "fused attention (auto)", "unfused": "unfused attention (MOVIEREC_ATTENTION=unfused)"}


@dataclasses.dataclass
class Mode:
    """What a run measures: the full GPU check or the reduced CPU mode."""

    cpu: bool
    device: str
    precisions: list[str]
    unfused_precisions: list[str]  # the sse-pt recipe is also timed with MOVIEREC_ATTENTION=unfused at these
    threads: int | None  # torch threads per process (CPU mode: 1, the machine may be busy)
    warmup: int
    steps: int  # timed steps of a throughput row (ML-1M: 48 = one pass)
    recipe_overrides: list[str]  # on top of the ML-1M recipes
    mlperf_fraction: float
    mlperf_items: int
    mlperf_steps: int
    mlperf_overrides: list[str]
    ddp_world: int | str
    ddp_steps: int
    worker_cap_s: float  # timeout of one throughput worker
    run_cap_s: float  # timeout of one torchrun-scaling run
    quality_reserve_s: float  # kept for the time-to-quality row while the others run
    quality_overhead_s: float  # of the time-to-quality run's cap, what is left for its set-up and its test
    shared_worker: bool  # all throughput jobs in one worker process (CPU mode: saves process starts)


GPU_MODE = Mode(
    cpu=False, device="cuda", precisions=["fp32", "fp16", "bf16"], unfused_precisions=["fp16", "bf16"],
    threads=None, warmup=3, steps=48, recipe_overrides=[], mlperf_fraction=0.1, mlperf_items=855_776,
    mlperf_steps=20, mlperf_overrides=[], ddp_world="gpu", ddp_steps=144, worker_cap_s=120, run_cap_s=150,
    quality_reserve_s=120, quality_overhead_s=45, shared_worker=False,
)  # fmt: skip
CPU_MODE = Mode(
    cpu=True, device="cpu", precisions=["fp32", "bf16"], unfused_precisions=[], threads=1, warmup=1, steps=2,
    recipe_overrides=["model.max_len=50", "train.batch_size=64"], mlperf_fraction=1e-3, mlperf_items=100_000,
    mlperf_steps=2, mlperf_overrides=["train.batch_size=32", "model.max_len=50"], ddp_world=2, ddp_steps=3,
    worker_cap_s=60, run_cap_s=90, quality_reserve_s=30, quality_overhead_s=20, shared_worker=True,
)  # fmt: skip


@dataclasses.dataclass
class Row:
    check: str
    data: str
    case: str
    precision: str = ""
    tokens_per_s: float | None = None
    s_per_pass: float | None = None
    peak_mib: float | None = None
    status: str = "ok"  # ok | FAILED | SKIPPED
    detail: str = ""
    values: dict = dataclasses.field(default_factory=dict)


class Check:
    def __init__(self, args: argparse.Namespace, mode: Mode):
        self.args, self.mode = args, mode
        self.started = time.perf_counter()
        self.rows: list[Row] = []
        self.out: Path = args.out
        self.logs = self.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = f"sqlite:///{(self.out / 'mlflow.db').resolve()}"  # for the `movierec train` runs

    def remaining(self) -> float:
        return self.args.budget_s - (time.perf_counter() - self.started)

    def timeout(self, cap: float, keep: float = 0.0) -> float | None:
        """Seconds a child may run: at most `cap`, leaving `keep` of the budget; None when under 10 s are left."""
        left = min(cap, self.remaining() - keep)
        return left if left >= 10 else None

    def add(self, row: Row) -> Row:
        self.rows.append(self.note(row))
        return row

    def note(self, row: Row) -> Row:
        """Log a finished row on stderr (progress), without adding it to the table."""
        rate = f"{row.tokens_per_s:,.0f} tokens/s; " if row.status == "ok" and row.tokens_per_s is not None else ""
        shown = rate + row.detail
        when = f"[{time.perf_counter() - self.started:5.0f} s]"
        log(f"{when} {row.check} | {row.case} {row.precision}: {row.status} {shown}")
        return row

    def keep_log(self, name: str, text: str) -> Path:
        path = self.logs / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', name)}.log"
        path.write_text(text)
        return path

    @property
    def failed(self) -> bool:
        return any(row.status == "FAILED" for row in self.rows)


def cuda_status() -> str | None:
    """None when CUDA can be used, else why not (one line)."""
    import torch

    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a build without CUDA"
    try:
        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"
    except Exception as exc:  # a broken driver raises here
        return f"CUDA initialisation failed: {exc}"
    return None


# --------------------------------------------------------------------------- data


def prepare_into(check: Check, name: str, command: list[str], target: Path, timeout: float | None) -> str:
    """Run a `movierec prepare` command that writes `target`: "" when it did, else why not (its output kept)."""
    finished = run_child(command, timeout=timeout)
    if finished.ok and is_prepared(target):
        return ""
    check.keep_log(f"prepare-{name}", finished.output)
    return f"preparing {name} failed: {finished.why()}"


def ml1m_data(check: Check) -> tuple[Path | None, str]:
    """(prepared ML-1M folder or None, why it is missing)."""
    target = check.out / "data" / "ml-1m-sasrec"
    for folder in (Path(check.args.ml1m or ROOT / "data" / "ml-1m-sasrec"), target):
        if is_prepared(folder):
            return folder, ""
    if not SHARED_ML1M.is_file():
        return None, f"no prepared ML-1M (data/ml-1m-sasrec or --ml1m) and no {SHARED_ML1M}"
    log(f"preparing ML-1M from {SHARED_ML1M}")
    command = cli("prepare", "--dataset", "ml-1m-sasrec", "--input", str(SHARED_ML1M), "--out", str(target.parent))
    why = prepare_into(check, "ML-1M", command, target, timeout=300)
    return (None, why) if why else (target, "")


def synthetic_data(check: Check) -> tuple[Path | None, str]:
    target = check.out / "data" / "synthetic"
    if is_prepared(target):
        return target, ""
    command = cli("prepare", "--dataset", "synthetic", "--out", str(target.parent))
    why = prepare_into(check, "synthetic data", command, target, timeout=120)
    return (None, why) if why else (target, "")


def mlperf_data(check: Check) -> tuple[Path | None, str, float]:
    """File 0 of scaled_shape(fraction, items), generated and prepared under OUT: (folder, error, seconds)."""
    from movierec.data.mlperf_synthetic import generate_mlperf_files, scaled_shape

    mode, started = check.mode, time.perf_counter()
    name = f"mlperf-f{mode.mlperf_fraction:g}-i{mode.mlperf_items}"
    source, out = check.out / name, check.out / "data" / name
    target = out / "ml-20mx16x32"
    try:
        generate_mlperf_files(source, scaled_shape(mode.mlperf_fraction, mode.mlperf_items), files=[0])
    except Exception as exc:
        return None, f"generating the ml-20mx16x32-shaped file failed: {exc}", time.perf_counter() - started
    if not is_fresh(target, source):
        command = prepare_command("ml-20mx16x32", source, out)
        timeout = check.timeout(300, keep=mode.quality_reserve_s)
        if why := prepare_into(check, "the ml-20mx16x32-shaped file", command, target, timeout):
            return None, why, 0.0
    return target, "", time.perf_counter() - started


# --------------------------------------------------------------------------- throughput (worker processes)


@dataclasses.dataclass
class Job:
    """One throughput row: a worker job on `data` with `config` + `overrides` at `precision`."""

    kind: str
    data: Path
    label: str
    case: str
    config: Path
    overrides: list[str]
    precision: str
    steps: int
    fraction: float | None = None  # the data is this fraction of ml-20mx16x32 file 0: extrapolate a pass of it
    attention: str = "auto"  # MOVIEREC_ATTENTION of its worker process

    def spec(self, mode: Mode) -> dict:
        threads = [f"train.num_threads={mode.threads}"] if mode.threads else []
        overrides = [*self.overrides, *threads, f"train.precision={self.precision}", f"train.device={mode.device}"]
        return steps_job(self.config, self.data, overrides, mode.warmup, self.steps)


def precision_label(precision: str) -> str:
    return "fp16+GradScaler" if precision == "fp16" else precision


def job_row(check: Check, job: Job, r: dict | None, why: str) -> Row:
    """The row of a job from its worker's result (None: the worker died or timed out first, `why`)."""
    mode = check.mode
    row = Row(job.kind, job.label, job.case, precision_label(job.precision))
    if r is None or "error" in r:
        return dataclasses.replace(row, status="FAILED", detail=r["error"] if r else why)
    if job.precision == "fp16" and mode.device == "cuda" and not r["grad_scaler"]:
        return dataclasses.replace(row, status="FAILED", detail="fp16 ran without a GradScaler")
    if r["attention"] != job.attention:
        return dataclasses.replace(row, status="FAILED", detail=f"the worker saw MOVIEREC_ATTENTION={r['attention']}")
    peak = r["peak_gpu_mib"] if r["peak_gpu_mib"] is not None else r["peak_rss_mib"]
    detail = f"{r['steps']} steps of {r['steps_per_pass']}/pass, autocast {r['autocast']}, {r['optimizer']}"
    if r["grad_scaler"]:
        detail += ", GradScaler"
    if mode.cpu:
        detail += f", {r['threads']} thread(s)"
    detail += f"; job {r['seconds']:.0f} s"
    if job.fraction:
        detail += f"; ~{r['s_per_pass'] / job.fraction:,.0f} s per whole file 0"
    return dataclasses.replace(
        row, tokens_per_s=r["tokens_per_s"], s_per_pass=r["s_per_pass"], peak_mib=peak, detail=detail, values=r
    )


def run_jobs(check: Check, jobs: list[Job | Row]) -> None:
    """Measure the jobs, each in its own worker process (CPU mode: all of one attention path in one, to save
    process starts). Rows given as such (skipped before they could run) are taken as they are; the table
    keeps the order."""
    mode = check.mode
    pending = [j for j in jobs if isinstance(j, Job)]
    if mode.shared_worker:
        groups = [[j for j in pending if j.attention == path] for path in dict.fromkeys(j.attention for j in pending)]
    else:
        groups = [[j] for j in pending]
    done: dict[int, Row] = {}
    for group in groups:
        timeout = check.timeout(mode.worker_cap_s * len(group), keep=mode.quality_reserve_s)
        if timeout is None:
            for job in group:
                row = Row(job.kind, job.label, job.case, precision_label(job.precision), status="SKIPPED")
                done[id(job)] = check.note(dataclasses.replace(row, detail="out of budget"))
            continue
        env = {"MOVIEREC_ATTENTION": group[0].attention}
        finished, results = run_worker(__file__, [job.spec(mode) for job in group], timeout, env)
        names = "-".join(f"{j.kind}-{j.case}-{j.precision}" for j in group) if len(group) == 1 else "throughput-worker"
        check.keep_log(names, finished.output)
        for job, result in zip(group, results, strict=True):
            done[id(job)] = check.note(job_row(check, job, result, finished.why()))
    check.rows.extend(done[id(j)] if isinstance(j, Job) else j for j in jobs)


def train_throughput_jobs(check: Check, data: Path | None, label: str, why: str) -> list[Job | Row]:
    """The ML-1M recipes at every precision; on CUDA, each row says its attention path, and the sse-pt recipe
    is timed again with the unfused attention math at `mode.unfused_precisions`."""
    mode, jobs = check.mode, []
    for recipe in RECIPES.values():
        for precision in mode.precisions:
            compared = recipe.short == "sse-pt" and precision in mode.unfused_precisions
            for path in ("auto", "unfused") if compared else ("auto",):
                case = recipe.name if mode.cpu else f"{recipe.name}, {ATTENTION_CASES[path]}"
                if data is None:
                    row = Row("train-throughput", label, case, precision_label(precision), status="SKIPPED", detail=why)
                    jobs.append(check.note(row))
                    continue
                overrides = [*recipe.overrides, *mode.recipe_overrides]
                jobs.append(Job("train-throughput", data, label, case, ML1M_CONFIG, overrides, precision, mode.steps,
                                attention=path))  # fmt: skip
    return jobs


def mlperf_jobs(check: Check, data: Path | None, why: str, seconds: float) -> list[Job | Row]:
    mode = check.mode
    label = f"ml-20mx16x32 file 0 x {mode.mlperf_fraction:g}, {mode.mlperf_items:,} items"
    case = "sse-pt (100+50)"
    if data is None:
        return [check.note(Row("mlperf-throughput", label, case, precision_label(p), status="FAILED", detail=why))
                for p in mode.precisions]  # fmt: skip
    meta = json.loads((data / "meta.json").read_text())
    label += f" ({meta['num_users']:,} users)"
    log(f"ml-20mx16x32-shaped data generated and prepared in {seconds:.1f} s: {data}")
    return [Job("mlperf-throughput", data, label, case, MLPERF_CONFIG, mode.mlperf_overrides, precision,
                mode.mlperf_steps, mode.mlperf_fraction) for precision in mode.precisions]  # fmt: skip


def batch_size_row(check: Check, data: Path | None, why: str) -> None:
    """`--batch-size auto` on the ml-20mx16x32-shaped file: the size the search chooses, from its setup line."""
    label, case = "ml-20mx16x32 file 0", "train.batch_size auto"
    if data is None:
        check.add(Row("batch-size-auto", label, case, status="FAILED", detail=why))
        return
    overrides = [o for o in check.mode.mlperf_overrides if not o.startswith("train.batch_size")]
    command = cli(
        "train", "--config", str(MLPERF_CONFIG), "--data", str(data), "--batch-size", "auto", "--max-steps", "1",
        "--device", check.mode.device, "--run-dir", str(check.out / "runs" / "batch-size-auto"), "--tracking-uri",
        check.tracking_uri, "eval.max_users=100", "tracking.log_model=false", *overrides,
    )  # fmt: skip
    finished = run_child(command, timeout=check.timeout(240, keep=check.mode.quality_reserve_s))
    found = re.search(r"setup batch size: auto: (\d+) \(tried (.*?)\); train\.lr", finished.output.replace("\n", " "))
    if not finished.ok or not found:
        check.keep_log("batch-size-auto", finished.output)
        check.add(Row("batch-size-auto", label, case, status="FAILED", detail=finished.why()))
        return
    detail = f"chose {found.group(1)} in {finished.wall_s:.0f} s; tried {found.group(2)}"
    check.add(Row("batch-size-auto", label, case, detail=detail, values={"batch_size": int(found.group(1))}))


# --------------------------------------------------------------------------- torchrun scaling


def torchrun_rows(check: Check, data: Path | None, label: str, why: str) -> None:
    mode = check.mode
    world = mode.ddp_world
    processes = ddp.world_processes(world)
    cases = [("1 process", 1), (f"torchrun --nproc_per_node {world} ({processes} processes)", world)]
    precision = "fp16+GradScaler" if mode.device == "cuda" else "fp32"
    if data is None:
        for case, _ in cases:
            check.add(Row("torchrun-scaling", label, case, precision, status="SKIPPED", detail=why))
        return
    overrides = [*RECIPES["sse-pt"].overrides, *mode.recipe_overrides]
    per_rank, accumulation = ddp.batch_size(ML1M_CONFIG, overrides)
    results = []
    for case, w in cases:
        timeout = check.timeout(mode.run_cap_s, keep=mode.quality_reserve_s)
        if timeout is None:
            results.append((case, w, {"skipped": "out of budget"}))
            continue
        log(f"torchrun-scaling: {case}, --max-steps {mode.ddp_steps}")
        run_dir = check.out / "runs" / f"scaling-w{w}"
        r = ddp.run_train(
            w, data=data, steps=mode.ddp_steps, run_dir=run_dir, tracking_uri=check.tracking_uri,
            overrides=overrides, threads=mode.threads, config=ML1M_CONFIG, device=mode.device, timeout=timeout,
        )  # fmt: skip
        check.keep_log(f"torchrun-scaling-w{w}", r.get("output", ""))
        results.append((case, w, r))
    # leave each run's first epoch (warm-up) out when every run has a later one
    skip_first = all(len(r.get("records", [])) > 1 for _, _, r in results)
    base = None
    for case, w, r in results:
        row = Row("torchrun-scaling", label, case, precision)
        n = ddp.world_processes(w)
        if "skipped" in r:
            check.add(dataclasses.replace(row, status="SKIPPED", detail=r["skipped"]))
            continue
        if "error" in r:
            check.add(dataclasses.replace(row, status="FAILED", detail=r["error"]))
            continue
        s = ddp.summarize(r["records"], skip_first)
        detail = f"{s['steps']} steps in {s['epochs']} epoch(s){' after the first' if s['skipped_first'] else ''}"
        detail += f", global batch {per_rank * n * accumulation}"
        if mode.threads:
            detail += f", {mode.threads} thread(s) each"
        if w == 1:
            base = s["tokens_per_s"]
        elif base:
            detail += f"; scaling {s['tokens_per_s'] / base:.2f}x vs 1 process"
            if n == 1:
                detail += " (one GPU: torchrun ran 1 process, no process group, DDP/NCCL not exercised)"
        detail += f"; run {r['wall_s']:.0f} s"
        values = {"steps": s["steps"], "epochs": s["epochs"], "processes": n, "wall_s": r["wall_s"]}
        if w != 1 and base:
            values["scaling"] = s["tokens_per_s"] / base
        check.add(dataclasses.replace(row, tokens_per_s=s["tokens_per_s"], detail=detail, values=values))


# --------------------------------------------------------------------------- time to quality


def quality_row(check: Check, data: Path | None, label: str, why: str) -> None:
    """bench/time_to_quality.py's run of the shipped SSE-PT config, its time budget the check's budget left
    less what its set-up and test take; the test metrics of its best weights are read from its checkpoint."""
    mode = check.mode
    config = SYNTHETIC_CONFIG if mode.cpu else ML1M_CONFIG
    row = Row("time-to-quality", label, f"sse-pt, configs/{config.name}", "fp32" if mode.cpu else "auto (fp16)")
    if data is None:
        check.add(dataclasses.replace(row, status="SKIPPED", detail=why))
        return
    cap = min(check.remaining() - 5, check.args.quality_cap_s or float("inf"))  # 5 s for the report
    minutes = round((cap - mode.quality_overhead_s) / 60, 2)
    if minutes * 60 < 10:
        check.add(dataclasses.replace(row, status="SKIPPED", detail="out of budget"))
        return
    run_dir = check.out / "runs" / "quality"
    shutil.rmtree(run_dir, ignore_errors=True)
    extra = ["--device", mode.device, *QUIET]
    if mode.cpu:
        extra += ["--epochs", "2", "eval.every_steps=1", "eval.max_users=500", f"train.num_threads={mode.threads}"]
    elif check.args.quality_epochs:
        extra += ["--epochs", str(check.args.quality_epochs)]
    command = ttq.train_command(config, data, run_dir, check.tracking_uri, minutes, *extra)
    log(f"time-to-quality: {' '.join(command[3:])} (cap {cap:.0f} s)")
    finished = run_child(command, timeout=cap)
    check.keep_log("time-to-quality", finished.output)
    ndcg = ttq.final_test(run_dir) if finished.ok else None
    if ndcg is None:
        detail = finished.why() if not finished.ok else f"no test {ttq.METRIC} in the checkpoint of {run_dir}"
        check.add(dataclasses.replace(row, status="FAILED", detail=detail))
        return
    records = ttq.history(run_dir)
    validated = [r for r in records if f"val_{ttq.METRIC}" in r]
    best = max(validated, key=lambda r: r[f"val_{ttq.METRIC}"]) if validated else None
    stopped = records[-1]["elapsed_s"] >= minutes * 60
    detail = (
        f"{finished.wall_s:.0f} s wall{' (stopped by its time budget)' if stopped else ''}, {len(records)} epochs, "
    )
    if best is not None:
        detail += f"best epoch {best['epoch']} (validation NDCG@10 {best[f'val_{ttq.METRIC}']:.4f})"
    else:
        detail += "no validation yet"
    detail += f"; test NDCG@10 (100 uniform negatives) of the best weights {ndcg:.4f}"
    reached = None if mode.cpu else ndcg >= TARGET
    detail += "; no threshold in CPU mode" if mode.cpu else f"; reached {TARGET}: {'yes' if reached else 'no'}"
    values = {"wall_s": finished.wall_s, "epochs": len(records), "best_epoch": best["epoch"] if best else None,
              "test_ndcg10": ndcg, "capped": stopped, "reached_target": reached}  # fmt: skip
    check.add(dataclasses.replace(row, detail=detail, values=values))


# --------------------------------------------------------------------------- report


def print_report(check: Check, info: dict, mode_line: str) -> None:
    gpus = ", ".join(info["gpus"]) if info["gpus"] else "none used"
    print(f"machine: GPUs: {gpus}; CPU: {info['cpu']}, {info['cores']} cores")
    print(f"torch {info['torch']} (CUDA {info['cuda'] or 'none'}), Python {info['python']}; {info['date']}")
    print(mode_line)
    peak = "peak RSS of the one worker process, cumulative" if check.mode.cpu else "torch.cuda.max_memory_allocated"
    used = time.perf_counter() - check.started
    print(f"budget {check.args.budget_s:.0f} s, used {used:.0f} s; work folder {check.out}; peak MiB = {peak}")
    print()
    print("| check | data | case | precision | tokens/s | s/pass | peak MiB | status | detail |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in check.rows:
        cells = [
            r.check,
            r.data,
            r.case,
            r.precision,
            f"{r.tokens_per_s:,.0f}" if r.tokens_per_s is not None else "",
            f"{r.s_per_pass:.2f}" if r.s_per_pass is not None else "",
            f"{r.peak_mib:,.0f}" if r.peak_mib is not None else "",
            r.status,
            r.detail.replace("|", "/"),
        ]
        print("| " + " | ".join(cells) + " |")
    failed = sum(r.status == "FAILED" for r in check.rows)
    skipped = sum(r.status == "SKIPPED" for r in check.rows)
    print()
    print(f"{len(check.rows)} rows: {failed} FAILED, {skipped} SKIPPED; exit status {1 if failed else 0}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="reduced CPU mode (forced when CUDA is unavailable)")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: $TMPDIR/movierec-gpu-check)")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    parser.add_argument("--budget-s", type=float, default=480, help="wall-clock budget of the whole check")
    parser.add_argument("--ml1m", type=Path, help="a prepared ML-1M (default data/ml-1m-sasrec)")
    parser.add_argument("--mlperf-fraction", type=float, help="users of the ml-20mx16x32 file (default 0.1)")
    parser.add_argument("--quality-cap-s", type=float, help="cap of the time-to-quality run (default: budget left)")
    parser.add_argument("--quality-epochs", type=int, help="time-to-quality: --epochs (default the config's)")
    parser.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated subset of {', '.join(CHECKS)}")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        work(json.loads(args.worker), time_job)
        return
    only = [c for c in args.only.split(",") if c]
    if unknown := sorted(set(only) - set(CHECKS)):
        parser.error(f"--only: unknown {', '.join(unknown)}")

    why_not = cuda_status()
    if args.cpu:
        mode_line = "mode: CPU (--cpu): reduced sizes, no CUDA path checked"
    elif why_not:
        mode_line = f"mode: CPU, forced: CUDA is not available ({why_not}); no CUDA path checked"
    else:
        mode_line = "mode: GPU (CUDA)"
    mode = dataclasses.replace(CPU_MODE if args.cpu or why_not else GPU_MODE)
    if args.mlperf_fraction:
        mode.mlperf_fraction = args.mlperf_fraction
    args.out = (args.out or Path(tempfile.gettempdir()) / "movierec-gpu-check").resolve()
    check = Check(args, mode)
    info = machine(with_gpus=not mode.cpu)
    log(f"gpu_check: {mode_line}; GPUs: {info['gpus'] or 'none'}; work folder {args.out}")

    if mode.cpu:
        data, why = synthetic_data(check)
        label = "synthetic (3,000 users)"
    else:
        data, why = ml1m_data(check)
        label = "ML-1M"
    jobs = train_throughput_jobs(check, data, label, why) if "train-throughput" in only else []
    if {"mlperf-throughput", "batch-size-auto"} & set(only):
        mlperf, mlperf_why, seconds = mlperf_data(check)
    if "mlperf-throughput" in only:
        jobs += mlperf_jobs(check, mlperf, mlperf_why, seconds)
    run_jobs(check, jobs)
    if "batch-size-auto" in only:
        batch_size_row(check, mlperf, mlperf_why)
    if "torchrun-scaling" in only:
        torchrun_rows(check, data, label, why)
    if "time-to-quality" in only:
        quality_row(check, data, label, why)

    print_report(check, info, mode_line)
    if args.json:
        payload = {
            **info,
            "mode": mode_line,
            "budget_s": args.budget_s,
            "rows": [dataclasses.asdict(r) for r in check.rows],
        }
        args.json.write_text(json.dumps(payload, indent=1, default=str))
    sys.exit(1 if check.failed else 0)


if __name__ == "__main__":
    main()
