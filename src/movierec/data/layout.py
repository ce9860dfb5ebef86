"""The on-disk layout of a prepared dataset: writing it atomically and reading it back with validation.

A prepared dataset is a folder::

    <name>/
      meta.json             format version, source, options, counts, shard list with per-file sha256
      items.parquet         item (our id) -> movie_id (original), title, year, genres
      users.parquet         user (our id) -> user_id (original)
      training/part-K.npz   `pairs` (N, 2) int32 [user, item] in per-user time order, `timestamps` (N,)
      validation/part-K.npz one pair per evaluated user
      evaluation/part-K.npz one pair per evaluated user

Ids are contiguous from 1 (0 is padding). Shard K of every split covers the same user range, so that a
fraction of the shards trains and evaluates exactly the same users.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from movierec.data.mapped import ConcatenatedColumn, map_npz_member
from movierec.errors import DataError
from movierec.files import shared_mode

FORMAT_VERSION = 1
SPLITS = ("training", "validation", "evaluation")
META_FILE = "meta.json"
MAX_IDS = 2**31 - 1  # user and item ids are stored as int32 in the shards
ITEMS_FILE = "items.parquet"
USERS_FILE = "users.parquet"
LEASE = ".writer.lock"  # in a writer's temporary folder, flock'ed while the writer lives
LEFT_OVER_AFTER_S = 60


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class ShardWriter:
    """Writes a dataset into a hidden temporary folder and moves it into place only when complete.

    A crash at any point leaves the temporary folder behind (ignored by readers, removed by the next
    prepare), never a folder that looks like a finished dataset. A writer holds an flock on `LEASE` inside its
    temporary folder until it is done, so a concurrent prepare of the same dataset removes only the folders
    of writers that are gone (the kernel releases a killed writer's lock), never a live one's; two
    concurrent prepares both finish, and the one that finishes last is the dataset.
    """

    out_dir: Path
    name: str
    overwrite: bool = False
    shards: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.out_dir = Path(self.out_dir)
        self.final_dir = self.out_dir / self.name
        if self.final_dir.exists() and not self.overwrite:
            raise DataError(f"{self.final_dir} already exists; pass --overwrite to replace it or choose another --out")
        self.out_dir.mkdir(parents=True, exist_ok=True)
        for stale in self.out_dir.glob(f".{self.name}.tmp-*"):
            if _is_left_over(stale):
                shutil.rmtree(stale, ignore_errors=True)
        self.tmp_dir = Path(tempfile.mkdtemp(prefix=f".{self.name}.tmp-", dir=self.out_dir))
        self._lease = open(self.tmp_dir / LEASE, "w")  # noqa: SIM115 (held until finish or abort)
        fcntl.flock(self._lease, fcntl.LOCK_EX)
        os.chmod(self.tmp_dir, shared_mode(directory=True))  # the finished folder is renamed from this one
        for split in SPLITS:
            (self.tmp_dir / split).mkdir()

    def add_shard(
        self,
        user_range: tuple[int, int],
        splits: dict[str, tuple[np.ndarray, np.ndarray | None]],
    ) -> None:
        """Write shard number len(self.shards): per split a (N, 2) pair array and optional timestamps."""
        index = len(self.shards)
        files = {}
        for split in SPLITS:
            pairs, timestamps = splits[split]
            rel = f"{split}/part-{index:05d}.npz"
            arrays = {"pairs": np.ascontiguousarray(pairs, dtype=np.int32)}
            if timestamps is not None:
                arrays["timestamps"] = np.ascontiguousarray(timestamps, dtype=np.int64)
            with open(self.tmp_dir / rel, "wb") as handle:
                np.savez(handle, **arrays)
            files[split] = {"path": rel, "pairs": len(pairs), "sha256": sha256_file(self.tmp_dir / rel)}
        self.shards.append({"index": index, "users": [int(user_range[0]), int(user_range[1])], "files": files})

    def finish(self, meta: dict, items: pa.Table, users: pa.Table) -> Path:
        """Write tables and meta.json, then atomically move the folder into place."""
        pq.write_table(items, self.tmp_dir / ITEMS_FILE)
        pq.write_table(users, self.tmp_dir / USERS_FILE)
        meta = {"format_version": FORMAT_VERSION, **meta, "shards": self.shards}
        meta["files_sha256"] = {name: sha256_file(self.tmp_dir / name) for name in (ITEMS_FILE, USERS_FILE)}
        (self.tmp_dir / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        (self.tmp_dir / LEASE).unlink()  # the held descriptor keeps the lock until the folder is in place
        if self.final_dir.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{self.name}.old-", dir=self.out_dir))
            os.replace(self.final_dir, trash / self.name)
            os.replace(self.tmp_dir, self.final_dir)
            shutil.rmtree(trash, ignore_errors=True)
        else:
            os.replace(self.tmp_dir, self.final_dir)
        self._lease.close()
        return self.final_dir

    def abort(self) -> None:
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        self._lease.close()


def _is_left_over(tmp: Path) -> bool:
    """Whether a writer's temporary folder belongs to no live writer: its lease is not locked, or it has no
    lease (an older writer's, or one finishing this instant) and has not changed for LEFT_OVER_AFTER_S."""
    try:
        handle = open(tmp / LEASE)  # noqa: SIM115 (closed below)
    except FileNotFoundError:
        try:
            return time.time() - tmp.stat().st_mtime > LEFT_OVER_AFTER_S
        except FileNotFoundError:
            return False
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


def read_meta(path: str | Path) -> dict:
    """Read and check meta.json of a prepared dataset folder."""
    root = Path(path)
    meta_path = root / META_FILE
    if not root.is_dir():
        raise DataError(
            f"dataset folder {root} does not exist; run `movierec prepare --dataset NAME --out DIR` and pass DIR/NAME"
        )
    if not meta_path.is_file():
        hint = ""
        candidates = sorted(p.parent.name for p in root.glob(f"*/{META_FILE}"))
        if candidates:
            hint = f" (it contains prepared datasets: {', '.join(candidates)}; pass one of those folders)"
        raise DataError(f"{root} is not a prepared dataset: {META_FILE} is missing{hint}")
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{meta_path} is not valid JSON ({exc}); re-run `movierec prepare`") from exc
    version = meta.get("format_version") if isinstance(meta, dict) else None
    if version != FORMAT_VERSION:
        raise DataError(
            f"{meta_path} has format version {version!r}, this movierec reads version {FORMAT_VERSION}; "
            "re-run `movierec prepare` with this version"
        )
    for key in ("name", "num_users", "num_items", "shards"):
        if key not in meta:
            raise DataError(f"{meta_path} lacks the field {key!r}; re-run `movierec prepare`")
    _check_types(meta, meta_path)
    _check_counts(meta, meta_path)
    return meta


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_types(meta: dict, meta_path: Path) -> None:
    """Each field meta.json's readers use has the type they expect: an edited file is one line here, not a
    TypeError in `info`, `train` or `serve`."""
    fix = "re-run `movierec prepare` (do not edit meta.json)"
    problems = []
    if not isinstance(meta["name"], str):
        problems.append("name is not text")
    for key in ("source", "options", "files_sha256"):
        if key in meta and not isinstance(meta[key], dict):
            problems.append(f"{key} is not a mapping")
    for key in ("num_interactions", "num_evaluated_users"):
        if key in meta and not _is_count(meta[key]):
            problems.append(f"{key} is not a count")
    counts = meta.get("split_counts", {})
    if not isinstance(counts, dict) or not all(_is_count(counts.get(split)) for split in SPLITS):
        problems.append("split_counts is not a count per split")
    if (isinstance(meta["num_users"], int) and meta["num_users"] > MAX_IDS) or (isinstance(
        meta["num_items"], int) and meta["num_items"] > MAX_IDS):  # fmt: skip
        problems.append(f"num_users or num_items is over {MAX_IDS:,}")
    for index, shard in enumerate(meta["shards"] if isinstance(meta["shards"], list) else []):
        files = shard.get("files") if isinstance(shard, dict) else None
        entries = [files.get(split) for split in SPLITS] if isinstance(files, dict) else []
        if not all(isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("sha256"), str)
                   and _is_count(e.get("pairs")) for e in entries) or len(entries) != len(SPLITS):  # fmt: skip
            problems.append(f"shard {index} does not list a path, sha256 and pair count per split")
            break
    if problems:
        raise DataError(f"{meta_path} is damaged: {problems[0]}; {fix}")


def _check_counts(meta: dict, meta_path: Path) -> None:
    """meta.json's counts must agree with its own shard list: an edited or damaged file is caught here, on
    one line, instead of as an index error deep inside training or serving."""
    problem = f"{meta_path} is inconsistent"
    fix = "re-run `movierec prepare` (do not edit meta.json)"
    num_users, num_items, shards = meta["num_users"], meta["num_items"], meta["shards"]
    if not all(isinstance(n, int) and n > 0 for n in (num_users, num_items)):
        raise DataError(f"{problem}: num_users and num_items must be positive integers; {fix}")
    if not isinstance(shards, list) or not shards:
        raise DataError(f"{problem}: it lists no shards; {fix}")
    previous_end = 1
    for index, shard in enumerate(shards):
        try:
            lo, hi = (int(x) for x in shard["users"])
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{problem}: shard {index} has no user range; {fix}") from exc
        files = shard.get("files") or {}
        for split in SPLITS:
            if not isinstance(files.get(split), dict) or not isinstance(files[split].get("pairs"), int):
                raise DataError(f"{meta_path}: shard {index} has no {split} file (or no pair count); {fix}")
        pairs = {split: files[split]["pairs"] for split in SPLITS}
        if not previous_end <= lo <= hi <= num_users + 1:
            raise DataError(
                f"{problem}: shard {index} covers users [{lo}, {hi}), outside 1..{num_users} (num_users) or "
                f"overlapping the previous shard; {fix}"
            )
        if any(count < 0 for count in pairs.values()):
            raise DataError(f"{problem}: shard {index} has a negative pair count; {fix}")
        previous_end = hi
    totals = {split: sum(int(shard["files"][split]["pairs"]) for shard in shards) for split in SPLITS}
    recorded = meta.get("split_counts", totals)
    if any(int(recorded.get(split, -1)) != totals[split] for split in SPLITS):
        raise DataError(f"{problem}: split_counts {recorded} differ from its shards' pairs {totals}; {fix}")
    if "num_interactions" in meta and int(meta["num_interactions"]) != sum(totals.values()):
        raise DataError(
            f"{problem}: num_interactions is {meta['num_interactions']}, its shards hold {sum(totals.values())}; {fix}"
        )


def select_shards(
    num_shards: int, fraction: float | None = None, shards: str | Sequence[int] | None = None
) -> list[int]:
    """Resolve `--fraction F` (the first ceil(F * n) shards) or `--shards 0-3,7` into shard indices."""
    if fraction is not None and shards is not None:
        raise DataError("give either --fraction or --shards, not both")
    if shards is not None:
        if isinstance(shards, str):
            chosen: list[int] = []
            for part in shards.split(","):
                part = part.strip()
                try:
                    lo, hi = (int(x) for x in part.split("-", 1)) if "-" in part else (int(part), int(part))
                except ValueError as exc:
                    raise DataError(f"--shards {shards!r}: expected indices like '0-3,7'") from exc
                if not 0 <= lo <= hi < num_shards:  # checked before the range is built: 0-10^10 is no list
                    raise DataError(f"--shards {shards!r}: this dataset has shards 0-{num_shards - 1}")
                chosen.extend(range(lo, hi + 1))
        else:
            chosen = [int(s) for s in shards]
        bad = [s for s in chosen if not 0 <= s < num_shards]
        if bad or not chosen:
            raise DataError(f"--shards {shards!r}: this dataset has shards 0-{num_shards - 1}")
        return sorted(set(chosen))
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise DataError(f"--fraction must be in (0, 1], got {fraction}")
        return list(range(max(1, int(np.ceil(fraction * num_shards - 1e-9)))))
    return list(range(num_shards))


def _member(path: Path, name: str) -> np.ndarray | None:
    """The mapped member `name` of a shard, or None when the shard has no such member."""
    try:
        return map_npz_member(path, name)
    except KeyError:
        return None
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise DataError(f"shard {path} cannot be read ({exc}); re-run `movierec prepare`") from exc


def _load_npz(
    path: Path, expected: dict, user_range: tuple[int, int], num_items: int, verify: bool
) -> tuple[np.ndarray, np.ndarray | None]:
    """A shard's (N, 2) `pairs` and its (N,) `timestamps` (None when it has none), memory-mapped, after
    checking them against meta.json and its user range."""
    if not path.is_file():
        raise DataError(f"shard {path} is missing; the dataset is incomplete, re-run `movierec prepare`")
    if verify and sha256_file(path) != expected["sha256"]:
        raise DataError(f"shard {path} is corrupt: its sha256 differs from meta.json; re-run `movierec prepare`")
    pairs = _member(path, "pairs")
    if pairs is None:
        raise DataError(f"shard {path} has no `pairs` array; re-run `movierec prepare`")
    if pairs.ndim != 2 or pairs.shape[1] != 2 or not np.issubdtype(pairs.dtype, np.integer):
        raise DataError(f"shard {path}: expected an (N, 2) integer array, got {pairs.dtype} {pairs.shape}")
    if len(pairs) != expected["pairs"]:
        raise DataError(f"shard {path} holds {len(pairs)} pairs, meta.json says {expected['pairs']}")
    timestamps = _member(path, "timestamps")
    if timestamps is not None and timestamps.shape != (len(pairs),):
        raise DataError(f"shard {path}: {len(timestamps)} timestamps for {len(pairs)} pairs; re-run `movierec prepare`")
    if len(pairs):
        users, items = pairs[:, 0], pairs[:, 1]
        lo, hi = user_range
        if users.min() < lo or users.max() >= hi:
            raise DataError(f"shard {path}: user ids outside the shard's range [{lo}, {hi})")
        if items.min() < 1 or items.max() > num_items:
            raise DataError(f"shard {path}: item ids outside 1..{num_items}")
        if np.any(users[1:] < users[:-1]):
            raise DataError(f"shard {path}: pairs are not grouped by user")
    return pairs, timestamps


def verify_files(path: str | Path) -> tuple[int, list[str]]:
    """Check every file of a prepared dataset against meta.json: each shard's checksum, dtype, shape, pair
    count, timestamps and id ranges, and the two side tables. Returns (files checked, problems found)."""
    root = Path(path)
    meta = read_meta(root)
    num_items, checked, problems = int(meta["num_items"]), 0, []
    for index, shard in enumerate(meta["shards"]):
        user_range = (int(shard["users"][0]), int(shard["users"][1]))
        for split in SPLITS:
            expected = shard["files"][split]
            checked += 1
            try:
                pairs, _ = _load_npz(root / expected["path"], expected, user_range, num_items, verify=True)
                if split != "training" and np.any(pairs[1:, 0] <= pairs[:-1, 0]):
                    raise DataError(f"{root / expected['path']}: a user has more than one held-out pair")
            except DataError as exc:
                problems.append(f"shard {index} {split}: {exc}")
    for reader in (read_items, read_users):
        checked += 1
        try:
            reader(root)
        except DataError as exc:
            problems.append(str(exc))
    return checked, problems


@dataclass
class SequenceData:
    """Per-user sequences of a prepared dataset, indexed by our user id (1..num_users).

    `train_items[train_offsets[u]:train_offsets[u + 1]]` is user u's training sequence in time order;
    `valid_item[u]` / `test_item[u]` are the held-out items (0 when the user is not evaluated).
    Users outside the selected shards have empty sequences and are not in `users`.
    `train_items` is a view over the memory-mapped shards (no private copy): gather from it with index
    arrays (`train_items[idx]`); `np.asarray(train_items)` copies it whole. `train_times` (aligned with
    `train_items`), `valid_time` and `test_time` (per user) are the Unix seconds of the interactions, or None when the
    dataset has no real timestamps (see `has_real_timestamps`).
    """

    path: Path
    meta: dict
    num_users: int
    num_items: int
    users: np.ndarray
    train_offsets: np.ndarray
    train_items: ConcatenatedColumn
    valid_item: np.ndarray
    test_item: np.ndarray
    shard_indices: list[int]
    train_times: ConcatenatedColumn | None = None
    valid_time: np.ndarray | None = None
    test_time: np.ndarray | None = None
    _item_counts: np.ndarray | None = field(default=None, repr=False)

    def train_sequence(self, user: int) -> np.ndarray:
        return self.train_items[self.train_offsets[user] : self.train_offsets[user + 1]]

    @property
    def train_lengths(self) -> np.ndarray:
        return np.diff(self.train_offsets)

    @property
    def tested_users(self) -> np.ndarray:
        """Users with an evaluation (test) pair: what meta.json counts as `num_evaluated_users`."""
        return np.flatnonzero(self.test_item)

    def item_counts(self) -> np.ndarray:
        """Training interactions per item id (index 0 = padding = 0), counted once in one pass."""
        if self._item_counts is None:
            counts = np.zeros(self.num_items + 1, dtype=np.int64)
            for part in self.train_items.chunks():
                counts += np.bincount(part, minlength=self.num_items + 1)[: self.num_items + 1]
            self._item_counts = counts
        return self._item_counts


def load_sequences(
    path: str | Path,
    fraction: float | None = None,
    shards: str | Sequence[int] | None = None,
    verify: bool = True,
) -> SequenceData:
    """Map the selected shards of a prepared dataset into per-user arrays, validating every file.

    Time and memory are linear in the selected data; the pairs themselves stay in the mapped files.
    """
    root = Path(path)
    meta = read_meta(root)
    num_users, num_items = int(meta["num_users"]), int(meta["num_items"])
    chosen = select_shards(len(meta["shards"]), fraction, shards)
    counts = np.zeros(num_users + 2, dtype=np.int64)
    item_parts: list[np.ndarray] = []
    time_parts: list[np.ndarray | None] = []
    held_out = {split: np.zeros(num_users + 1, dtype=np.int32) for split in ("validation", "evaluation")}
    held_out_time = {split: np.zeros(num_users + 1, dtype=np.int64) for split in ("validation", "evaluation")}
    timed = has_real_timestamps(meta)
    for index in chosen:
        shard = meta["shards"][index]
        user_range = (int(shard["users"][0]), int(shard["users"][1]))
        for split in SPLITS:
            try:
                expected = shard["files"][split]
            except KeyError as exc:
                raise DataError(f"{root / META_FILE}: shard {index} has no {split} file") from exc
            pairs, times = _load_npz(root / expected["path"], expected, user_range, num_items, verify)
            timed = timed and times is not None
            if split == "training":
                lo, hi = user_range
                counts[lo:hi] += np.bincount(pairs[:, 0] - lo, minlength=hi - lo)[: hi - lo]
                item_parts.append(pairs[:, 1])
                time_parts.append(times)
                continue
            users = pairs[:, 0]
            if np.any(users[1:] <= users[:-1]):
                raise DataError(f"{root / expected['path']}: a user has more than one held-out pair")
            held_out[split][users] = pairs[:, 1]
            if times is not None:
                held_out_time[split][users] = times
    offsets = np.zeros(num_users + 2, dtype=np.int64)
    np.cumsum(counts[: num_users + 1], out=offsets[1:])
    users = np.flatnonzero(counts[: num_users + 1] + (held_out["evaluation"] > 0))
    return SequenceData(
        path=root,
        meta=meta,
        num_users=num_users,
        num_items=num_items,
        users=users.astype(np.int64),
        train_offsets=offsets,
        train_items=ConcatenatedColumn(item_parts),
        valid_item=held_out["validation"],
        test_item=held_out["evaluation"],
        shard_indices=chosen,
        train_times=ConcatenatedColumn(time_parts) if timed else None,
        valid_time=held_out_time["validation"] if timed else None,
        test_time=held_out_time["evaluation"] if timed else None,
    )


def has_real_timestamps(meta: dict) -> bool:
    """Whether a dataset's shards hold the interactions' real times: not for SASRec's text format (whose
    "timestamps" are line numbers) nor MLPerf's files (which have none)."""
    return meta.get("time_ordered", True) and meta.get("source", {}).get("kind") != "sasrec-text"


def _read_table(path: str | Path, name: str, id_column: str, key: str) -> pa.Table:
    """A side table of a prepared dataset, checked against meta.json (checksum and row count)."""
    root = Path(path)
    file = root / name
    if not file.is_file():
        raise DataError(f"{file} is missing; re-run `movierec prepare`")
    meta = read_meta(root)
    expected = meta.get("files_sha256", {}).get(name)
    if expected is not None and sha256_file(file) != expected:
        raise DataError(f"{file} is corrupt: its sha256 differs from meta.json; re-run `movierec prepare`")
    try:
        table = pq.read_table(file)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{file} cannot be read ({exc}); re-run `movierec prepare`") from exc
    if id_column not in table.column_names or len(table) != int(meta[key]):
        raise DataError(f"{file} does not hold one {id_column} row per id 1..{meta[key]}; re-run `movierec prepare`")
    if not pa.types.is_integer(table.schema.field(id_column).type):  # what train and serve read as ids
        raise DataError(f"{file}: its {id_column} column holds {table.schema.field(id_column).type}, not integer "
                        "ids; re-run `movierec prepare`")  # fmt: skip
    return table


def read_items(path: str | Path) -> pa.Table:
    """items.parquet: item (our id), movie_id, title, year, genres."""
    return _read_table(path, ITEMS_FILE, "movie_id", "num_items")


def read_users(path: str | Path) -> pa.Table:
    """users.parquet: user (our id), user_id (original)."""
    return _read_table(path, USERS_FILE, "user_id", "num_users")
