"""Requests/s and latency of `movierec serve` under concurrent clients, per top-k index and for title
search, on 127.0.0.1.

    python bench/serve_latency.py [MODEL] [--clients 1,8,32,128] [--seconds 20] [--index exact,approximate]
    python bench/serve_latency.py --endpoints search --clients 1,8     # search over 27,278 titles (issue 27)
    python bench/serve_latency.py --mlperf --index exact,approximate      # issue 26's table, ~10-15 minutes
    python bench/serve_latency.py --mlperf --endpoints health --clients 1,32  # the HTTP stack's own ceiling
    python bench/serve_latency.py --mlperf tiny --index exact,approximate --clients 1,8 --seconds 2  # smoke run

Models. MODEL is anything `movierec serve` takes (checkpoint, run folder, runs:/..., models:/...). Without it
the tiny synthetic model is trained into a temporary folder first (1 epoch of configs/synthetic.yaml on the
default synthetic dataset, 3,000 users x 1,500 items, max_len 50). `--mlperf` serves SSE-PT on file 0 of
ml-20mx16x32 (137,327 users, 855,776 items), generated and prepared by bench/scale.py's helpers and trained
for `--steps` optimizer steps of configs/ml-20mx16x32-sse-pt.yaml (`train --max-steps`, 100 evaluation
users): data and run folder are cached under `--cache` ($TMPDIR/movierec-bench by default), so only the first
call trains (a few minutes); delete `CACHE/runs` to retrain. `--mlperf tiny` is scale.py's --tiny shape
(138 users, 100,000 items): the same path in seconds. With `--endpoints search` and no MODEL, the model is
one with ML-20M's catalogue size instead: 27,278 synthetic titles shaped like MovieLens's (bench/titles.py),
configs/synthetic.yaml trained `--steps` steps on them, cached under `--cache` the same way.

Measurement. One server process per `--index` (`movierec serve MODEL --index I`, one after the other),
warmed with `--warmup` requests, then one phase per `--clients` count: each client thread opens its own
keep-alive connection (http.client), sends one untimed request, and then, from a common start, sends
`GET /v1/users/{id}/recommendations?k=K` for users drawn at random (seeded) one after another for
`--seconds`. requests/s is the phase's 200 answers over its wall time (start to the last answer); p50/p99 are
the client's latency, request sent to body read; errors counts other answers and broken connections.

Search (`--endpoints` with `search`). After the recommendation phases of the first server (the title index
is the same whatever --index), one phase per `--clients` count sends `GET /v1/items?query=Q&limit=L`, the
page's as-you-type request, labelled `search` in the table. Each Q is what someone types while looking for a
title of the served catalogue (drawn at random, seeded): the title's beginning cut at a random keystroke,
the beginning of a later word, a word and the year, or the year alone, in lower case without accents (the
way people type "amelie"). Since each Q comes from a title, an answer without a match also counts as an error.

Health (`--endpoints` with `health`). One phase per `--clients` count of `GET /health` on the first server: the
same HTTP server, framework and client threads with no model work, so the most requests/s this machine gives
any endpoint of the stack (labelled `health`).

Recall. Each server also answers the same `--recall-users` users (a seeded sample), one by one, after its
phases; the recall@K of an approximate server is the mean share of the exact server's top-K movieIds that it
also returns (movierec.serving.approximate.recall_at_k), both as served over HTTP with seen items left out.
It needs `exact` in --index.

Prints the machine, the model, each server's start time and peak RSS, then one markdown table; `--json`
writes the same. Exits 1 when any request failed.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import json
import os
import re
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from urllib.parse import quote

import numpy as np
from common import ROOT, cli, is_prepared, log, machine, machine_line, run_child

INDEXES = ("exact", "approximate")
ENDPOINTS = ("recommend", "search", "health")
NO_MATCH = b'{"items":[]}'  # the search answer without a match
SEARCH_QUERIES = 5000  # typed queries the search clients draw from
MLPERF_CONFIG = ROOT / "configs" / "ml-20mx16x32-sse-pt.yaml"
# a bounded run: validation and test of 100 users instead of the config's all (the weights do not matter)
BOUNDED_RUN = ("eval.max_users=100", "tracking.log_model=false", "tracking.system_metrics=false")
SERVE_MODE = re.compile(r"listening on \S+ \((exact scoring|approximate index);")
SERVER_START_LIMIT_S = 900  # the approximate index of 855,776 items is built before the server answers


# --------------------------------------------------------------------------- the model (also bench/export_recs.py's)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """The options that choose the model: MODEL, --mlperf, or the tiny synthetic one."""
    parser.add_argument("model", nargs="?", help="MODEL for `movierec serve` (default: train the tiny synthetic one)")
    parser.add_argument(
        "--mlperf", nargs="?", const="full", choices=("full", "tiny"),
        help="SSE-PT on ml-20mx16x32 file 0 (full; tiny: scale.py's --tiny shape), trained and cached",
    )  # fmt: skip
    parser.add_argument("--steps", type=int, default=20, help="--mlperf (and the titles model): training steps")
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "movierec-bench",
                        help="--mlperf (and the titles model): where data and run are kept (default "
                             "$TMPDIR/movierec-bench)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch threads of the measured command (--threads)")
    parser.add_argument("--data", default=None, help="--data of the measured command")
    parser.add_argument(
        "--tracking-uri", default=None, help="--tracking-uri of the measured command (runs:/, models:/)"
    )


def check_model_options(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.model is not None and args.mlperf is not None:
        parser.error("give MODEL or --mlperf, not both")
    if args.steps < 1:
        parser.error("--steps must be positive")


def model_flags(args: argparse.Namespace) -> list[str]:
    """The --threads, --data and --tracking-uri given, for a `movierec` command that loads the model."""
    flags = []
    for flag, value in (("--threads", args.threads), ("--data", args.data), ("--tracking-uri", args.tracking_uri)):
        if value is not None:
            flags += [flag, str(value)]
    return flags


def resolve_model(args: argparse.Namespace, scratch: Path) -> tuple[str, str]:
    """(MODEL, a label for tables): the one given, the cached ml-20mx16x32 run, or the tiny model trained
    into `scratch` (which the caller removes)."""
    if args.model is not None:
        return args.model, args.model
    if args.mlperf is not None:
        shape = "file 0" if args.mlperf == "full" else "file 0, --tiny shape"
        return str(mlperf_run(args.mlperf == "tiny", args.steps, args.cache)), f"ml-20mx16x32 {shape}"
    log("training the tiny synthetic model (1 epoch) ...")
    return str(train_tiny(scratch)), "synthetic (tiny)"


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


def mlperf_run(tiny: bool, steps: int, cache: Path) -> Path:
    """The run folder of SSE-PT trained `steps` steps on ml-20mx16x32 file 0 (scale.py's `file` dataset, its
    --tiny shape if `tiny`): generated, prepared and trained unless cached under `cache`."""
    import scale  # bench/scale.py: the dataset's shape, generator call and cached prepare

    dataset = scale.datasets(argparse.Namespace(datasets=["file"], tiny=tiny, cache=cache))[0]
    run = cache / "runs" / f"{dataset.prepared.parent.name}-sse-pt-{steps}-steps"
    if run.is_dir():
        log(f"using the cached run {run}")
        return run
    scale.make_input(dataset, argparse.Namespace(tiny=tiny))
    scale.ensure_prepared(dataset)
    train_cached(run, MLPERF_CONFIG, dataset.prepared, steps, (*BOUNDED_RUN, *(scale.TINY_OVERRIDES if tiny else ())))
    return run


def titles_run(steps: int, cache: Path) -> Path:
    """The run folder of configs/synthetic.yaml trained `steps` steps on bench/titles.py's 27,278-title
    dataset, made unless cached under `cache` (only the titles matter to search, not the weights)."""
    import titles  # bench/titles.py

    run = cache / "runs" / f"titles-{titles.ML20M_MOVIES}-sse-pt-{steps}-steps"
    if run.is_dir():
        log(f"using the cached run {run}")
        return run
    data = cache / "prepared" / "titles"
    if not is_prepared(data):
        log(f"writing {titles.ML20M_MOVIES:,} synthetic titles and their dataset into {data} ...")
        titles.write_titles_dataset(data.parent)
    train_cached(run, ROOT / "configs" / "synthetic.yaml", data, steps, BOUNDED_RUN)
    return run


def train_cached(run: Path, config: Path, data: Path, steps: int, overrides: tuple[str, ...]) -> None:
    """`movierec train` of `config` on `data` for `steps` steps into `run`, through a `.partial` folder
    renamed at the end, so that an interrupted run is never served."""
    partial = run.with_name(run.name + ".partial")
    if partial.exists():
        import shutil

        shutil.rmtree(partial)
    log(f"training {config.name} for {steps} steps into {run} ...")
    command = cli(
        "train", "--config", str(config), "--data", str(data), "--max-steps", str(steps), "--run-dir", str(partial),
        "--tracking-uri", f"sqlite:///{run.parent / 'mlflow.db'}", *overrides,
    )  # fmt: skip
    finished = run_child(command, echo=True)
    if not finished.ok:
        raise SystemExit(f"training {config.name} on {data} failed: {finished.why()}")
    partial.rename(run)


def model_users(model: str, tracking_uri: str | None) -> np.ndarray:
    """The userIds with a training history (the ones the server knows)."""
    from movierec.data.layout import load_sequences
    from movierec.serving.loader import load_state

    state = load_state(model, tracking_uri)
    dataset = state.dataset
    data = load_sequences(dataset.path, shards=dataset.shards, verify=False)
    return np.asarray(dataset.user_ids)[data.users - 1]


def model_titles(model: str, tracking_uri: str | None) -> list[str]:
    """The titles of the model's catalogue (the ones the server searches); exits if it has none."""
    from movierec.data.layout import read_items
    from movierec.serving.loader import load_state

    items = read_items(load_state(model, tracking_uri).dataset.path)
    titles = [title for title in items.column("title").to_pylist() if title] if "title" in items.column_names else []
    if not titles:
        raise SystemExit("the model's catalogue has no titles to search (MLPerf's has none): give another MODEL")
    return titles


