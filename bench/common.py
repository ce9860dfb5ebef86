"""The bench toolkit: the ML-1M recipes, the child-process runner, the machine's description and the one
step-timing worker every bench shares, so that a number in docs/results.md means the same thing whichever
bench printed it.

Benches run their measurements in child processes (a child's peak RSS is its own, a worker's CUDA state
dies with it): `run_child` runs one to its end, its timeout or a line it waits for; `run_worker` and `work`
are the two sides of a worker process that answers one `RESULT` line per job. `time_steps` is what a worker
times: `Engine.from_config` alone, with no run folder, MLflow store or console.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import importlib.util
import json
import os
import platform
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("movierec") is None and (ROOT / "src" / "movierec").is_dir():
    # not installed (a bare python3 with PyTorch, e.g. a GPU machine's): src/ for this process and its children
    sys.path.insert(0, str(ROOT / "src"))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))

if TYPE_CHECKING:
    from movierec.training.config import RunConfig

ML1M_CONFIG = ROOT / "configs" / "ml-1m-sse-pt.yaml"
PAPER_LOSS = ("train.loss=bce", "train.start_loss=null")  # one sampled negative per position, as the peer trains
FIRST_STEP = re.compile(r"first optimizer step after\s+([0-9]+(?:\.[0-9]*)?)\s*s")  # the trainer's console line
RESULT = "bench result: "  # a worker's line per job: this prefix, then the job's result as JSON


@dataclasses.dataclass(frozen=True)
class Recipe:
    """An ML-1M model recipe: overrides of ML1M_CONFIG. `name` is what tables and train_throughput.py's
    --recipes call it, `short` what ddp_throughput.py's --recipe does."""

    name: str
    short: str
    overrides: tuple[str, ...]


RECIPES = {  # by short name
    recipe.short: recipe
    for recipe in (
        Recipe("sasrec (d 50)", "sasrec", ("model.kind=sasrec", "model.d_item=50", *PAPER_LOSS)),
        Recipe("sse-pt (100+50)", "sse-pt", ("model.kind=sse-pt", "model.d_item=100", "model.d_user=50", *PAPER_LOSS)),
    )
}


def parse_recipes(text: str) -> list[Recipe]:
    """The recipes of a comma-separated list of names or short names (an argparse `type`)."""
    known = {key: recipe for recipe in RECIPES.values() for key in (recipe.name, recipe.short)}
    names = [name.strip() for name in text.split(",") if name.strip()]
    if unknown := [name for name in names if name not in known]:
        raise argparse.ArgumentTypeError(f"unknown {', '.join(unknown)}; known: {', '.join(known)}")
    return [known[name] for name in names]


def log(message: str) -> None:
    """Progress on stderr, so that stdout is the table alone."""
    print(message, file=sys.stderr, flush=True)


def cli(*args: str) -> list[str]:
    """The command line of `movierec ARGS` with this Python."""
    return [sys.executable, "-m", "movierec", *args]


def prepare_command(kind: str, input_dir: Path, out_dir: Path) -> list[str]:
    """`movierec prepare` of the raw files in `input_dir` into `out_dir/kind`, replacing what is there."""
    return cli("prepare", "--dataset", kind, "--input", str(input_dir), "--out", str(out_dir), "--overwrite")


def is_prepared(folder: Path) -> bool:
    return (folder / "meta.json").is_file()


def is_fresh(prepared: Path, input_dir: Path) -> bool:
    """Whether `prepared` holds a dataset written after every file of `input_dir`: a cached copy to reuse."""
    newest_input = max((p.stat().st_mtime for p in input_dir.iterdir() if p.is_file()), default=0)
    return is_prepared(prepared) and (prepared / "meta.json").stat().st_mtime >= newest_input


def parse_first_step(output: str) -> float | None:
    """Seconds since process start of the trainer's `first optimizer step after X s` line, if printed."""
    match = FIRST_STEP.search(output)
    return float(match.group(1)) if match else None


# --------------------------------------------------------------------------- the machine


