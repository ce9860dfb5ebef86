"""`prepare(name, ...)`: one entry point from a dataset name to a prepared dataset folder.

Names: `synthetic` (embedded generator), `ml-1m-sasrec` (SASRec's text file, `--input`), and every
MovieLens release of :mod:`movierec.data.registry`. A release is read from `--input DIR` (an extracted
folder), else `--archive PATH` (a zip you already have), else the download cache (downloading it first).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pyarrow as pa

from movierec.data.layout import sha256_file
from movierec.data.parsers import read_id_map, read_movies_csv, read_movies_dat
from movierec.data.prepare import DEFAULT_SHARD_PAIRS, write_dataset
from movierec.data.registry import FORMAT_MLPERF, RELEASES, get_release
from movierec.data.sources import read_sasrec_text
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


def _prepare_sasrec_text(
    dataset: str, out: str | Path, *, input_path, name, titles, num_shards, shard_pairs, overwrite, **options
) -> Path:
    """A SASRec `user item` text file. Original MovieLens ids (for titles and for matching other
    preparations) come from SASRec's id maps beside the file, `sas_to_original_items.txt` / `_users.txt`."""
    if dataset == "sasrec-text" and not name:
        raise ConfigError("sasrec-text needs --name NAME: the prepared folder's name (e.g. --name ml-1m-sasrec)")
    name = name or dataset
    if input_path is None:
        raise DataError(f"{dataset} needs --input PATH: a SASRec-format `user item` text file (e.g. ml-1m.txt)")
    input_path = Path(input_path)
    interactions = read_sasrec_text(input_path)
    item_map, user_map = input_path.parent / ITEM_MAP, input_path.parent / USER_MAP
    original_items = read_id_map(item_map) if item_map.is_file() else None
    titles_path = _find_titles(titles, input_path, dataset)
    titles_table = None
    if titles_path is not None:
        if original_items is None:
            if titles is not None:
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
        interactions, out, name, source=source, titles=titles_table, num_shards=num_shards, shard_pairs=shard_pairs,
        overwrite=overwrite, original_item_ids=original_items,
        original_user_ids=read_id_map(user_map) if user_map.is_file() else None, **options,
    )  # fmt: skip


def _kcore_options(min_user: int | None, min_item: int | None, default: int) -> dict:
    return {
        "min_user_interactions": default if min_user is None else min_user,
        "min_item_interactions": default if min_item is None else min_item,
    }