# --------------------------------------------------------------------------- the server


@dataclasses.dataclass
class Server:
    """One `movierec serve` process: its port, how long it took to answer /health, and its peak RSS."""

    index: str
    port: int
    startup_s: float = 0.0
    health: dict = dataclasses.field(default_factory=dict)
    peak_rss_mib: float = 0.0


def get(connection: http.client.HTTPConnection, path: str) -> tuple[int, bytes]:
    connection.request("GET", path)
    response = connection.getresponse()
    return response.status, response.read()


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(args: argparse.Namespace, model: str, index: str, log_file: Path) -> Iterator[Server]:
    """A server of `model` with `index`, answering /health; stopped (SIGTERM) on exit, its peak RSS read then."""
    server = Server(index, free_port())
    argv = cli("serve", model, "--port", str(server.port), "--log-level", "warning", "--index", index)
    argv += model_flags(args)
    for flag, value in (("--batch-window-ms", args.batch_window_ms), ("--max-batch", args.max_batch),
                        ("--nprobe", args.nprobe)):  # fmt: skip
        if value is not None:
            argv += [flag, str(value)]
    started = time.perf_counter()
    with log_file.open("wb") as output:
        proc = subprocess.Popen(argv, stdout=output, stderr=subprocess.STDOUT)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"the {index} server exited:\n{log_file.read_text()[-3000:]}")
            with contextlib.suppress(OSError, http.client.HTTPException):
                with contextlib.closing(http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)) as probe:
                    status, body = get(probe, "/health")
                if status == 200:
                    server.health = json.loads(body)
                    break
            if time.perf_counter() - started > SERVER_START_LIMIT_S:
                raise SystemExit(f"the {index} server did not answer /health within {SERVER_START_LIMIT_S} s")
            time.sleep(0.1)
        server.startup_s = time.perf_counter() - started
        mode = SERVE_MODE.search(log_file.read_text())
        if mode is None or mode.group(1).split()[0] != index:
            raise SystemExit(f"asked for --index {index}, the server says: {mode and mode.group(1)}")
        yield server
    finally:
        server.peak_rss_mib = stop(proc)


