"""Data-parallel training throughput: world size 1 (one `movierec train`) against N (torchrun), same recipe.

    python bench/ddp_throughput.py --data data/ml-1m-sasrec --recipe sasrec,sse-pt --worlds 1,2 --steps 30
    python bench/ddp_throughput.py --device cuda --worlds 1,gpu          # on a GPU machine (gpu: all GPUs)

Every run is a real `movierec train --max-steps S` (world 1) or
`python -m torch.distributed.run --standalone --nproc_per_node N -m movierec train --max-steps S` (world N),
with the ML-1M config (configs/ml-1m-sse-pt.yaml) and the recipe's overrides, and its tokens/s is read
from the run's history.json: non-padding target tokens over all ranks per second of training (the
trainer's own `tokens_per_s`, which excludes validation and checkpoint writing), summed over the run's
epochs. The per-rank batch stays the config's `train.batch_size`, so the global batch grows with the world
size (batch size x world size x train.grad_accumulation) and S steps of world N train N times as many
sequences as S steps of world 1. On CPU the backend is gloo and the cores are split: world 1 gets
`--threads` (default: all cores) torch threads, world N gets threads // N each (at least one). On CUDA
(`--device cuda`) the backend is nccl, one GPU per process; `gpu` in `--worlds` means every visible GPU.

Validation and test after the last step run on `eval.max_users=500` users with one protocol: they are
not measured, only kept short. Nothing is asserted; the script prints one table (`--json`: its rows).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if importlib.util.find_spec("movierec") is None and (ROOT / "src" / "movierec").is_dir():
    sys.path.insert(0, str(ROOT / "src"))  # not installed: src/ for this process and the runs it starts
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
CONFIG = ROOT / "configs" / "ml-1m-sse-pt.yaml"
RECIPES = {  # the ML-1M recipes of bench/train_throughput.py, by short name
    "sasrec": ["model.kind=sasrec", "model.d_item=50", "model.d_user=0", "train.loss=bce", "train.start_loss=null"],
    "sse-pt": ["model.kind=sse-pt", "model.d_item=100", "model.d_user=50", "train.loss=bce", "train.start_loss=null"],
}
QUIET = [  # keep what follows the last step short; none of it is timed
    "eval.max_users=500",
    "eval.protocols=[sampled-uniform-100]",
    "tracking.log_model=false",
    "tracking.system_metrics=false",
]
FIRST_STEP = re.compile(r"first optimizer step after\s+([0-9.]+)\s*s")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def reason(output: str, limit: int = 200) -> str:
    """One line saying why a child failed: its last error-looking line, else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if re.search(r"(Error|error:|Exception|CUDA|NCCL)", line)]
    line = (errors or lines or ["no output"])[-1]
    return line[:limit]


def world_processes(world: int | str) -> int:
    """Training processes of a world: the number itself, or every visible GPU for "gpu"."""
    if world == "gpu":
        import torch

        return torch.cuda.device_count()
    return int(world)


def train_command(
    world: int | str,
    *,
    data: str | Path,
    steps: int,
    run_dir: Path,
    tracking_uri: str,
    overrides: list[str],
    config: Path = CONFIG,
    device: str | None = None,
    precision: str | None = None,
) -> list[str]:
    """`movierec train` (world 1) or torchrun of it (world N or "gpu"), with `--max-steps steps`."""
    if world == 1:
        launcher = [sys.executable, "-m", "movierec"]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={world}"]
        launcher += ["-m", "movierec"]
    command = [*launcher, "train", "--config", str(config), "--data", str(data), "--max-steps", str(steps)]
    command += ["--run-dir", str(run_dir), "--tracking-uri", tracking_uri]
    if device:
        command += ["--device", device]
    if precision:
        command += ["--precision", precision]
    return [*command, *QUIET, *overrides]


