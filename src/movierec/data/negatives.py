"""Negative items: "has user u seen item i?" over the shards as they lie on disk, and seeded draws.

`SeenItems` answers membership with a vectorised binary search inside each user's sorted item segment.
When a dataset's sequences are already sorted by item id (MLPerf's files) the mapped shards are the index
and nothing is copied; otherwise each shard is sorted once on its own (one sort of ~2 M keys per shard; the
result is a private copy of 4 bytes per pair in every process).

Evaluation draws its negatives from a counter-based hash of (seed, stream, user, slot, round): the same
user always gets the same candidates, whichever batch, sample of users or process it is scored in.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from movierec.data.layout import SequenceData
from movierec.data.mapped import ConcatenatedColumn


def _is_sorted_within_users(part: np.ndarray, segment_starts: np.ndarray) -> bool:
    """True when the items of `part` only decrease where a new user's segment starts."""
    if len(part) < 2:
        return True
    drops = np.flatnonzero(part[1:] < part[:-1]) + 1
    return bool(np.isin(drops, segment_starts).all())


class SeenItems:
    """Per-user sorted item sets (CSR over user ids) plus optional held-out columns, for vectorised look-ups."""

    def __init__(self, offsets: np.ndarray, sorted_items: ConcatenatedColumn, num_items: int, held_out: tuple = ()):
        self.offsets, self.items, self.num_items, self.held_out = offsets, sorted_items, num_items, held_out

    @classmethod
    def from_data(cls, data: SequenceData, include_held_out: bool = False) -> SeenItems:
        offsets, parts = data.train_offsets, []
        for part, start in zip(data.train_items.parts, data.train_items.starts[:-1], strict=True):
            lo, hi = np.searchsorted(offsets, [start, start + len(part)])
            segment_starts = offsets[lo:hi] - start
            if _is_sorted_within_users(part, segment_starts):
                parts.append(part)
                continue
            lengths = np.diff(np.append(segment_starts, len(part)))
            owner = np.repeat(np.arange(len(lengths), dtype=np.int64), lengths)
            keys = owner * (data.num_items + 1) + part
            keys.sort()
            parts.append((keys % (data.num_items + 1)).astype(np.int32))
        held = (data.valid_item, data.test_item) if include_held_out else ()
        return cls(offsets, ConcatenatedColumn(parts), data.num_items, held)

    def contains(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Boolean array of the shape of `items`: has the entry's user (broadcast to it) seen the item?"""
        shape = np.shape(items)
        users = np.broadcast_to(users, shape).ravel()
        items = np.asarray(items).ravel()
        found = np.zeros(len(items), dtype=bool)
        for column in self.held_out:
            found |= column[users] == items
        lo, end = self.offsets[users], self.offsets[users + 1]
        active = np.flatnonzero(end > lo)
        if len(active):
            lo, end, target = lo[active], end[active], items[active]
            hi = end.copy()
            gather = self.items.gatherer(lo)
            while (todo := lo < hi).any():  # lower bound of target in [lo, end)
                mid = (lo + hi) // 2
                below = gather(np.minimum(mid, end - 1)) < target
                lo = np.where(todo & below, mid + 1, lo)
                hi = np.where(todo & ~below, mid, hi)
            found[active] |= (lo < end) & (gather(np.minimum(lo, end - 1)) == target)
        return found.reshape(shape)

    def seen_items(self, user: int) -> np.ndarray:
        seen = self.items[self.offsets[user] : self.offsets[user + 1]]
        extra = [column[user] for column in self.held_out if column[user] > 0]
        return np.union1d(seen, extra).astype(np.int64)


def sample_unseen(
    index: SeenItems,
    users: np.ndarray,
    draw: Callable[[np.ndarray, int], np.ndarray],
    fallback_rng: Callable[[int], np.random.Generator],
    rounds: int = 32,
) -> np.ndarray:
    """Items from `draw(mask, round)` that each entry's user (`users`, any shape) has not seen, by rejection.

    `draw(mask, r)` returns new candidates for the entries where `mask` is true. Entries still rejected after
    `rounds` redraws (users who have seen nearly every item) are drawn uniformly from the user's unseen
    items with `fallback_rng(user)`; a user who has seen every item keeps a seen one.
    """
    everything = np.ones(users.shape, dtype=bool)
    negs = draw(everything, 0).reshape(users.shape)
    bad = index.contains(users, negs)
    for round_ in range(1, rounds + 1):
        if not bad.any():
            return negs
        negs[bad] = draw(bad, round_)
        bad[bad] = index.contains(users[bad], negs[bad])
    for user in np.unique(users[bad]):
        where = bad & (users == user)
        unseen = np.setdiff1d(np.arange(1, index.num_items + 1), index.seen_items(int(user)))
        if len(unseen):
            negs[where] = fallback_rng(int(user)).choice(unseen, size=int(where.sum()))
    return negs


def draw_by_weight(rng: np.random.Generator, cdf: np.ndarray, n: int) -> np.ndarray:
    """`n` item ids drawn with probability proportional to their weight; `cdf` is the cumsum over ids 0..I."""
    return items_at(rng.random(n), cdf)


def items_at(unit: np.ndarray, cdf: np.ndarray) -> np.ndarray:
    """Item ids at quantiles `unit` in [0, 1) of the distribution whose cumsum over ids 0..I is `cdf`."""
    return np.minimum(np.searchsorted(cdf, unit * cdf[-1], side="right"), len(cdf) - 1)


def sample_training_negatives(
    rng: np.random.Generator, index: SeenItems, users: np.ndarray, shape: tuple[int, ...], num_items: int
) -> np.ndarray:
    """Uniform items in 1..num_items that the row's user has not seen; `users` broadcasts against `shape`."""
    grid = np.ascontiguousarray(np.broadcast_to(users, shape))
    return sample_unseen(
        index,
        grid,
        lambda mask, _round: rng.integers(1, num_items + 1, size=int(mask.sum())),
        lambda _user: rng,
    )


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a bijection of uint64 whose outputs look independent and uniform."""
    x = x ^ (x >> np.uint64(30))
    x = x * np.uint64(0xBF58476D1CE4E5B9)
    x = x ^ (x >> np.uint64(27))
    x = x * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hashed_unit(seed: int, stream: int, users: np.ndarray, count: int, round_: int) -> np.ndarray:
    """(len(users), count) floats in [0, 1), a pure function of (seed, stream, user, slot, round)."""
    with np.errstate(over="ignore"):
        base = _mix64(np.uint64(seed) * _GOLDEN + np.uint64(stream))
        per_user = _mix64(base ^ (np.asarray(users, dtype=np.uint64) * _GOLDEN))
        slots = np.arange(count, dtype=np.uint64) + np.uint64(round_) * np.uint64(count)
        bits = _mix64(per_user[:, None] + (slots[None, :] + np.uint64(1)) * _GOLDEN)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def seeded_candidates(
    index: SeenItems, users: np.ndarray, count: int, seed: int, stream: int, cdf: np.ndarray | None = None
) -> np.ndarray:
    """(len(users), count) items each user never interacted with, uniform (or by `cdf`), fixed per user."""
    users = np.asarray(users, dtype=np.int64)
    grid = np.ascontiguousarray(np.broadcast_to(users[:, None], (len(users), count)))

    def draw(mask: np.ndarray, round_: int) -> np.ndarray:
        unit = hashed_unit(seed, stream, users, count, round_)[mask.reshape(grid.shape)]
        if cdf is None:
            return 1 + np.minimum((unit * index.num_items).astype(np.int64), index.num_items - 1)
        return items_at(unit, cdf)

    return sample_unseen(index, grid, draw, lambda user: np.random.default_rng([seed, stream, user]))