def stop(proc: subprocess.Popen) -> float:
    """SIGTERM (SIGKILL after 60 s) and reap: the process's peak RSS in MiB (os.wait4; Popen.wait drops it)."""
    if proc.poll() is not None:
        return 0.0
    proc.terminate()
    timer = threading.Timer(60, proc.kill)
    timer.start()
    _, status, usage = os.wait4(proc.pid, 0)
    timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return usage.ru_maxrss / 1024  # Linux reports KiB


# --------------------------------------------------------------------------- the clients


@dataclasses.dataclass
class ClientLog:
    latencies: list[float] = dataclasses.field(default_factory=list)
    errors: int = 0
    last: float = 0.0  # perf_counter of its last answer


def phase(port: int, paths: Sequence[str], clients: int, seconds: float, seed: int, no_match: bytes = b"") -> dict:
    """`clients` threads, each over its own keep-alive connection, sending GET of random `paths` one after
    another for `seconds` from a common start: requests/s, p50/p99 ms and errors (a 200 whose body holds
    `no_match`, when given, is one too)."""
    logs = [ClientLog() for _ in range(clients)]
    clock: dict[str, float] = {}
    gate = threading.Barrier(clients, action=lambda: clock.update(start=time.perf_counter()))

    def client(number: int) -> None:
        rng = np.random.default_rng([seed, clients, number])
        record = logs[number]
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

        def path() -> str:
            return paths[rng.integers(len(paths))]

        with contextlib.suppress(OSError, http.client.HTTPException):
            get(connection, path())  # untimed: opens the connection
        gate.wait()
        deadline = clock["start"] + seconds
        while (sent := time.perf_counter()) < deadline:
            try:
                status, body = get(connection, path())
            except (OSError, http.client.HTTPException):
                record.errors += 1
                connection.close()  # the next request reconnects
                continue
            record.last = time.perf_counter()
            if status == 200 and not (no_match and no_match in body):
                record.latencies.append(record.last - sent)
            else:
                record.errors += 1
        connection.close()

    threads = [threading.Thread(target=client, args=(number,)) for number in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ms = np.concatenate([r.latencies for r in logs]) * 1000 if any(r.latencies for r in logs) else np.array([np.nan])
    wall = max(max(r.last for r in logs) - clock["start"], 1e-9)
    answered = sum(len(r.latencies) for r in logs)
    return {
        "clients": clients,
        "requests": answered,
        "errors": sum(r.errors for r in logs),
        "requests_per_s": answered / wall,
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "wall_s": wall,
    }


def top_k_ids(port: int, users: np.ndarray, k: int) -> np.ndarray:
    """(users, k) movieIds of each user's answer, best first, 0 where it holds fewer than k."""
    out = np.zeros((len(users), k), dtype=np.int64)
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    for row, user in enumerate(users):
        status, body = get(connection, f"/v1/users/{int(user)}/recommendations?k={k}")
        if status != 200:
            raise SystemExit(f"user {user}: {status} {body[:300]!r}")
        ids = [r["movieId"] for r in json.loads(body)["recommendations"]]
        out[row, : len(ids)] = ids
    connection.close()
    return out


def typed_queries(titles: Sequence[str], count: int, seed: int) -> list[str]:
    """`count` queries as people type them into the page's search box, each looking for a title drawn at
    random: in lower case without accents (search.normalise's words, the way "amelie" is typed), so that
    every one matches at least its own title."""
    from movierec.serving.search import normalise

    rng = np.random.default_rng([seed, count])
    queries: list[str] = []
    while len(queries) < count:
        words = normalise(titles[rng.integers(len(titles))]).split()
        if not words:
            continue
        form, last = rng.random(), words[-1]  # MovieLens titles end with the year
        if form < 0.6:  # the title's beginning, sent at a keystroke: "the godf"
            text = " ".join(words)
            query = text[: rng.integers(min(2, len(text)), len(text) + 1)]
        elif form < 0.8:  # the beginning of one word, remembered alone: "godf"
            word = words[rng.integers(len(words))]
            query = word[: rng.integers(min(3, len(word)), len(word) + 1)]
        elif form < 0.95:  # a word and the year: "godfather 1972"
            query = f"{words[rng.integers(max(len(words) - 1, 1))]} {last}"
        else:  # the year alone
            query = last
        queries.append(query.strip())
    return queries


# --------------------------------------------------------------------------- main


def parse_list(text: str, kind: type) -> list:
    return [kind(part) for part in text.split(",") if part.strip()]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_options(parser)
    parser.add_argument("--index", default="exact", help=f"comma-separated subset of {', '.join(INDEXES)}")
    parser.add_argument("--endpoints", default="recommend",
                        help=f"comma-separated subset of {', '.join(ENDPOINTS)} (default recommend); search "
                             "without MODEL serves the 27,278-title model")  # fmt: skip
    parser.add_argument("--clients", default="1,8,32,128", help="client counts, a phase each (default 1,8,32,128)")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase (default 20)")
    parser.add_argument("--warmup", type=int, default=20, help="untimed requests before the first phase")
    parser.add_argument("--recall-users", type=int, default=300, help="users whose top-k recall@k compares")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--limit", type=int, default=8, help="search: matches asked for (default 8, the page's)")
    parser.add_argument("--batch-window-ms", type=float, default=None, help="serve --batch-window-ms")
    parser.add_argument("--max-batch", type=int, default=None, help="serve --max-batch")
    parser.add_argument("--nprobe", type=int, default=None, help="serve --nprobe (approximate index)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args()
    check_model_options(parser, args)
    args.index, args.endpoints = parse_list(args.index, str), parse_list(args.endpoints, str)
    try:
        args.clients = parse_list(args.clients, int)
    except ValueError:
        parser.error(f"--clients {args.clients!r}: give counts separated by commas, like 1,8,32")
    if unknown := sorted(set(args.index) - set(INDEXES)):
        parser.error(f"--index: unknown {', '.join(unknown)}; known: {', '.join(INDEXES)}")
    if unknown := sorted(set(args.endpoints) - set(ENDPOINTS)):
        parser.error(f"--endpoints: unknown {', '.join(unknown)}; known: {', '.join(ENDPOINTS)}")
    if not args.index or not args.endpoints or not args.clients or not all(1 <= c <= 1024 for c in args.clients):
        parser.error("--index and --endpoints need a value each, --clients counts of 1..1024")
    if "recommend" not in args.endpoints and len(args.index) > 1:
        parser.error("search and health are timed on one server (the index does not matter to them): give one --index")
    if not 1 <= args.limit <= 100:
        parser.error("--limit must be from 1 to 100")
    if args.seconds <= 0 or args.warmup < 0 or args.recall_users < 0:
        parser.error("--seconds must be positive, --warmup and --recall-users not negative")
    return args


def main() -> None:
    from movierec.serving.approximate import recall_at_k

    args = parse_args()
    servers: list[Server] = []
    rows: list[dict] = []
    answers: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="movierec-serve-bench-") as tmp:
        model, label = serving_model(args, Path(tmp))
        rng = np.random.default_rng(args.seed)
        requests: dict[str, list[str]] = {}  # endpoint -> the paths its clients draw from
        recall_users, queries = np.zeros(0, dtype=np.int64), []
        if "recommend" in args.endpoints:
            users = model_users(model, args.tracking_uri)
            compared = min(args.recall_users, len(users)) if {"exact", "approximate"} <= set(args.index) else 0
            recall_users = rng.choice(users, size=compared, replace=False)
            requests["recommend"] = [f"/v1/users/{int(user)}/recommendations?k={args.k}" for user in users]
        if "search" in args.endpoints:
            queries = typed_queries(model_titles(model, args.tracking_uri), SEARCH_QUERIES, args.seed)
            requests["search"] = [f"/v1/items?query={quote(query)}&limit={args.limit}" for query in queries]
        if "health" in args.endpoints:
            requests["health"] = ["/health"]
        for index in args.index:
            log(f"starting the {index} server ...")
            with running(args, model, index, Path(tmp) / f"server-{index}.log") as server:
                log(f"{index}: answering after {server.startup_s:.1f} s")
                for endpoint, paths in requests.items():
                    if endpoint != "recommend" and index != args.index[0]:
                        continue  # search and health do not depend on --index: timed once
                    name = index if endpoint == "recommend" else endpoint
                    no_match = NO_MATCH if endpoint == "search" else b""
                    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
                    for at in rng.integers(len(paths), size=args.warmup):
                        get(connection, paths[at])
                    connection.close()
                    for clients in args.clients:
                        log(f"{name}: {clients} client(s) for {args.seconds:g} s ...")
                        timed = phase(server.port, paths, clients, args.seconds, args.seed, no_match)
                        rows.append({"index": name, **timed})
                if len(recall_users):
                    answers[index] = top_k_ids(server.port, recall_users, args.k)
            servers.append(server)
    recall = {index: recall_at_k(found, answers["exact"]) for index, found in answers.items() if index != "exact"}
    for row in rows:
        row["recall"] = recall.get(row["index"])
    report(args, model, label, servers, rows, len(recall_users), queries)
    if any(row["errors"] for row in rows):
        raise SystemExit(1)


def serving_model(args: argparse.Namespace, scratch: Path) -> tuple[str, str]:
    """resolve_model's (MODEL, label), but the 27,278-title model when search is timed without a MODEL."""
    if "search" in args.endpoints and args.model is None and args.mlperf is None:
        return str(titles_run(args.steps, args.cache)), "synthetic titles"
    return resolve_model(args, scratch)


def report(
    args: argparse.Namespace,
    model: str,
    label: str,
    servers: list[Server],
    rows: list[dict],
    recall_users: int,
    queries: list[str],
) -> None:
    health = servers[0].health
    dataset = f"{health['dataset']} ({health['num_users']:,} users, {health['num_items']:,} items)"
    options = {"threads": args.threads, "batch-window-ms": args.batch_window_ms, "max-batch": args.max_batch,
               "nprobe": args.nprobe}  # fmt: skip
    given = ", ".join(f"--{name} {value}" for name, value in options.items() if value is not None) or "defaults"
    recall = f"recall@{args.k} over {recall_users} users against the exact server"
    if not recall_users:
        recall = "no recall (it needs recommend and both exact and approximate)"
    search = f"search: GET /v1/items?query=Q&limit={args.limit}, Q one of {len(queries):,} typed queries like "
    search += ", ".join(map(repr, queries[:6]))
    info = machine(with_gpus=False)
    lines = [
        f"machine: {machine_line(info)}",
        f"model: {health['model']}, max_len {health['max_len']}, on {dataset}; MODEL {model}",
        f"serve options: {given}; phases of {args.seconds:g} s; k {args.k}; seed {args.seed}; {recall}",
        *([search] if queries else []),
        *(f"{s.index} server: /health after {s.startup_s:.1f} s, peak RSS {s.peak_rss_mib:,.0f} MiB" for s in servers),
        "",
        f"| dataset | index | clients | requests | errors | requests/s | p50 ms | p99 ms | recall@{args.k} |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        recall_cell = "" if r["recall"] is None else f"{r['recall']:.3f}"
        lines.append(
            f"| {label} ({health['num_items']:,} items) | {r['index']} | {r['clients']} | {r['requests']:,} | "
            f"{r['errors']} | {r['requests_per_s']:,.0f} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {recall_cell} |"
        )
    print("\n".join(lines))
    if args.json:
        servers_out = [dataclasses.asdict(s) for s in servers]
        args.json.write_text(json.dumps({"machine": info, "model": model, "label": label, "servers": servers_out,
                                         "rows": rows}, indent=1))  # fmt: skip


if __name__ == "__main__":
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    main()
