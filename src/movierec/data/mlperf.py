"""MLPerf's `ml-20mx16x32` (fractal expansion of ML-20M) converted into our sharded layout, streaming.

Input: a folder with `trainx16x32_{k}.npz` and `testx16x32_{k}.npz` (k = 0..15), each holding one array
`arr_0` of shape (N, 2), `[user, item]`, int64, as written by MLPerf's generator: file k holds a block of
users, each user's pairs together with its items in increasing id order. The seed pipeline's "organised"
folder holds the same files as `training/trainx16x32_{k}.npz` and `validation/test_{k}.npz` (k = 0-7) /
`evaluation/test_{k}.npz` (k = 8-15), often with only some of the training files; it is read as it lies.
There are no timestamps and so **no time order**: "sequences" are in item-id order, meta.json says
`time_ordered: false`, and sequential models trained on it learn no real temporal signal.

Conversion, one input file pair at a time (memory is bounded by one input shard, not by the 1.2 B pairs):

- items: MLPerf's item 0 is a real item, so every item id is shifted by one (our id = MLPerf id + 1; 0 stays
  padding); `items.parquet` keeps the MLPerf id in `movie_id`. `num_items` = largest id seen + 1.
- users: renumbered contiguously from 1 in the order of the input files and, within a file, of MLPerf's user
  id (for the full data set this is MLPerf id + 1); `users.parquet` keeps the MLPerf id in `user_id`.
- evaluation: the test pair of each user (MLPerf's one test item per user), unchanged. Should a user have
  several test pairs, the last one in file order is the evaluation pair and the others join its training
  pairs (counted in meta.json as `extra_test_pairs_to_training`).
- validation: the **last training pair of each user in file order** (its largest item id) is held out, for
  users with at least two training pairs; a user with a single training pair keeps it for training.
- training: the remaining pairs, in file order.

`--holdout by-file` (organised folders only) keeps every training pair for training instead, and makes the
test pairs of the files in validation/ the validation pairs and those in evaluation/ the evaluation pairs.

`--fraction F` / `--shards 0-3` choose which input files are converted (the first ceil(F * 16) files for a
fraction, 16 being the whole set's count whichever files are present); without them every training file
present is converted. Each input file becomes one or more output shards of about `shard_pairs` pairs.
"""

from __future__ import annotations

import re
import shutil
import sys
import tarfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from movierec.data.layout import SPLITS, ShardWriter, select_shards, sha256_file
from movierec.data.split import DEFAULT_SHARD_PAIRS, shard_boundaries
from movierec.errors import ConfigError, DataError
from movierec.progress import Progress

TRAIN_FILE = "trainx16x32_{k}.npz"
TEST_FILE = "testx16x32_{k}.npz"
_TRAIN_RE = re.compile(r"^trainx16x32_(\d+)\.npz$")
# the seed pipeline's organised folder renames MLPerf's testx16x32_K.npz to test_K.npz
_TEST_RE = re.compile(r"^test(?:x16x32)?_(\d+)\.npz$")
ORGANISED_HOLDOUT = ("validation", "evaluation")  # organised/<split>/test_K.npz
HOLDOUTS = ("leave-one-out", "by-file")
VALIDATION_RULE = (
    "last training pair of each user in file order (its largest item id), for users with >= 2 training pairs"
)
BY_FILE_RULE = (
    "by file: the test pair of each user of a file in validation/ is its validation pair, of a file in "
    "evaluation/ its evaluation pair; every training pair trains"
)


@dataclass
class InputFiles:
    """The MLPerf files of an input folder: as MLPerf ships them (`trainx16x32_K.npz` beside
    `testx16x32_K.npz`) or as the seed pipeline organises them (`training/trainx16x32_K.npz`,
    `validation/test_K.npz` for K = 0-7, `evaluation/test_K.npz` for K = 8-15)."""

    folder: Path
    layout: str  # "mlperf" | "organised"
    train: dict[int, Path]
    test: dict[int, Path]
    test_split: dict[int, str] = field(default_factory=dict)  # organised: the folder test_K.npz lies in

    @property
    def num_files(self) -> int:
        """How many files the whole set has: `--fraction` is a fraction of this, whichever files are present."""
        return max([*self.train, *self.test]) + 1


def _numbered(folder: Path, pattern: re.Pattern) -> dict[int, Path]:
    return {int(m.group(1)): p for p in folder.glob("*.npz") if (m := pattern.match(p.name))}


