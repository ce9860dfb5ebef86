"""Micro-batching: concurrent requests scored together, one (batch x d) x (d x chunk) product per catalogue chunk
(a bfloat16 screen, then float32 scores of each row's candidates, where the CPU has native bfloat16:
`CatalogScorer.top_k`).

Scoring one request is one matrix-vector product over the whole catalogue; with 855,776 items that is
memory-bound, so four concurrent requests cost four times one. `MicroBatcher` collects the requests that
arrive within `window_s` of the first (at most `max_rows` histories) and scores them in one call, which reads
the item table once for all of them. A request's result is its own rows of the batch, truncated to its k.

Results equal scoring alone to floating-point rounding: the screen's candidates are scored row by row (the
same bits batched or alone), and a row that falls back to the float32 product sums the same terms in a
blocking that may differ from a single row's, so a score can differ in its last bits (tests allow 1e-5), and
only two items whose scores tie within that can swap places. A batch that fails is retried request by request, so
one failing request never fails its neighbours.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

import numpy as np

# (offsets, items, users, k, exclude_seen, times) -> (top items, top scores), each (rows, k)
ScoreRows = Callable[[np.ndarray, np.ndarray, np.ndarray, int, bool, np.ndarray | None], tuple[np.ndarray, np.ndarray]]


@dataclass
class Request:
    """Histories in CSR form (offsets over items), their users, k, whether seen items are left out, and the
    items' timestamps (aligned with `items`) for a model with a time bias, or None."""

    offsets: np.ndarray
    items: np.ndarray
    users: np.ndarray
    k: int
    exclude_seen: bool
    times: np.ndarray | None = None

    @property
    def rows(self) -> int:
        return len(self.offsets) - 1


def concatenate(requests: list[Request]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
    """The requests' histories as one CSR block (offsets, items), their users and their items' timestamps
    (None unless every request has them), rows in request order."""
    lengths = np.concatenate([np.diff(r.offsets) for r in requests])
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    items = np.concatenate([r.items[r.offsets[0] : r.offsets[-1]] for r in requests])
    timed = all(r.times is not None for r in requests)
    times = np.concatenate([r.times[r.offsets[0] : r.offsets[-1]] for r in requests]) if timed else None
    return offsets, items, np.concatenate([r.users for r in requests]), times


class MicroBatcher:
    """`submit(request)` from any thread; one worker thread scores what arrived together."""

    def __init__(self, score_rows: ScoreRows, window_s: float = 0.002, max_rows: int = 64):
        self.score_rows, self.window_s, self.max_rows = score_rows, window_s, max_rows
        self.queue: queue.Queue[tuple[Request, Future]] = queue.Queue()
        self.batches = 0  # batches scored, and requests in them (for the tests and the bench)
        self.requests = 0
        threading.Thread(target=self._work, name="movierec-batcher", daemon=True).start()

    def submit(self, request: Request) -> tuple[np.ndarray, np.ndarray]:
        future: Future = Future()
        self.queue.put((request, future))
        return future.result()

    def _collect(self) -> list[tuple[Request, Future]]:
        """The first waiting request and those arriving within the window, at most max_rows histories."""
        batch = [self.queue.get()]
        rows, deadline = batch[0][0].rows, time.monotonic() + self.window_s
        while rows < self.max_rows:
            try:
                item = self.queue.get(timeout=max(deadline - time.monotonic(), 0)) if self.window_s else \
                    self.queue.get_nowait()  # fmt: skip
            except queue.Empty:
                break
            batch.append(item)
            rows += item[0].rows
        return batch

    def _work(self) -> None:
        while True:
            batch = self._collect()
            for exclude in (True, False):  # one scoring call per kind of request
                for timed in (True, False):
                    group = [(r, f) for r, f in batch if r.exclude_seen == exclude and (r.times is not None) == timed]
                    if group:
                        self._score(group)

    def _score(self, group: list[tuple[Request, Future]]) -> None:
        requests = [r for r, _ in group]
        try:
            offsets, items, users, times = concatenate(requests)
            k = max(r.k for r in requests)
            top_items, top_scores = self.score_rows(offsets, items, users, k, requests[0].exclude_seen, times)
        except Exception:
            for request, future in group:
                self._score_alone(request, future)
            return
        self.batches, self.requests = self.batches + 1, self.requests + len(group)
        start = 0
        for request, future in group:
            stop = start + request.rows
            future.set_result((top_items[start:stop, : request.k], top_scores[start:stop, : request.k]))
            start = stop

    def _score_alone(self, request: Request, future: Future) -> None:
        try:
            future.set_result(self.score_rows(request.offsets, request.items, request.users, request.k,
                                              request.exclude_seen, request.times))  # fmt: skip
        except Exception as exc:
            future.set_exception(exc)
