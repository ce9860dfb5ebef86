"""Synthetic ml-20mx16x32-shaped files: MLPerf's format and invariants, determinism, and our converter on them."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from movierec.data.layout import read_meta
from movierec.data.mlperf import prepare_mlperf
from movierec.data.mlperf_synthetic import (
    FULL_SHAPE,
    MIN_ITEMS_PER_USER,
    SIDECAR,
    MlperfShape,
    generate_file,
    generate_mlperf_files,
    scaled_shape,
)

TINY = scaled_shape(1e-4)  # 220 users over 16 files, ~122 k pairs, the full 855,776-item catalog


def load(path) -> np.ndarray:
    with np.load(path, allow_pickle=False) as npz:
        assert npz.files == ["arr_0"]
        return npz["arr_0"]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("mlperf-tiny")
    generate_mlperf_files(folder, TINY)
    return folder


def test_shapes():
    assert (FULL_SHAPE.users, FULL_SHAPE.items, FULL_SHAPE.train_pairs, FULL_SHAPE.files) == (
        2_197_225,
        855_776,
        1_223_962_043,
        16,
    )
    ranges = [FULL_SHAPE.user_range(k) for k in range(16)]
    assert ranges[0][0] == 0 and ranges[-1][1] == FULL_SHAPE.users
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges)), "contiguous user blocks"
    assert sum(FULL_SHAPE.train_pairs_of(k) for k in range(16)) == FULL_SHAPE.train_pairs
    assert 76_000_000 < FULL_SHAPE.train_pairs_of(0) < 77_000_000
    assert TINY.items == 855_776 and TINY.files == 16 and TINY.users == 220
    assert TINY.mean_items_per_user == pytest.approx(FULL_SHAPE.mean_items_per_user, rel=1e-2)
    quarter = scaled_shape(0.25)
    assert quarter.user_range(0)[1] == pytest.approx(FULL_SHAPE.user_range(0)[1] / 4, abs=1)
    assert scaled_shape(1e-9).users == 16, "at least one user per file"
    with pytest.raises(ValueError):
        FULL_SHAPE.user_range(16)
    with pytest.raises(ValueError):
        MlperfShape(users=10, items=100, train_pairs=10_000)  # more than half the catalog per user


def test_format_and_invariants(tiny_folder):
    all_train, all_test = [], []
    for k in range(TINY.files):
        train, test = load(tiny_folder / f"trainx16x32_{k}.npz"), load(tiny_folder / f"testx16x32_{k}.npz")
        for array in (train, test):
            assert array.dtype == np.int64 and array.ndim == 2 and array.shape[1] == 2
        lo, hi = TINY.user_range(k)
        assert np.unique(train[:, 0]).tolist() == list(range(lo, hi)), f"file {k} holds its own user block"
        assert test[:, 0].tolist() == list(range(lo, hi)), "exactly one test pair per user, in user order"
        assert len(train) == TINY.train_pairs_of(k)
        all_train.append(train)
        all_test.append(test)
    train, test = np.concatenate(all_train), np.concatenate(all_test)
    users = train[:, 0]
    assert np.all(users[1:] >= users[:-1]), "a user's rows are together, users ascending across files"
    same_user = users[1:] == users[:-1]
    assert np.all(train[1:, 1][same_user] > train[:-1, 1][same_user]), "items ascending and unique per user"
    assert len(train) == TINY.train_pairs and len(test) == TINY.users
    for array in (train, test):
        assert array[:, 1].min() >= 0 and array[:, 1].max() < 855_776
    assert train[:, 1].max() > 0.9 * 855_776, "items drawn from the whole catalog"
    keys = set((train[:, 0] * TINY.items + train[:, 1]).tolist())
    assert not any(u * TINY.items + i in keys for u, i in test.tolist()), "the test item is not in training"
    counts = np.bincount(users)
    assert counts.min() >= MIN_ITEMS_PER_USER and counts.max() <= TINY.max_items_per_user
    assert counts.mean() > 1.5 * np.median(counts), "heavy-tailed counts per user"


def test_small_catalog_and_popularity():
    shape = scaled_shape(2e-4, items=26_744)
    train, test = generate_file(shape, 5, seed=3)
    assert train[:, 1].max() < 26_744 and test[:, 1].max() < 26_744
    popularity = np.sort(np.bincount(train[:, 1], minlength=26_744))[::-1]
    assert popularity[:100].sum() > 10 * popularity[-100:].sum(), "Zipf-like: a popular head, a long tail"


def test_one_file_alone_is_the_same_file(tmp_path, tiny_folder):
    paths = generate_mlperf_files(tmp_path / "one", TINY, files=[0, 3])
    names = ["trainx16x32_0.npz", "testx16x32_0.npz", "trainx16x32_3.npz", "testx16x32_3.npz"]
    assert [p.name for p in paths] == names
    assert sorted(p.name for p in (tmp_path / "one").glob("*.npz")) == sorted(p.name for p in paths)
    for path in paths:
        assert np.array_equal(load(path), load(tiny_folder / path.name))
    other = generate_file(TINY, 0, seed=1)[0]
    assert not np.array_equal(other, load(paths[0])), "the seed matters"


def test_cache_sidecar_and_compressed(tmp_path):
    folder = tmp_path / "cache"
    first = generate_mlperf_files(folder, TINY, files=[1, 2])
    stamps = [p.stat().st_mtime_ns for p in first]
    plain_bytes = first[0].stat().st_size
    assert generate_mlperf_files(folder, TINY, files=[1]) == first[:2]
    assert [p.stat().st_mtime_ns for p in first] == stamps, "files already generated are kept"
    record = json.loads((folder / SIDECAR).read_text())
    assert record["seed"] == 0 and set(record["files"]) == {"1", "2"}
    compressed = generate_mlperf_files(folder, TINY, files=[1], compressed=True)
    assert not (folder / "trainx16x32_2.npz").exists(), "files of another configuration are removed"
    assert compressed[0].stat().st_size < plain_bytes, "savez_compressed, like MLPerf's files"
    assert np.array_equal(load(compressed[0]), generate_file(TINY, 1)[0])
    assert not list(folder.glob(".*part")), "no temporary files left behind"


def test_prepare_mlperf_converts_a_generated_set(tmp_path, tiny_folder):
    path = prepare_mlperf(tiny_folder, tmp_path / "out")
    meta = read_meta(path)
    assert meta["num_users"] == TINY.users and meta["time_ordered"] is False
    largest = max(int(load(p)[:, 1].max()) for p in tiny_folder.glob("*.npz"))
    assert meta["num_items"] == largest + 1
    counts = meta["split_counts"]
    assert counts["evaluation"] == TINY.users
    assert counts["validation"] == TINY.users, "every user has >= 2 training pairs, so one is held out"
    assert counts["training"] + counts["validation"] == TINY.train_pairs
    assert meta["options"]["input_shards"] == list(range(16))
