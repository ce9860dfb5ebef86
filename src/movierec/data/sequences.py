"""Vectorised views of per-user sequences stored as CSR (offsets + items): no per-example Python."""

from __future__ import annotations

import numpy as np


def ragged_indices(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of arange(start, start + length) for each row, vectorised."""
    lengths = np.asarray(lengths, dtype=np.int64)
    total = int(lengths.sum())
    row_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    return np.repeat(np.asarray(starts, dtype=np.int64) - row_starts, lengths) + np.arange(total)


def left_padded(items, ends: np.ndarray, starts: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of the last `width` items before `ends` (exclusive), left-padded with 0 (int64); also their indices.

    `items` is an array or a `ConcatenatedColumn` (anything gathered by an index array).
    """
    idx = ends[:, None] - width + np.arange(width)[None, :]
    valid = idx >= starts[:, None]
    gathered = items[np.where(valid, idx, 0)] if len(items) else 0
    out = np.where(valid, gathered, 0).astype(np.int64)
    return out, np.where(valid, idx, -1)


def inputs_with_appended(
    items,
    offsets: np.ndarray,
    users: np.ndarray,
    appended: np.ndarray | None,
    width: int,
    present: np.ndarray | None = None,
) -> np.ndarray:
    """Left-padded (len(users), width) inputs: each user's last items, then `appended[row]` when it is > 0
    (or where `present`, for values that may be 0, such as the held-out items' timestamps).

    Evaluation feeds the training sequence (validation) or the training sequence plus the validation item
    (test) without building a second copy of the histories.
    """
    starts, ends = offsets[users], offsets[users + 1]
    if appended is None:
        return left_padded(items, ends, starts, width)[0]
    has = appended > 0 if present is None else present
    out, _ = left_padded(items, ends, starts, width)
    shifted, _ = left_padded(items, ends, starts, width - 1) if width > 1 else (np.zeros((len(users), 0), np.int64), 0)
    out[has, :-1] = shifted[has]
    out[has, -1] = appended[has]
    return out


class UserHistories:
    """Every user's whole history, read from the mapped shards: the training sequence, then each non-zero
    held-out item of `appended` (for example validation, then test), without a second copy of the data.
    For values that may be 0 (the held-out items' timestamps), `present` gives the held-out items whose
    presence they follow."""

    def __init__(
        self,
        offsets: np.ndarray,
        items,
        appended: tuple[np.ndarray, ...] = (),
        present: tuple[np.ndarray, ...] | None = None,
    ):
        self.offsets, self.items, self.appended = offsets, items, appended
        self.present = appended if present is None else present
        self.lengths = np.diff(offsets) + sum((a > 0).astype(np.int64) for a in self.present)

    def gather(self, users: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Compact CSR (offsets, int64 items) of the histories of `users`, oldest item first."""
        users = np.asarray(users, dtype=np.int64)
        starts = self.offsets[users]
        train_lengths = self.offsets[users + 1] - starts
        lengths = self.lengths[users]
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        out = np.empty(int(offsets[-1]), dtype=np.int64)
        out[ragged_indices(offsets[:-1], train_lengths)] = self.items[ragged_indices(starts, train_lengths)]
        position = offsets[:-1] + train_lengths
        for column, presence in zip(self.appended, self.present, strict=True):
            values = column[users]
            has = presence[users] > 0
            out[position[has]] = values[has]
            position = position + has
        return offsets, out
