"""Every reader check of a prepared dataset: each failure is a DataError naming the file, never a traceback."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from data_builders import ratings

from movierec.cli import main
from movierec.data.layout import load_sequences, read_items, read_meta, read_users, sha256_file
from movierec.data.split import Interactions, write_dataset
from movierec.errors import DataError


@pytest.fixture
def path(tmp_path):
    rows = ratings(num_users=20, per_user=6, num_items=10)
    data = Interactions(users=rows[:, 0], items=rows[:, 1], timestamps=rows[:, 3])
    return write_dataset(data, tmp_path, "tiny", source={}, num_shards=2,
                         min_user_interactions=0, min_item_interactions=0)  # fmt: skip


def shard_file(path, split="training", index=0):
    return path / read_meta(path)["shards"][index]["files"][split]["path"]


def edit_meta(path, change) -> None:
    meta = json.loads((path / "meta.json").read_text())
    change(meta)
    (path / "meta.json").write_text(json.dumps(meta))


def rewrite_shard(path, pairs, split="training", index=0) -> None:
    """Replace a shard with `pairs` and fix meta.json so only the content check can catch it."""
    file = shard_file(path, split, index)
    with open(file, "wb") as handle:
        np.savez(handle, pairs=pairs)

    def fix(meta):
        entry = meta["shards"][index]["files"][split]
        change = len(pairs) - entry["pairs"]
        entry.update(sha256=sha256_file(file), pairs=len(pairs))
        meta["split_counts"][split] += change
        meta["num_interactions"] += change

    edit_meta(path, fix)


def test_valid_dataset_loads(path):
    data = load_sequences(path)
    assert len(data.tested_users) == 20
    assert read_items(path).num_rows == 10 and read_users(path).num_rows == 20


def test_corrupt_shard_fails_its_checksum(path):
    file = shard_file(path)
    raw = bytearray(file.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    file.write_bytes(bytes(raw))
    with pytest.raises(DataError, match=rf"shard {re.escape(str(file))} is corrupt: its sha256 differs"):
        load_sequences(path)


def test_truncated_shard_cannot_be_read(path):
    file = shard_file(path)
    file.write_bytes(file.read_bytes()[:40])
    with pytest.raises(DataError, match=rf"shard {re.escape(str(file))} cannot be read"):
        load_sequences(path, verify=False)


def test_missing_shard_file(path):
    file = shard_file(path, "validation", 1)
    file.unlink()
    with pytest.raises(DataError, match=rf"shard {re.escape(str(file))} is missing"):
        load_sequences(path)


def test_missing_split(path):
    edit_meta(path, lambda meta: meta["shards"][0]["files"].pop("evaluation"))
    with pytest.raises(DataError, match="shard 0 does not list a path, sha256 and pair count per split"):
        load_sequences(path)


def test_item_id_out_of_range(path):
    pairs = np.load(shard_file(path))["pairs"].copy()
    pairs[3, 1] = 11  # num_items is 10
    rewrite_shard(path, pairs)
    with pytest.raises(DataError, match=rf"{re.escape(str(shard_file(path)))}: item ids outside 1\.\.10"):
        load_sequences(path)


def test_user_id_outside_the_shard(path):
    pairs = np.load(shard_file(path))["pairs"].copy()
    pairs[-1, 0] = 20  # belongs to shard 1
    rewrite_shard(path, pairs)
    with pytest.raises(DataError, match="user ids outside the shard's range"):
        load_sequences(path)


def test_wrong_shape_and_count(path):
    rewrite_shard(path, np.zeros((4, 3), dtype=np.int32))
    with pytest.raises(DataError, match=r"expected an \(N, 2\) integer array"):
        load_sequences(path)
    rewrite_shard(path, np.ones((4, 2), dtype=np.int32))

    def claim_five(meta):
        meta["shards"][0]["files"]["training"]["pairs"] = 5
        meta["split_counts"]["training"] += 1
        meta["num_interactions"] += 1

    edit_meta(path, claim_five)
    with pytest.raises(DataError, match=r"holds 4 pairs, meta\.json says 5"):
        load_sequences(path, verify=False)


def test_wrong_folder_and_bad_meta(path):
    with pytest.raises(DataError, match=r"meta\.json is missing \(it contains prepared datasets: tiny"):
        read_meta(path.parent)
    with pytest.raises(DataError, match="does not exist"):
        read_meta(path.parent / "nope")
    (path / "meta.json").write_text("{not json")
    with pytest.raises(DataError, match="is not valid JSON"):
        read_meta(path)
    (path / "meta.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(DataError, match="format version 99"):
        read_meta(path)
    (path / "meta.json").write_text(json.dumps({"format_version": 1, "name": "x"}))
    with pytest.raises(DataError, match="lacks the field 'num_users'"):
        read_meta(path)


def test_missing_tables(path):
    (path / "items.parquet").unlink()
    with pytest.raises(DataError, match=r"items\.parquet is missing"):
        read_items(path)


def test_cli_info_reports_errors_on_one_line(path, capsys):
    assert main(["info", str(path)]) == 0
    assert "tiny" in capsys.readouterr().out
    assert main(["info", str(path.parent)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a prepared dataset" in err


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda m: m.update(num_users=m["num_users"] - 5), r"shard 1 covers users \[11, 21\), outside 1\.\.15"),
        (lambda m: m["split_counts"].update(training=1), r"split_counts .* differ from its shards' pairs"),
        (lambda m: m.update(num_interactions=7), r"num_interactions is 7, its shards hold 120"),
        (lambda m: m["shards"][1].update(users=[5, 21]), r"shard 1 covers users \[5, 21\).*overlapping"),
        (lambda m: m.update(num_items=0), "num_users and num_items must be positive integers"),
        (lambda m: m.update(shards=[]), "it lists no shards"),
    ],
)
def test_meta_counts_must_agree_with_the_shards(path, change, message):
    edit_meta(path, change)
    with pytest.raises(DataError, match=f"meta\\.json is inconsistent: {message}"):
        load_sequences(path)


def test_timestamps_of_the_wrong_length(path):
    file = shard_file(path)
    with np.load(file) as npz:
        pairs, timestamps = npz["pairs"], npz["timestamps"]
    with open(file, "wb") as handle:
        np.savez(handle, pairs=pairs, timestamps=timestamps[:-3])
    edit_meta(path, lambda meta: meta["shards"][0]["files"]["training"].update(sha256=sha256_file(file)))
    with pytest.raises(DataError, match=f"{len(pairs) - 3} timestamps for {len(pairs)} pairs"):
        load_sequences(path)


def test_info_verify_checks_every_file(path, capsys):
    assert main(["info", str(path), "--verify"]) == 0
    assert "verified 8 files" in capsys.readouterr().out
    shard_file(path, "evaluation", 1).unlink()
    truncated = shard_file(path, "training", 0)
    truncated.write_bytes(truncated.read_bytes()[:100])
    assert main(["info", str(path)]) == 0  # the summary alone reads meta.json only
    capsys.readouterr()
    assert main(["info", str(path), "--verify"]) == 2
    captured = capsys.readouterr()
    assert "FAILED shard 0 training" in captured.out and "is corrupt" in captured.out
    assert "FAILED shard 1 evaluation" in captured.out and "is missing" in captured.out
    assert captured.err == "movierec info: error: 2 of 8 files failed verification; re-run `movierec prepare`\n"


def test_prepared_folders_follow_the_umask(tmp_path):
    import os

    rows = ratings(num_users=20, per_user=6, num_items=10)
    data = Interactions(users=rows[:, 0], items=rows[:, 1], timestamps=rows[:, 3])
    old = os.umask(0o022)
    try:
        out = write_dataset(data, tmp_path, "tiny", source={}, num_shards=2)
    finally:
        os.umask(old)
    assert oct(out.stat().st_mode & 0o777) == oct(0o755)
    assert oct((out / "meta.json").stat().st_mode & 0o777) == oct(0o644)
