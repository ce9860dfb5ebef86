"""k-core, tie-break, leave-one-out, user-partitioned shards, --fraction/--shards, atomic writing."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from data_builders import ratings

from movierec.data import layout
from movierec.data.layout import load_sequences, read_meta
from movierec.data.prepare import prepare
from movierec.data.split import Interactions, build_split, write_dataset
from movierec.errors import DataError


def interactions(rows) -> Interactions:
    rows = np.asarray(rows, dtype=np.int64)
    ratings_column = rows[:, 3].astype(np.float32) if rows.shape[1] > 3 else None
    return Interactions(users=rows[:, 0], items=rows[:, 1], timestamps=rows[:, 2], ratings=ratings_column)


def sequences(split: dict) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for user, item in zip(split["users"].tolist(), split["items"].tolist(), strict=True):
        out.setdefault(user, []).append(item)
    return out


def test_kcore_is_iterative():
    # item 30 has one rating -> dropped -> user 3 is left with one rating -> dropped
    rows = [(1, 10, 1), (1, 20, 2), (2, 10, 1), (2, 20, 2), (3, 30, 1), (3, 10, 2)]
    split = build_split(interactions(rows), min_user_interactions=2, min_item_interactions=2)
    assert split["original_users"].tolist() == [1, 2] and split["original_items"].tolist() == [10, 20]
    assert len(split["users"]) == 4
    assert (np.bincount(split["items"])[1:] >= 2).all() and (np.bincount(split["users"])[1:] >= 2).all()


def test_kcore_off_keeps_everything_and_min_rating_filters():
    rows = [(1, 10, 1, 5), (1, 20, 2, 1), (2, 10, 1, 4)]
    split = build_split(interactions(rows), min_user_interactions=0, min_item_interactions=0)
    assert len(split["users"]) == 3
    split = build_split(interactions(rows), min_rating=4, min_user_interactions=0, min_item_interactions=0)
    assert split["original_items"].tolist() == [10] and len(split["users"]) == 2
    with pytest.raises(DataError, match="no interaction survives"):
        build_split(interactions(rows), min_user_interactions=5, min_item_interactions=5)


def test_time_order_with_row_order_tie_break_and_contiguous_ids():
    rows = [(7, 50, 10), (7, 30, 10), (7, 90, 5), (7, 40, 10)]
    split = build_split(interactions(rows), min_user_interactions=0, min_item_interactions=0)
    # ids remapped in order of the original id: 30->1, 40->2, 50->3, 90->4; user 7 -> 1
    assert sequences(split) == {1: [4, 3, 1, 2]}, "timestamp first, then the source's row order"
    assert split["timestamps"].tolist() == [5, 10, 10, 10]


def test_leave_one_out_and_short_users_stay_in_training():
    rows = [(1, 1, 1)] + [(2, i, i) for i in (1, 2)] + [(3, i, i) for i in (3, 1, 2)] + [(4, i, i) for i in range(1, 6)]
    split = build_split(interactions(rows), min_user_interactions=0, min_item_interactions=0)
    labels: dict[int, list[int]] = {}
    for user, label in zip(split["users"].tolist(), split["label"].tolist(), strict=True):
        labels.setdefault(user, []).append(label)
    assert labels == {1: [0], 2: [0, 0], 3: [0, 1, 2], 4: [0, 0, 0, 1, 2]}
    assert split["num_evaluated"] == 2


@pytest.fixture
def dataset(tmp_path):
    rows = ratings(num_users=30, per_user=7, num_items=12)
    data = Interactions(users=rows[:, 0], items=rows[:, 1], timestamps=rows[:, 3], ratings=rows[:, 2].astype(float))
    path = write_dataset(data, tmp_path, "tiny", source={"kind": "test"}, num_shards=3,
                         min_user_interactions=0, min_item_interactions=0)  # fmt: skip
    return path, rows


def test_written_splits_match_the_source(dataset):
    path, rows = dataset
    data = load_sequences(path)
    order = np.lexsort((np.arange(len(rows)), rows[:, 3], rows[:, 0]))
    by_user: dict[int, list[int]] = {}
    for user, item in rows[order][:, :2].tolist():
        by_user.setdefault(user, []).append(item)
    meta = read_meta(path)  # users/items are 1..30 / 1..12, so our ids equal the original ones
    assert meta["num_users"] == 30 and meta["num_items"] == 12
    for user, seq in by_user.items():
        assert data.train_sequence(user).tolist() == seq[:-2]
        assert data.valid_item[user] == seq[-2] and data.test_item[user] == seq[-1]


def test_shards_partition_users_identically_in_every_split(dataset):
    path, _ = dataset
    meta = read_meta(path)
    assert len(meta["shards"]) == 3
    bounds = [tuple(s["users"]) for s in meta["shards"]]
    assert bounds[0][0] == 1 and bounds[-1][1] == 31
    assert all(a[1] == b[0] for a, b in itertools.pairwise(bounds)), "ranges are contiguous"
    for shard in meta["shards"]:
        lo, hi = shard["users"]
        users = {}
        for split, entry in shard["files"].items():
            with np.load(path / entry["path"]) as npz:
                users[split] = set(npz["pairs"][:, 0].tolist())
        assert users["training"] == users["validation"] == users["evaluation"] == set(range(lo, hi))


def test_fraction_and_shard_selection_evaluate_the_trained_users(dataset):
    path, _ = dataset
    meta = read_meta(path)
    first = load_sequences(path, fraction=1 / 3)
    lo, hi = meta["shards"][0]["users"]
    assert first.shard_indices == [0]
    assert set(first.users.tolist()) == set(range(lo, hi)) == set(first.tested_users.tolist())
    later = load_sequences(path, shards="1-2")
    assert later.shard_indices == [1, 2] and later.tested_users.min() == meta["shards"][1]["users"][0]
    assert len(later.train_sequence(1)) == 0, "users outside the chosen shards have no data"
    with pytest.raises(DataError, match="shards 0-2"):
        load_sequences(path, shards="5")
    with pytest.raises(DataError, match="either --fraction or --shards"):
        load_sequences(path, fraction=0.5, shards="0")


def test_shard_count_follows_data_size(tmp_path):
    rows = ratings(num_users=40, per_user=5, num_items=10)
    data = Interactions(users=rows[:, 0], items=rows[:, 1], timestamps=rows[:, 3])
    path = write_dataset(data, tmp_path, "sized", source={}, shard_pairs=50,
                         min_user_interactions=0, min_item_interactions=0)  # fmt: skip
    assert len(read_meta(path)["shards"]) == 4  # 200 pairs / 50 per shard


def test_crash_mid_prepare_leaves_no_dataset(tmp_path, monkeypatch):
    rows = ratings(num_users=30, per_user=7, num_items=12)
    data = Interactions(users=rows[:, 0], items=rows[:, 1], timestamps=rows[:, 3])
    original = layout.ShardWriter.add_shard

    def crash_after_first(self, *args, **kwargs):
        if self.shards:
            raise RuntimeError("simulated crash")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(layout.ShardWriter, "add_shard", crash_after_first)
    with pytest.raises(RuntimeError):
        write_dataset(data, tmp_path, "tiny", source={}, num_shards=3)
    assert list(tmp_path.iterdir()) == [], "no folder, not even a temporary one"
    with pytest.raises(DataError, match="does not exist"):
        read_meta(tmp_path / "tiny")


def test_killed_process_leaves_nothing_that_looks_valid(tmp_path):
    """A hard kill (no cleanup runs) mid-prepare: only a hidden temp folder without meta.json remains."""
    script = textwrap.dedent(f"""
        import os
        from movierec.data import layout
        from movierec.data.prepare import prepare
        def die(self, *a, **k):
            os._exit(3)
        layout.ShardWriter.finish = die
        prepare("synthetic", {str(tmp_path)!r}, num_shards=2)
    """)
    assert subprocess.run([sys.executable, "-c", script], check=False).returncode == 3
    leftovers = list(tmp_path.iterdir())
    assert [p.name.startswith(".synthetic.tmp-") for p in leftovers] == [True]
    assert not (leftovers[0] / "meta.json").exists()
    with pytest.raises(DataError, match="does not exist"):
        read_meta(tmp_path / "synthetic")
    path = prepare("synthetic", tmp_path, num_shards=2)
    assert [p.name for p in tmp_path.iterdir()] == ["synthetic"], "the next prepare removes the leftovers"
    assert read_meta(path)["name"] == "synthetic"


def test_failed_overwrite_keeps_the_old_dataset(dataset, monkeypatch):
    path, rows = dataset
    before = json.loads((path / "meta.json").read_text())
    monkeypatch.setattr(layout.ShardWriter, "add_shard", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    data = Interactions(users=rows[:, 0], items=rows[:, 1], timestamps=rows[:, 3])
    with pytest.raises(OSError):
        write_dataset(data, path.parent, "tiny", source={}, overwrite=True)
    assert json.loads((path / "meta.json").read_text()) == before
    load_sequences(path)
    with pytest.raises(DataError, match="already exists; pass --overwrite"):
        write_dataset(data, path.parent, "tiny", source={})