def machine(with_gpus: bool = True) -> dict:
    """What a table's numbers depend on: CPU model and cores, GPUs, torch, CUDA and Python, and the date."""
    import torch

    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        names = [line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")]
        cpu = names[0].split(":", 1)[1].strip() if names else cpu
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if with_gpus else []
    return {
        "gpus": gpus,
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }


def machine_line(info: dict) -> str:
    gpus = f"; GPUs: {', '.join(info['gpus'])}" if info["gpus"] else ""
    return (
        f"{info['cpu']}, {info['cores']} cores{gpus}; torch {info['torch']} (CUDA {info['cuda'] or 'none'}), "
        f"Python {info['python']}; {info['date']}"
    )


# --------------------------------------------------------------------------- child processes


@dataclasses.dataclass
class Finished:
    """A child process that ended: how, what it printed, and what it cost."""

    status: int | str  # exit status; "timeout" when killed at its timeout; 0 when stopped at the awaited line
    output: str  # stdout and stderr, merged in the order they were written
    wall_s: float
    cpu_s: float
    peak_rss_mib: float  # of the child and the descendants it waited for (os.wait4)

    @property
    def ok(self) -> bool:
        return self.status == 0

    def why(self, limit: int = 200) -> str:
        """One line saying why the child failed: its last error-looking line, else its last line."""
        if self.status == "timeout":
            return f"timed out after {self.wall_s:.0f} s"
        lines = [line.strip() for line in self.output.splitlines() if line.strip()]
        errors = [line for line in lines if re.search(r"(Error|error:|Exception|CUDA|NCCL)", line)]
        return f"exit {self.status}: {(errors or lines or ['no output'])[-1][:limit]}"


def _signal_group(child: subprocess.Popen, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, sig)


def run_child(
    command: list[str],
    *,
    timeout: float | None = None,
    stop_on: re.Pattern | None = None,
    env: dict | None = None,
    echo: bool = False,
) -> Finished:
    """Run `command` until it ends, `timeout` seconds pass, or a line matches `stop_on` (then it is
    terminated, and its peak RSS is the peak up to there). `echo` also copies its output to stderr as it
    comes (a long run shows its progress). The child leads a process group of its own, so that a timeout
    also stops what it started (torchrun's workers) and none of them keeps the pipe open."""
    started = time.perf_counter()
    child = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace",
        env={**os.environ, "COLUMNS": "200", **(env or {})}, start_new_session=True,
    )  # fmt: skip
    timed_out = threading.Event()

    def kill_at_timeout() -> None:
        timed_out.set()
        _signal_group(child, signal.SIGKILL)

    timer = threading.Timer(timeout, kill_at_timeout) if timeout is not None else None
    lines, matched = [], False
    try:
        if timer:
            timer.start()
        assert child.stdout is not None
        for line in child.stdout:
            lines.append(line)
            if echo:
                sys.stderr.write(line)
            if stop_on is not None and not matched and stop_on.search(line):
                matched = True
                _signal_group(child, signal.SIGTERM)
    except BaseException:  # interrupted: the child's group must not outlive the bench
        _signal_group(child, signal.SIGKILL)
        raise
    finally:
        if timer:
            timer.cancel()
    child.stdout.close()
    _, wait_status, usage = os.wait4(child.pid, 0)
    status = "timeout" if timed_out.is_set() else 0 if matched else os.waitstatus_to_exitcode(wait_status)
    return Finished(
        status, "".join(lines), time.perf_counter() - started, usage.ru_utime + usage.ru_stime,
        usage.ru_maxrss / 1024,  # Linux reports KiB
    )  # fmt: skip


# --------------------------------------------------------------------------- worker processes