def prepare(
    dataset: str,
    out: str | Path = "data",
    *,
    input_path: str | Path | None = None,
    archive: str | Path | None = None,
    data_home: str | Path | None = None,
    base_url: str | None = None,
    verify: bool = True,
    titles: str | Path | None = None,
    name: str | None = None,
    seed: int = 0,
    min_rating: float | None = None,
    min_user_interactions: int | None = None,
    min_item_interactions: int | None = None,
    num_shards: int | None = None,
    shard_pairs: int = DEFAULT_SHARD_PAIRS,
    fraction: float | None = None,
    shards: str | None = None,
    holdout: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Prepare `dataset` into `out/<dataset>` and return that folder.

    `fraction` / `shards` choose input shards and `holdout` how validation and evaluation are held out
    (leave-one-out or by-file); they apply to ml-20mx16x32 only. `num_shards` / `shard_pairs` set the number
    of output shards (default: about `shard_pairs` interactions per shard).
    """
    if shard_pairs < 1:
        raise ConfigError(f"--shard-pairs must be positive, got {shard_pairs}")
    if num_shards is not None and num_shards < 1:
        raise ConfigError(f"--num-shards must be positive, got {num_shards}")
    is_mlperf = dataset in RELEASES and RELEASES[dataset].format == FORMAT_MLPERF
    if (fraction is not None or shards is not None) and not is_mlperf:
        raise ConfigError(
            "--fraction/--shards in `prepare` choose input shards of ml-20mx16x32 only; for other datasets pass "
            "them where the prepared data is read (training, evaluation)"
        )
    if holdout is not None and not is_mlperf:
        raise ConfigError("--holdout applies to ml-20mx16x32; other datasets hold out each user's last items")
    if name is not None and dataset != "sasrec-text":
        raise ConfigError(f"--name names a `sasrec-text` dataset; {dataset!r} has its own name")
    if (archive is not None or data_home is not None or base_url is not None) and dataset not in RELEASES:
        raise ConfigError(f"--archive/--data-home/--base-url apply to MovieLens releases, not to {dataset!r}")
    if dataset == "synthetic":
        from movierec.data.synthetic import generate_synthetic

        interactions, titles = generate_synthetic(seed=seed)
        return write_dataset(
            interactions,
            out,
            "synthetic",
            source={"kind": "synthetic", "seed": seed},
            titles=titles,
            min_rating=min_rating,
            **_kcore_options(min_user_interactions, min_item_interactions, 5),
            num_shards=num_shards or 4,
            shard_pairs=shard_pairs,
            overwrite=overwrite,
        )
    if dataset in SASREC_TEXT:
        return _prepare_sasrec_text(
            dataset, out, input_path=input_path, name=name, titles=titles, min_rating=min_rating,
            num_shards=num_shards, shard_pairs=shard_pairs, overwrite=overwrite,
            **_kcore_options(min_user_interactions, min_item_interactions, 0),
        )  # fmt: skip
    if dataset in RELEASES:
        if is_mlperf:
            return _prepare_mlperf(
                dataset, out, input_path=input_path, archive=archive, data_home=data_home, base_url=base_url,
                verify=verify, fraction=fraction, shards=shards, shard_pairs=shard_pairs, overwrite=overwrite,
                holdout=holdout or "leave-one-out",
                progress=progress, num_shards=num_shards,
                ignored={"--min-rating": min_rating, "--min-user-interactions": min_user_interactions,
                         "--min-item-interactions": min_item_interactions},
            )  # fmt: skip
        return _prepare_release(
            dataset, out, input_path=input_path, archive=archive, data_home=data_home, base_url=base_url,
            verify=verify, min_rating=min_rating, num_shards=num_shards, shard_pairs=shard_pairs,
            overwrite=overwrite, progress=progress,
            **_kcore_options(min_user_interactions, min_item_interactions, MOVIELENS_KCORE),
        )  # fmt: skip
    raise DataError(f"unknown dataset {dataset!r}; known: synthetic, {', '.join(SASREC_TEXT)}, {', '.join(RELEASES)}")


def _prepare_release(
    dataset: str,
    out: str | Path,
    *,
    input_path,
    archive,
    data_home,
    base_url,
    verify: bool,
    progress: bool,
    **options,
) -> Path:
    from movierec.data.download import obtain_archive
    from movierec.data.sources import ReleaseFiles, read_release

    release = get_release(dataset)
    if input_path is not None and archive is not None:
        raise ConfigError("give either --input (an extracted folder) or --archive (a zip), not both")
    source = {"kind": "movielens", "release": release.name}
    if input_path is not None:
        files = ReleaseFiles(release, folder=input_path)
        ratings = files.require(release.ratings)
        source.update({"input": str(Path(input_path).resolve()), "ratings_sha256": sha256_file(Path(ratings))})
    else:
        path, described = obtain_archive(
            dataset, archive=archive, home=data_home, url=base_url, verify=verify, progress=progress
        )
        files = ReleaseFiles(release, archive=path)
        source.update(described)
    with files:
        interactions, titles = read_release(files)
    return write_dataset(interactions, out, dataset, source=source, titles=titles, **options)


def _prepare_mlperf(
    dataset: str,
    out: str | Path,
    *,
    input_path,
    archive,
    data_home,
    base_url,
    verify: bool,
    progress: bool,
    num_shards: int | None,
    ignored: dict,
    **options,
) -> Path:
    from movierec.data.download import data_home as resolve_home
    from movierec.data.download import obtain_archive
    from movierec.data.mlperf import extract_shards, prepare_mlperf

    given = [flag for flag, value in ignored.items() if value is not None]
    if given or num_shards is not None:
        raise ConfigError(
            f"{', '.join(given + (['--num-shards'] if num_shards is not None else []))} do not apply to "
            "ml-20mx16x32: it is converted as it is (output shards follow --shard-pairs)"
        )
    if input_path is not None and archive is not None:
        raise ConfigError("give either --input (the extracted folder) or --archive (the tar), not both")
    source: dict = {}
    if input_path is None:
        tar, source = obtain_archive(
            dataset, archive=archive, home=data_home, url=base_url, verify=verify, progress=progress
        )
        input_path, chosen = extract_shards(
            tar, resolve_home(data_home) / dataset, fraction=options.pop("fraction"), shards=options.pop("shards")
        )
        options["shards"] = chosen
    return prepare_mlperf(input_path, out, dataset, source=source, **options)
