"""Every reader check of a prepared dataset: each failure is a DataError naming the file, never a traceback."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from data_builders import ratings

from movierec.cli import main
from movierec.data.layout import load_sequences, read_items, read_meta, read_users, sha256_file
from movierec.data.prepare import Interactions, write_dataset
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
        meta["shards"][index]["files"][split].update(sha256=sha256_file(file), pairs=len(pairs))

    edit_meta(path, fix)


def test_valid_dataset_loads(path):
    data = load_sequences(path)
    assert len(data.evaluated_users) == 20
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
    with pytest.raises(DataError, match="shard 0 has no evaluation file"):
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
    edit_meta(path, lambda meta: meta["shards"][0]["files"]["training"].update(pairs=5))
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
