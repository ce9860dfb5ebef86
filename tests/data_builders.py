"""Tiny MovieLens-shaped files and archives for the data tests (no real data, nothing downloaded)."""

from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import numpy as np

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
# a model and run small enough to train in seconds: the base overrides of the training tests, each adding its own
TINY_RUN = [
    "model.max_len=20", "model.d_item=16", "model.d_user=8", "eval.patience_steps=100000",
    "tracking.log_model=false", "tracking.system_metrics=false",
]  # fmt: skip


def ratings(num_users: int = 12, per_user: int = 8, num_items: int = 10, seed: int = 0) -> np.ndarray:
    """(N, 4) int64 rows [user, item, rating, timestamp]; users 1-based, each rates distinct items."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(1, num_users + 1):
        items = rng.choice(np.arange(1, num_items + 1), size=per_user, replace=False)
        times = 880_000_000 + np.sort(rng.integers(0, 10_000_000, per_user))
        stars = rng.integers(1, 6, per_user)
        rows.extend([user, item, star, t] for item, star, t in zip(items, stars, times, strict=True))
    return np.asarray(rows, dtype=np.int64)


def u_data(rows: np.ndarray) -> bytes:
    return "".join(f"{u}\t{i}\t{r}\t{t}\n" for u, i, r, t in rows).encode()


def u_item(num_items: int) -> bytes:
    lines = []
    for item in range(1, num_items + 1):
        flags = ["0"] * 19
        flags[1 + item % 18] = "1"
        flags[5] = "1" if item % 2 else "0"
        title = f"Caf\xe9 {item} ({1990 + item % 10})"
        lines.append(f"{item}|{title}|01-Jan-{1990 + item % 10}||http://example.invalid/{item}|{'|'.join(flags)}\n")
    return "".join(lines).encode("latin-1")


def u_genre() -> bytes:
    names = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
             "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller",
             "War", "Western"]  # fmt: skip
    return "".join(f"{n}|{k}\n" for k, n in enumerate(names)).encode() + b"\n"


def ratings_dat(rows: np.ndarray, rating_format: str = "{:d}") -> bytes:
    return "".join(f"{u}::{i}::{rating_format.format(r)}::{t}\n" for u, i, r, t in rows).encode()


def movies_dat(num_items: int, encoding: str = "latin-1") -> bytes:
    return "".join(
        f"{i}::Movie: the sequel {i} \xe9 ({1990 + i % 10})::Comedy|Drama\n" for i in range(1, num_items + 1)
    ).encode(encoding)


def ratings_csv(rows: np.ndarray) -> bytes:
    body = "".join(f"{u},{i},{r / 2:.1f},{t}\n" for u, i, r, t in rows)
    return ("userId,movieId,rating,timestamp\n" + body).encode()


def movies_csv(num_items: int) -> bytes:
    lines = ["movieId,title,genres"]
    for i in range(1, num_items + 1):
        lines.append(f'{i},"American President, The {i} ({1990 + i % 10})",Comedy|Drama|Romance')
    return ("\n".join(lines) + "\n").encode("utf-8")


def release_members(name: str, rows: np.ndarray, num_items: int) -> dict[str, bytes]:
    """The files of release `name` at their place inside GroupLens's archive."""
    if name == "ml-100k":
        return {"ml-100k/u.data": u_data(rows), "ml-100k/u.item": u_item(num_items),
                "ml-100k/u.genre": u_genre(), "ml-100k/README": b"test\n"}  # fmt: skip
    if name == "ml-1m":
        return {"ml-1m/ratings.dat": ratings_dat(rows), "ml-1m/movies.dat": movies_dat(num_items)}
    if name == "ml-10m":
        return {"ml-10M100K/ratings.dat": ratings_dat(rows, "{:d}.5"),
                "ml-10M100K/movies.dat": movies_dat(num_items, "utf-8")}  # fmt: skip
    root = name
    return {f"{root}/ratings.csv": ratings_csv(rows), f"{root}/movies.csv": movies_csv(num_items),
            f"{root}/links.csv": b"movieId,imdbId,tmdbId\n"}  # fmt: skip


def make_zip(members: dict[str, bytes], folders: bool = True) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        if folders:
            for folder in sorted({m.split("/")[0] + "/" for m in members if "/" in m}):
                archive.writestr(zipfile.ZipInfo(folder), "")
        for member, data in members.items():
            archive.writestr(member, data)
    return buffer.getvalue()


def md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


# per file: {mlperf user: (training items in id order, test item)}; item 0 is a real item
MLPERF_FILES = [
    {0: ([0, 3, 5], 7), 1: ([1, 2], 0), 2: ([4], 6), 3: ([0, 1, 2, 3, 4], 9)},
    {4: ([2, 8], 1), 5: ([0, 5, 6, 7], 3)},
    {6: ([1, 9, 11], 2), 7: ([3], 4), 8: ([0, 2], 5)},
]


def write_mlperf_files(folder, files=MLPERF_FILES):
    """Tiny files in exactly MLPerf's format (savez_compressed arr_0, int64), one per block of MLPERF_FILES."""
    folder.mkdir(parents=True, exist_ok=True)
    for k, users in enumerate(files):
        train = [[u, i] for u, (items, _) in users.items() for i in items]
        test = [[u, t] for u, (_, t) in users.items()]
        np.savez_compressed(folder / f"trainx16x32_{k}.npz", np.asarray(train, dtype=np.int64))
        np.savez_compressed(folder / f"testx16x32_{k}.npz", np.asarray(test, dtype=np.int64))
    return folder