def summarize(records: list[dict], skip_first: bool = False) -> dict:
    """Tokens/s over the epochs of a history.json (all of them, or all but the first when there are more)."""
    used = records[1:] if skip_first and len(records) > 1 else records
    seconds = sum(r["seconds"] for r in used)
    tokens = sum(r["tokens_per_s"] * r["seconds"] for r in used)
    return {
        "tokens_per_s": tokens / seconds if seconds > 0 else float("nan"),
        "steps": sum(r["steps"] for r in used),
        "epochs": len(used),
        "skipped_first": used is not records,
        "train_s": seconds,
    }


def run_train(
    world: int | str,
    *,
    data: str | Path,
    steps: int,
    run_dir: Path,
    tracking_uri: str,
    overrides: list[str],
    threads: int | None = None,
    config: Path = CONFIG,
    device: str | None = None,
    precision: str | None = None,
    timeout: float | None = None,
    skip_first: bool = False,
) -> dict:
    """Run one training job to its end; its history.json summarized, or `error` (one line) when it failed."""
    overrides = list(overrides)
    env = {**os.environ, "COLUMNS": "200"}
    if threads:
        overrides.append(f"train.num_threads={threads}")
        env["OMP_NUM_THREADS"] = str(threads)
    command = train_command(
        world, data=data, steps=steps, run_dir=run_dir, tracking_uri=tracking_uri, overrides=overrides,
        config=config, device=device, precision=precision,
    )  # fmt: skip
    shutil.rmtree(run_dir, ignore_errors=True)  # a history.json left by an earlier run must not be read as this one's
    started = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env=env, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        return {"error": f"timed out after {timeout:.0f} s", "output": out, "wall_s": time.perf_counter() - started}
    result = {"output": done.stdout + done.stderr, "wall_s": time.perf_counter() - started, "command": command}
    if done.returncode:
        result["error"] = f"exit {done.returncode}: {reason(result['output'])}"
        return result
    history = run_dir / "history.json"
    if not history.is_file():
        result["error"] = f"no {history} after a successful exit"
        return result
    records = json.loads(history.read_text())
    if not records:
        result["error"] = f"{history} is empty"
        return result
    result["records"] = records
    result.update(summarize(records, skip_first))
    match = FIRST_STEP.search(result["output"])
    result["first_step_s"] = float(match.group(1)) if match else None
    return result


def batch_size(config: Path, overrides: list[str]) -> tuple[int, int]:
    """(train.batch_size, train.grad_accumulation) of the config with these overrides."""
    from movierec.training.config import load_config

    c = load_config(config, overrides).train
    return c.batch_size, c.grad_accumulation


