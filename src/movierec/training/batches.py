"""Training batches built with numpy from the per-user CSR arrays: no per-example Python.

An epoch is one pass over the users with at least two training items (as SASRec's sampler). Users are
shuffled, then grouped "sortish": within windows of `bucket_batches` batches users are sorted by length,
so a batch is only as wide as its longest sequence (dynamic padding) and little compute goes to padding.

A user's training sequence is the latest `max_len` items; with `window_prob` (SSE-PT++, Wu et al., RecSys
2020) a user with a longer history instead gets, with that probability, a contiguous window of `max_len`
items ending at a uniformly drawn earlier position, so that the older part of long histories is trained on too.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from movierec.data.layout import SequenceData
from movierec.data.sequences import left_padded
from movierec.errors import ConfigError


@dataclass
class Batch:
    users: np.ndarray  # (B,)
    inputs: np.ndarray  # (B, L) left-padded
    targets: np.ndarray  # (B, L) next item, 0 at padding
    times: np.ndarray | None = None  # (B, L) Unix seconds of the inputs, for a model with a time bias

    @property
    def num_tokens(self) -> int:
        return int(np.count_nonzero(self.targets))


class TrainBatches:
    """Yields shuffled, length-bucketed batches of (users, inputs, targets) for one epoch at a time."""

    def __init__(
        self,
        data: SequenceData,
        batch_size: int,
        max_len: int,
        bucket_batches: int = 32,
        window_prob: float = 0.0,
        with_times: bool = False,
    ):
        self.data, self.batch_size, self.max_len, self.bucket_batches = data, batch_size, max_len, bucket_batches
        self.window_prob, self.with_times = window_prob, with_times
        if with_times and data.train_times is None:
            raise ConfigError(
                f"the model reads timestamps (model.time_bias), and {data.path} has none (SASRec's text format "
                "keeps only the order); prepare a MovieLens release with timestamps, or set model.time_bias=false"
            )
        lengths = data.train_lengths
        self.users = np.flatnonzero(lengths >= 2)
        self.lengths = np.minimum(lengths[self.users] - 1, max_len)  # target positions per user
        self.mean_tokens = float(self.lengths.sum()) / max(len(self), 1)  # target positions per batch

    def __len__(self) -> int:
        return int(np.ceil(len(self.users) / self.batch_size))

    @staticmethod
    def count(data: SequenceData, batch_size: int) -> int:
        """Batches per epoch of `batch_size` (users with at least two training items), without building them."""
        return int(np.ceil(np.count_nonzero(data.train_lengths >= 2) / batch_size))

    def plan(self, rng: np.random.Generator) -> list[np.ndarray]:
        """The users of each batch of one epoch, in training order (shuffled, length-bucketed)."""
        order = rng.permutation(len(self.users))
        window = self.batch_size * max(1, self.bucket_batches)
        batches = []
        for start in range(0, len(order), window):
            chunk = order[start : start + window]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            batches.extend(chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size))
        return [self.users[batches[pick]] for pick in rng.permutation(len(batches))]

    def epoch(self, rng: np.random.Generator) -> Iterator[Batch]:
        for users in self.plan(rng):
            yield self.make_batch(users, rng)

    def make_batch(self, users: np.ndarray, rng: np.random.Generator | None = None) -> Batch:
        """The batch of `users`; `rng` draws the SSE-PT++ windows (none drawn without it or at window_prob 0)."""
        data = self.data
        starts, ends = data.train_offsets[users], data.train_offsets[users + 1]
        if self.window_prob > 0 and rng is not None:
            ends = self.window_ends(rng, starts, ends)
        width = int(min(self.max_len, (ends - starts).max() - 1))
        targets, _ = left_padded(data.train_items, ends, starts + 1, width)
        inputs, _ = left_padded(data.train_items, ends - 1, starts, width)
        times = left_padded(data.train_times, ends - 1, starts, width)[0] if self.with_times else None
        return Batch(users=users, inputs=inputs, targets=targets, times=times)

    def window_ends(self, rng: np.random.Generator, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
        """`ends`, moved back for the users drawn for an earlier window: a user with n training items has
        n - 1 - max_len windows older than the latest, and the drawn one is uniform among them."""
        older_windows = np.maximum(ends - starts - 1 - self.max_len, 0)
        drawn = (rng.random(len(ends)) < self.window_prob) & (older_windows > 0)
        shift = np.floor(rng.random(len(ends)) * older_windows).astype(np.int64) + 1  # 1 .. older_windows
        return np.where(drawn, ends - shift, ends)
