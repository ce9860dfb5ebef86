"""Synthetic files with the published shape of MLPerf's `ml-20mx16x32`, for benchmarks and tests offline.

The real data set (MLPerf's fractal expansion of ML-20M, 1.2 B pairs) cannot be downloaded everywhere, yet
the converter and the trainer must be measured at its scale. This writes files in exactly its format:

- `trainx16x32_{k}.npz` / `testx16x32_{k}.npz` (k = 0 .. files - 1), each holding one array `arr_0` of
  shape (N, 2), int64, rows `[user, item]`; `np.savez` (uncompressed) by default, `compressed=True` writes
  `np.savez_compressed` like MLPerf's own files;
- file k holds a contiguous block of users after those of file k - 1; a user's rows are together, its
  items in increasing id order without duplicates; item ids are 0 .. items - 1 (item 0 is a real item);
- exactly one test pair per user, an item that is not among its training items;
- per-user counts: `MIN_ITEMS_PER_USER` plus a log-normal tail (sigma `COUNT_SIGMA`, about ML-20M's
  mean/median ratio), capped at half the catalog, summing exactly to the file's share of the pairs;
- item popularity: Zipf-like (exponent `ZIPF_EXPONENT`) over popularity ranks, ranks mapped to item ids by
  one permutation shared by all files. Over the 1.2 B pairs of the full shape every item is expected about
  180 times or more, so every item appears with overwhelming probability (not enforced).

There are no timestamps and no sequential structure: the files exist for scale (time, memory, I/O), not
for model quality. File k is a function of (shape, seed, k) only: its users and pair count follow from the
shape, its random numbers from `default_rng([seed, k])`, so writing one file alone gives the same bytes'
content as writing all of them. Memory is bounded by one file (the output array plus one ~4 M pair chunk).
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

TRAIN_FILE = "trainx16x32_{k}.npz"  # the names MLPerf uses (and movierec.data.mlperf reads)
TEST_FILE = "testx16x32_{k}.npz"
SIDECAR = "mlperf_synthetic.json"  # what was generated here: lets a rerun keep files that are already right
GENERATOR_VERSION = 1  # bump when the content for a given (shape, seed, k) changes

MIN_ITEMS_PER_USER = 3
COUNT_SIGMA = 1.2  # log-normal sigma: mean/median ~2.05, as ML-20M's ratings per user (144 / 68)
ZIPF_EXPONENT = 0.9
CHUNK_PAIRS = 4_000_000  # users are generated in chunks of about this many pairs (bounds temporary memory)
_POLISHED_ROUNDS = 8  # rejection rounds drawn by popularity before falling back to uniform draws


@dataclass(frozen=True)
class MlperfShape:
    """Sizes of an ml-20mx16x32-like data set; users and pairs are split over `files` deterministically."""

    users: int
    items: int
    train_pairs: int
    files: int = 16

    def __post_init__(self) -> None:
        if self.files < 1 or self.users < self.files:
            raise ValueError(f"need at least one user per file: {self.users} users, {self.files} files")
        if self.items < 2 * MIN_ITEMS_PER_USER + 2:
            raise ValueError(f"items must be at least {2 * MIN_ITEMS_PER_USER + 2}, got {self.items}")
        if not self.users * MIN_ITEMS_PER_USER <= self.train_pairs <= self.users * self.max_items_per_user:
            raise ValueError(
                f"{self.train_pairs} pairs do not fit {self.users} users with {MIN_ITEMS_PER_USER} .. "
                f"{self.max_items_per_user} items each"
            )

    @property
    def max_items_per_user(self) -> int:
        """Cap of a user's training items: half the catalog, so a test item outside them is easy to find."""
        return self.items // 2

    @property
    def mean_items_per_user(self) -> float:
        return self.train_pairs / self.users

    def user_range(self, k: int) -> tuple[int, int]:
        """Users [lo, hi) of file k: equal blocks, the first `users % files` files one user larger."""
        self._check(k)
        base, extra = divmod(self.users, self.files)
        lo = k * base + min(k, extra)
        return lo, lo + base + (k < extra)

    def pair_range(self, k: int) -> tuple[int, int]:
        """Training pairs [lo, hi) of file k in the concatenation of all files, proportional to its users."""
        self._check(k)
        lo, hi = self.user_range(k)
        return self.train_pairs * lo // self.users, self.train_pairs * hi // self.users

    def train_pairs_of(self, k: int) -> int:
        lo, hi = self.pair_range(k)
        return hi - lo

    def _check(self, k: int) -> None:
        if not 0 <= k < self.files:
            raise ValueError(f"file number {k} is not in 0 .. {self.files - 1}")


FULL_SHAPE = MlperfShape(users=2_197_225, items=855_776, train_pairs=1_223_962_043, files=16)


