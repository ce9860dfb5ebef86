"""`prepare(name, out, **options)`: what `movierec prepare` does, from a dataset name to a prepared folder.

Every name is a `Source` in `SOURCES`: a function that prepares it and the options it takes, so that an
option a source does not use is a one-line error, never silently ignored. Names: `synthetic` (embedded
generator), `sasrec-text` / `ml-1m-sasrec` (SASRec's text files, `--input`), every MovieLens release of
:mod:`movierec.data.registry` (read from `--input DIR`, an extracted folder, else `--archive PATH`, else the
download cache, downloading it first) and MLPerf's `ml-20mx16x32` (:mod:`movierec.data.mlperf`). The split
and the shards are written by :mod:`movierec.data.split`.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import pyarrow as pa

from movierec.data.layout import sha256_file
from movierec.data.parsers import read_id_map, read_movies_csv, read_movies_dat
from movierec.data.registry import FORMAT_MLPERF, RELEASES, get_release
from movierec.data.sources import read_sasrec_text
from movierec.data.split import DEFAULT_SHARD_PAIRS, write_dataset
from movierec.errors import ConfigError, DataError

MOVIELENS_KCORE = 5  # SASRec's 5-core default for MovieLens releases
# SASRec's `user item` text files: `sasrec-text --name NAME` for any, `ml-1m-sasrec` for the ML-1M benchmark file
SASREC_TEXT = ("sasrec-text", "ml-1m-sasrec")
ITEM_MAP, USER_MAP = "sas_to_original_items.txt", "sas_to_original_users.txt"
TITLE_FILES = ("movies.dat", "movies.csv")
MIN_TITLE_COVERAGE = 0.5  # below this share of movies with a title, the titles are from another release


def _find_titles(titles: str | Path | None, input_path: Path, dataset: str) -> Path | None:
    """The titles file: --titles (a movies.dat/.csv file, or a folder holding one), else one beside the input
    (ml-1m-sasrec: also ../ml-1m/movies.dat, where the SASRec repository keeps it)."""
    if titles is not None:
        titles = Path(titles)
        if titles.is_file():
            return titles
        if not titles.is_dir():
            raise DataError(f"--titles {titles} does not exist; pass a movies.dat / movies.csv file or its folder")
        found = [titles / name for name in TITLE_FILES if (titles / name).is_file()]
        if not found:
            raise DataError(f"--titles {titles} holds neither {' nor '.join(TITLE_FILES)}")
        return found[0]
    folders = [input_path.parent] + ([input_path.parent.parent / "ml-1m"] if dataset == "ml-1m-sasrec" else [])
    return next((f / name for f in folders for name in TITLE_FILES if (f / name).is_file()), None)


def _read_titles(path: Path, original_items: np.ndarray) -> pa.Table:
    """movies.dat or movies.csv, checked to cover the dataset's movies (else the id map or file is wrong)."""
    table = read_movies_csv(path) if path.suffix == ".csv" else read_movies_dat(path)
    wanted = original_items[original_items > 0]
    covered = np.isin(wanted, table["movie_id"].to_numpy()).mean() if len(wanted) else 1.0
    if covered < MIN_TITLE_COVERAGE:
        raise DataError(
            f"{path} has titles for only {covered:.0%} of the dataset's movies: it is not the titles file of "
            f"this data, or the id map ({ITEM_MAP}) is not"
        )
    if covered < 1:
        print(
            f"warning: {path} has no title for {1 - covered:.1%} of the movies; they are shown by id", file=sys.stderr
        )
    return table


@dataclass
class PrepareOptions:
    """Every option of `movierec prepare`. Each source takes some of them; the others must be left unset."""

    input_path: str | Path | None = None
    archive: str | Path | None = None
    data_home: str | Path | None = None
    base_url: str | None = None
    verify: bool = True
    titles: str | Path | None = None
    name: str | None = None
    seed: int = 0
    min_rating: float | None = None
    min_user_interactions: int | None = None
    min_item_interactions: int | None = None
    num_shards: int | None = None
    shard_pairs: int = DEFAULT_SHARD_PAIRS
    fraction: float | None = None
    shards: str | list[int] | None = None
    holdout: str | None = None
    overwrite: bool = False
    progress: bool = True

    def kcore(self, default: int) -> dict:
        """The k-core minima, each `default` unless given."""
        return {
            "min_user_interactions": default if self.min_user_interactions is None else self.min_user_interactions,
            "min_item_interactions": default if self.min_item_interactions is None else self.min_item_interactions,
        }


