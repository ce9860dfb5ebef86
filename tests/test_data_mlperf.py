"""MLPerf ml-20mx16x32 conversion, on tiny files in exactly MLPerf's format (savez_compressed arr_0, int64)."""

from __future__ import annotations

import io
import itertools
import tarfile

import numpy as np
import pytest
from data_builders import MLPERF_FILES as FILES
from data_builders import write_mlperf_files as write_files

from movierec.cli import main
from movierec.data.layout import load_sequences, read_items, read_meta, read_users
from movierec.data.mlperf import prepare_mlperf
from movierec.data.prepare import prepare
from movierec.errors import ConfigError, DataError


def test_conversion(tmp_path):
    path = prepare_mlperf(write_files(tmp_path / "in"), tmp_path / "out")
    meta = read_meta(path)
    assert meta["time_ordered"] is False
    assert meta["num_users"] == 9 and meta["num_items"] == 12  # largest MLPerf item 11, shifted by one
    assert meta["split_counts"] == {"training": 23 - 7, "validation": 7, "evaluation": 9}
    data = load_sequences(path)
    users = read_users(path)["user_id"].to_pylist()
    assert users == list(range(9)), "users renumbered from 1 in file order: here MLPerf id + 1"
    for k, block in enumerate(FILES):
        for mlperf_user, (items, test) in block.items():
            user = mlperf_user + 1
            shifted = [i + 1 for i in items]
            assert data.test_item[user] == test + 1, f"file {k}: the test pair is the evaluation pair"
            if len(items) >= 2:
                assert data.valid_item[user] == shifted[-1], "validation = last training pair in file order"
                assert data.train_sequence(user).tolist() == shifted[:-1]
            else:
                assert data.valid_item[user] == 0 and data.train_sequence(user).tolist() == shifted
    items = read_items(path)
    assert items["movie_id"].to_pylist()[:3] == [0, 1, 2] and items["title"][0].as_py() == "MLPerf item 0"


def test_each_input_file_is_split_into_user_shards(tmp_path):
    path = prepare_mlperf(write_files(tmp_path / "in"), tmp_path / "out", shard_pairs=5)
    meta = read_meta(path)
    assert len(meta["shards"]) > 3
    ranges = [tuple(s["users"]) for s in meta["shards"]]
    assert ranges[0][0] == 1 and ranges[-1][1] == 10
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    for shard in meta["shards"]:
        lo, hi = shard["users"]
        evaluated = set()
        with np.load(path / shard["files"]["evaluation"]["path"]) as npz:
            evaluated = set(npz["pairs"][:, 0].tolist())
        assert evaluated == set(range(lo, hi)), "shard k of every split covers the same users"
    assert load_sequences(path).test_item.tolist() == load_sequences(prepare_mlperf(
        tmp_path / "in", tmp_path / "out2")).test_item.tolist()  # fmt: skip


def test_fraction_and_shards_choose_input_files(tmp_path):
    folder = write_files(tmp_path / "in")
    first = read_meta(prepare_mlperf(folder, tmp_path / "a", fraction=0.34))
    assert first["options"]["input_shards"] == [0, 1] and first["num_users"] == 6
    last = prepare_mlperf(folder, tmp_path / "b", shards="2")
    meta = read_meta(last)
    assert meta["options"]["input_shards"] == [2] and meta["num_users"] == 3
    assert read_users(last)["user_id"].to_pylist() == [6, 7, 8], "users.parquet maps back to MLPerf ids"
    with pytest.raises(DataError, match="shards 0-2"):
        prepare_mlperf(folder, tmp_path / "c", shards="3")


def test_unsorted_file_is_grouped_keeping_file_order(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    np.savez_compressed(folder / "trainx16x32_0.npz", np.asarray([[1, 5], [0, 2], [1, 3], [0, 9]], np.int64))
    np.savez_compressed(folder / "testx16x32_0.npz", np.asarray([[1, 1], [0, 4]], np.int64))
    data = load_sequences(prepare_mlperf(folder, tmp_path / "out"))
    assert data.train_sequence(1).tolist() == [3] and data.valid_item[1] == 10
    assert data.train_sequence(2).tolist() == [6] and data.valid_item[2] == 4


def test_input_errors_name_the_file(tmp_path):
    folder = write_files(tmp_path / "in")
    (folder / "testx16x32_1.npz").unlink()
    with pytest.raises(DataError, match=r"testx16x32_1\.npz is missing"):
        prepare_mlperf(folder, tmp_path / "out")
    assert not (tmp_path / "out" / "ml-20mx16x32").exists(), "a failed conversion leaves no dataset"
    np.savez_compressed(folder / "testx16x32_1.npz", np.zeros((2, 3), np.int64))
    with pytest.raises(DataError, match=r"testx16x32_1\.npz: expected arr_0 of shape \(N, 2\)"):
        prepare_mlperf(folder, tmp_path / "out")
    (folder / "testx16x32_1.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(DataError, match=r"testx16x32_1\.npz cannot be read"):
        prepare_mlperf(folder, tmp_path / "out")
    overlapping = write_files(tmp_path / "overlap", [FILES[1], FILES[0]])
    with pytest.raises(DataError, match=r"trainx16x32_1\.npz: its users overlap or precede"):
        prepare_mlperf(overlapping, tmp_path / "out")
    with pytest.raises(DataError, match=r"holds no trainx16x32_K\.npz"):
        prepare_mlperf(tmp_path, tmp_path / "out")


def test_prepare_from_tar_archive_and_cli(tmp_path, capsys):
    folder = write_files(tmp_path / "files")
    tar_path = tmp_path / "ml-20mx16x32.tar"
    with tarfile.open(tar_path, "w") as tar:
        for file in sorted(folder.iterdir()):
            tar.add(file, arcname=f"ml-20mx16x32/{file.name}")
        tar.addfile(tarfile.TarInfo("ml-20mx16x32/readme.txt"), io.BytesIO(b""))
    path = prepare("ml-20mx16x32", tmp_path / "out", archive=tar_path, data_home=tmp_path / "home", shards="1-2")
    meta = read_meta(path)
    assert meta["options"]["input_shards"] == [1, 2] and meta["num_users"] == 5
    assert sorted(p.name for p in (tmp_path / "home" / "ml-20mx16x32").iterdir()) == [
        "testx16x32_1.npz", "testx16x32_2.npz", "trainx16x32_1.npz", "trainx16x32_2.npz"]  # fmt: skip
    args = ["prepare", "--dataset", "ml-20mx16x32", "--input", str(folder), "--out", str(tmp_path / "cli")]
    assert main([*args, "--fraction", "0.5"]) == 0
    assert "no (items within a user in id order)" in capsys.readouterr().out
    assert main([*args, "--min-rating", "4", "--overwrite"]) == 2
    assert "--min-rating does not apply to ml-20mx16x32" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="--fraction does not apply to synthetic"):
        prepare("synthetic", tmp_path / "x", fraction=0.5)