def scaled_shape(fraction_of_users: float, items: int = FULL_SHAPE.items) -> MlperfShape:
    """FULL_SHAPE with a fraction of its users (at least one per file) and the same mean pairs per user.

    Tiny fractions give test-sized data with the real catalog; `scaled_shape(0.25)`'s file 0 is a quarter
    of a full file. `items` lets a benchmark compare catalog sizes at equal pair counts.
    """
    if not fraction_of_users > 0:
        raise ValueError(f"fraction_of_users must be positive, got {fraction_of_users}")
    users = max(FULL_SHAPE.files, round(FULL_SHAPE.users * fraction_of_users))
    pairs = round(users * FULL_SHAPE.mean_items_per_user)
    return MlperfShape(users=users, items=items, train_pairs=pairs, files=FULL_SHAPE.files)


def _user_counts(rng: np.random.Generator, users: int, total: int, cap: int) -> np.ndarray:
    """Training items per user: MIN_ITEMS_PER_USER + a log-normal share of the rest, <= cap, sum == total."""
    if not users * MIN_ITEMS_PER_USER <= total <= users * cap:
        raise ValueError(f"{total} pairs do not fit {users} users with {MIN_ITEMS_PER_USER} .. {cap} items each")
    weights = rng.lognormal(0.0, COUNT_SIGMA, users)
    spare = total - users * MIN_ITEMS_PER_USER
    counts = MIN_ITEMS_PER_USER + np.floor(weights / weights.sum() * spare).astype(np.int64)
    np.minimum(counts, cap, out=counts)
    while (short := total - int(counts.sum())) > 0:  # rounding remainder and what the cap cut off
        room = np.flatnonzero(counts < cap)
        if short < len(room):
            counts[rng.choice(room, short, replace=False)] += 1
        else:
            counts[room] += np.bincount(rng.choice(len(room), short), minlength=len(room))
            np.minimum(counts, cap, out=counts)
    return counts


def _popular_items(rng: np.random.Generator, n: int, items: int, order: np.ndarray, uniform: bool) -> np.ndarray:
    """n item ids drawn by Zipf-like popularity (inverse CDF of a continuous power law), or uniformly."""
    if uniform:
        return rng.integers(0, items, n)
    a = 1.0 - ZIPF_EXPONENT
    top = (items + 1.0) ** a
    ranks = (1.0 + rng.random(n) * (top - 1.0)) ** (1.0 / a)
    ranks = ranks.astype(np.int64) - 1
    np.clip(ranks, 0, items - 1, out=ranks)
    return order[ranks]


def _counts_in(keys: np.ndarray, users: int, items: int) -> np.ndarray:
    """Per local user, how many of the sorted keys (local_user * items + item) it has."""
    return np.diff(np.searchsorted(keys, np.arange(users + 1, dtype=np.int64) * items))


def _sorted_unique(keys: np.ndarray) -> np.ndarray:
    """Sorted distinct values; sorts in place (numpy's np.unique hashes first, which is several times slower)."""
    keys.sort()
    if len(keys) < 2:
        return keys
    keep = np.empty(len(keys), dtype=bool)
    keep[0] = True
    np.not_equal(keys[1:], keys[:-1], out=keep[1:])
    return keys[keep]


def _chunk(rng: np.random.Generator, counts: np.ndarray, items: int, order: np.ndarray):
    """Sorted unique keys (local user * items + item) with counts[u] keys per user, and one test item each."""
    n = len(counts)
    local = np.arange(n, dtype=np.int64)
    keys = np.repeat(local * items, counts)
    keys += _popular_items(rng, len(keys), items, order, False)
    keys = _sorted_unique(keys)
    need = counts - _counts_in(keys, n, items)
    rounds = 0
    while need.any():  # redraw the duplicates; accepted draws never exceed what a user still needs
        rounds += 1
        fresh = np.repeat(local * items, need)
        fresh += _popular_items(rng, len(fresh), items, order, rounds > _POLISHED_ROUNDS)
        fresh = _sorted_unique(fresh)
        at = np.minimum(np.searchsorted(keys, fresh), len(keys) - 1)
        fresh = fresh[keys[at] != fresh]
        keys = np.sort(np.concatenate([keys, fresh]), kind="stable")  # two sorted runs: a linear merge
        need -= _counts_in(fresh, n, items)
    test = np.empty(n, dtype=np.int64)
    pending = local
    rounds = 0
    while len(pending):  # a test item the user has not in training
        rounds += 1
        draws = _popular_items(rng, len(pending), items, order, rounds > _POLISHED_ROUNDS)
        wanted = pending * items + draws
        at = np.minimum(np.searchsorted(keys, wanted), len(keys) - 1)
        ok = keys[at] != wanted
        test[pending[ok]] = draws[ok]
        pending = pending[~ok]
    return keys, test


def _item_order(seed: int, items: int) -> np.ndarray:
    """Item id of each popularity rank: one permutation per (seed, items), shared by every file."""
    return np.random.default_rng([seed, items, 0x5EED]).permutation(items).astype(np.int64)