def run_worker(
    script: str | Path, jobs: list[dict], timeout: float | None = None, env: dict | None = None
) -> tuple[Finished, list[dict | None]]:
    """`python SCRIPT --worker JOBS` (the script answers through `work`): the child, and each job's result
    in order (None for a job it printed no result for: it died or timed out first)."""
    finished = run_child([sys.executable, str(script), "--worker", json.dumps(jobs)], timeout=timeout, env=env)
    results: dict[int, dict] = {}
    for line in finished.output.splitlines():
        if line.startswith(RESULT):
            result = json.loads(line[len(RESULT) :])
            results[result["index"]] = result
    return finished, [results.get(index) for index in range(len(jobs))]


def work(jobs: Iterable[dict], do_job: Callable[[dict], dict]) -> None:
    """The worker's side: each job in turn, a RESULT line each with its index and seconds (an `error` when the
    job raised: the next still runs). CUDA memory is released and its peak reset between jobs."""
    import gc
    import traceback

    import torch

    for index, job in enumerate(jobs):
        started = time.perf_counter()
        try:
            result = do_job(job)
        except Exception as exc:  # that job's failure; the next job still runs
            traceback.print_exc()
            result = {"error": f"{type(exc).__name__}: {exc}".splitlines()[0][:200]}
        result.update(index=index, seconds=time.perf_counter() - started)
        print(RESULT + json.dumps(result), flush=True)
        gc.collect()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()


def steps_job(config: Path, data: Path, overrides: list[str], warmup: int, steps: int, **extra) -> dict:
    """A worker job for `time_job`: the config file, the prepared data and overrides, and the steps to take."""
    return {"config": str(config), "data": str(data), "overrides": list(overrides), "warmup": warmup,
            "steps": steps, **extra}  # fmt: skip


def time_job(job: dict) -> dict:
    """`time_steps` of a `steps_job`: what a worker process runs."""
    from movierec.training.config import load_config

    config = load_config(job["config"], job["overrides"], flags={"data.path": job["data"]})
    return time_steps(config, job["warmup"], job["steps"])


def time_steps(config: RunConfig, warmup: int, steps: int) -> dict:
    """Build the engine of `config` (Engine.from_config: its data, device and precision; no run folder, MLflow
    or console), take `warmup` steps (allocator, kernels, cuBLAS handles), then time `steps` optimizer steps
    of the same epoch: the rates, the implied seconds of one pass over the training users (one epoch, the
    epoch's batch plan included), and peak memory since this process started or `work` last reset it."""
    import torch

    from movierec.models import layers
    from movierec.training.engine import Engine

    if config.train.num_threads:
        torch.set_num_threads(config.train.num_threads)
    engine = Engine.from_config(config)
    on_cuda = engine.device.type == "cuda"
    engine.train_epoch(max_steps=warmup)
    if on_cuda:
        torch.cuda.synchronize()
    started = time.perf_counter()
    stats = engine.train_epoch(max_steps=steps)
    if on_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    steps_per_pass = len(engine.batches) // engine.batches_per_step
    model = engine.model_config
    return {
        "tokens_per_s": stats["tokens_per_s"],
        "sequences_per_s": stats["sequences_per_s"],
        "gflops": stats["tokens_per_s"] * model.train_flops_per_token() / 1e9,
        "steps": stats["steps"],
        "steps_per_pass": steps_per_pass,
        "seconds": seconds,
        "s_per_pass": seconds / max(stats["steps"], 1) * steps_per_pass,
        "peak_gpu_mib": torch.cuda.max_memory_allocated(engine.device) / 2**20 if on_cuda else None,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # Linux reports KiB
        "device": str(engine.device),
        "gpu": torch.cuda.get_device_name(engine.device) if on_cuda else None,
        "autocast": str(engine.autocast_dtype).removeprefix("torch.") if engine.autocast_dtype else "none",
        "grad_scaler": engine.scaler.is_enabled(),
        "attention": layers.ATTENTION_PATH,
        "optimizer": engine.optimizer_kind,
        "num_items": engine.data.num_items,
        "threads": torch.get_num_threads(),
        "batch_size": config.train.batch_size,
        "model": {"d_model": model.d_model, "max_len": model.max_len, "num_blocks": model.num_blocks},
    }