# the command-line flag of each option, for the messages
FLAGS = {
    "input_path": "--input", "archive": "--archive", "data_home": "--data-home", "base_url": "--base-url",
    "verify": "--no-verify", "titles": "--titles", "name": "--name", "seed": "--seed", "min_rating": "--min-rating",
    "min_user_interactions": "--min-user-interactions", "min_item_interactions": "--min-item-interactions",
    "num_shards": "--num-shards", "shard_pairs": "--shard-pairs", "fraction": "--fraction", "shards": "--shards",
    "holdout": "--holdout",
}  # fmt: skip
EVERY_SOURCE = {"shard_pairs", "overwrite", "progress"}
FILTERS = {"min_rating", "min_user_interactions", "min_item_interactions", "num_shards"}
DOWNLOADS = {"input_path", "archive", "data_home", "base_url", "verify"}


@dataclass(frozen=True)
class Source:
    """A dataset name's preparation and the options it takes (besides EVERY_SOURCE)."""

    prepare: Callable[[str, Path, PrepareOptions], Path]
    takes: frozenset[str]
    description: str


def _prepare_synthetic(dataset: str, out: Path, o: PrepareOptions) -> Path:
    from movierec.data.synthetic import generate_synthetic

    interactions, titles = generate_synthetic(seed=o.seed)
    return write_dataset(
        interactions, out, "synthetic", source={"kind": "synthetic", "seed": o.seed}, titles=titles,
        min_rating=o.min_rating, **o.kcore(5), num_shards=o.num_shards or 4, shard_pairs=o.shard_pairs,
        overwrite=o.overwrite,
    )  # fmt: skip


def _prepare_sasrec_text(dataset: str, out: Path, o: PrepareOptions) -> Path:
    """A SASRec `user item` text file. Original MovieLens ids (for titles and for matching other
    preparations) come from SASRec's id maps beside the file, `sas_to_original_items.txt` / `_users.txt`."""
    if dataset == "sasrec-text" and not o.name:
        raise ConfigError("sasrec-text needs --name NAME: the prepared folder's name (e.g. --name ml-1m-sasrec)")
    name = o.name or dataset
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) or name in (".", ".."):
        raise ConfigError(f"--name {name!r} must be a plain folder name (letters, digits, . _ -), not a path")
    if o.input_path is None:
        raise DataError(f"{dataset} needs --input PATH: a SASRec-format `user item` text file (e.g. ml-1m.txt)")
    input_path = Path(o.input_path)
    interactions = read_sasrec_text(input_path)
    item_map, user_map = input_path.parent / ITEM_MAP, input_path.parent / USER_MAP
    original_items = read_id_map(item_map) if item_map.is_file() else None
    titles_path = _find_titles(o.titles, input_path, dataset)
    titles_table = None
    if titles_path is not None:
        if original_items is None:
            if o.titles is not None:
                raise DataError(
                    f"--titles needs {item_map}: the map from SASRec item ids to MovieLens movieIds, without "
                    "which titles cannot be matched (SASRec renumbers movies)"
                )
        else:
            titles_table = _read_titles(titles_path, original_items)
    if titles_table is None:
        print(f"note: {name} has no titles (recommendations show ids); pass --titles with movies.dat/.csv and keep "
              f"{ITEM_MAP} beside --input", file=sys.stderr)  # fmt: skip
    source = {
        "kind": "sasrec-text",
        "path": str(input_path.resolve()),
        "sha256": sha256_file(input_path),
        "item_map": str(item_map) if original_items is not None else None,
        "titles": str(titles_path) if titles_table is not None else None,
    }
    return write_dataset(
        interactions, out, name, source=source, titles=titles_table, num_shards=o.num_shards,
        shard_pairs=o.shard_pairs, overwrite=o.overwrite, original_item_ids=original_items,
        original_user_ids=read_id_map(user_map) if user_map.is_file() else None, min_rating=o.min_rating,
        **o.kcore(0),
    )  # fmt: skip


