"""Scoring the whole catalogue for a batch of queries, `item_chunk` items at a time.

Evaluation (the rank of a held-out item, the log-partition of the full cross-entropy) and serving (the top k)
rank against the same catalogue, so they share this one scorer: the same query precision, the same exclusion
of a row's seen items, the same chunking. A batch never holds a (batch x catalogue) matrix, whatever the
number of items.

Serving's top k (`screen=True`) first ranks the catalogue in bfloat16 (`BF16Screen`: about four times the
float32 product's speed on a CPU with native bfloat16), in order of decreasing item norm, stopping for a row
once no later item can beat its candidates (Cauchy-Schwarz), keeps a few more candidates than k, and scores those
again in float32 with the model's own `score`. A proven bound on the bfloat16 error says when the candidates
hold every item that the float32 top k could hold; a row where it cannot say so is scored in float32 over the
whole catalogue. Either way the answer is the float32 top k.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from functools import cached_property

import numpy as np
import torch

from movierec.data.sequences import ragged_indices
from movierec.errors import ConfigError
from movierec.models.base import SequentialModel

SeenPairs = tuple[np.ndarray, np.ndarray]  # (row in the batch, item id) of every item a row must not be offered
NOTHING_SEEN: SeenPairs = (np.zeros(0, np.int64), np.zeros(0, np.int64))
AFFINE_TOLERANCE = 1e-3
BF16_UNIT = 2.0**-8  # unit roundoff of bfloat16 (8 significant bits) and of float32 (24)
FP32_UNIT = 2.0**-24


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


def seen_of_rows(seen: SeenPairs, rows: np.ndarray, batch: int) -> SeenPairs:
    """The pairs of `rows` (of a batch of `batch` rows) only, renumbered as rows 0..len(rows)-1."""
    position = np.full(batch, -1)
    position[rows] = np.arange(len(rows))
    keep = position[seen[0]] >= 0
    return position[seen[0][keep]], seen[1][keep]


def affine_item_chunks(model: SequentialModel, chunk: int = 65536) -> Iterator[torch.Tensor]:
    """(items, Q + 1) float32 rows [w_j ; b_j] of items lo..hi-1, chunk by chunk, with score(q, j) =
    [q ; 1] . row_j: `affine_item_table` a chunk at a time, so that a copy of it need not exist in float32.

    Every model kind scores an item as an affine function of its query; w_j and b_j are read off the model
    itself, through `score_shared` of the unit queries and of the zero query, and the identity is checked on
    random queries (ConfigError where it does not hold), so no kind needs code of its own.
    """
    width = model.config.num_items + 1
    with torch.inference_mode():
        probe = model.queries(torch.ones(1, 1, dtype=torch.long), torch.zeros(1, dtype=torch.long), last_only=True)
        q = probe.shape[-1]
        basis = torch.cat([torch.eye(q), torch.zeros(1, q)])  # unit queries, then the zero query
        check = torch.randn(4, q)
        for lo in range(1, width, chunk):
            items = slice(lo, min(lo + chunk, width))
            scores = model.score_shared(basis, items).float()
            part = torch.cat([scores[:q] - scores[q:], scores[q:]]).t()  # (items, q + 1)
            exact = model.score_shared(check, items).float()
            derived = torch.cat([check, torch.ones(4, 1)], 1) @ part.t()
            if not torch.allclose(exact, derived, rtol=0, atol=AFFINE_TOLERANCE * max(1.0, exact.abs().max().item())):
                raise ConfigError(f"model.kind {model.config.kind} does not score items affinely: use the exact index")
            yield part


def affine_item_table(model: SequentialModel, chunk: int = 65536) -> np.ndarray:
    """(num_items, Q + 1) float32 rows [w_j ; b_j] with score(q, j) = [q ; 1] . row_j, item j at row j - 1."""
    return np.ascontiguousarray(torch.cat(list(affine_item_chunks(model, chunk))).numpy())


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16, AMX): only then is `BF16Screen` faster."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


class BF16Screen:
    """A bfloat16 copy of the catalogue's affine item table (`affine_item_table`), for `top_k`'s first pass.

    Columns that are the same for every item (SSE-PT's user term, a bias of zero) add the same amount to each
    item of a row and are left out: the screen ranks x . t_j over the other m columns. The rows are stored by
    decreasing norm |t_j|, so that `candidates` can stop early: by Cauchy-Schwarz no item after position p
    screens above |x| |t_p|, and once a row's candidates all beat that, the rest of the catalogue cannot
    enter them. A copy of the weights at construction: for a model that no longer trains (serving). On the
    CPU only: a CUDA bfloat16 product may reduce in reduced precision, which the bounds below do not cover.
    """

    FIRST_CHUNK = 4096  # items screened before the first test for an early stop; each later chunk doubles

    def __init__(self, model: SequentialModel):
        parts = affine_item_chunks(model)
        first = next(parts)
        table = torch.empty((model.config.num_items, first.shape[1]), dtype=torch.bfloat16)
        varying = torch.zeros(first.shape[1], dtype=torch.bool)
        column_max = torch.zeros(first.shape[1])  # each bounds |t_ji| over the items j
        lo = 0
        for part in itertools.chain([first], parts):
            table[lo : lo + len(part)] = part
            varying |= (part != first[0]).any(0)
            column_max = torch.maximum(column_max, part.abs().amax(0))
            lo += len(part)
        if not varying.any():
            raise ConfigError("every item scores the same: there is nothing to screen")
        table = table[:, varying]
        norms = torch.cat([part.double().norm(dim=1) for part in table.split(65536)])  # of the bfloat16 values
        self.norms, order = norms.sort(descending=True, stable=True)
        self.table, self.items = table[order], order + 1  # position p holds item items[p]
        self.position = torch.empty_like(order)
        self.position[order] = torch.arange(len(order))  # of item j at j - 1
        self.varying, self.constant = varying, first[0, ~varying].double()
        self.column_max, self.bias_max = column_max[varying].double(), column_max[-1].double()

    def rows(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(bfloat16 screen rows x (B, m), float64 bound (B,)) of float32 queries (B, Q).

        For every item j, |screen score - (float32 score - row constant)| <= bound, whatever the order of the
        float32 sums. With A = sum_i |x_i| max_j |t_ji| >= sum_i |x_i t_ji|, u = 2^-8 and
        gamma = (m + 2) 2^-24 / (1 - (m + 2) 2^-24):
        - bfloat16 inputs (relative error u each), float32 accumulation (gamma) and a bfloat16 result (u):
          (3u + 2^-13 + 2 gamma) A, the 2^-13 covering the u^2 and u^3 terms;
        - the float32 score itself and the table read off it: 4 gamma (A + |row constant| + |q|_1 max|b_j|);
        - denormals flushed to zero by the bfloat16 instructions: (m + 1) 2^-125 (1 + max|x_i| + max|t_ji|).
        """
        augmented = torch.cat([queries, torch.ones(len(queries), 1, device=queries.device)], 1).double()
        x = augmented[:, self.varying]
        m = x.shape[1]
        gamma = (m + 2) * FP32_UNIT / (1 - (m + 2) * FP32_UNIT)
        spread = x.abs() @ self.column_max
        row_constant = augmented[:, ~self.varying] @ self.constant
        bound = (
            (3 * BF16_UNIT + 2.0**-13 + 2 * gamma) * spread
            + 4 * gamma * (spread + row_constant.abs() + augmented[:, :-1].abs().sum(1) * self.bias_max)
            + (m + 1) * 2.0**-125 * (1 + x.abs().amax(1) + self.column_max.max())
        )  # fmt: skip
        return x.to(torch.bfloat16), bound

    def ceilings(self, rows: torch.Tensor) -> torch.Tensor:
        """(B,) c with screen score <= c |t_j| for every item j: the screen product of bfloat16 values
        (exact products, float32 sums within (1 + gamma), a bfloat16 result within (1 + u)) is at most
        (1 + 2^-6) |x| |t_j|, plus (m + 1) 2^-124 for flushed denormals, folded in by `candidates`."""
        return rows.double().norm(dim=1) * (1 + 2.0**-6)

    def candidates(
        self, rows: torch.Tensor, width: int, seen: SeenPairs, item_chunk: int
    ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(screen scores, item ids) of each row's `width` best unseen items by screen score, best first, and
        the number of (row, item) screen scores computed.

        Chunks of the norm-ordered table, FIRST_CHUNK items, then twice as many each time, up to `item_chunk`.
        After each, a row whose width-th best beats every later item's ceiling (|x| |t_p| at the next position
        p) drops out: every item it never screened scores at most that width-th best, as it would have in a
        full pass, so `top_k`'s coverage test holds as before. Ties and -inf never drop a row.
        """
        batch, total = len(rows), len(self.table)
        best = torch.full((batch, width), float("-inf"), device=rows.device)
        best_positions = torch.zeros((batch, width), dtype=torch.long, device=rows.device)
        ceilings = self.ceilings(rows)
        flushed = (rows.shape[1] + 1) * 2.0**-124
        seen_positions = (seen[0], self.position[torch.from_numpy(seen[1] - 1)].numpy())
        active = torch.arange(batch, device=rows.device)
        mask = _SeenMask(seen_positions, rows.device)
        lo, size, computed = 0, min(self.FIRST_CHUNK, item_chunk), 0
        while lo < total:
            hi = min(lo + size, total)
            scores = rows[active] @ self.table[lo:hi].t()
            mask.apply(scores, lo, hi)
            computed += scores.numel()
            values, positions = torch.topk(scores.float(), min(width, hi - lo), dim=1)
            merged, pick = torch.topk(torch.cat([best[active], values], 1), width, dim=1)
            best_positions[active] = torch.cat([best_positions[active], positions + lo], 1).gather(1, pick)
            best[active] = merged
            lo, size = hi, min(2 * size, item_chunk)
            if lo < total:
                done = (ceilings[active] * self.norms[lo] + flushed) < merged[:, -1].double()
                if done.any():
                    active = active[~done]
                    if len(active) == 0:
                        break
                    mask = _SeenMask(seen_of_rows(seen_positions, active.cpu().numpy(), batch), rows.device)
        return best, self.items[best_positions], computed


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


def _chunked_top_k(
    chunks: Iterator[tuple[int, int, torch.Tensor]], k: int, mask: _SeenMask
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores, item ids), each (B, k), best first, of the chunks' unmasked items: each chunk's own top k, then
    one top k of them all (no merge per chunk)."""
    values, items = [], []
    for lo, hi, scores in chunks:
        mask.apply(scores, lo, hi)
        chunk_values, indices = torch.topk(scores, min(k, hi - lo), dim=1)
        values.append(chunk_values)
        items.append(indices + lo)
    best, pick = torch.topk(torch.cat(values, 1), k, dim=1)
    return best, torch.cat(items, 1).gather(1, pick)


class CatalogScorer:
    """Queries of a model and their scores against every item 1..num_items, `item_chunk` items at a time.

    `autocast_dtype` (e.g. torch.bfloat16) computes the queries under autocast, for speed; they are then cast
    to float32 and the catalogue is scored, ranked and masked in float32, where ties and -inf behave the same
    on every device.
    """

    def __init__(
        self,
        model: SequentialModel,
        item_chunk: int = 32768,
        autocast_dtype: torch.dtype | None = None,
        screen: bool = False,
    ):
        self.model, self.item_chunk, self.autocast_dtype, self.screen = model, item_chunk, autocast_dtype, screen
        self.screened_rows = self.screened_scores = 0  # rows through the screen, and the item scores it computed

    @cached_property
    def bf16_screen(self) -> BF16Screen | None:
        """`top_k`'s bfloat16 screen, built at its first use (None: off, or a model that is not affine)."""
        if not self.screen or next(self.model.parameters()).device.type != "cpu":
            return None
        try:
            return BF16Screen(self.model)
        except ConfigError:
            return None

    @staticmethod
    def screen_width(k: int) -> int:
        """Candidates the screen keeps per row for a top k: enough that a row rarely needs the float32 pass."""
        return 2 * k + 32

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

        The float32 top k, through the bfloat16 screen when it is on (see the module docstring), else chunk by
        chunk: memory stays at (B x item_chunk) whatever the catalogue's size. A row with fewer than k unseen
        items gets -inf scores in its last places (drop them).
        """
        width = self.screen_width(k)
        screen = self.bf16_screen
        if width >= self.model.config.num_items or screen is None:
            return _chunked_top_k(self._chunks(queries), k, _SeenMask(seen, queries.device))
        rows, bound = screen.rows(queries)
        values, items, computed = screen.candidates(rows, width, seen, self.item_chunk)
        self.screened_rows += len(rows)
        self.screened_scores += computed
        values = values.double()
        # the float32 top k of a row lies among the items within 2 x bound of its k-th screen score: held by its
        # candidates when the last of them is below that (or -inf: the row has fewer unseen items than that)
        covered = (values[:, -1] < values[:, k - 1] - 2 * bound) | (values[:, -1] == float("-inf"))
        candidates, by_item = items[covered].sort(1)  # float32 ties go to the smaller item id
        seen_or_none = values[covered].gather(1, by_item) == float("-inf")
        scores = self.model.score(queries[covered], candidates).float().masked_fill(seen_or_none, float("-inf"))
        scores, order = scores.sort(dim=1, descending=True, stable=True)
        best_scores = torch.empty((len(queries), k), device=queries.device)
        best_items = torch.empty((len(queries), k), dtype=torch.long, device=queries.device)
        best_scores[covered], best_items[covered] = scores[:, :k], candidates.gather(1, order[:, :k])
        if not covered.all():
            left = torch.nonzero(~covered)[:, 0]
            mask = _SeenMask(seen_of_rows(seen, left.cpu().numpy(), len(queries)), queries.device)
            best_scores[left], best_items[left] = _chunked_top_k(self._chunks(queries[left]), k, mask)
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
