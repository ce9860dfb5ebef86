"""Training batches built with numpy from the per-user CSR arrays: no per-example Python.

An epoch is one pass over the users with at least two training items (as SASRec's sampler). Users are
shuffled, then grouped "sortish": within windows of `bucket_batches` batches users are sorted by length,
so a batch is only as wide as its longest sequence (dynamic padding) and little compute goes to padding.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from movierec.data.layout import SequenceData


@dataclass
class Batch:
    users: np.ndarray  # (B,)
    inputs: np.ndarray  # (B, L) left-padded
    targets: np.ndarray  # (B, L) next item, 0 at padding

    @property
    def num_tokens(self) -> int:
        return int(np.count_nonzero(self.targets))


class HistoryIndex:
    """Sorted (user, item) keys for vectorised "has user u seen item i?" look-ups."""

    def __init__(self, users: np.ndarray, items: np.ndarray, num_items: int):
        self.stride = num_items + 1
        self.keys = np.unique(users.astype(np.int64) * self.stride + items)

    @classmethod
    def from_sequences(cls, data: SequenceData, include_held_out: bool = False) -> HistoryIndex:
        users = np.repeat(np.arange(data.num_users + 1), np.diff(data.train_offsets)[: data.num_users + 1])
        items = data.train_items
        if include_held_out:
            for column in (data.valid_item, data.test_item):
                held = np.flatnonzero(column)
                users, items = np.concatenate([users, held]), np.concatenate([items, column[held]])
        return cls(users, items, data.num_items)

    def contains(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        keys = users.astype(np.int64) * self.stride + items
        pos = np.searchsorted(self.keys, keys)
        pos = np.minimum(pos, len(self.keys) - 1)
        return self.keys[pos] == keys

    def seen_items(self, user: int) -> np.ndarray:
        lo, hi = np.searchsorted(self.keys, [user * self.stride, (user + 1) * self.stride])
        return self.keys[lo:hi] - user * self.stride


def sample_unseen(
    rng: np.random.Generator, index: HistoryIndex, users: np.ndarray, draw, rounds: int = 32
) -> np.ndarray:
    """Items from `draw(n)` that each entry's user (`users`, any shape) has not seen, by rejection.

    Entries still rejected after `rounds` redraws (users who have seen nearly every item) are drawn
    uniformly from the user's unseen items; a user who has seen every item keeps a seen one.
    """
    negs = draw(users.size).reshape(users.shape)
    bad = index.contains(users, negs)
    for _ in range(rounds):
        if not bad.any():
            return negs
        negs[bad] = draw(int(bad.sum()))
        bad[bad] = index.contains(users[bad], negs[bad])
    num_items = index.stride - 1
    for user in np.unique(users[bad]):
        where = bad & (users == user)
        unseen = np.setdiff1d(np.arange(1, num_items + 1), index.seen_items(int(user)))
        if len(unseen):
            negs[where] = rng.choice(unseen, size=int(where.sum()))
    return negs


def draw_by_weight(rng: np.random.Generator, cdf: np.ndarray, n: int) -> np.ndarray:
    """`n` item ids drawn with probability proportional to their weight; `cdf` is the cumsum over ids 0..I."""
    return np.minimum(np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right"), len(cdf) - 1)


def sample_negatives(
    rng: np.random.Generator, index: HistoryIndex, users: np.ndarray, shape: tuple[int, ...], num_items: int
) -> np.ndarray:
    """Uniform items in 1..num_items that the row's user has not seen; `users` broadcasts against `shape`."""
    grid = np.ascontiguousarray(np.broadcast_to(users, shape))
    return sample_unseen(rng, index, grid, lambda n: rng.integers(1, num_items + 1, size=n))


def ragged_indices(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(start, start + length) for each row, vectorised."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    row_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return np.repeat(np.asarray(starts, dtype=np.int64) - row_starts, lengths) + np.arange(total)


def left_padded(items: np.ndarray, ends: np.ndarray, starts: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the last `width` items before `ends` (exclusive), left-padded with 0; also their indices."""
    idx = ends[:, None] - width + np.arange(width)[None, :]
    valid = idx >= starts[:, None]
    out = np.where(valid, items[np.where(valid, idx, 0)] if len(items) else 0, 0)
    return out, np.where(valid, idx, -1)


class TrainBatches:
    """Yields shuffled, length-bucketed batches of (users, inputs, targets) for one epoch at a time."""

    def __init__(self, data: SequenceData, batch_size: int, max_len: int, bucket_batches: int = 32):
        self.data, self.batch_size, self.max_len, self.bucket_batches = data, batch_size, max_len, bucket_batches
        lengths = data.train_lengths
        self.users = np.flatnonzero(lengths >= 2)
        self.lengths = np.minimum(lengths[self.users] - 1, max_len)  # target positions per user
        self.mean_tokens = float(self.lengths.sum()) / max(len(self), 1)  # target positions per batch

    def __len__(self) -> int:
        return int(np.ceil(len(self.users) / self.batch_size))

    def epoch(self, rng: np.random.Generator) -> Iterator[Batch]:
        order = rng.permutation(len(self.users))
        window = self.batch_size * max(1, self.bucket_batches)
        batches = []
        for start in range(0, len(order), window):
            chunk = order[start : start + window]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches.extend(chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size))
        for pick in rng.permutation(len(batches)):
            yield self.make_batch(self.users[batches[pick]])

    def make_batch(self, users: np.ndarray) -> Batch:
        data = self.data
        starts, ends = data.train_offsets[users], data.train_offsets[users + 1]
        width = int(min(self.max_len, (ends - starts).max() - 1))
        targets, _ = left_padded(data.train_items, ends, starts + 1, width)
        inputs, _ = left_padded(data.train_items, ends - 1, starts, width)
        return Batch(users=users, inputs=inputs, targets=targets)
