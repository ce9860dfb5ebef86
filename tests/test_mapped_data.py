"""Shards read in place: memory-mapped members, one view over many shards, the seen-item index."""

from __future__ import annotations

import numpy as np
import pytest

from movierec.data.layout import load_sequences
from movierec.data.mapped import ConcatenatedColumn, map_npz_member
from movierec.data.negatives import SeenItems, sample_training_negatives
from movierec.data.sequences import inputs_with_appended
from movierec.data.split import Interactions, write_dataset


def test_stored_members_are_mapped_and_compressed_ones_read(tmp_path):
    pairs = np.arange(40, dtype=np.int32).reshape(20, 2)
    np.savez(tmp_path / "stored.npz", pairs=pairs, other=np.ones(3))
    np.savez_compressed(tmp_path / "packed.npz", pairs=pairs)
    mapped = map_npz_member(tmp_path / "stored.npz", "pairs")
    assert isinstance(mapped, np.memmap) and not mapped.flags.writeable
    np.testing.assert_array_equal(mapped, pairs)
    np.testing.assert_array_equal(map_npz_member(tmp_path / "packed.npz", "pairs"), pairs)
    with pytest.raises(KeyError):
        map_npz_member(tmp_path / "stored.npz", "missing")


def test_concatenated_column_gathers_like_the_concatenation():
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 100, n).astype(np.int32) for n in (5, 0, 7, 1, 9)]
    whole = np.concatenate(parts)
    column = ConcatenatedColumn(parts)
    assert len(column) == len(whole)
    index = rng.integers(0, len(whole), (4, 6))
    np.testing.assert_array_equal(column[index], whole[index])
    np.testing.assert_array_equal(column[3:15], whole[3:15])
    np.testing.assert_array_equal(np.asarray(column), whole)
    anchors = np.array([0, 5, 12, 13])  # the start of each non-empty part
    lengths = np.array([5, 7, 1, 9])
    gather = column.gatherer(anchors)
    offsets = anchors + rng.integers(0, 100, 4) % lengths
    np.testing.assert_array_equal(gather(offsets), whole[offsets])


def dataset(tmp_path, sequences: dict[int, list[int]], shards: int = 3):
    users = np.concatenate([[u] * len(s) for u, s in sequences.items()])
    items = np.concatenate(list(sequences.values()))
    interactions = Interactions(users=users, items=items, timestamps=np.arange(len(users)))
    path = write_dataset(
        interactions, tmp_path, "d", source={"kind": "test"}, min_user_interactions=0, min_item_interactions=0,
        num_shards=shards,
    )  # fmt: skip
    return load_sequences(path)


@pytest.mark.parametrize("ordered", [True, False])
def test_seen_items_answers_like_a_set_per_user(tmp_path, ordered):
    rng = np.random.default_rng(1)
    sequences = {}
    for user in range(1, 41):
        items = rng.choice(np.arange(1, 61), size=int(rng.integers(1, 30)), replace=False)
        sequences[user] = sorted(items.tolist()) if ordered else items.tolist()
    data = dataset(tmp_path, sequences)
    assert all(isinstance(part, np.memmap) for part in data.train_items.parts), "shards are mapped, not copied"
    index = SeenItems.from_data(data)
    held = SeenItems.from_data(data, include_held_out=True)
    assert all(isinstance(p, np.memmap) for p in index.items.parts) == ordered, "sorted data is its own index"
    users = rng.choice(data.users, 500)
    items = rng.integers(1, data.num_items + 1, 500)
    expected = np.array([i in set(data.train_sequence(u).tolist()) for u, i in zip(users, items, strict=True)])
    np.testing.assert_array_equal(index.contains(users, items), expected)
    with_held = expected | (items == data.valid_item[users]) | (items == data.test_item[users])
    np.testing.assert_array_equal(held.contains(users, items), with_held)
    negatives = sample_training_negatives(np.random.default_rng(0), index, users[:, None], (500, 3), data.num_items)
    assert not index.contains(users[:, None], negatives).any()


def test_inputs_with_appended_item(tmp_path):
    data = dataset(tmp_path, {1: [1, 2, 3, 4, 5], 2: [6, 7, 8]}, shards=2)
    users = np.array([1, 2])
    plain = inputs_with_appended(data.train_items, data.train_offsets, users, None, 4)
    appended = inputs_with_appended(data.train_items, data.train_offsets, users, data.valid_item[users], 4)
    # training sequences: [1, 2, 3] and [6]; validation items 4 and 7
    np.testing.assert_array_equal(plain, [[0, 1, 2, 3], [0, 0, 0, 6]])
    np.testing.assert_array_equal(appended, [[1, 2, 3, 4], [0, 0, 6, 7]])
