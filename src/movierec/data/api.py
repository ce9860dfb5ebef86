"""`prepare(name, ...)`: one entry point from a dataset name to a prepared dataset folder."""

from __future__ import annotations

from pathlib import Path

from movierec.data.layout import sha256_file
from movierec.data.parsers import read_id_map, read_movies_dat
from movierec.data.prepare import write_dataset
from movierec.data.sources import read_sasrec_text
from movierec.errors import DataError


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
    titles_dir: str | Path | None = None,
    seed: int = 0,
    min_rating: float | None = None,
    min_user_interactions: int | None = None,
    min_item_interactions: int | None = None,
    num_shards: int | None = None,
    overwrite: bool = False,
) -> Path:
    """Prepare `dataset` into `out/<dataset>` and return that folder."""
    if dataset == "synthetic":
        from movierec.data.synthetic import generate_synthetic

        interactions, titles = generate_synthetic(seed=seed)
        return write_dataset(
            interactions, out, "synthetic", source={"kind": "synthetic", "seed": seed}, titles=titles,
            min_rating=min_rating, **_kcore_options(min_user_interactions, min_item_interactions, 5),
            num_shards=num_shards or 4, overwrite=overwrite,
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
            interactions, out, dataset, source=source, titles=titles, min_rating=min_rating,
            **_kcore_options(min_user_interactions, min_item_interactions, 0),
            num_shards=num_shards, overwrite=overwrite,
            original_item_ids=original_items,
            original_user_ids=read_id_map(user_map) if user_map.is_file() else None,
        )
    raise DataError(f"unknown dataset {dataset!r}; known: synthetic, ml-1m-sasrec")
