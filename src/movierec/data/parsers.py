"""Readers for MovieLens file formats. Every reader returns numpy arrays or pyarrow tables, vectorised."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa

from movierec.errors import DataError


def read_id_map(path: str | Path) -> np.ndarray:
    """A `<our id> <original id>` text file as a lookup array: result[our_id] = original id (0 if absent)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"id map {path} does not exist")
    try:
        pairs = np.loadtxt(path, dtype=np.int64, ndmin=2)
    except ValueError as exc:
        raise DataError(f"{path} is not a two-column integer id map: {exc}") from exc
    lookup = np.zeros(int(pairs[:, 0].max()) + 1, dtype=np.int64)
    lookup[pairs[:, 0]] = pairs[:, 1]
    return lookup


def read_movies_dat(path: str | Path) -> pa.Table:
    """ML-1M / ML-10M `movies.dat`: `MovieID::Title::Genres`, ISO-8859-1 (ML-10M: UTF-8)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"titles file {path} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    ids, titles, genres = [], [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("::")
        if len(parts) != 3:
            raise DataError(f"{path}:{number}: expected `MovieID::Title::Genres`, got {line[:80]!r}")
        ids.append(int(parts[0]))
        titles.append(parts[1])
        genres.append(parts[2])
    return pa.table({"movie_id": pa.array(ids, pa.int64()), "title": titles, "genres": genres})
