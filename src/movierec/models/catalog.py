"""Scoring the whole catalogue for a batch of queries, `item_chunk` items at a time.

Evaluation (the rank of a held-out item, the log-partition of the full cross-entropy) and serving (the top k)
rank against the same catalogue, so they share this one scorer: the same query precision, the same exclusion
of a row's seen items, the same chunking. A batch never holds a (batch x catalogue) matrix, whatever the
number of items.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from movierec.data.sequences import ragged_indices
from movierec.models.base import SequentialModel

SeenPairs = tuple[np.ndarray, np.ndarray]  # (row in the batch, item id) of every item a row must not be offered
NOTHING_SEEN: SeenPairs = (np.zeros(0, np.int64), np.zeros(0, np.int64))


def row_item_pairs(items: np.ndarray, starts: np.ndarray, lengths: np.ndarray) -> SeenPairs:
    """(row, item) pairs of each row r's items[starts[r] : starts[r] + lengths[r]]: a batch's seen items."""
    return np.repeat(np.arange(len(lengths)), lengths), items[ragged_indices(starts, lengths)]


def length_sorted_batches(
    rows: np.ndarray,
    lengths: np.ndarray,
    batch_size: int,
    max_len: int,
    inputs: Callable[[np.ndarray, int], np.ndarray],
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(batch of `rows`, their left-padded inputs `inputs(batch, width)`), rows sorted by `lengths[row]`.

    Rows of similar length share a batch, so each batch is padded only to its longest row (at most `max_len`):
    dynamic padding, the cost of a batch follows its histories rather than the longest one overall.
    """
    rows = rows[np.argsort(lengths[rows], kind="stable")]
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        width = int(min(max_len, max(1, lengths[batch].max())))
        yield batch, inputs(batch, width)


class _SeenMask:
    """A batch's seen (row, item) pairs, sorted by item once, so that each chunk finds its own by bisection."""

    def __init__(self, seen: SeenPairs, device: torch.device):
        rows, items = seen
        order = np.argsort(items, kind="stable")
        self.rows, self.items, self.device = rows[order], items[order], device

    def apply(self, scores: torch.Tensor, lo: int, hi: int) -> None:
        """Set the scores of the seen items lo..hi-1 of chunk `scores` (batch x (hi - lo)) to -inf, in place."""
        a, b = np.searchsorted(self.items, [lo, hi])
        if b > a:
            rows = torch.from_numpy(self.rows[a:b]).to(self.device)
            scores[rows, torch.from_numpy(self.items[a:b] - lo).to(self.device)] = float("-inf")


class CatalogScorer:
    """Queries of a model and their scores against every item 1..num_items, `item_chunk` items at a time.

    `autocast_dtype` (e.g. torch.bfloat16) computes the queries under autocast, for speed; they are then cast
    to float32 and the catalogue is scored, ranked and masked in float32, where ties and -inf behave the same
    on every device.
    """

    def __init__(self, model: SequentialModel, item_chunk: int = 32768, autocast_dtype: torch.dtype | None = None):
        self.model, self.item_chunk, self.autocast_dtype = model, item_chunk, autocast_dtype

    def queries(self, sequences: np.ndarray, users: np.ndarray, times: np.ndarray | None = None) -> torch.Tensor:
        """Float32 last-position queries (B, Q) of left-padded `sequences` (B, L) of `users` (B,), on the
        model's device; user 0 is a person without a user embedding. `times` (B, L): the items' Unix seconds,
        for a model with a time bias (None: unknown)."""
        device = next(self.model.parameters()).device
        dtype = self.autocast_dtype or torch.float32
        extra = {"times": torch.from_numpy(times).to(device)} if self.model.uses_times and times is not None else {}
        with torch.autocast(device.type, dtype=dtype, enabled=self.autocast_dtype is not None):
            queries = self.model.queries(
                torch.from_numpy(sequences).to(device), torch.from_numpy(users).to(device), last_only=True, **extra
            )
        return queries.float()

    def _chunks(self, queries: torch.Tensor) -> Iterator[tuple[int, int, torch.Tensor]]:
        """(lo, hi, float32 scores (B, hi - lo) of items lo..hi-1) over the catalogue, unmasked: the log-partition
        of `target_ranks` is taken over every item, seen or not."""
        num_items = self.model.config.num_items
        for lo in range(1, num_items + 1, self.item_chunk):
            hi = min(lo + self.item_chunk, num_items + 1)
            yield lo, hi, self.model.score_shared(queries, slice(lo, hi)).float()

    def top_k(self, queries: torch.Tensor, k: int, seen: SeenPairs = NOTHING_SEEN) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores, item ids), each (B, k), best first; `seen` items are left out (their score is -inf).

        A running top-k over the chunks: memory stays at (B x item_chunk) whatever the catalogue's size. A row
        with fewer than k unseen items gets -inf scores in its last places (drop them).
        """
        device = queries.device
        mask = _SeenMask(seen, device)
        best_scores = torch.full((len(queries), k), float("-inf"), device=device)
        best_items = torch.zeros((len(queries), k), dtype=torch.long, device=device)
        for lo, hi, scores in self._chunks(queries):
            mask.apply(scores, lo, hi)
            values, indices = torch.topk(scores, min(k, hi - lo), dim=1)
            merged_scores = torch.cat([best_scores, values], dim=1)
            merged_items = torch.cat([best_items, indices + lo], dim=1)
            best_scores, pick = torch.topk(merged_scores, k, dim=1)
            best_items = merged_items.gather(1, pick)
        return best_scores, best_items

    def target_ranks(
        self, queries: torch.Tensor, targets: np.ndarray, seen: SeenPairs = NOTHING_SEEN
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(0-based rank of each row's target among the unseen items, log-partition over all items), each (B,).

        The target is not its own competitor; ties count against it (a model that scores everything equally
        gets no credit); `seen` items are not competitors. The log-partition (the normaliser of the full
        cross-entropy) is taken over every item, seen ones included.
        """
        device = queries.device
        target_scores = self.model.score(queries, torch.from_numpy(targets).to(device)[:, None])[:, 0]
        rows, items = seen  # the target joins the items its row does not compete with
        mask = _SeenMask((np.concatenate([rows, np.arange(len(targets))]), np.concatenate([items, targets])), device)
        ranks = torch.zeros(len(queries), dtype=torch.long, device=device)
        log_partition = torch.full((len(queries),), float("-inf"), device=device)
        for lo, hi, scores in self._chunks(queries):
            log_partition = torch.logaddexp(log_partition, torch.logsumexp(scores, dim=1))
            mask.apply(scores, lo, hi)
            ranks += (scores >= target_scores[:, None]).sum(1)
        return ranks, log_partition
