"""Readers for MovieLens file formats. Every reader returns numpy arrays or pyarrow tables, vectorised.

Ratings are parsed by pyarrow's multithreaded CSV reader, never row by row in Python:

- ML-100K `u.data`: `user<TAB>item<TAB>rating<TAB>timestamp`, no header.
- ML-1M / ML-10M `ratings.dat`: `UserID::MovieID::Rating::Timestamp`. Read with `:` as the delimiter, so
  every `::` yields an empty column in between, which is skipped (no copy of the file, no text replace).
- ML-20M / ML-25M / ml-latest `ratings.csv`: header `userId,movieId,rating,timestamp`.

Every reader takes a path or a binary file object (e.g. a member of a zip archive, read while it is
decompressed) and a display name used in error messages.
"""

from __future__ import annotations

from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from movierec.data.split import Interactions
from movierec.errors import DataError

Source = str | Path | BinaryIO

# ML-100K's 19 genre flags, in the order of u.item's columns (and of u.genre).
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip

_RATING_TYPES = {"user": pa.int32(), "item": pa.int32(), "rating": pa.float32(), "timestamp": pa.int64()}
_BLOCK = 16 << 20


def _display(source: Source, name: str | None) -> str:
    if name:
        return name
    return str(source) if isinstance(source, str | Path) else getattr(source, "name", "<stream>")


def _check_path(source: Source, what: str) -> None:
    if isinstance(source, str | Path) and not Path(source).is_file():
        raise DataError(f"{what} {source} does not exist")


def _read_csv(source: Source, name: str, expected: str, **options) -> pa.Table:
    try:
        return pacsv.read_csv(source, **options)
    except (pa.ArrowException, UnicodeDecodeError, OSError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"{name} is not in the expected format ({expected}): {message}") from exc


def _to_interactions(table: pa.Table, name: str) -> Interactions:
    for column in ("user", "item", "rating", "timestamp"):
        if table[column].null_count:
            raise DataError(f"{name}: the {column} column has {table[column].null_count} empty values")
    if len(table) == 0:
        raise DataError(f"{name} holds no ratings")
    users = table["user"].to_numpy()
    items = table["item"].to_numpy()
    if users.min() < 0 or items.min() < 0:
        raise DataError(f"{name}: negative user or movie ids")
    return Interactions(
        users=users,
        items=items,
        timestamps=table["timestamp"].to_numpy(),
        ratings=table["rating"].to_numpy(),
    )


def read_u_data(source: Source, name: str | None = None) -> Interactions:
    """ML-100K `u.data`: tab-separated `user item rating timestamp`, no header."""
    _check_path(source, "ratings file")
    name = _display(source, name)
    table = _read_csv(
        source,
        name,
        "tab-separated `user item rating timestamp`",
        read_options=pacsv.ReadOptions(column_names=list(_RATING_TYPES), block_size=_BLOCK),
        parse_options=pacsv.ParseOptions(delimiter="\t", quote_char=False),
        convert_options=pacsv.ConvertOptions(column_types=_RATING_TYPES),
    )
    return _to_interactions(table, name)


def read_ratings_dat(source: Source, name: str | None = None) -> Interactions:
    """ML-1M / ML-10M `ratings.dat`: `UserID::MovieID::Rating::Timestamp`, no header."""
    _check_path(source, "ratings file")
    name = _display(source, name)
    columns = ["user", "_1", "item", "_2", "rating", "_3", "timestamp"]
    table = _read_csv(
        source,
        name,
        "`UserID::MovieID::Rating::Timestamp` per line",
        read_options=pacsv.ReadOptions(column_names=columns, block_size=_BLOCK),
        parse_options=pacsv.ParseOptions(delimiter=":", quote_char=False),
        convert_options=pacsv.ConvertOptions(
            column_types={**_RATING_TYPES, "_1": pa.string(), "_2": pa.string(), "_3": pa.string()},
            include_columns=columns,
        ),
    )
    for gap in ("_1", "_2", "_3"):
        if pc.any(pc.not_equal(pc.utf8_length(table[gap]), 0)).as_py():
            raise DataError(f"{name} is not in the expected format: fields must be separated by `::`")
    return _to_interactions(table.select(list(_RATING_TYPES)), name)


def read_ratings_csv(source: Source, name: str | None = None) -> Interactions:
    """ML-20M / ML-25M / ml-latest `ratings.csv`: header `userId,movieId,rating,timestamp`."""
    _check_path(source, "ratings file")
    name = _display(source, name)
    header = {"userId": "user", "movieId": "item", "rating": "rating", "timestamp": "timestamp"}
    table = _read_csv(
        source,
        name,
        "CSV with header `userId,movieId,rating,timestamp`",
        read_options=pacsv.ReadOptions(block_size=_BLOCK),
        convert_options=pacsv.ConvertOptions(
            column_types={k: _RATING_TYPES[v] for k, v in header.items()}, include_columns=list(header)
        ),
    )
    return _to_interactions(table.rename_columns([header[c] for c in table.column_names]), name)


