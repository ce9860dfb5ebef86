"""Leave-one-out evaluation, batched, with memory bounded whatever the catalog and user counts.

Protocols:
- `full`: the held-out item ranked against every item, the user's input history excluded. Scores are
  computed over chunks of `item_chunk` items and only the rank is kept, so a batch never holds a
  (batch x catalog) matrix.
- `sampled-uniform-100` / `sampled-popularity-100`: against 100 items the user never interacted with
  (in any split), drawn uniformly / by training popularity. Each user's candidates are a pure function of
  (eval seed, protocol, user), so every run, batch size, user sample and process sees the same ones.
For the evaluation split the input is the training sequence plus the validation item; for the validation
split it is the training sequence (as the official SASRec/SSE-PT code). `max_users` evaluates a seeded,
fixed sample of the split's users.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from movierec.data.layout import SequenceData
from movierec.data.negatives import SeenItems, seeded_candidates
from movierec.data.sequences import UserHistories, inputs_with_appended
from movierec.errors import ConfigError
from movierec.evaluation.metrics import bce_from_logits, metrics_from_ranks, rank_of_target
from movierec.models.base import SequentialModel
from movierec.models.catalog import CatalogScorer, SeenPairs, length_sorted_batches, row_item_pairs
from movierec.progress import Progress

PROTOCOLS = ("full", "sampled-uniform-100", "sampled-popularity-100")
HELD_OUT = ("validation", "evaluation")  # the splits with one held-out pair per user
LOSS_STREAM = len(PROTOCOLS)  # hash stream of the one negative of the validation BCE loss
SAMPLE_STREAM = 99  # hash stream of the max_users sample


def check_protocols(protocols: tuple[str, ...] | list[str], name: str = "protocol") -> tuple[str, ...]:
    """`protocols` if each is known (and there is one), else a one-line ConfigError naming `name` (the option
    or flag that gave them): the one check of protocol names, for configs, the CLI and the evaluator alike."""
    unknown = [p for p in protocols if p not in PROTOCOLS]
    if unknown or not protocols:
        raise ConfigError(f"{name}: unknown {unknown or 'none given'}; choose from {', '.join(PROTOCOLS)}")
    return tuple(protocols)


def held_out_users(data: SequenceData, split: str, max_users: int | None = None, seed: int = 0) -> np.ndarray:
    """The users with a held-out item in `split`, or a seeded, fixed sample of `max_users` of them (sorted)."""
    if split not in HELD_OUT:
        raise ConfigError(f"split must be one of {HELD_OUT}, got {split!r}")
    held_out = data.valid_item if split == "validation" else data.test_item
    users = data.users[held_out[data.users] > 0]
    if max_users is not None and max_users < len(users):
        users = np.sort(np.random.default_rng([seed, SAMPLE_STREAM]).choice(users, max_users, replace=False))
    return users


class Evaluator:
    """Scores one split under several protocols; the same users and negatives on every call."""

    def __init__(
        self,
        data: SequenceData,
        split: str = "evaluation",
        protocols: tuple[str, ...] = PROTOCOLS,
        ks: tuple[int, ...] = (1, 5, 10, 20),
        seed: int = 0,
        batch_size: int = 256,
        num_negatives: int = 100,
        max_users: int | None = None,
        item_chunk: int = 32768,
        seen: SeenItems | None = None,
    ):
        self.data, self.split, self.protocols, self.ks = data, split, check_protocols(protocols), ks
        self.seed, self.batch_size, self.num_negatives, self.item_chunk = seed, batch_size, num_negatives, item_chunk
        self.users = held_out_users(data, split, max_users, seed)
        held_out = data.valid_item if split == "validation" else data.test_item
        self.targets = held_out[self.users].astype(np.int64)
        self.appended = data.valid_item[self.users] if split == "evaluation" else None
        appended = (data.valid_item,) if split == "evaluation" else ()
        self.histories = UserHistories(data.train_offsets, data.train_items, appended)
        self.lengths = self.histories.lengths[self.users]
        seen = seen or SeenItems.from_data(data)
        self.seen = SeenItems(seen.offsets, seen.items, seen.num_items, (data.valid_item, data.test_item))
        self.popularity_cdf = None
        if any(p.startswith("sampled-popularity") for p in protocols):
            popularity = data.item_counts().astype(np.float64)
            popularity[0] = 0
            self.popularity_cdf = np.cumsum(popularity)

    @property
    def num_users(self) -> int:
        return len(self.users)

    def negatives(self, protocol: str, rows: np.ndarray) -> np.ndarray:
        """(len(rows), num_negatives) candidates of `protocol` for the evaluated users at `rows`."""
        cdf = self.popularity_cdf if protocol.startswith("sampled-popularity") else None
        stream = PROTOCOLS.index(protocol)
        return seeded_candidates(self.seen, self.users[rows], self.num_negatives, self.seed, stream, cdf)

    def batches(self, max_len: int, rows: np.ndarray | None = None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(rows into the evaluated users, left-padded inputs), grouped by length for dynamic padding."""
        rows = np.arange(self.num_users) if rows is None else rows

        def inputs(batch: np.ndarray, width: int) -> np.ndarray:
            appended = None if self.appended is None else self.appended[batch]
            data = self.data
            return inputs_with_appended(data.train_items, data.train_offsets, self.users[batch], appended, width)

        return length_sorted_batches(rows, self.lengths, self.batch_size, max_len, inputs)

    def input_times(self, rows: np.ndarray, width: int) -> np.ndarray:
        """The timestamps (len(rows), width) aligned with `batches()`' inputs of `rows`, for a model with a time
        bias: the training items' times, then the validation item's for the evaluation split."""
        data = self.data
        if data.train_times is None:
            raise ConfigError(f"the model reads timestamps (model.time_bias), and {data.path} has none")
        users = self.users[rows]
        appended = None if self.appended is None else data.valid_time[users]
        present = None if self.appended is None else self.appended[rows] > 0
        return inputs_with_appended(data.train_times, data.train_offsets, users, appended, width, present)

    def history(self, rows: np.ndarray) -> SeenPairs:
        """(row in batch, item) of every item in the input histories of `rows` (training + appended)."""
        offsets, items = self.histories.gather(self.users[rows])
        return row_item_pairs(items, offsets[:-1], np.diff(offsets))

    @torch.inference_mode()
    def run(
        self,
        model: SequentialModel,
        device: torch.device | str = "cpu",
        autocast_dtype: torch.dtype | None = None,
        loss: str = "bce",
        part: tuple[int, int] = (0, 1),
        all_reduce: Callable[[np.ndarray], np.ndarray] | None = None,
        progress: Progress | None = None,
    ) -> dict:
        """Metrics per protocol (`<protocol>/ndcg@10`, ...), `loss` (BCE vs one negative, or full CE), `users`.

        `part=(rank, world)` scores every world-th user from rank; `all_reduce` sums the per-process
        totals, so the numbers equal one process's.
        """
        was_training = model.training
        model.eval()
        device = torch.device(device)
        rank, world = part
        sums = np.zeros(2 + len(self.protocols) * (2 * len(self.ks) + 1), dtype=np.float64)  # loss, count, metrics
        try:
            for rows, seqs in self.batches(model.config.max_len, np.arange(rank, self.num_users, world)):
                if progress is not None:
                    progress.advance(len(rows))
                ranks, batch_loss = self.batch_ranks(model, rows, seqs, device, autocast_dtype, loss)
                sums[0] += batch_loss * len(rows)
                sums[1] += len(rows)
                offset = 2
                for protocol in self.protocols:
                    values = metrics_from_ranks(ranks[protocol], self.ks)
                    sums[offset : offset + len(values)] += np.array(list(values.values())) * len(rows)
                    offset += len(values)
        finally:
            model.train(was_training)
        if all_reduce is not None:
            sums = all_reduce(sums)
        count = float(sums[1])
        out: dict[str, float] = {"loss": float(sums[0]) / max(count, 1), "users": count}
        offset = 2
        for protocol in self.protocols:
            names = list(metrics_from_ranks(np.zeros(1), self.ks))
            for name, total in zip(names, sums[offset : offset + len(names)], strict=True):
                out[f"{protocol}/{name}"] = float(total) / count if count else float("nan")
            offset += len(names)
        return out

    @torch.inference_mode()
    def batch_ranks(
        self,
        model: SequentialModel,
        rows: np.ndarray,
        sequences: np.ndarray,
        device: torch.device | str = "cpu",
        autocast_dtype: torch.dtype | None = None,
        loss: str = "bce",
    ) -> tuple[dict[str, np.ndarray], float]:
        """One batch of `batches()`: the 0-based rank of each user's target under every protocol, and the
        batch's mean validation loss (BCE vs one negative, or full CE)."""
        device = torch.device(device)
        scorer = CatalogScorer(model, self.item_chunk, autocast_dtype)
        times = self.input_times(rows, sequences.shape[1]) if model.uses_times else None
        queries = scorer.queries(sequences, self.users[rows], times)
        targets = torch.from_numpy(self.targets[rows]).to(device)
        target_scores = model.score(queries, targets[:, None])[:, 0]
        full_ranks, log_partition = None, None
        if "full" in self.protocols or loss != "bce":
            full_ranks, log_partition = scorer.target_ranks(queries, self.targets[rows], self.history(rows))
        if loss == "bce":
            negs = torch.from_numpy(self.negatives_for_loss(rows)).to(device)
            negative_scores = model.score(queries, negs[:, None])[:, 0]
            batch_loss = bce_from_logits(target_scores, negative_scores)  # the training objective
        else:
            batch_loss = (log_partition - target_scores).mean()  # cross-entropy over all items
        ranks = {}
        for protocol in self.protocols:
            if protocol == "full":
                ranks[protocol] = full_ranks.cpu().numpy()
            else:
                negs = torch.from_numpy(self.negatives(protocol, rows)).to(device)
                scores = model.score(queries, torch.cat([targets[:, None], negs], -1)).cpu().numpy()
                ranks[protocol] = rank_of_target(scores[:, 0], scores[:, 1:])
        return ranks, float(batch_loss)

    def negatives_for_loss(self, rows: np.ndarray) -> np.ndarray:
        return seeded_candidates(self.seen, self.users[rows], 1, self.seed, LOSS_STREAM)[:, 0]


def evaluate_checkpoint(
    checkpoint: str | Path,
    data_path: str | Path | None = None,
    split: str = "evaluation",
    protocols: tuple[str, ...] = PROTOCOLS,
    ks: tuple[int, ...] = (1, 5, 10, 20),
    seed: int = 0,
    device: str = "cpu",
    max_users: int | None = None,
) -> dict:
    """Evaluate a checkpoint (a run folder means its best.ckpt) on a prepared dataset (default: its own)."""
    from movierec.data.layout import load_sequences
    from movierec.models.checkpoint import BEST, load_checkpoint, model_from_checkpoint, verify_dataset

    state = load_checkpoint(checkpoint, prefer=BEST)
    path = verify_dataset(state, data_path)
    data = load_sequences(path, shards=state.dataset.shards)
    model = model_from_checkpoint(state, device)
    evaluator = Evaluator(data, split, protocols, ks, seed, max_users=max_users)
    with Progress("evaluate", evaluator.num_users, "users") as progress:
        return evaluator.run(model, device, loss=state.validation_loss, progress=progress)
