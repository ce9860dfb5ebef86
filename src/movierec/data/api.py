"""`prepare(name, ...)`: one entry point from a dataset name to a prepared dataset folder.

Names: `synthetic` (embedded generator), `ml-1m-sasrec` (SASRec's text file, `--input`), and every
MovieLens release of :mod:`movierec.data.registry`. A release is read from `--input DIR` (an extracted
folder), else `--archive PATH` (a zip you already have), else the download cache (downloading it first).
"""

from __future__ import annotations

from pathlib import Path

from movierec.data.layout import sha256_file
from movierec.data.parsers import read_id_map, read_movies_dat
from movierec.data.prepare import DEFAULT_SHARD_PAIRS, write_dataset
from movierec.data.registry import FORMAT_MLPERF, RELEASES, get_release
from movierec.data.sources import read_sasrec_text
from movierec.errors import ConfigError, DataError

MOVIELENS_KCORE = 5  # SASRec's 5-core default for MovieLens releases


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
    titles_dir: str | Path | None = None,
    seed: int = 0,
    min_rating: float | None = None,
    min_user_interactions: int | None = None,
    min_item_interactions: int | None = None,
    num_shards: int | None = None,
    shard_pairs: int = DEFAULT_SHARD_PAIRS,
    fraction: float | None = None,
    shards: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Prepare `dataset` into `out/<dataset>` and return that folder.

    `fraction` / `shards` choose input shards and apply to ml-20mx16x32 only; `num_shards` / `shard_pairs`
    set the number of output shards (default: about `shard_pairs` interactions per shard).
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
    if dataset == "ml-1m-sasrec":
        if input_path is None:
            raise DataError("ml-1m-sasrec needs --input PATH/ml-1m.txt (SASRec's preprocessed ML-1M)")
        input_path = Path(input_path)
        interactions = read_sasrec_text(input_path)
        folder = input_path.parent
        item_map = folder / "sas_to_original_items.txt"
        user_map = folder / "sas_to_original_users.txt"
        movies = Path(titles_dir) / "movies.dat" if titles_dir else folder.parent / "ml-1m" / "movies.dat"
        original_items = read_id_map(item_map) if item_map.is_file() else None
        titles = read_movies_dat(movies) if movies.is_file() and original_items is not None else None
        source = {
            "kind": "sasrec-text",
            "path": str(input_path.resolve()),
            "sha256": sha256_file(input_path),
            "item_map": str(item_map) if original_items is not None else None,
            "titles": str(movies) if titles is not None else None,
        }
        return write_dataset(
            interactions,
            out,
            dataset,
            source=source,
            titles=titles,
            min_rating=min_rating,
            **_kcore_options(min_user_interactions, min_item_interactions, 0),
            num_shards=num_shards,
            shard_pairs=shard_pairs,
            overwrite=overwrite,
            original_item_ids=original_items,
            original_user_ids=read_id_map(user_map) if user_map.is_file() else None,
        )
    if dataset in RELEASES:
        if is_mlperf:
            return _prepare_mlperf(
                dataset, out, input_path=input_path, archive=archive, data_home=data_home, base_url=base_url,
                verify=verify, fraction=fraction, shards=shards, shard_pairs=shard_pairs, overwrite=overwrite,
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
    raise DataError(f"unknown dataset {dataset!r}; known: synthetic, ml-1m-sasrec, {', '.join(RELEASES)}")


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
