"""Turn a named source (synthetic, a SASRec text file, ...) into a prepared dataset folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from movierec.data.layout import sha256_file
from movierec.data.prepare import Interactions, write_dataset
from movierec.errors import DataError


def read_sasrec_text(path: str | Path) -> Interactions:
    """SASRec/SSE-PT text format: `user item` per line, each user's lines in time order.

    The line number serves as the timestamp, so the published split (train = all but the last two
    items, valid = second-to-last, test = last) is reproduced exactly.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"input file {path} does not exist; pass the SASRec-format text file with --input")
    try:
        table = pacsv.read_csv(
            path,
            read_options=pacsv.ReadOptions(column_names=["user", "item"]),
            parse_options=pacsv.ParseOptions(delimiter=" "),
            convert_options=pacsv.ConvertOptions(column_types={"user": pa.int64(), "item": pa.int64()}),
        )
    except (pa.ArrowInvalid, UnicodeDecodeError) as exc:
        raise DataError(f"{path} is not in SASRec's `user item` text format: {exc}") from exc
    users = table["user"].to_numpy()
    items = table["item"].to_numpy()
    if len(users) and (users.min() < 1 or items.min() < 1):
        raise DataError(f"{path}: SASRec ids start at 1, found an id below 1")
    return Interactions(users=users, items=items, timestamps=np.arange(len(users), dtype=np.int64))


def prepare_synthetic(out: str | Path, seed: int = 0, overwrite: bool = False, num_shards: int = 4) -> Path:
    from movierec.data.synthetic import generate_synthetic

    interactions, titles = generate_synthetic(seed=seed)
    return write_dataset(
        interactions, out, "synthetic", source={"kind": "synthetic", "seed": seed}, titles=titles,
        num_shards=num_shards, overwrite=overwrite,
    )


def prepare_sasrec_text(
    input_path: str | Path, out: str | Path, name: str = "ml-1m-sasrec", titles: pa.Table | None = None,
    overwrite: bool = False, **options,
) -> Path:
    """Prepare a SASRec text file. It is already filtered and 1-based, so no k-core by default."""
    interactions = read_sasrec_text(input_path)
    options.setdefault("min_user_interactions", 0)
    options.setdefault("min_item_interactions", 0)
    source = {"kind": "sasrec-text", "path": str(Path(input_path).resolve()), "sha256": sha256_file(Path(input_path))}
    return write_dataset(interactions, out, name, source=source, titles=titles, overwrite=overwrite, **options)