def parse_worlds(text: str) -> list[int | str]:
    worlds: list[int | str] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        if part == "gpu":
            worlds.append(part)
        elif part.isdigit() and int(part) >= 1:
            worlds.append(int(part))
        else:
            raise SystemExit(f"--worlds: {part!r} is neither a positive integer nor 'gpu'")
    return worlds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/ml-1m-sasrec", help="a prepared dataset (default data/ml-1m-sasrec)")
    parser.add_argument("--recipe", default="sse-pt", help=f"comma-separated: {', '.join(RECIPES)}")
    parser.add_argument("--worlds", default="1,2", help="comma-separated world sizes; 'gpu' = all visible GPUs")
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run (--max-steps)")
    parser.add_argument("--threads", type=int, default=None, help="CPU cores to share out (default: all)")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, one GPU per process)")
    parser.add_argument("--precision", default=None, help="fp32|fp16|bf16|auto (default: the config's, auto)")
    parser.add_argument("--config", type=Path, default=CONFIG, help="run config (default configs/ml-1m-sse-pt.yaml)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides")
    parser.add_argument("--skip-first-epoch", action="store_true", help="leave each run's first epoch (warm-up) out")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args()

    recipes = [r.strip() for r in args.recipe.split(",") if r.strip()]
    if unknown := [r for r in recipes if r not in RECIPES]:
        parser.error(f"--recipe: unknown {', '.join(unknown)}; known: {', '.join(RECIPES)}")
    worlds = parse_worlds(args.worlds)
    if not (Path(args.data) / "meta.json").is_file() and not (ROOT / args.data / "meta.json").is_file():
        parser.error(f"--data {args.data}: not a prepared dataset (no meta.json); see `movierec prepare`")
    cores = os.cpu_count() or 1
    total_threads = args.threads or cores
    on_cuda = args.device.startswith("cuda")
    out = args.out or Path(tempfile.mkdtemp(prefix="movierec-ddp-"))
    out.mkdir(parents=True, exist_ok=True)
    tracking_uri = f"sqlite:///{out.resolve() / 'mlflow.db'}"
    load_before = load_average()

    rows, failed = [], False
    for recipe in recipes:
        overrides = [*RECIPES[recipe], *args.set]
        per_rank, accumulation = batch_size(args.config, overrides)
        for world in worlds:
            processes = world_processes(world)
            threads = None if on_cuda else max(1, total_threads // processes)
            print(f"{recipe}: world {world} ({processes} processes) ...", file=sys.stderr, flush=True)
            run_dir = out / f"{recipe}-w{world}"
            r = run_train(
                world, data=args.data, steps=args.steps, run_dir=run_dir, tracking_uri=tracking_uri,
                overrides=overrides, threads=threads, config=args.config, device=args.device,
                precision=args.precision, timeout=args.timeout, skip_first=args.skip_first_epoch,
            )  # fmt: skip
            row = {
                "recipe": recipe,
                "world": world,
                "processes": processes,
                "launcher": "movierec train" if world == 1 else "torchrun",
                "threads_each": threads if threads else "-",
                "global_batch": per_rank * processes * accumulation,
                "wall_s": r["wall_s"],
            }
            if "error" in r:
                failed = True
                row["error"] = r["error"]
                print(r.get("output", "")[-3000:], file=sys.stderr)
            else:
                row.update({k: r[k] for k in ("tokens_per_s", "steps", "epochs", "first_step_s")})
            rows.append(row)
        mine = [row for row in rows if row["recipe"] == recipe]
        base = next((row["tokens_per_s"] for row in mine if row["processes"] == 1 and "error" not in row), None)
        for row in mine:
            row["speedup"] = row["tokens_per_s"] / base if base and "error" not in row else None

    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    import torch

    gpus = ""
    if on_cuda and torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        gpus = f"; GPUs: {', '.join(names)}"
    print(f"machine: {cpu_model()}, {cores} cores{gpus}; torch {torch.__version__}; {now}")
    print(
        f"data {args.data}; config {args.config.name} + recipe overrides; --max-steps {args.steps} per run; "
        f"device {args.device}{', precision ' + args.precision if args.precision else ''}; "
        f"per-rank batch = config batch size (the global batch grows with the world size); "
        f"tokens/s over {'all epochs but the first' if args.skip_first_epoch else 'every epoch'} of a run"
    )
    print(f"load average (1/5/15 min) before: {load_before}; after: {load_average()}")
    print()
    print("| recipe | world size | processes | threads each | global batch | steps | tokens/s | speed-up vs world 1 |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        procs = f"{row['processes']} ({row['launcher']})"
        head = f"| {row['recipe']} | {row['world']} | {procs} | {row['threads_each']} | {row['global_batch']:,} |"
        if "error" in row:
            print(f"{head} | FAILED: {row['error']} | |")
            continue
        speedup = f"{row['speedup']:.2f}x" if row.get("speedup") else "-"
        print(f"{head} {row['steps']} | {row['tokens_per_s']:,.0f} | {speedup} |")
    if args.json:
        payload = {"machine": f"{cpu_model()}, {cores} cores", "date": now, "args": vars(args), "rows": rows}
        args.json.write_text(json.dumps(payload, indent=1, default=str))
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