def generate_file(shape: MlperfShape, k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) arrays of file k, each (N, 2) int64 `[user, item]`; a function of (shape, seed, k) only."""
    user_lo, user_hi = shape.user_range(k)
    users = user_hi - user_lo
    rng = np.random.default_rng([seed, k])
    counts = _user_counts(rng, users, shape.train_pairs_of(k), shape.max_items_per_user)
    order = _item_order(seed, shape.items)
    train = np.empty((int(counts.sum()), 2), dtype=np.int64)
    test = np.empty((users, 2), dtype=np.int64)
    test[:, 0] = np.arange(user_lo, user_hi)
    ends = np.cumsum(counts)
    # chunk boundaries depend on the counts only, so the random stream (and the content) is deterministic
    marks = np.arange(1, ends[-1] // CHUNK_PAIRS + 1, dtype=np.int64) * CHUNK_PAIRS
    bounds = np.unique(np.concatenate([[0], np.searchsorted(ends, marks, side="right"), [users]]))
    for a, b in itertools.pairwise(bounds.tolist()):
        keys, test_items = _chunk(rng, counts[a:b], shape.items, order)
        start = int(ends[a - 1]) if a else 0
        rows = train[start : start + len(keys)]
        np.floor_divide(keys, shape.items, out=rows[:, 0])
        rows[:, 0] += user_lo + a
        np.remainder(keys, shape.items, out=rows[:, 1])
        test[a:b, 1] = test_items
    return train, test


def _save(path: Path, array: np.ndarray, compressed: bool) -> None:
    """np.savez(_compressed) to a temporary name in the same folder, then os.replace: never a partial file."""
    part = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        with open(part, "wb") as handle:
            (np.savez_compressed if compressed else np.savez)(handle, array)
        os.replace(part, path)
    finally:
        part.unlink(missing_ok=True)


def _read_sidecar(folder: Path) -> dict:
    try:
        return json.loads((folder / SIDECAR).read_text())
    except (OSError, ValueError):
        return {}


def _write_sidecar(folder: Path, record: dict) -> None:
    part = folder / f".{SIDECAR}.{os.getpid()}.part"
    part.write_text(json.dumps(record, indent=1, sort_keys=True))
    os.replace(part, folder / SIDECAR)


def generate_mlperf_files(
    folder: str | Path,
    shape: MlperfShape = FULL_SHAPE,
    files: Sequence[int] | None = None,
    seed: int = 0,
    compressed: bool = False,
) -> list[Path]:
    """Write the chosen file pairs (default: all) into `folder`; return [train_k, test_k, ...] in order of k.

    A pair that the sidecar json records for the same (generator version, shape, seed, compressed) and whose
    sizes still match is kept, so benchmarks can cache the inputs. Files the sidecar records for another
    shape or seed are deleted, so the folder never mixes two data sets. One file in memory at a time.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chosen = list(range(shape.files)) if files is None else sorted(set(files))
    for k in chosen:
        shape.user_range(k)  # validates k before anything is written
    identity = {"generator_version": GENERATOR_VERSION, "shape": asdict(shape), "seed": seed}
    identity["compressed"] = compressed
    record = _read_sidecar(folder)
    if {key: record.get(key) for key in identity} != identity:
        for entry in record.get("files", {}).values():  # files of another data set: never mix the two
            for name in (entry.get("train"), entry.get("test")):
                if name and Path(name).name == name:
                    (folder / name).unlink(missing_ok=True)
        record = {**identity, "files": {}}
        _write_sidecar(folder, record)
    written: list[Path] = []
    for k in chosen:
        train_path, test_path = folder / TRAIN_FILE.format(k=k), folder / TEST_FILE.format(k=k)
        entry = record["files"].get(str(k))
        if not (
            entry
            and train_path.is_file()
            and test_path.is_file()
            and train_path.stat().st_size == entry["train_bytes"]
            and test_path.stat().st_size == entry["test_bytes"]
        ):
            train, test = generate_file(shape, k, seed)
            _save(train_path, train, compressed)
            _save(test_path, test, compressed)
            record["files"][str(k)] = {
                "train": train_path.name,
                "test": test_path.name,
                "users": list(shape.user_range(k)),
                "train_pairs": len(train),
                "train_bytes": train_path.stat().st_size,
                "test_bytes": test_path.stat().st_size,
            }
            del train, test
            _write_sidecar(folder, record)
        written += [train_path, test_path]
    return written


def organise(source: str | Path, dest: str | Path, train_files: Sequence[int], files: int = 16) -> Path:
    """Lay MLPerf files out as the seed pipeline's "organised" folder, hard-linked (copied across devices):
    `training/trainx16x32_K.npz` for K in `train_files` only, and every `testx16x32_K.npz` renamed
    `test_K.npz` under `validation/` (the first half of the files) or `evaluation/` (the second half)."""
    source, dest = Path(source), Path(dest)
    links = [(source / TRAIN_FILE.format(k=k), dest / "training" / TRAIN_FILE.format(k=k)) for k in train_files]
    for k in range(files):
        split = "validation" if k < files // 2 else "evaluation"
        links.append((source / TEST_FILE.format(k=k), dest / split / f"test_{k}.npz"))
    for src, dst in links:
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.unlink(missing_ok=True)
        try:
            os.link(src, dst)
        except OSError:
            shutil.copyfile(src, dst)
    return dest