def _prepare_release(dataset: str, out: Path, o: PrepareOptions) -> Path:
    from movierec.data.download import obtain_archive
    from movierec.data.sources import ReleaseFiles, read_release

    release = get_release(dataset)
    if o.input_path is not None and o.archive is not None:
        raise ConfigError("give either --input (an extracted folder) or --archive (a zip), not both")
    source = {"kind": "movielens", "release": release.name}
    if o.input_path is not None:
        files = ReleaseFiles(release, folder=o.input_path)
        ratings = files.require(release.ratings)
        source.update({"input": str(Path(o.input_path).resolve()), "ratings_sha256": sha256_file(Path(ratings))})
    else:
        path, described = obtain_archive(
            dataset, archive=o.archive, home=o.data_home, url=o.base_url, verify=o.verify, progress=o.progress
        )
        files = ReleaseFiles(release, archive=path)
        source.update(described)
    with files:
        interactions, titles = read_release(files)
    return write_dataset(
        interactions, out, dataset, source=source, titles=titles, min_rating=o.min_rating,
        num_shards=o.num_shards, shard_pairs=o.shard_pairs, overwrite=o.overwrite, **o.kcore(MOVIELENS_KCORE),
    )  # fmt: skip


def _prepare_mlperf(dataset: str, out: Path, o: PrepareOptions) -> Path:
    from movierec.data.download import data_home as resolve_home
    from movierec.data.download import obtain_archive
    from movierec.data.mlperf import extract_shards, prepare_mlperf

    if o.input_path is not None and o.archive is not None:
        raise ConfigError("give either --input (the extracted folder) or --archive (the tar), not both")
    source: dict = {}
    input_path, fraction, shards = o.input_path, o.fraction, o.shards
    if input_path is None:
        tar, source = obtain_archive(
            dataset, archive=o.archive, home=o.data_home, url=o.base_url, verify=o.verify, progress=o.progress
        )
        input_path, shards = extract_shards(tar, resolve_home(o.data_home) / dataset, fraction=fraction, shards=shards)
        fraction = None
    return prepare_mlperf(
        input_path, out, dataset, fraction=fraction, shards=shards, shard_pairs=o.shard_pairs, overwrite=o.overwrite,
        source=source, holdout=o.holdout or "leave-one-out",
    )  # fmt: skip


def _sources() -> dict[str, Source]:
    text = frozenset({"input_path", "titles", *FILTERS})
    sources = {
        "synthetic": Source(_prepare_synthetic, frozenset({"seed", *FILTERS}), "the embedded generator, no download"),
        "sasrec-text": Source(_prepare_sasrec_text, text | {"name"}, "a SASRec `user item` file (--input, --name)"),
        "ml-1m-sasrec": Source(_prepare_sasrec_text, text, "SASRec's ML-1M benchmark file (--input ml-1m.txt)"),
    }
    for name, release in RELEASES.items():
        if release.format == FORMAT_MLPERF:
            takes = frozenset({*DOWNLOADS, "fraction", "shards", "holdout"})
            sources[name] = Source(_prepare_mlperf, takes, release.description)
        else:
            sources[name] = Source(_prepare_release, frozenset({*DOWNLOADS, *FILTERS}), release.description)
    return sources


SOURCES = _sources()


def prepare(dataset: str, out: str | Path = "data", **options) -> Path:
    """Prepare `dataset` into `out/<name>` and return that folder. `options` are PrepareOptions' fields; one
    that the dataset's source does not take is a ConfigError naming its flag."""
    source = SOURCES.get(dataset)
    if source is None:
        raise DataError(f"unknown dataset {dataset!r}; known: {', '.join(SOURCES)}")
    try:
        chosen = PrepareOptions(**options)
    except TypeError as exc:
        raise ConfigError(f"prepare: {exc}") from exc
    defaults = PrepareOptions()
    unused = [FLAGS[f.name] for f in fields(PrepareOptions) if f.name not in source.takes | EVERY_SOURCE
              and getattr(chosen, f.name) != getattr(defaults, f.name)]  # fmt: skip
    if unused:
        takes = ", ".join(FLAGS[name] for name in sorted(source.takes)) or "none"
        verb = "does" if len(unused) == 1 else "do"
        raise ConfigError(f"{', '.join(unused)} {verb} not apply to {dataset} (its options: {takes})")
    if chosen.min_rating is not None and not math.isfinite(chosen.min_rating):
        raise ConfigError(f"--min-rating must be a finite number, got {chosen.min_rating}")
    if chosen.shard_pairs < 1:
        raise ConfigError(f"--shard-pairs must be positive, got {chosen.shard_pairs}")
    if chosen.num_shards is not None and chosen.num_shards < 1:
        raise ConfigError(f"--num-shards must be positive, got {chosen.num_shards}")
    return source.prepare(dataset, Path(out), chosen)
