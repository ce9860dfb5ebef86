"""Latency and throughput of single-user recommendations from `movierec serve` on 127.0.0.1.

    python bench/serve_latency.py [MODEL] [--requests 500] [--concurrency 4] [--k 10] [--threads N]

MODEL is anything `movierec serve` takes (checkpoint, run folder, runs:/..., models:/...). Without it,
the tiny synthetic model is trained into a temporary folder first (1 epoch of configs/synthetic.yaml on
the default synthetic dataset, 3,000 users x 1,500 items, max_len 50).

The server runs in its own process (`python -m movierec.cli serve MODEL --port P`). The client sends
`GET /v1/users/{id}/recommendations?k=K` for users drawn at random (seeded) from the model's users:
`--warmup` requests first (not timed), then `--requests` one after another over one keep-alive
connection (latency), then `--requests` from `--concurrency` threads (throughput). Every response must
be 200. Prints p50/p99/mean latency and requests/s per phase as a table.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from common import ROOT, cli, log, run_child


def train_tiny(root: Path) -> Path:
    """One epoch of configs/synthetic.yaml on the default synthetic data, through the CLI: its run folder."""
    commands = (
        cli("prepare", "--dataset", "synthetic", "--out", str(root / "data")),
        cli("train", "--config", str(ROOT / "configs" / "synthetic.yaml"), "--data", str(root / "data" / "synthetic"),
            "--run-dir", str(root / "run"), "--tracking-uri", f"sqlite:///{root / 'mlflow.db'}", "train.epochs=1",
            "tracking.log_model=false", "tracking.system_metrics=false"),
    )  # fmt: skip
    for command in commands:
        finished = run_child(command)
        if not finished.ok:
            raise SystemExit(f"training the tiny model failed: {finished.why()}\n{finished.output[-3000:]}")
    return root / "run"


def model_users(model: str, tracking_uri: str | None) -> np.ndarray:
    from movierec.data.layout import load_sequences
    from movierec.serving.loader import load_state

    state = load_state(model, tracking_uri)
    dataset = state.dataset
    data = load_sequences(dataset.path, shards=dataset.shards, verify=False)
    return np.asarray(dataset.user_ids)[data.users - 1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, port: int, log: Path) -> tuple[subprocess.Popen, float]:
    argv = cli("serve", args.model, "--port", str(port), "--log-level", "warning")
    for flag, value in (("--threads", args.threads), ("--data", args.data), ("--tracking-uri", args.tracking_uri)):
        if value is not None:
            argv += [flag, str(value)]
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc, time.perf_counter() - started
        except httpx.TransportError:
            pass
        if time.perf_counter() - started > 300:
            proc.terminate()
            raise SystemExit("the server did not answer /health within 300 s")
        time.sleep(0.1)


def timed(client: httpx.Client, url: str) -> float:
    started = time.perf_counter()
    response = client.get(url)
    elapsed = time.perf_counter() - started
    if response.status_code != 200:
        raise SystemExit(f"GET {url}: {response.status_code} {response.text}")
    return elapsed


def summary(phase: str, concurrency: int, latencies: list[float], wall: float) -> dict:
    ms = np.asarray(latencies) * 1000
    return {
        "phase": phase,
        "concurrency": concurrency,
        "requests": len(ms),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "mean_ms": float(statistics.fmean(ms)),
        "requests_per_s": len(ms) / wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", help="MODEL for `movierec serve` (default: train the tiny synthetic one)")
    parser.add_argument("--requests", type=int, default=500, help="timed requests per phase (default 500)")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=4, help="client threads of the throughput phase")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="the server's torch threads (--threads)")
    parser.add_argument("--data", default=None)
    parser.add_argument("--tracking-uri", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()
    if not 1 <= args.requests <= 100_000 or not 1 <= args.concurrency <= 64:
        parser.error("--requests must be 1..100000 and --concurrency 1..64")

    with tempfile.TemporaryDirectory(prefix="movierec-serve-bench-") as tmp:
        root = Path(tmp)
        if args.model is None:
            log("training the tiny synthetic model (1 epoch) ...")
            args.model = str(train_tiny(root))
        users = model_users(args.model, args.tracking_uri)
        rng = np.random.default_rng(args.seed)
        picks = rng.choice(users, size=args.warmup + 2 * args.requests)
        port = free_port()
        proc, startup = start_server(args, port, root / "server.log")
        base = f"http://127.0.0.1:{port}"
        try:
            health = httpx.get(f"{base}/health").json()
            urls = [f"{base}/v1/users/{int(u)}/recommendations?k={args.k}" for u in picks]
            warm, sequential, concurrent = (
                urls[: args.warmup],
                urls[args.warmup : args.warmup + args.requests],
                urls[args.warmup + args.requests :],
            )
            with httpx.Client(timeout=60) as client:
                for url in warm:
                    timed(client, url)
                started = time.perf_counter()
                latencies = [timed(client, url) for url in sequential]
                results = [summary("sequential", 1, latencies, time.perf_counter() - started)]

            local = threading.local()

            def one(url: str) -> float:
                if not hasattr(local, "client"):
                    local.client = httpx.Client(timeout=60)
                return timed(local.client, url)

            with ThreadPoolExecutor(args.concurrency) as pool:
                started = time.perf_counter()
                latencies = list(pool.map(one, concurrent))
                results.append(summary("concurrent", args.concurrency, latencies, time.perf_counter() - started))
        finally:
            proc.terminate()
            proc.wait(timeout=30)

    print_table(args, health, startup, results)
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "health": health, "results": results}, indent=2))


def print_table(args: argparse.Namespace, health: dict, startup: float, results: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    title = (
        f"GET /v1/users/{{id}}/recommendations?k={args.k}: {health['model']} on {health['dataset']} "
        f"({health['num_users']:,} users, {health['num_items']:,} items, max_len {health['max_len']}); "
        f"server threads {args.threads or 'default'}, started in {startup:.1f} s"
    )
    table = Table(title=title)
    for column in ("phase", "clients", "requests", "p50 ms", "p99 ms", "mean ms", "requests/s"):
        table.add_column(column, justify="left" if column == "phase" else "right")
    for r in results:
        table.add_row(
            r["phase"],
            str(r["concurrency"]),
            str(r["requests"]),
            f"{r['p50_ms']:.1f}",
            f"{r['p99_ms']:.1f}",
            f"{r['mean_ms']:.1f}",
            f"{r['requests_per_s']:.0f}",
        )
    Console().print(table)


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    main()