def _decode(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


def _read_bytes(source: Source, what: str) -> bytes:
    if isinstance(source, str | Path):
        _check_path(source, what)
        return Path(source).read_bytes()
    return source.read()


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


def read_movies_dat(source: Source, name: str | None = None) -> pa.Table:
    """ML-1M / ML-10M `movies.dat`: `MovieID::Title::Genres`, ISO-8859-1 (ML-10M: UTF-8).

    Titles may contain `:` (but never `::`), so this small catalogue is split line by line.
    """
    name = _display(source, name)
    text = _decode(_read_bytes(source, "titles file"))
    ids, titles, genres = [], [], []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("::")
        if len(parts) != 3 or not parts[0].strip().isdigit():
            raise DataError(f"{name}:{number}: expected `MovieID::Title::Genres`, got {line[:80]!r}")
        ids.append(int(parts[0]))
        titles.append(parts[1])
        genres.append(parts[2])
    return pa.table({"movie_id": pa.array(ids, pa.int64()), "title": titles, "genres": genres})


def read_movies_csv(source: Source, name: str | None = None) -> pa.Table:
    """ML-20M / ML-25M / ml-latest `movies.csv`: `movieId,title,genres`, quoted CSV, UTF-8."""
    name = _display(source, name)
    raw = _read_bytes(source, "titles file")
    encoding = "utf8"
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        encoding = "latin1"
    table = _read_csv(
        pa.BufferReader(raw),
        name,
        "CSV with header `movieId,title,genres`",
        read_options=pacsv.ReadOptions(encoding=encoding),
        convert_options=pacsv.ConvertOptions(
            column_types={"movieId": pa.int64(), "title": pa.string(), "genres": pa.string()},
            include_columns=["movieId", "title", "genres"],
        ),
    )
    return table.rename_columns(["movie_id", "title", "genres"])


def read_u_item(source: Source, name: str | None = None, genre_names: tuple[str, ...] = ML100K_GENRES) -> pa.Table:
    """ML-100K `u.item`: `id|title|release date|video release date|IMDb URL|19 genre flags`, latin-1.

    The genre flags become one `|`-joined string as in later releases (`Action|Comedy`).
    """
    name = _display(source, name)
    raw = _read_bytes(source, "titles file")
    flags = [f"g{k}" for k in range(len(genre_names))]
    columns = ["movie_id", "title", "release_date", "video_release_date", "url", *flags]
    table = _read_csv(
        pa.BufferReader(raw),
        name,
        f"`|`-separated id|title|release date|video date|URL|{len(genre_names)} genre flags",
        read_options=pacsv.ReadOptions(column_names=columns, encoding="latin1"),
        parse_options=pacsv.ParseOptions(delimiter="|", quote_char=False),
        convert_options=pacsv.ConvertOptions(
            column_types={"movie_id": pa.int64(), "title": pa.string(), "release_date": pa.string(),
                          **{f: pa.int8() for f in flags}},
            include_columns=["movie_id", "title", "release_date", *flags],
        ),
    )  # fmt: skip
    # "Name|" where the flag is set, "" where not; concatenated, then the last "|" trimmed. (Joining nulls
    # with null_handling="skip" would be shorter, but pyarrow drops rows where every value is null.)
    named = [pc.if_else(pc.equal(table[f], 1), pa.scalar(f"{g}|"), pa.scalar("")) for f, g in
             zip(flags, genre_names, strict=True)]  # fmt: skip
    genres = pc.utf8_rtrim(pc.binary_join_element_wise(*named, ""), "|")
    title_year = pc.struct_field(pc.extract_regex(table["title"], r"\((?P<y>\d{4})\)\s*$"), "y")
    date_year = pc.utf8_slice_codeunits(table["release_date"], -4)
    date_year = pc.if_else(pc.equal(date_year, ""), pa.scalar(None, pa.string()), date_year)
    year = pc.cast(pc.coalesce(title_year, date_year), pa.int32())
    return pa.table({"movie_id": table["movie_id"], "title": table["title"], "year": year, "genres": genres})


def read_u_genre(source: Source) -> tuple[str, ...]:
    """ML-100K `u.genre`: `name|index` lines; returns the names in index order."""
    text = _decode(_read_bytes(source, "genre file"))
    pairs = [line.rsplit("|", 1) for line in text.splitlines() if line.strip()]
    try:
        return tuple(n for n, _ in sorted(pairs, key=lambda p: int(p[1])))
    except (ValueError, IndexError) as exc:
        raise DataError(f"{_display(source, None)}: expected `name|index` lines") from exc
