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
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from common import (
    ML1M_CONFIG,
    ROOT,
    cli,
    is_prepared,
    log,
    machine,
    machine_line,
    parse_first_step,
    parse_recipes,
    run_child,
)

QUIET = [  # keep what follows the last step short; none of it is timed
    "eval.max_users=500",
    "eval.protocols=[sampled-uniform-100]",
    "tracking.log_model=false",
    "tracking.system_metrics=false",
]


def load_average() -> str:
    try:
        return " / ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def world_processes(world: int | str) -> int:
    """Training processes of a world: the number itself, or every visible GPU for "gpu"."""
    if world == "gpu":
        import torch

        return torch.cuda.device_count()
    return int(world)


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
    config: Path = ML1M_CONFIG,
    device: str | None = None,
    precision: str | None = None,
    timeout: float | None = None,
    skip_first: bool = False,
) -> dict:
    """`movierec train --max-steps steps` (world 1) or torchrun of it (world N or "gpu"), run to its end: its
    history.json summarized, or `error` (one line) when it failed."""
    launcher = cli() if world == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                         f"--nproc_per_node={world}", "-m", "movierec"]  # fmt: skip
    command = [*launcher, "train", "--config", str(config), "--data", str(data), "--max-steps", str(steps),
               "--run-dir", str(run_dir), "--tracking-uri", tracking_uri]  # fmt: skip
    command += ["--device", device] if device else []
    command += ["--precision", precision] if precision else []
    command += [*QUIET, *overrides, *([f"train.num_threads={threads}"] if threads else [])]
    shutil.rmtree(run_dir, ignore_errors=True)  # a history.json left by an earlier run must not be read as this one's
    finished = run_child(command, timeout=timeout, env={"OMP_NUM_THREADS": str(threads)} if threads else None)
    result = {"output": finished.output, "wall_s": finished.wall_s, "command": command}
    history = run_dir / "history.json"
    records = json.loads(history.read_text()) if finished.ok and history.is_file() else []
    if not finished.ok or not records:
        result["error"] = finished.why() if not finished.ok else f"no epoch in {history} after a successful exit"
        return result
    first_step = parse_first_step(finished.output)
    return {**result, "records": records, **summarize(records, skip_first), "first_step_s": first_step}


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
            raise argparse.ArgumentTypeError(f"{part!r} is neither a positive integer nor 'gpu'")
    return worlds


def measure(args: argparse.Namespace, out: Path) -> list[dict]:
    """One row per (recipe, world): its run's tokens/s, and the speed-up over world 1 of the same recipe."""
    tracking_uri = f"sqlite:///{out.resolve() / 'mlflow.db'}"
    total_threads = args.threads or os.cpu_count() or 1
    on_cuda = args.device.startswith("cuda")
    rows = []
    for recipe in args.recipe:
        overrides = [*recipe.overrides, *args.set]
        per_rank, accumulation = batch_size(args.config, overrides)
        for world in args.worlds:
            processes = world_processes(world)
            threads = None if on_cuda else max(1, total_threads // processes)
            log(f"{recipe.short}: world {world} ({processes} processes) ...")
            r = run_train(
                world, data=args.data, steps=args.steps, run_dir=out / f"{recipe.short}-w{world}",
                tracking_uri=tracking_uri, overrides=overrides, threads=threads, config=args.config,
                device=args.device, precision=args.precision, timeout=args.timeout, skip_first=args.skip_first_epoch,
            )  # fmt: skip
            row = {
                "recipe": recipe.short,
                "world": world,
                "processes": processes,
                "launcher": "movierec train" if world == 1 else "torchrun",
                "threads_each": threads if threads else "-",
                "global_batch": per_rank * processes * accumulation,
                "wall_s": r["wall_s"],
            }
            if "error" in r:
                row["error"] = r["error"]
                log(r["output"][-3000:])
            else:
                row.update({k: r[k] for k in ("tokens_per_s", "steps", "epochs", "first_step_s")})
            rows.append(row)
        mine = [row for row in rows if row["recipe"] == recipe.short]
        base = next((row["tokens_per_s"] for row in mine if row["processes"] == 1 and "error" not in row), None)
        for row in mine:
            row["speedup"] = row["tokens_per_s"] / base if base and "error" not in row else None
    return rows


def print_table(args: argparse.Namespace, rows: list[dict], info: dict, load_before: str) -> None:
    print(f"machine: {machine_line(info)}")
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data/ml-1m-sasrec", help="a prepared dataset (default data/ml-1m-sasrec)")
    parser.add_argument("--recipe", type=parse_recipes, default="sse-pt", help="comma-separated: sasrec, sse-pt")
    parser.add_argument("--worlds", type=parse_worlds, default="1,2",
                        help="comma-separated world sizes; 'gpu' = all visible GPUs")  # fmt: skip
    parser.add_argument("--steps", type=int, default=30, help="optimizer steps per run (--max-steps)")
    parser.add_argument("--threads", type=int, default=None, help="CPU cores to share out (default: all)")
    parser.add_argument("--device", default="cpu", help="cpu (gloo) or cuda (nccl, one GPU per process)")
    parser.add_argument("--precision", default=None, help="fp32|fp16|bf16|auto (default: the config's, auto)")
    parser.add_argument("--config", type=Path, default=ML1M_CONFIG,
                        help="run config (default configs/ml-1m-sse-pt.yaml)")  # fmt: skip
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra config overrides")
    parser.add_argument("--skip-first-epoch", action="store_true", help="leave each run's first epoch (warm-up) out")
    parser.add_argument("--out", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--json", type=Path, help="also write the rows to this JSON file")
    args = parser.parse_args()
    args.data = next((d for d in (Path(args.data), ROOT / args.data) if is_prepared(d)), None) or parser.error(
        f"--data {args.data}: not a prepared dataset (no meta.json); see `movierec prepare`"
    )
    out = args.out or Path(tempfile.mkdtemp(prefix="movierec-ddp-"))
    out.mkdir(parents=True, exist_ok=True)
    load_before = load_average()
    rows = measure(args, out)
    info = machine(with_gpus=args.device.startswith("cuda"))
    print_table(args, rows, info, load_before)
    if args.json:
        chosen = {**vars(args), "recipe": [r.short for r in args.recipe]}
        payload = {"machine": machine_line(info), "date": info["date"], "args": chosen, "rows": rows}
        args.json.write_text(json.dumps(payload, indent=1, default=str))
    if any("error" in row for row in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
