"""Command-line interface: a thin layer of argument parsing over the library functions.

Each subcommand has an `add_<name>` function that declares its options and a `cmd_<name>` function that
calls the library. Errors the user can fix (:class:`movierec.errors.MovierecError`) are printed on one
line and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Callable
from pathlib import Path

from movierec.errors import ConfigError, DataError, MovierecError

MAX_LINE = 400  # a message longer than this (a path of 10 KB, say) is cut: one readable line

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {}


def command(name: str, help_text: str, add_fn: Callable[[argparse.ArgumentParser], None]):
    """Register a subcommand: `add_fn` declares its options, the decorated function runs it."""

    def register(run_fn):
        COMMANDS[name] = (add_fn, run_fn, help_text)
        return run_fn

    return register


# --------------------------------------------------------------------------- data


def add_prepare(p: argparse.ArgumentParser) -> None:
    from movierec.data.prepare import SOURCES

    p.add_argument("--dataset", required=True, help=f"one of: {', '.join(SOURCES)} (docs/data.md)")
    p.add_argument("--name", help="sasrec-text: the prepared dataset's name (its folder under --out)")
    p.add_argument("--out", default="data", type=Path, help="parent folder of the prepared dataset (default: data)")
    p.add_argument(
        "--input",
        type=Path,
        help="a local source: ml-1m-sasrec: the ml-1m.txt file; a release: its extracted folder; "
        "ml-20mx16x32: the folder with trainx16x32_K.npz/testx16x32_K.npz, or an organised folder "
        "(training/, validation/, evaluation/)",
    )
    p.add_argument(
        "--titles",
        type=Path,
        help="sasrec-text/ml-1m-sasrec: movies.dat or movies.csv, or its folder (the id maps are read beside --input)",
    )
    _add_source_options(p)
    p.add_argument("--fraction", type=float, default=None, help="ml-20mx16x32: convert the first F of its shards")
    p.add_argument("--shards", default=None, help="ml-20mx16x32: convert these shards, e.g. 0-3,7")
    p.add_argument(
        "--holdout",
        choices=["leave-one-out", "by-file"],
        default=None,
        help="ml-20mx16x32: leave-one-out (default: each user's last training pair validates, its test pair "
        "evaluates) or by-file (an organised folder's validation/ and evaluation/ test files; docs/data.md)",
    )
    p.add_argument("--seed", type=int, default=0, help="synthetic: generator seed")
    p.add_argument("--min-rating", type=float, default=None, help="drop ratings below this (default: keep all)")
    p.add_argument("--min-user-interactions", type=int, default=None, help="k-core minimum per user (default 5)")
    p.add_argument("--min-item-interactions", type=int, default=None, help="k-core minimum per item (default 5)")
    p.add_argument("--num-shards", type=int, default=None, help="number of user shards (default: by size)")
    p.add_argument(
        "--shard-pairs", type=int, default=2_000_000, help="target interactions per shard (default 2,000,000)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset")


def _add_source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--archive", type=Path, help="use this archive (zip/tar) instead of downloading (offline use)")
    p.add_argument(
        "--data-home", type=Path, help="download cache (default: $MOVIEREC_DATA_HOME, else ~/.cache/movierec)"
    )
    p.add_argument("--base-url", help="mirror to download from (default: $MOVIEREC_BASE_URL, else GroupLens)")
    p.add_argument("--no-verify", action="store_true", help="skip the MD5 check of the archive")


@command("prepare", "prepare a dataset into sharded training/validation/evaluation splits", add_prepare)
def cmd_prepare(args: argparse.Namespace) -> int:
    from movierec.data.prepare import prepare
    from movierec.data.summary import print_summary

    path = prepare(
        args.dataset,
        out=args.out,
        input_path=args.input,
        titles=args.titles,
        name=args.name,
        seed=args.seed,
        min_rating=args.min_rating,
        min_user_interactions=args.min_user_interactions,
        min_item_interactions=args.min_item_interactions,
        num_shards=args.num_shards,
        shard_pairs=args.shard_pairs,
        overwrite=args.overwrite,
        archive=args.archive,
        data_home=args.data_home,
        base_url=args.base_url,
        verify=not args.no_verify,
        fraction=args.fraction,
        shards=args.shards,
        holdout=args.holdout,
        progress=sys.stderr.isatty(),
    )
    print_summary(path)
    return 0


def add_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path, help="a prepared dataset folder (DIR/NAME)")
    p.add_argument(
        "--verify",
        action="store_true",
        help="also check every shard against meta.json: checksum, dtype, shape, counts and id ranges",
    )


@command("info", "print the summary of a prepared dataset (--verify: check every file)", add_info)
def cmd_info(args: argparse.Namespace) -> int:
    from movierec.data.layout import verify_files
    from movierec.data.summary import print_summary

    print_summary(args.path)
    if args.verify:
        checked, problems = verify_files(args.path)
        for problem in problems:
            print(f"FAILED {problem}")
        if problems:
            raise DataError(f"{len(problems)} of {checked} files failed verification; re-run `movierec prepare`")
        print(f"verified {checked} files: checksums, shapes, counts and id ranges match meta.json")
    return 0


def add_download(p: argparse.ArgumentParser) -> None:
    p.add_argument("name", nargs="?", help="a MovieLens release (see --list)")
    p.add_argument("--list", action="store_true", help="list the known releases and exit")
    _add_source_options(p)


@command(
    "download", "download a MovieLens release into the cache (or copy --archive there), MD5-verified", add_download
)
def cmd_download(args: argparse.Namespace) -> int:
    from movierec.data.download import data_home, download
    from movierec.data.registry import RELEASES

    if args.list:
        for release in RELEASES.values():
            checksum = release.md5 or "no pinned MD5"
            print(f"{release.name:16} {release.url()}  {checksum}\n{'':16} {release.description}")
        return 0
    if not args.name:
        raise ConfigError("give a release name, e.g. `movierec download ml-1m` (`--list` shows them all)")
    path = download(
        args.name,
        home=args.data_home,
        url=args.base_url,
        archive=args.archive,
        verify=not args.no_verify,
        progress=sys.stderr.isatty(),
    )
    print(f"{path}  (cache: {data_home(args.data_home)})")
    return 0


# --------------------------------------------------------------------------- training and evaluation


def add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="a YAML run config (see configs/)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. model.d_item=100")
    p.add_argument("--data", help="a prepared dataset folder (data.path)")
    p.add_argument("--epochs", type=int, help="train.epochs (the run's length in epochs; clears train.steps)")
    p.add_argument("--steps", type=int, help="train.steps (the run's length in optimizer steps; clears train.epochs)")
    p.add_argument(
        "--batch-size", help="train.batch_size: a number, or auto (the largest that fits, from train.max_batch_size)"
    )
    p.add_argument("--run-dir", help="folder for checkpoints and local outputs (run_dir)")
    p.add_argument("--seed", type=int, help="train.seed")
    p.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db)")
    p.add_argument("--experiment", help="MLflow experiment name")
    p.add_argument("--run-name", help="MLflow run name")
    p.add_argument("--resume", help="continue a run exactly from its run folder or checkpoint")
    p.add_argument(
        "--init-from",
        help="start from the weights of a movierec checkpoint or run folder, or of a plain PyTorch state dict "
        "(.pth/.pt): tensors that match by name and shape are loaded, the rest skipped (a table says which)",
    )
    p.add_argument("--init-map", help="YAML rules renaming a state dict's tensors to ours (configs/init-maps/)")
    p.add_argument("--fraction", type=float, help="train on the first ceil(F * shards) shards")
    p.add_argument("--shards", help="train on these shards, e.g. 0-3,7")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16", "auto"], help="train.precision")
    p.add_argument("--device", help="train.device: auto, cpu, cuda, cuda:N")
    p.add_argument("--max-steps", type=int, help="train.max_steps: stop after N optimizer steps")
    p.add_argument("--max-minutes", type=float, help="train.max_minutes: stop after M minutes, then test the best")


def config_from_args(args: argparse.Namespace):
    """The run config of `train`'s arguments: a resumed run's own config (unless --config is given) or the
    defaults, the YAML file, KEY=VALUE overrides, then the named flags (see `training.config.load_config`)."""
    from movierec.models.checkpoint import load_checkpoint
    from movierec.training.config import config_from_dict, load_config

    base = None
    flags = {
        "data.path": args.data,
        "train.epochs": args.epochs,
        "train.steps": args.steps,
        "train.batch_size": args.batch_size,
        "run_dir": args.run_dir,
        "train.seed": args.seed,
        "tracking.uri": args.tracking_uri,
        "tracking.experiment": args.experiment,
        "tracking.run_name": args.run_name,
        "init.from_checkpoint": args.init_from,
        "init.map": args.init_map,
        "data.fraction": args.fraction,
        "data.shards": args.shards,
        "train.precision": args.precision,
        "train.device": args.device,
        "train.max_steps": args.max_steps,
        "train.max_minutes": args.max_minutes,
    }
    if args.epochs is not None and args.steps is not None:
        raise ConfigError("give --epochs or --steps, not both: each sets the run's length")
    # a length flag replaces the other kind of length, whichever the config file used
    overrides = [*args.overrides, *(["train.steps=null"] if args.epochs is not None else []),
                 *(["train.epochs=null"] if args.steps is not None else [])]  # fmt: skip
    if not args.resume:
        return load_config(args.config, overrides, flags)
    resumed = Path(args.resume)
    run_dir = resumed if resumed.is_dir() else resumed.parent  # where the run is now, if it moved
    if args.run_dir is not None and Path(args.run_dir).resolve() != run_dir.resolve():
        raise ConfigError(
            f"--resume continues {run_dir} in that folder; --run-dir {args.run_dir} names another (omit --run-dir, "
            "or copy the run folder there and resume that)"
        )
    if not args.config:
        base = config_from_dict(load_checkpoint(args.resume).config)
    config = load_config(args.config, overrides, flags, base=base)
    config.run_dir = str(run_dir)  # a resumed run writes to its own folder, whatever a --config file says
    return config


@command("train", "train SSE-PT, SASRec, BERT4Rec or HSTU with MLflow, checkpoints, resume and fine-tuning", add_train)
def cmd_train(args: argparse.Namespace) -> int:
    from movierec.evaluation.metrics import print_metrics
    from movierec.training.run import train

    config = config_from_args(args)
    result = train(config, resume=args.resume)
    if not result.is_main:  # under torchrun, rank 0 reports
        return 0
    test = {k.removeprefix("test_"): v for k, v in result.test_metrics.items()}
    print_metrics(f"test metrics (best epoch {result.best_epoch} of {result.epochs_run})", test)
    print(f"mlflow run id: {result.run_id}")
    print(f"run dir: {result.run_dir}")
    return 0


def add_evaluate(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="a checkpoint file or run folder (uses best.ckpt)")
    p.add_argument("--data", help="prepared dataset folder (default: the one the model was trained on)")
    p.add_argument("--split", choices=["evaluation", "validation"], default="evaluation")
    p.add_argument(
        "--protocol",
        default="full,sampled-uniform-100,sampled-popularity-100",
        help="comma-separated: full, sampled-uniform-100, sampled-popularity-100",
    )
    p.add_argument("--k", default="1,5,10,20", help="cut-offs, comma-separated")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampled negatives and of the user sample")
    p.add_argument("--max-users", type=int, help="evaluate a seeded, fixed sample of this many users (default: all)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", type=Path, help="also write the metrics to this JSON file")


@command("evaluate", "HR/NDCG/MRR@k of a checkpoint, full ranking and sampled negatives, all users", add_evaluate)
def cmd_evaluate(args: argparse.Namespace) -> int:
    import json

    from movierec.device import resolve_device
    from movierec.errors import ConfigError
    from movierec.evaluation.evaluate import check_protocols, evaluate_checkpoint
    from movierec.evaluation.metrics import print_metrics

    protocols = check_protocols([p.strip() for p in args.protocol.split(",") if p.strip()], "--protocol")
    device = str(resolve_device(args.device))
    if args.json:
        from movierec.files import check_output_file

        check_output_file(args.json, "--json")
    try:
        ks = tuple(int(k) for k in args.k.split(","))
    except ValueError as exc:
        raise ConfigError(f"--k {args.k!r}: expected integers like 1,5,10") from exc
    if any(k <= 0 for k in ks):
        raise ConfigError("--k values must be positive")
    if args.max_users is not None and args.max_users <= 0:
        raise ConfigError(f"--max-users must be > 0, got {args.max_users}")
    metrics = evaluate_checkpoint(
        args.checkpoint, args.data, args.split, protocols, ks, args.seed, device, args.max_users
    )
    print_metrics(f"{args.split} split, {int(metrics['users']):,} users", metrics)
    if args.json:
        from movierec.files import atomic_path

        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps(metrics, indent=2))
    return 0


def add_quickstart(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("runs/quickstart"), help="folder for data, runs and MLflow store")
    p.add_argument("--config", type=Path, default=None, help="run config (default: configs/synthetic.yaml)")
    p.add_argument("--epochs", type=int, default=None)


@command(
    "quickstart", "the main job on the embedded synthetic dataset: prepare, train, evaluate, recommend", add_quickstart
)
def cmd_quickstart(args: argparse.Namespace) -> int:
    from movierec.quickstart import quickstart

    quickstart(args.out, args.config, args.epochs)
    return 0


# --------------------------------------------------------------------------- export and model registry


def add_export(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="checkpoint file or run folder (uses best.ckpt), runs:/... or models:/NAME/VERSION")
    p.add_argument("--format", choices=["onnx", "torchscript"], default="onnx", help="export format (default: onnx)")
    p.add_argument("--out", type=Path, help="file to write, e.g. model.onnx or model.pt")
    p.add_argument("--no-verify", action="store_true", help="skip comparing the export's scores with PyTorch's")
    p.add_argument("--register", metavar="NAME", help="also register the run's MLflow model under NAME")
    p.add_argument(
        "--tracking-uri",
        help="MLflow store for runs:/ and models:/ references and --register (default: for a checkpoint the "
        "store its run logged to; else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )


@command("export", "export the scoring function to ONNX or TorchScript; register the model in MLflow", add_export)
def cmd_export(args: argparse.Namespace) -> int:
    from movierec.serving.export import load_source, register

    if args.out is None and args.register is None:
        raise ConfigError("give --out FILE to export, --register NAME to register, or both")
    if args.out is not None:
        from movierec.files import check_output_file

        check_output_file(args.out, "--out")
    source = load_source(args.model, args.tracking_uri)
    if args.out is not None:
        from movierec.serving.export import export_model, verify_export

        path = export_model(source, args.format, args.out)
        print(f"wrote {path} ({args.format}, {path.stat().st_size / 1e6:.2f} MB)")
        if not args.no_verify:
            error = verify_export(path, args.format, source.model)
            print(f"max |export - PyTorch| on random batches of 1 and 7: {error:.2e}")
    if args.register is not None:
        name, version = register(source.run_id, args.register, source.tracking_uri)
        print(f"registered models:/{name}/{version}")
    return 0


# --------------------------------------------------------------------------- recommendations and serving


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model",
        metavar="MODEL",
        help="a checkpoint file, a run folder, runs:/<run_id>[/path] or models:/<name>/<version>",
    )
    p.add_argument("--data", help="prepared dataset folder (default: the one recorded in the checkpoint)")
    p.add_argument(
        "--tracking-uri",
        help="MLflow tracking URI for runs:/ and models:/ (default: $MLFLOW_TRACKING_URI or mlflow.db)",
    )
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")


def _load_recommender(args: argparse.Namespace):
    from movierec.serving.loader import load_model

    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads must be positive, got {args.threads}")
        import torch

        torch.set_num_threads(args.threads)
    return load_model(args.model, data=args.data, tracking_uri=args.tracking_uri)


def _parse_ids(text: str, flag: str) -> list[int]:
    try:
        return [int(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError as exc:
        raise ConfigError(f"{flag} {text!r}: expected movieIds separated by commas, like 1,260,1196") from exc


def add_recommend(p: argparse.ArgumentParser) -> None:
    _add_model_options(p)
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--user", type=int, help="a user of the training data (original MovieLens userId)")
    who.add_argument("--history", help="a new person's movieIds in the order watched, e.g. 1,260,1196")
    p.add_argument("--k", type=int, default=10, help="number of recommendations (default 10)")
    p.add_argument("--include-seen", action="store_true", help="also recommend movies already in the history")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


@command("recommend", "top-k movies with titles for a known user or for a new person's history", add_recommend)
def cmd_recommend(args: argparse.Namespace) -> int:
    import json

    from rich.console import Console
    from rich.table import Table

    history = _parse_ids(args.history, "--history") if args.history is not None else None
    recommender = _load_recommender(args)
    unknown: list[int] = []
    if history is not None:
        result = recommender.recommend_history(history, args.k, args.include_seen)
        recs, unknown = result.recommendations, result.unknown_movie_ids
        unknown_ids = set(unknown)
        used = sum(movie_id not in unknown_ids for movie_id in history)
        ignored = f", {len(history) - used} unknown id(s) ignored" if used < len(history) else ""
        title = f"top {args.k} for a history of {used} movies{ignored}"
    else:
        recs = recommender.recommend_user(args.user, args.k, args.include_seen)
        title = f"top {args.k} for user {args.user}"
    if args.json:
        out = {"recommendations": [r.to_dict() for r in recs]}
        out.update({"userId": args.user} if history is None else {"unknownMovieIds": unknown})
        print(json.dumps(out, indent=2))
        return 0
    if unknown:
        shown = ", ".join(map(str, unknown[:20])) + (" ..." if len(unknown) > 20 else "")
        print(f"ignored {len(unknown)} unknown movieId(s): {shown}", file=sys.stderr)
    table = Table(title=f"{title} ({recommender.config.kind}, {recommender.dataset_name})")
    table.add_column("rank", justify="right")
    table.add_column("movieId", justify="right")
    table.add_column("title")
    table.add_column("score", justify="right")
    for r in recs:
        table.add_row(str(r.rank), str(r.movie_id), r.title or "", f"{r.score:.4f}")
    Console().print(table)
    return 0


def add_export_recs(p: argparse.ArgumentParser) -> None:
    _add_model_options(p)
    p.add_argument("--out", required=True, type=Path, help="parquet file: user_id, rank, movie_id, title, score")
    p.add_argument("--k", type=int, default=100, help="recommendations per user (default 100)")
    p.add_argument("--include-seen", action="store_true", help="also recommend movies already in the history")
    p.add_argument("--batch-size", type=int, default=256, help="users scored per batch (default 256)")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--users", help="only these users (original userIds, comma-separated)")
    who.add_argument("--shards", help="only the users of these dataset shards, e.g. 0-3,7")


@command(
    "export-recs",
    "top-k recommendations for every user into a parquet file, batched, written atomically",
    add_export_recs,
)
def cmd_export_recs(args: argparse.Namespace) -> int:
    import time

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be positive, got {args.batch_size}")
    if args.out.suffix != ".parquet":
        raise ConfigError(f"--out {args.out}: give a .parquet file")
    from movierec.files import check_output_file

    check_output_file(args.out, "--out")
    from movierec.progress import Progress

    recommender = _load_recommender(args)
    recommender.check_k(args.k)
    recommender.batch_size = args.batch_size
    users = recommender.known_users
    if args.users is not None:
        users = recommender.users_of_ids(_parse_ids(args.users, "--users"))
    elif args.shards is not None:
        users = recommender.users_of_shards(args.shards)
    started = time.perf_counter()
    with Progress("export-recs", len(users), "users") as progress:
        rows = recommender.export_all(args.out, args.k, args.include_seen, users=users, progress=progress)
    print(f"{rows:,} rows for {len(users):,} users (k={args.k}) -> {args.out} in {time.perf_counter() - started:.1f}s")
    scorer = recommender.scorer
    if scorer.screened_rows:  # how much of the catalogue the early stop of the bfloat16 screen left to score
        share = scorer.screened_scores / (scorer.screened_rows * recommender.num_items)
        print(f"the exact top k screened {share:.2%} of the catalogue per user (items by decreasing norm)")
    return 0


def add_serve(p: argparse.ArgumentParser) -> None:
    _add_model_options(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--batch-window-ms", type=float, default=2.0,
                   help="score requests arriving within this many ms of each other together (default 2; 0: only "
                        "those already waiting)")  # fmt: skip
    p.add_argument("--max-batch", type=int, default=64, help="at most this many histories per batch (default 64)")
    p.add_argument("--index", choices=["auto", "exact", "approximate"], default="auto",
                   help="top-k by scoring every item (exact) or an approximate faiss index; auto: the index for "
                        "catalogues of 200,000 items or more")  # fmt: skip
    p.add_argument("--nprobe", type=int, default=32, help="approximate index: cells searched per query")


@command("serve", "serve recommendations over HTTP (FastAPI + uvicorn); OpenAPI docs at /docs", add_serve)
def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from movierec.serving.approximate import APPROXIMATE_FROM_ITEMS
    from movierec.serving.http import create_app
    from movierec.serving.limits import PARSER_HEADER_BUFFER

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port must be 0-65535, got {args.port}")
    listener = bind(args.host, args.port)  # before the model loads: a taken port is one line, at once
    if not (0 <= args.batch_window_ms <= 1000 and args.max_batch >= 1):
        raise ConfigError("--batch-window-ms must be in [0, 1000] and --max-batch >= 1")
    recommender = _load_recommender(args)
    if args.index == "approximate" or (args.index == "auto" and recommender.num_items >= APPROXIMATE_FROM_ITEMS):
        from movierec.serving.approximate import ApproximateIndex

        recommender.use_index(ApproximateIndex(recommender.model, nprobe=args.nprobe))
    else:  # exact scoring's bfloat16 screen, built now (seconds for a large catalogue), not at the first request
        _ = recommender.scorer.bf16_screen
    app = create_app(recommender, batch_window_ms=args.batch_window_ms, max_batch=args.max_batch)
    host, port = listener.getsockname()[:2]
    index = "approximate index" if recommender.index is not None else "exact scoring"
    print(f"movierec serve: listening on http://{host}:{port} ({index}; Ctrl-C stops)", flush=True)
    # h11 pinned (not httptools if installed): its refusals are the ones docs/serving.md lists
    config = uvicorn.Config(
        app, log_level=args.log_level, http="h11", h11_max_incomplete_event_size=PARSER_HEADER_BUFFER
    )
    uvicorn.Server(config).run(sockets=[listener])
    return 0


def bind(host: str, port: int):
    """A listening socket on host:port, or a one-line ConfigError (port in use, unknown host, privileged
    port): uvicorn would print its own error in six log lines and exit 3."""
    import socket

    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        # IPPROTO_TCP named: asyncio sets TCP_NODELAY only on connections of such a socket, and without it a
        # keep-alive client waits out a delayed ACK (about 40 ms) on every answer written in two parts
        listener = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((host, port))
        listener.listen(2048)
    except (OSError, UnicodeError) as exc:
        raise ConfigError(f"cannot listen on {host}:{port}: {getattr(exc, 'strerror', None) or exc}") from exc
    return listener


# --------------------------------------------------------------------------- entry point


def build_parser() -> argparse.ArgumentParser:
    from movierec import __version__

    parser = argparse.ArgumentParser(prog="movierec", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"movierec {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_fn, run_fn, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_fn(p)
        p.set_defaults(run=run_fn)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may also stand after flags (argparse stops the positional list at the first flag)
    late = [x for x in extra if "=" in x and not x.startswith("-")]
    if len(late) != len(extra) or (late and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if late:
        args.overrides = [*args.overrides, *late]
    try:
        return args.run(args)
    except MovierecError as exc:
        return fail(args.command, str(exc))
    except OSError as exc:  # a path the user gave that the system refuses (full, read-only, not a folder, ...)
        kind = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
        where = f": {exc.filename}" if exc.filename else ""
        return fail(args.command, f"{exc.strerror or exc} ({kind}){where}; nothing was left half-written")
    except (UnicodeEncodeError, UnicodeDecodeError) as exc:  # a path with bytes that are not text
        return fail(args.command, f"a path or value cannot be read as text ({exc.reason}); rename it")
    except KeyboardInterrupt:
        print(f"movierec {args.command}: interrupted", file=sys.stderr)
        return 130


def fail(command: str, message: str) -> int:
    """Print `message` as one line (control characters and newlines shown escaped) and return exit status 2."""
    text = message.encode("utf-8", "backslashreplace").decode("utf-8")
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    if len(text) > MAX_LINE:
        text = text[: MAX_LINE - 3] + "..."
    print(f"movierec {command}: error: {text}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