def _organised_files(folder: Path) -> InputFiles:
    train = _numbered(folder / "training", _TRAIN_RE)
    test: dict[int, Path] = {}
    test_split: dict[int, str] = {}
    for split in ORGANISED_HOLDOUT:
        for k, path in _numbered(folder / split, _TEST_RE).items() if (folder / split).is_dir() else ():
            if k in test:
                raise DataError(f"{test[k]} and {path} are both test file {k}: keep it in validation/ or evaluation/")
            test[k], test_split[k] = path, split
    if not train:
        held = f" ({len(test)} test files alone cannot train a model)" if test else ""
        raise DataError(f"{folder / 'training'} holds no trainx16x32_K.npz files{held}; pass the organised folder "
                        "whose training/ holds them")  # fmt: skip
    return InputFiles(folder, "organised", train, test, test_split)


def find_files(folder: str | Path) -> InputFiles:
    """The input files of DIR: MLPerf's own layout (DIR or DIR/ml-20mx16x32), or the organised one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"--input {folder} is not a folder; pass the folder with trainx16x32_*.npz files")
    if (folder / "training").is_dir():
        return _organised_files(folder)
    for candidate in (folder, folder / "ml-20mx16x32"):
        train = _numbered(candidate, _TRAIN_RE) if candidate.is_dir() else {}
        if train:
            test = {k: p for k, p in _numbered(candidate, re.compile(r"^testx16x32_(\d+)\.npz$")).items()}
            return InputFiles(candidate, "mlperf", train, test)
    held = " (it holds test files only: the training files are needed too)" if list(folder.glob("test*.npz")) else ""
    raise DataError(
        f"{folder} holds no trainx16x32_K.npz files{held}: pass the extracted ml-20mx16x32 folder, or an organised "
        "folder with training/, validation/ and evaluation/, with --input"
    )


def choose_files(files: InputFiles, fraction=None, shards=None) -> list[int]:
    """File numbers K chosen by --fraction (of the whole set's files) or --shards, else every training file
    present; each chosen K must have its training file and its test file."""
    if fraction is None and shards is None:
        chosen = sorted(files.train)
    else:
        chosen = select_shards(files.num_files, fraction, shards)
    for k in chosen:
        if k not in files.train:
            beside = f"; {files.test[k]} is there without it" if k in files.test else ""
            raise DataError(f"{files.folder} lacks {TRAIN_FILE.format(k=k)} (chosen files: {chosen}){beside}")
        if k not in files.test:
            name = TEST_FILE.format(k=k) if files.layout == "mlperf" else f"test_{k}.npz"
            raise DataError(f"{name} is missing in {files.folder}; every trainx16x32_K.npz needs its test file")
    return chosen


def _open_tar(archive: Path) -> tarfile.TarFile:
    try:
        return tarfile.open(archive)
    except (tarfile.TarError, OSError) as exc:
        raise DataError(f"{archive} is not a readable tar archive ({exc}); download it again") from exc


def choose(numbers: list[int], fraction=None, shards=None, where: str | Path = "") -> list[int]:
    """Shard numbers k chosen by --fraction (of 0..max k) or --shards, each present in `numbers`."""
    chosen = select_shards(max(numbers) + 1, fraction, shards)
    missing = [k for k in chosen if k not in set(numbers)]
    if missing:
        raise DataError(f"{where} lacks {TRAIN_FILE.format(k=missing[0])} (chosen shards: {chosen})")
    return chosen


def extract_shards(archive: str | Path, dest: str | Path, fraction=None, shards=None) -> tuple[Path, list[int]]:
    """Extract the chosen shards of `ml-20mx16x32.tar` into `dest` (each file atomically).

    Returns dest and the chosen shard numbers. Files already extracted with the right size are kept.
    """
    archive, dest = Path(archive), Path(dest)
    with _open_tar(archive) as tar:
        members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
        numbers = sorted(int(m.group(1)) for n in members if (m := _TRAIN_RE.match(n)))
        if not numbers:
            raise DataError(f"{archive} holds no trainx16x32_K.npz files: is it ml-20mx16x32.tar?")
        chosen = choose(numbers, fraction, shards, archive)
        dest.mkdir(parents=True, exist_ok=True)
        for k in chosen:
            for pattern in (TRAIN_FILE, TEST_FILE):
                name = pattern.format(k=k)
                if name not in members:
                    raise DataError(f"{archive} lacks {name}")
                target = dest / name
                if target.is_file() and target.stat().st_size == members[name].size:
                    continue
                part = dest / (name + ".part")
                with tar.extractfile(members[name]) as src, open(part, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 22)
                part.replace(target)
    return dest, chosen


def _load_pairs(path: Path) -> np.ndarray:
    if not path.is_file():
        raise DataError(f"{path} is missing; every trainx16x32_K.npz needs its testx16x32_K.npz")
    try:
        with np.load(path, allow_pickle=False) as npz:
            if "arr_0" not in npz.files:
                raise DataError(f"{path} has no array arr_0 (it has {npz.files}); not an MLPerf ml-20mx16x32 file")
            pairs = npz["arr_0"]
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise DataError(f"{path} cannot be read ({exc}); it is corrupt or truncated: extract it again") from exc
    if pairs.ndim != 2 or pairs.shape[1] != 2 or not np.issubdtype(pairs.dtype, np.integer):
        raise DataError(f"{path}: expected arr_0 of shape (N, 2) integers, got {pairs.dtype} {pairs.shape}")
    if len(pairs) and pairs.min() < 0:
        raise DataError(f"{path}: negative user or item ids")
    return pairs


def _group_by_user(pairs: np.ndarray) -> np.ndarray:
    users = pairs[:, 0]
    if len(users) > 1 and np.any(users[1:] < users[:-1]):
        pairs = pairs[np.argsort(users, kind="stable")]  # keeps file order within a user
    return pairs


def _last_of_each_user(users: np.ndarray) -> np.ndarray:
    """Boolean mask of the last row of each run of equal (sorted) user ids."""
    last = np.ones(len(users), dtype=bool)
    last[:-1] = users[1:] != users[:-1]
    return last


def convert_file_pair(train: np.ndarray, test: np.ndarray, name: str, held_out_as: str | None = None) -> dict:
    """Split one input shard: returns MLPerf user ids and per-split [mlperf_user, item + 1] arrays.

    `held_out_as` None: leave-one-out (validation = each user's last training pair, evaluation = its test
    pair); "validation" / "evaluation": the test pairs are that split's pairs and every training pair trains.
    """
    train, test = _group_by_user(train), _group_by_user(test)
    extra = 0
    if len(test):
        last_test = _last_of_each_user(test[:, 0])
        if not last_test.all():
            extra = int((~last_test).sum())
            train = _group_by_user(np.concatenate([train, test[~last_test]]))
            test = test[last_test]
    users = np.union1d(train[:, 0], test[:, 0])
    empty = np.empty((0, 2), dtype=train.dtype)
    if held_out_as is not None:
        other = "evaluation" if held_out_as == "validation" else "validation"
        return {"users": users, "training": train, held_out_as: test, other: empty, "extra_test": extra, "name": name}
    counts = np.bincount(np.searchsorted(users, train[:, 0]), minlength=len(users))
    valid_rows = _last_of_each_user(train[:, 0]) & (counts[np.searchsorted(users, train[:, 0])] >= 2)
    return {
        "users": users,
        "training": train[~valid_rows],
        "validation": train[valid_rows],
        "evaluation": test,
        "extra_test": extra,
        "name": name,
    }


def _holdout_splits(files: InputFiles, chosen: list[int], holdout: str) -> dict[int, str | None]:
    """Per chosen file, the split its test pairs become under `holdout` (None: leave-one-out)."""
    if holdout not in HOLDOUTS:
        raise ConfigError(f"--holdout must be one of {', '.join(HOLDOUTS)}, got {holdout!r}")
    if holdout == "leave-one-out":
        return dict.fromkeys(chosen)
    if files.layout != "organised":
        raise ConfigError(
            f"--holdout by-file takes the split from the folder a test file lies in: {files.folder} is not an "
            "organised folder (training/, validation/, evaluation/); use --holdout leave-one-out"
        )
    splits = {k: files.test_split[k] for k in chosen}
    for split in ORGANISED_HOLDOUT:
        if split not in splits.values():
            raise DataError(
                f"--holdout by-file: the chosen files {chosen} give no {split} users (none of their test files is in "
                f"{split}/); choose files from both folders with --shards, or use --holdout leave-one-out"
            )
    return splits


def _write_file_pair(writer: ShardWriter, part: dict, next_user: int, shard_pairs: int) -> None:
    """One converted file pair as shards: its users become next_user .. next_user + len(users) - 1."""
    users = part["users"]
    counts = np.zeros(len(users) + 1, dtype=np.int64)
    remapped = {}
    for split in SPLITS:
        local = np.searchsorted(users, part[split][:, 0]) + 1
        counts += np.bincount(local, minlength=len(users) + 1)
        pairs = np.empty((len(local), 2), dtype=np.int64)
        pairs[:, 0] = local + (next_user - 1)
        pairs[:, 1] = part[split][:, 1] + 1
        remapped[split] = pairs
    for lo, hi in shard_boundaries(counts, shard_pairs, None):
        g_lo, g_hi = lo + next_user - 1, hi + next_user - 1
        pieces = {}
        for split, pairs in remapped.items():
            a, b = np.searchsorted(pairs[:, 0], [g_lo, g_hi])
            pieces[split] = (pairs[a:b], None)
        writer.add_shard((g_lo, g_hi), pieces)


def _side_tables(original_users: np.ndarray, num_items: int) -> tuple[pa.Table, pa.Table]:
    """items.parquet (MLPerf item id = our id - 1, titled by it) and users.parquet (MLPerf user ids)."""
    users = pa.table({"user": np.arange(1, len(original_users) + 1, dtype=np.int64), "user_id": original_users})
    item_ids = np.arange(1, num_items + 1, dtype=np.int64)
    items = pa.table(
        {
            "item": item_ids,
            "movie_id": item_ids - 1,
            "title": pc.binary_join_element_wise("MLPerf item ", pc.cast(pa.array(item_ids - 1), pa.string()), ""),
            "year": pa.nulls(num_items, pa.int32()),
            "genres": pa.nulls(num_items, pa.string()),
        }
    )
    return items, users


def _options(files: InputFiles, chosen: list[int], holdout: str, extra_test: int) -> dict:
    """meta.json's `options`: how ids, splits and ties were made."""
    by_file = holdout != "leave-one-out"
    return {
        "input_shards": chosen,
        "item_ids": "MLPerf item id + 1 (MLPerf's item 0 is a real item; 0 is our padding id)",
        "user_ids": "contiguous from 1 in file order, then MLPerf user id order (users.parquet maps back)",
        "layout": files.layout,
        "holdout": holdout,
        "validation": BY_FILE_RULE if by_file else VALIDATION_RULE,
        "evaluation": "MLPerf's test pair of each user" + (" of a file in evaluation/" if by_file else ""),
        "extra_test_pairs_to_training": extra_test,
        "tie_break": "none: MLPerf lists each user's items in item-id order, there are no timestamps",
    }


def prepare_mlperf(
    input_dir: str | Path,
    out: str | Path,
    name: str = "ml-20mx16x32",
    *,
    fraction: float | None = None,
    shards: str | None = None,
    shard_pairs: int = DEFAULT_SHARD_PAIRS,
    overwrite: bool = False,
    source: dict | None = None,
    holdout: str = "leave-one-out",
) -> Path:
    """Convert the chosen input shards into `out/name`, one input shard in memory at a time.

    `holdout`: "leave-one-out" (each user's last training pair validates, its test pair evaluates) or
    "by-file" (organised folders only: the folder a test file lies in says which split its pairs are).
    """
    files = find_files(input_dir)
    chosen = choose_files(files, fraction, shards)
    held_out_as = _holdout_splits(files, chosen, holdout)
    unused = sorted(set(files.test) - set(chosen))
    print(
        f"{name}: {files.folder} ({files.layout} layout): converting files {chosen} of {files.num_files}, "
        f"holdout {holdout}" + (f"; {len(unused)} test files of unchosen files are not used" if unused else ""),
        file=sys.stderr,
    )
    writer = ShardWriter(Path(out), name, overwrite=overwrite)
    try:
        next_user, max_item, extra_test, last_user = 1, -1, 0, -1
        original_users: list[np.ndarray] = []
        inputs = []
        with Progress(f"prepare {name}", len(chosen), "files") as progress:
            for k in chosen:
                train_path, test_path = files.train[k], files.test[k]
                part = convert_file_pair(
                    _load_pairs(train_path), _load_pairs(test_path), train_path.name, held_out_as[k]
                )
                users = part["users"]
                if len(users) and users[0] <= last_user:
                    raise DataError(
                        f"{train_path}: its users overlap or precede those of the previous file; the converter needs "
                        "each file to hold its own block of users, as MLPerf's files do"
                    )
                extra_test += part["extra_test"]
                max_item = max([max_item, *(int(part[s][:, 1].max()) for s in SPLITS if len(part[s]))])
                _write_file_pair(writer, part, next_user, shard_pairs)
                next_user += len(users)
                original_users.append(users)
                last_user = int(users[-1]) if len(users) else last_user
                checksums = {"train_sha256": sha256_file(train_path), "test_sha256": sha256_file(test_path)}
                inputs.append({"shard": k, "train": train_path.name, "test": test_path.name, **checksums})
                progress.advance(1)
        if next_user == 1:
            raise DataError(f"{files.folder}: the chosen files hold no pairs")
        counts = {s: sum(sh["files"][s]["pairs"] for sh in writer.shards) for s in SPLITS}
        meta = {
            "name": name,
            "source": {"kind": "mlperf-ml-20mx16x32", "input": str(files.folder.resolve()), "files": inputs,
                       **(source or {})},
            "options": _options(files, chosen, holdout, extra_test),
            "time_ordered": False,
            "num_users": next_user - 1,
            "num_items": max_item + 1,
            "num_interactions": sum(counts.values()),
            "num_evaluated_users": counts["evaluation"],
            "split_counts": counts,
        }  # fmt: skip
        items, users_table = _side_tables(np.concatenate(original_users).astype(np.int64), max_item + 1)
        return writer.finish(meta, items, users_table)
    except BaseException:
        writer.abort()
        raise
