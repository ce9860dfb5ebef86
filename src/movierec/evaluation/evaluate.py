"""Leave-one-out evaluation over all evaluated users, batched.

Protocols:
- `full`: the held-out item ranked against every item, the user's input history excluded.
- `sampled-uniform-100` / `sampled-popularity-100`: against 100 items the user never interacted with
  (in any split), drawn uniformly / by training popularity, seeded so every call sees the same negatives.
For the evaluation split the input is the training sequence plus the validation item; for the validation
split it is the training sequence (as the official SASRec/SSE-PT code).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from movierec.data.layout import SequenceData
from movierec.evaluation.metrics import metrics_from_ranks, rank_of_target
from movierec.models.sse_pt import SSEPT
from movierec.training.batches import HistoryIndex, draw_by_weight, left_padded, ragged_indices, sample_unseen
from movierec.training.losses import bce_loss

PROTOCOLS = ("full", "sampled-uniform-100", "sampled-popularity-100")
SPLITS = ("validation", "evaluation")


@dataclass
class Histories:
    """Input sequences (CSR) and targets of the evaluated users of one split."""

    users: np.ndarray
    offsets: np.ndarray  # (len(users) + 1,) into items
    items: np.ndarray
    targets: np.ndarray


def split_histories(data: SequenceData, split: str) -> Histories:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    targets_all = data.valid_item if split == "validation" else data.test_item
    users = data.users[targets_all[data.users] > 0]
    starts, ends = data.train_offsets[users], data.train_offsets[users + 1]
    lengths = ends - starts
    items = data.train_items[ragged_indices(starts, lengths)]
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    if split == "evaluation":
        extra = data.valid_item[users]
        has = extra > 0
        items = np.insert(items, offsets[1:][has], extra[has])
        offsets = np.concatenate([[0], np.cumsum(lengths + has)])
    return Histories(users=users, offsets=offsets, items=items, targets=targets_all[users].astype(np.int64))


def sample_candidates(
    rng: np.random.Generator, index: HistoryIndex, users: np.ndarray, count: int, probs: np.ndarray | None
) -> np.ndarray:
    """(len(users), count) items each user never interacted with, uniform or with `probs` over item ids."""
    num_items = index.stride - 1
    shape = (len(users), count)
    cdf = None if probs is None else np.cumsum(probs)

    def draw(n: int) -> np.ndarray:
        if cdf is None:
            return rng.integers(1, num_items + 1, size=n)
        return draw_by_weight(rng, cdf, n)

    grid = np.ascontiguousarray(np.broadcast_to(users[:, None], shape))
    return sample_unseen(rng, index, grid, draw)


class Evaluator:
    """Scores one split under several protocols. Negatives are drawn once, so repeated calls compare."""

    def __init__(
        self,
        data: SequenceData,
        split: str = "evaluation",
        protocols: tuple[str, ...] = PROTOCOLS,
        ks: tuple[int, ...] = (1, 5, 10, 20),
        seed: int = 0,
        batch_size: int = 256,
        num_negatives: int = 100,
    ):
        unknown = [p for p in protocols if p not in PROTOCOLS]
        if unknown:
            raise ValueError(f"unknown protocol(s) {unknown}; known: {', '.join(PROTOCOLS)}")
        self.data, self.split, self.protocols, self.ks, self.batch_size = data, split, protocols, ks, batch_size
        self.histories = split_histories(data, split)
        index = HistoryIndex.from_sequences(data, include_held_out=True)
        popularity = np.bincount(data.train_items, minlength=data.num_items + 1).astype(np.float64)
        popularity[0] = 0
        self.negatives: dict[str, np.ndarray] = {}
        for protocol in protocols:
            if protocol == "full":
                continue
            # one generator per protocol: its negatives do not depend on which other protocols are asked for
            rng = np.random.default_rng([seed, PROTOCOLS.index(protocol)])
            probs = popularity if protocol.startswith("sampled-popularity") else None
            self.negatives[protocol] = sample_candidates(rng, index, self.histories.users, num_negatives, probs)
        loss_rng = np.random.default_rng([seed, len(PROTOCOLS)])
        self.loss_negatives = sample_candidates(loss_rng, index, self.histories.users, 1, None)[:, 0]

    @property
    def num_users(self) -> int:
        return len(self.histories.users)

    def batches(self, max_len: int):
        """Index arrays into the evaluated users, grouped by length for dynamic padding."""
        lengths = np.diff(self.histories.offsets)
        order = np.argsort(lengths, kind="stable")
        for start in range(0, len(order), self.batch_size):
            rows = order[start : start + self.batch_size]
            width = int(min(max_len, lengths[rows].max()))
            seqs, _ = left_padded(
                self.histories.items, self.histories.offsets[rows + 1], self.histories.offsets[rows], width
            )
            yield rows, seqs

    @torch.inference_mode()
    def run(
        self,
        model: SSEPT,
        device: torch.device | str = "cpu",
        autocast_dtype: torch.dtype | None = None,
        loss: str = "bce",
    ) -> dict:
        """Metrics per protocol (`<protocol>/ndcg@10`, ...) and `loss` (BCE vs one negative, or full CE)."""
        was_training = model.training
        model.eval()
        device = torch.device(device)
        ranks: dict[str, list[np.ndarray]] = {p: [] for p in self.protocols}
        losses, count = 0.0, 0
        h = self.histories
        try:
            for rows, seqs in self.batches(model.config.max_len):
                users = torch.from_numpy(h.users[rows]).to(device)
                targets = torch.from_numpy(h.targets[rows]).to(device)
                with torch.autocast(
                    device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None
                ):
                    hidden, user_vecs = model.last_hidden(torch.from_numpy(seqs).to(device), users)
                hidden = hidden.float()
                user_vecs = None if user_vecs is None else user_vecs.float()
                all_scores = None
                if "full" in self.protocols or loss != "bce":
                    all_scores = model.score_all(hidden, user_vecs)
                    all_scores[:, 0] = float("-inf")
                if loss == "bce":
                    negs = torch.from_numpy(self.loss_negatives[rows]).to(device)
                    batch_loss = bce_loss(model, hidden, user_vecs, targets, negs)  # the training objective
                else:
                    batch_loss = F.cross_entropy(all_scores[:, 1:], targets - 1)
                losses += float(batch_loss) * len(rows)
                count += len(rows)
                for protocol in self.protocols:
                    if protocol == "full":
                        ranks[protocol].append(self._full_ranks(all_scores, rows, targets))
                    else:
                        negs = torch.from_numpy(self.negatives[protocol][rows]).to(device)
                        scores = model.score(hidden, torch.cat([targets[:, None], negs], -1), user_vecs).cpu().numpy()
                        ranks[protocol].append(rank_of_target(scores[:, 0], scores[:, 1:]))
        finally:
            model.train(was_training)
        out: dict[str, float] = {"loss": losses / max(count, 1), "users": float(count)}
        for protocol, parts in ranks.items():
            all_ranks = np.concatenate(parts) if parts else np.zeros(0)
            for name, value in metrics_from_ranks(all_ranks, self.ks).items():
                out[f"{protocol}/{name}"] = value
        return out

    def _full_ranks(self, scores: torch.Tensor, rows: np.ndarray, targets: torch.Tensor) -> np.ndarray:
        h = self.histories
        lengths = h.offsets[rows + 1] - h.offsets[rows]
        batch_rows = np.repeat(np.arange(len(rows)), lengths)
        cols = h.items[ragged_indices(h.offsets[rows], lengths)]
        target_scores = scores.gather(1, targets[:, None]).squeeze(1)
        scores[torch.from_numpy(batch_rows), torch.from_numpy(cols)] = float("-inf")
        scores.scatter_(1, targets[:, None], float("-inf"))  # the target is not its own competitor
        return (scores >= target_scores[:, None]).sum(1).cpu().numpy()


def evaluate_checkpoint(
    checkpoint: str | Path,
    data_path: str | Path | None = None,
    split: str = "evaluation",
    protocols: tuple[str, ...] = PROTOCOLS,
    ks: tuple[int, ...] = (1, 5, 10, 20),
    seed: int = 0,
    device: str = "cpu",
) -> dict:
    """Evaluate a checkpoint (a run folder means its best.ckpt) on a prepared dataset (default: its own)."""
    from movierec.data.layout import load_sequences, read_items, read_users
    from movierec.errors import CheckpointError
    from movierec.training.checkpoint import BEST, load_checkpoint, model_from_checkpoint

    state = load_checkpoint(checkpoint, prefer=BEST)
    dataset = state["dataset"]
    data = load_sequences(data_path or dataset["path"], shards=dataset.get("shards"))
    items = read_items(data.path)["movie_id"].to_numpy()
    users = read_users(data.path)["user_id"].to_numpy()
    same_items = np.array_equal(items, dataset["item_movie_ids"].numpy())
    if not (same_items and np.array_equal(users, dataset["user_ids"].numpy())):
        raise CheckpointError(
            f"{state['path']} was trained on {dataset['path']} ({dataset['num_users']} users x "
            f"{dataset['num_items']} items), and {data.path} numbers its users or movies differently; "
            "pass the dataset it was trained on with --data"
        )
    model = model_from_checkpoint(state, device)
    loss = state.get("config", {}).get("train", {}).get("loss", "bce")
    return Evaluator(data, split, protocols, ks, seed).run(model, device, loss=loss)
