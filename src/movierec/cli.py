"""Command-line interface: a thin layer of argument parsing over the library functions.

Each subcommand has an `add_<name>` function that declares its options and a `cmd_<name>` function that
calls the library. Errors the user can fix (:class:`movierec.errors.MovierecError`) are printed on one
line and exit with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

from movierec.errors import MovierecError

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]] = {}


def command(name: str, help_text: str):
    """Register `add_fn` (options) under `name`; the decorated function runs the command."""

    def register(run_fn):
        add_fn = globals()[f"add_{run_fn.__name__.removeprefix('cmd_')}"]
        COMMANDS[name] = (add_fn, run_fn, help_text)
        return run_fn

    return register


# --------------------------------------------------------------------------- data


def add_prepare(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", required=True, help="synthetic, ml-1m-sasrec, or a MovieLens release name")
    p.add_argument("--out", default="data", type=Path, help="parent folder of the prepared dataset (default: data)")
    p.add_argument("--input", type=Path, help="a local source file or folder (ml-1m-sasrec: the ml-1m.txt file)")
    p.add_argument("--titles", type=Path, help="ml-1m-sasrec: folder with movies.dat and sas_to_original_items.txt")
    p.add_argument("--seed", type=int, default=0, help="synthetic: generator seed")
    p.add_argument("--min-rating", type=float, default=None, help="drop ratings below this (default: keep all)")
    p.add_argument("--min-user-interactions", type=int, default=None, help="k-core minimum per user (default 5)")
    p.add_argument("--min-item-interactions", type=int, default=None, help="k-core minimum per item (default 5)")
    p.add_argument("--num-shards", type=int, default=None, help="number of user shards (default: by size)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing prepared dataset")


@command("prepare", "prepare a dataset into sharded training/validation/evaluation splits")
def cmd_prepare(args: argparse.Namespace) -> int:
    from movierec.data.api import prepare
    from movierec.data.summary import print_summary

    path = prepare(
        args.dataset,
        out=args.out,
        input_path=args.input,
        titles_dir=args.titles,
        seed=args.seed,
        min_rating=args.min_rating,
        min_user_interactions=args.min_user_interactions,
        min_item_interactions=args.min_item_interactions,
        num_shards=args.num_shards,
        overwrite=args.overwrite,
    )
    print_summary(path)
    return 0


def add_info(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", type=Path, help="a prepared dataset folder (DIR/NAME)")


@command("info", "print the summary of a prepared dataset")
def cmd_info(args: argparse.Namespace) -> int:
    from movierec.data.summary import print_summary

    print_summary(args.path)
    return 0


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
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except MovierecError as exc:
        print(f"movierec {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"movierec {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
