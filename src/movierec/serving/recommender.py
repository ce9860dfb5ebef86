"""Top-k recommendations with titles from any trained model kind (SSE-PT, SASRec, BERT4Rec, ...).

A :class:`Recommender` holds the model in eval mode, the original MovieLens ids of our items and users,
the titles, and every known user's whole history (training + validation + evaluation items, in time
order). It scores in batches under ``torch.inference_mode()``: rows are sorted by history length and
each batch is padded only to its longest row (dynamic padding), so exporting every user of ML-1M takes
seconds on a CPU.

**A person the model has no user embedding for** (``recommend_history``): SSE-PT concatenates a user
vector to every input item and adds a user term to every score, so it needs *some* user vector. We use
the mean of all user embeddings. Stochastic Shared Embeddings train the network to cope with
that: with probability ``1 - keep_user`` (0.92 for the paper's ML-1M setting ``keep_user = 0.08``) a
training sequence is paired with a *random* other user's vector, so the network learns to predict from
the item history under user vectors drawn from the embedding table; the mean of that table is the
least committal such vector (its score term favours no particular user's taste) and is deterministic.
SASRec has no user embedding and needs nothing.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from movierec.data.layout import load_sequences, read_items
from movierec.data.mapped import ConcatenatedColumn
from movierec.data.sequences import UserHistories, left_padded
from movierec.errors import DataError, MovierecError
from movierec.files import atomic_path
from movierec.models.base import SequentialModel
from movierec.models.catalog import (
    NOTHING_SEEN,
    CatalogScorer,
    SeenPairs,
    length_sorted_batches,
    native_bf16,
    row_item_pairs,
)
from movierec.models.checkpoint import Checkpoint, model_from_checkpoint, verify_dataset
from movierec.progress import Progress
from movierec.serving.approximate import ApproximateIndex
from movierec.serving.batching import MicroBatcher, Request
from movierec.serving.search import TitleIndex


class RecommendError(MovierecError):
    """A request the model cannot answer as asked (bad k, empty or unknown history)."""


class UnknownUserError(RecommendError):
    """A userId that is not a user of the model's training data."""


class UnknownItemError(RecommendError):
    """A movieId that is not an item of the model's training data."""


@dataclass(frozen=True)
class Recommendation:
    rank: int
    movie_id: int
    title: str | None
    score: float

    def to_dict(self) -> dict:
        return {"rank": self.rank, "movieId": self.movie_id, "title": self.title, "score": self.score}


@dataclass(frozen=True)
class Item:
    movie_id: int
    title: str | None
    year: int | None
    genres: str | None


@dataclass
class HistoryResult:
    """Recommendations for a new person's history, and the movieIds of that history we did not know."""

    recommendations: list[Recommendation]
    unknown_movie_ids: list[int]


@dataclass(frozen=True)
class Because:
    """The history movie that contributed most to a recommendation: the one whose leaving-out lowers the
    recommendation's score most, and by how much (None when the history holds no other movie)."""

    movie_id: int
    title: str | None
    score_drop: float | None


@dataclass(frozen=True)
class ExplainedRecommendation:
    recommendation: Recommendation
    item: Item
    because: Because


@dataclass
class ExplainedResult:
    """What the page shows: explained recommendations, and the movieIds of the history we did not know."""

    recommendations: list[ExplainedRecommendation]
    unknown_movie_ids: list[int]


# export-recs gathers this many users' histories at a time: a pass's gather holds several int64 copies of its
# histories (ml-20mx16x32: 557 items a user): 65,536 users a pass peaked at 4,180 MiB, 16,384 at 3,191
EXPORT_USERS_PER_PASS = 16384
# histories per forward pass of the model: on a 2-core CPU SSE-PT's forward (200 items, d 150) costs 0.8 ms a row
# in passes of 16-32 rows and 1.6 ms in one of 256 (its activations leave the cache), while the catalogue is
# scored fastest for the whole batch at once
QUERY_ROWS = 32


class Recommender:
    """A trained model with everything needed to turn scores into movieIds and titles.

    Ids: our item i (1..num_items) is MovieLens movieId ``item_movie_ids[i - 1]``; our user u is userId
    ``user_ids[u - 1]``. ``histories`` reads user u's history (training, validation and test items) from the
    mapped shards; users with an empty history are unknown to this model (for example users outside the
    shards it was trained on). ``history_times`` holds the same histories' timestamps for a model with a time
    bias (HSTU's model.time_bias), so a known user is scored as evaluation scores them; a history sent in a
    request has no times, and the model then leaves its time bias out. The catalog is scored in chunks, so
    memory does not grow with its size.
    """

    def __init__(
        self,
        model: SequentialModel,
        item_movie_ids: np.ndarray,
        user_ids: np.ndarray,
        titles: Sequence[str | None],
        histories: UserHistories,
        years: Sequence[int | None] | None = None,
        genres: Sequence[str | None] | None = None,
        source: str = "",
        dataset_name: str = "",
        batch_size: int = 256,
        item_chunk: int = 65536,
        shard_ranges: Sequence[tuple[int, int]] = (),
        history_times: UserHistories | None = None,
    ):
        self.model = model.eval()
        self.config = model.config
        self.num_items, self.num_users = self.config.num_items, self.config.num_users
        self.item_movie_ids = np.asarray(item_movie_ids, dtype=np.int64)
        self.user_ids = np.asarray(user_ids, dtype=np.int64)
        if len(self.item_movie_ids) != self.num_items or len(self.user_ids) != self.num_users:
            raise DataError(
                f"id maps hold {len(self.item_movie_ids)} items and {len(self.user_ids)} users, the model has "
                f"{self.num_items} and {self.num_users}; the dataset does not belong to this model"
            )
        self.titles = list(titles)
        self.years = list(years) if years is not None else [None] * self.num_items
        self.genres = list(genres) if genres is not None else [None] * self.num_items
        self.histories, self.history_times = histories, history_times
        self.source, self.dataset_name, self.batch_size = source, dataset_name, batch_size
        self.shard_ranges = list(shard_ranges)  # [lo, hi) of our user indices per dataset shard
        self.batcher: MicroBatcher | None = None
        self.index: ApproximateIndex | None = None
        self.scorer = CatalogScorer(self.model, item_chunk, screen=native_bf16())
        self._item_of = {int(m): i + 1 for i, m in enumerate(self.item_movie_ids)}
        self._user_of = {int(u): i + 1 for i, u in enumerate(self.user_ids)}
        self._lock = threading.Lock()  # one scoring call at a time: the CPU's cores go to one batch
        self.known_users = np.flatnonzero(histories.lengths > 0)  # our indices, not userIds
        self.title_index = TitleIndex(self.titles, self.years, self._popularity())
        self._genre_items = self._items_by_genre()  # genre -> (num_items + 1,) bool, True for its items

    def _popularity(self) -> np.ndarray:
        """How many times each item (index 1..num_items) occurs in the users' histories: search ranks the
        movies most people watched first."""
        items = self.histories.items
        parts = items.parts if isinstance(items, ConcatenatedColumn) else [np.asarray(items)]
        counts = np.zeros(self.num_items + 1, dtype=np.int64)
        for part in [*parts, *self.histories.appended]:
            counts += np.bincount(np.asarray(part, dtype=np.int64), minlength=self.num_items + 1)[: self.num_items + 1]
        return counts

    def _items_by_genre(self) -> dict[str, np.ndarray]:
        genres: dict[str, np.ndarray] = {}
        for item, listed in enumerate(self.genres, start=1):
            for genre in (listed or "").split("|"):
                if genre:
                    genres.setdefault(genre, np.zeros(self.num_items + 1, dtype=bool))[item] = True
        return dict(sorted(genres.items()))

    # ------------------------------------------------------------------ construction

    @classmethod
    def from_checkpoint(cls, state: Checkpoint, data: str | Path | None = None, source: str = "") -> Recommender:
        """Build from a loaded checkpoint and its prepared dataset (``data`` overrides the recorded path)."""
        identity = state.dataset
        path = verify_dataset(state, data)
        fix = "pass --data with the prepared dataset folder the model was trained on"
        try:
            data_seq = load_sequences(path, shards=identity.shards)
            items_table = read_items(path)
        except DataError as exc:
            raise DataError(f"{exc}; or {fix}") from exc
        model = model_from_checkpoint(state)
        items_table = items_table.sort_by("item")
        movie_ids = items_table["movie_id"].to_numpy().astype(np.int64)
        recorded_ids = identity.item_movie_ids
        if recorded_ids is not None and not np.array_equal(np.asarray(recorded_ids), movie_ids):
            raise DataError(f"{path}/items.parquet does not match the checkpoint's movieIds; {fix}")
        user_ids = identity.user_ids
        if user_ids is None:
            from movierec.data.layout import read_users

            user_ids = read_users(path).sort_by("user")["user_id"].to_numpy()
        held_out = (data_seq.valid_item, data_seq.test_item)
        # private copies, not the mapped shards: replacing a shard while serving must not crash the server
        histories = UserHistories(data_seq.train_offsets, data_seq.train_items.in_memory(), held_out)
        history_times = None
        if model.uses_times and data_seq.train_times is not None:
            held_out_times = (data_seq.valid_time, data_seq.test_time)
            times = data_seq.train_times.in_memory()
            history_times = UserHistories(data_seq.train_offsets, times, held_out_times, present=held_out)
        return cls(
            model,
            movie_ids,
            np.asarray(user_ids),
            _column(items_table, "title") or [None] * len(movie_ids),
            histories,
            years=_column(items_table, "year"),
            genres=_column(items_table, "genres"),
            source=source or state.path,
            dataset_name=identity.name if identity.name != "?" else data_seq.meta.get("name", ""),
            shard_ranges=[tuple(shard["users"]) for shard in data_seq.meta["shards"]],
            history_times=history_times,
        )

    @classmethod
    def for_new_people(cls, model: SequentialModel, items: pa.Table, source: str = "") -> Recommender:
        """A recommender of histories alone, with no known user and no dataset folder (what the MLflow pyfunc
        model serves): `items` holds movie_id, and title, year, genres when known, in our item order."""
        movie_ids = items["movie_id"].to_numpy().astype(np.int64)
        num_users = model.config.num_users
        nobody = UserHistories(np.zeros(num_users + 2, dtype=np.int64), np.zeros(0, dtype=np.int64))
        titles = _column(items, "title") or [None] * len(movie_ids)
        return cls(model, movie_ids, np.zeros(num_users, dtype=np.int64), titles, nobody,  # no userId is known
                   years=_column(items, "year"), genres=_column(items, "genres"), source=source)  # fmt: skip

    # ------------------------------------------------------------------ look-ups

    @property
    def known_user_ids(self) -> np.ndarray:
        """Original userIds of the users with a history (``known_users`` holds our indices of the same users)."""
        return self.user_ids[self.known_users - 1]

    def has_user(self, user_id: int) -> bool:
        index = self._user_of.get(int(user_id))
        return index is not None and self.histories.lengths[index] > 0

    def user_index(self, user_id: int) -> int:
        if not self.has_user(user_id):
            raise UnknownUserError(f"unknown user {user_id}: not a user of the data this model was trained on")
        return self._user_of[int(user_id)]

    def item(self, movie_id: int) -> Item:
        index = self._item_of.get(int(movie_id))
        if index is None:
            raise UnknownItemError(f"unknown movieId {movie_id}: not an item of this model")
        return self._item_of_index(index)

    def history_of(self, user_id: int) -> list[int]:
        """The user's history as original movieIds, oldest first."""
        u = self.user_index(user_id)
        return self.item_movie_ids[self.histories.gather(np.array([u]))[1] - 1].tolist()

    def history_items(self, user_id: int, limit: int) -> list[Item]:
        """The user's last `limit` movies, oldest first, with their titles: where the page starts from."""
        return [self.item(movie_id) for movie_id in self.history_of(user_id)[-limit:]]

    def search(self, query: str, limit: int = 10) -> list[Item]:
        """The movies whose title (or year) holds every word of `query`, best first (serving/search.py)."""
        return [self._item_of_index(int(i)) for i in self.title_index.search(query, limit)]

    @property
    def genre_names(self) -> list[str]:
        return list(self._genre_items)

    def _item_of_index(self, index: int) -> Item:
        i = index - 1
        return Item(int(self.item_movie_ids[i]), self.titles[i], self.years[i], self.genres[i])

    def check_k(self, k: int) -> int:
        if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= self.num_items:
            raise RecommendError(f"k must be an integer from 1 to {self.num_items} (the number of items), got {k}")
        return int(k)

    # ------------------------------------------------------------------ scoring

    def _top_k(
        self,
        offsets: np.ndarray,
        items: np.ndarray,
        users: np.ndarray,
        k: int,
        exclude_seen: bool,
        times: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """(rows, k) item ids and scores for CSR histories (and their items' `times`, for a time bias);
        users[r] = 0 means "no user embedding".

        Scores of excluded items are -inf (drop them); rows are scored in length-sorted batches.
        """
        lengths = np.diff(offsets)
        top_items = np.zeros((len(lengths), k), dtype=np.int64)
        top_scores = np.full((len(lengths), k), -np.inf, dtype=np.float32)

        def inputs(rows: np.ndarray, width: int) -> np.ndarray:
            return left_padded(items, offsets[rows + 1], offsets[rows], width)[0]

        batches = length_sorted_batches(np.arange(len(lengths)), lengths, self.batch_size, self.config.max_len, inputs)
        with self._lock, torch.inference_mode():
            for rows, sequences in batches:
                seen = row_item_pairs(items, offsets[rows], lengths[rows]) if exclude_seen else NOTHING_SEEN
                width = sequences.shape[1]
                row_times = None if times is None else left_padded(times, offsets[rows + 1], offsets[rows], width)[0]
                queries = self._queries(sequences, users[rows], row_times)
                if self.index is not None:
                    scores, indices = self._top_k_approximate(queries, len(rows), seen, k)
                else:
                    scores, indices = self.scorer.top_k(queries, k, seen)
                top_items[rows] = indices.cpu().numpy()
                top_scores[rows] = scores.cpu().numpy()
        return top_items, top_scores

    def _queries(self, sequences: np.ndarray, users: np.ndarray, times: np.ndarray | None = None) -> torch.Tensor:
        """The scorer's queries of a batch, computed QUERY_ROWS rows at a time."""
        return torch.cat([
            self.scorer.queries(sequences[lo : lo + QUERY_ROWS], users[lo : lo + QUERY_ROWS],
                                None if times is None else times[lo : lo + QUERY_ROWS])
            for lo in range(0, len(sequences), QUERY_ROWS)
        ])  # fmt: skip

    def use_index(self, index: ApproximateIndex | None) -> None:
        """Find top-k items with an approximate index (serving/approximate.py) instead of scoring them all;
        None goes back to exact scoring."""
        self.index = index

    def _top_k_approximate(
        self, queries: torch.Tensor, rows: int, seen: SeenPairs, k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The index's k best unseen items for each of the `rows` queries, scored exactly."""
        seen_rows, seen_items = seen
        extra = int(np.bincount(seen_rows, minlength=rows).max()) if len(seen_rows) else 0
        _, found = self.index.search(queries.cpu().numpy(), k + extra)
        if len(seen_rows):  # (row, item) pairs of the found items that the row has seen: left out
            width = self.num_items + 2
            blocked = np.isin(np.arange(len(found))[:, None] * width + found, seen_rows * width + seen_items)
            found = np.where(blocked, -1, found)
        order = np.argsort(found <= 0, axis=1, kind="stable")[:, :k]  # found items first, in the index's order
        chosen = np.take_along_axis(found, order, axis=1)
        ids = torch.from_numpy(np.maximum(chosen, 1))
        scores = self.model.score(queries, ids.to(queries.device)).float()
        scores = scores.masked_fill(torch.from_numpy(chosen <= 0).to(scores.device), -torch.inf)
        ranked = torch.argsort(scores, dim=1, descending=True, stable=True)
        return scores.gather(1, ranked), ids.to(scores.device).gather(1, ranked)

    def enable_batching(self, window_s: float = 0.002, max_rows: int = 64) -> None:
        """Score concurrent requests together (serving/batching.py): what `serve` does."""
        self.batcher = MicroBatcher(self._top_k, window_s, max_rows)

    def _score(self, request: Request) -> tuple[np.ndarray, np.ndarray]:
        """`_top_k` of a request, through the micro-batcher when batching is on."""
        if self.batcher is not None:
            return self.batcher.submit(request)
        return self._top_k(request.offsets, request.items, request.users, request.k, request.exclude_seen,
                           request.times)  # fmt: skip

    def _times_of(self, users: np.ndarray) -> np.ndarray | None:
        """The timestamps of known users' histories, aligned with `histories.gather(users)`, for a model with
        a time bias (None otherwise)."""
        return None if self.history_times is None else self.history_times.gather(users)[1]

    def _to_recommendations(self, items: np.ndarray, scores: np.ndarray) -> list[Recommendation]:
        keep = np.isfinite(scores)
        return [
            Recommendation(rank, int(self.item_movie_ids[i - 1]), self.titles[i - 1], float(s))
            for rank, (i, s) in enumerate(zip(items[keep], scores[keep], strict=True), start=1)
        ]

    def recommend_users(
        self, user_ids: Iterable[int], k: int = 10, include_seen: bool = False
    ) -> dict[int, list[Recommendation]]:
        """Top-k for known users (original userIds), scored on each whole history, in one batched pass."""
        k = self.check_k(k)
        wanted = list(dict.fromkeys(int(u) for u in user_ids))
        unknown = [u for u in wanted if not self.has_user(u)]
        if unknown:
            shown = ", ".join(map(str, unknown[:10])) + (" ..." if len(unknown) > 10 else "")
            raise UnknownUserError(
                f"unknown user{'s' if len(unknown) > 1 else ''} {shown}: not a user of the data this model was "
                "trained on"
            )
        if not wanted:
            return {}
        users = np.asarray([self._user_of[u] for u in wanted], dtype=np.int64)
        offsets, items = self.histories.gather(users)
        top_items, top_scores = self._score(Request(offsets, items, users, k, not include_seen, self._times_of(users)))
        return {u: self._to_recommendations(top_items[r], top_scores[r]) for r, u in enumerate(wanted)}

    def recommend_user(self, user_id: int, k: int = 10, include_seen: bool = False) -> list[Recommendation]:
        """Top-k for a known user (original MovieLens userId); already-seen items excluded by default."""
        self.user_index(user_id)
        return self.recommend_users([user_id], k, include_seen)[int(user_id)]

    def recommend_history(self, movie_ids: Iterable[int], k: int = 10, include_seen: bool = False) -> HistoryResult:
        """Top-k for a new person from the movieIds they watched, oldest first; unknown ids are ignored.

        SSE-PT uses the mean user vector (see the module docstring); the given movies are excluded.
        """
        k = self.check_k(k)
        items, unknown = self._known_history(movie_ids)
        new_person = Request(np.asarray([0, len(items)]), items, np.zeros(1, dtype=np.int64), k, not include_seen)
        top_items, top_scores = self._score(new_person)
        return HistoryResult(self._to_recommendations(top_items[0], top_scores[0]), unknown)

    def recommend_histories(self, histories: Sequence[Iterable[int]], k: int = 10) -> list[HistoryResult]:
        """:meth:`recommend_history` for many new people, scored in one batched pass (a batched product may
        round a score's last bits differently than scoring alone, as micro-batching does)."""
        k = self.check_k(k)
        known = []
        for row, movie_ids in enumerate(histories):
            try:
                known.append(self._known_history(movie_ids))
            except RecommendError as exc:
                raise RecommendError(f"history {row}: {exc}") from exc
        if not known:
            return []
        offsets = np.concatenate([[0], np.cumsum([len(items) for items, _ in known])]).astype(np.int64)
        items = np.concatenate([items for items, _ in known])
        top_items, top_scores = self._score(Request(offsets, items, np.zeros(len(known), dtype=np.int64), k, True))
        return [HistoryResult(self._to_recommendations(top_items[row], top_scores[row]), unknown)
                for row, (_, unknown) in enumerate(known)]  # fmt: skip

    def _known_history(self, movie_ids: Iterable[int]) -> tuple[np.ndarray, list[int]]:
        """(our item ids of the known movieIds, in order; the unknown movieIds); an empty or all-unknown history
        is a RecommendError."""
        given = [int(m) for m in movie_ids]
        if not given:
            raise RecommendError("the history is empty; give at least one movieId the model knows")
        known = [self._item_of[m] for m in given if m in self._item_of]
        unknown = list(dict.fromkeys(m for m in given if m not in self._item_of))
        if not known:
            shown = ", ".join(map(str, unknown[:10])) + (" ..." if len(unknown) > 10 else "")
            raise RecommendError(f"none of the history's movieIds is known to this model ({shown})")
        return np.asarray(known, dtype=np.int64), unknown

    def recommend_explained(self, movie_ids: Iterable[int], k: int = 10, genre: str | None = None) -> ExplainedResult:
        """Top-k for a new person, as :meth:`recommend_history` (only movies of `genre` when given), each with the
        history movie that contributed most to it (:meth:`explain`)."""
        movie_ids = list(movie_ids)
        history, unknown = self._known_history(movie_ids)
        if genre is None:
            recommendations = self.recommend_history(movie_ids, k).recommendations
        else:
            recommendations = self._recommend_in_genre(history, self.check_k(k), genre)
        items = np.asarray([self._item_of[r.movie_id] for r in recommendations], dtype=np.int64)
        reasons = self.explain(history, items)
        pairs = zip(recommendations, reasons, strict=True)
        return ExplainedResult([ExplainedRecommendation(r, self.item(r.movie_id), why) for r, why in pairs], unknown)

    def _recommend_in_genre(self, history: np.ndarray, k: int, genre: str) -> list[Recommendation]:
        """The k best unseen movies of `genre`: scored like :meth:`recommend_history` (exactly, whatever the
        index), with every movie outside the genre left out as the seen ones are."""
        in_genre = self._genre_items.get(genre)
        if in_genre is None:
            raise RecommendError(f"unknown genre {genre!r}; the genres are {', '.join(self._genre_items) or 'none'}")
        left_out = np.union1d(history, np.flatnonzero(~in_genre[1:]) + 1)
        width = min(len(history), self.config.max_len)
        sequence = left_padded(history, np.asarray([len(history)]), np.zeros(1, dtype=np.int64), width)[0]
        with self._lock, torch.inference_mode():
            queries = self.scorer.queries(sequence, np.zeros(1, dtype=np.int64))
            scores, items = self.scorer.top_k(queries, k, (np.zeros(len(left_out), dtype=np.int64), left_out))
        return self._to_recommendations(items[0].cpu().numpy(), scores[0].cpu().numpy())

    def explain(self, history: np.ndarray, recommended: np.ndarray) -> list[Because]:
        """For each recommended item (our ids), the item of `history` whose leaving-out lowers its score most.

        Leave-one-out over the model's window, the last `max_len` items (leaving out an older one changes
        nothing the model reads; leaving out one of the window lets the item before it in): the history and
        each history-minus-one-item are scored as a new person, in one batch.
        """
        if len(recommended) == 0:
            return []
        if len(history) == 1:  # nothing to compare with: the one movie is the reason
            return [self._because(history[0], None)] * len(recommended)
        width = min(len(history), self.config.max_len)
        tail = history[-(width + 1) :]  # the window, and the item that enters it when one of the window leaves
        rows = np.zeros((width + 1, width), dtype=np.int64)
        rows[0] = tail[-width:]
        for row, left_out in enumerate(range(len(tail) - width, len(tail)), start=1):
            kept = np.delete(tail, left_out)[-width:]
            rows[row, width - len(kept) :] = kept
        with self._lock, torch.inference_mode():
            queries = self.scorer.queries(rows, np.zeros(len(rows), dtype=np.int64))
            candidates = torch.from_numpy(recommended).to(queries.device).expand(len(rows), -1)
            scores = self.model.score(queries, candidates).float().cpu().numpy()
        drops = scores[0] - scores[1:]  # (position in the window, recommendation)
        window, strongest = tail[-width:], drops.argmax(axis=0)
        return [self._because(window[p], float(drops[p, column])) for column, p in enumerate(strongest)]

    def _because(self, item: int, score_drop: float | None) -> Because:
        return Because(int(self.item_movie_ids[item - 1]), self.titles[item - 1], score_drop)

    def users_of_shards(self, shards: str) -> np.ndarray:
        """Our indices of the known users in the dataset shards `shards` (e.g. "0-3,7")."""
        from movierec.data.layout import select_shards

        chosen = select_shards(len(self.shard_ranges), shards=shards)
        inside = np.zeros(len(self.user_ids) + 1, dtype=bool)
        for index in chosen:
            lo, hi = self.shard_ranges[index]
            inside[lo:hi] = True
        return self.known_users[inside[self.known_users]]

    def users_of_ids(self, user_ids: Iterable[int]) -> np.ndarray:
        """Our indices of original userIds, each known to the model (else UnknownUserError)."""
        wanted = list(dict.fromkeys(int(u) for u in user_ids))
        unknown = [u for u in wanted if not self.has_user(u)]
        if unknown:
            raise UnknownUserError(f"unknown users {', '.join(map(str, unknown[:10]))}: not users of this model's data")
        return np.asarray([self._user_of[u] for u in wanted], dtype=np.int64)

    def export_all(
        self, path: str | Path, k: int = 100, include_seen: bool = False, users: np.ndarray | None = None,
        progress: Progress | None = None, pass_users: int = EXPORT_USERS_PER_PASS,
    ) -> int:  # fmt: skip
        """Top-k for every known user (or `users`, our indices) into a parquet file (user_id, rank, movie_id,
        title, score), in passes of `pass_users` users: memory is bounded by one pass whatever the
        number of users. Each finished pass is kept in `<path>.parts/`, so a killed export resumes with the
        passes left (the same request only: k, seen items, model, users); the file is then written
        atomically from the parts, one row group each, and the parts removed. Returns the number of rows."""
        k = self.check_k(k)
        path = Path(path)
        users = self.known_users if users is None else np.asarray(users, dtype=np.int64)
        parts = ExportParts(path, {"k": k, "include_seen": include_seen, "source": self.source,
                                   "users": len(users), "users_sha256": sha256_of(users)})  # fmt: skip
        passes = range(0, len(users), pass_users)
        for number, start in enumerate(passes):
            chunk = users[start : start + pass_users]
            if not parts.done(number):
                offsets, items = self.histories.gather(chunk)
                top = self._top_k(offsets, items, chunk, k, not include_seen, self._times_of(chunk))
                parts.write(number, self._recommendation_table(chunk, *top))
            if progress is not None:
                progress.advance(len(chunk))
        return parts.combine(len(passes))

    def _recommendation_table(self, users: np.ndarray, top_items: np.ndarray, top_scores: np.ndarray) -> pa.Table:
        keep = np.isfinite(top_scores)
        ranks = np.broadcast_to(np.arange(1, top_items.shape[1] + 1, dtype=np.int32), top_items.shape)
        chosen = top_items[keep]
        return pa.table(
            {
                "user_id": np.broadcast_to(self.user_ids[users - 1][:, None], top_items.shape)[keep],
                "rank": ranks[keep],
                "movie_id": self.item_movie_ids[chosen - 1],
                "title": pa.array(self.titles, type=pa.string()).take(pa.array(chosen - 1)),
                "score": top_scores[keep],
            }
        )

    def describe(self) -> dict:
        return {
            "model": self.config.kind,
            "dataset": self.dataset_name,
            "num_users": len(self.known_users),
            "num_items": int(self.num_items),
            "max_len": int(self.config.max_len),
        }


def _column(table: pa.Table, name: str) -> list | None:
    return table[name].to_pylist() if name in table.column_names else None


def sha256_of(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


class ExportParts:
    """The finished passes of an export, beside its output: `<out>.parts/part-NNNNN.parquet` and a manifest of
    the request they answer. A manifest of another request means its parts are stale: they are removed."""

    def __init__(self, out: Path, request: dict):
        self.out, self.folder = out, out.with_name(out.name + ".parts")
        manifest = self.folder / "manifest.json"
        if self.folder.is_dir():
            try:
                same = json.loads(manifest.read_text()) == request
            except (OSError, ValueError):
                same = False
            if not same:
                shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        if not manifest.is_file():
            with atomic_path(manifest) as tmp:
                tmp.write_text(json.dumps(request))

    def path(self, number: int) -> Path:
        return self.folder / f"part-{number:05d}.parquet"

    def done(self, number: int) -> bool:
        return self.path(number).is_file()

    def write(self, number: int, table: pa.Table) -> None:
        with atomic_path(self.path(number)) as tmp:
            pq.write_table(table, tmp)

    def combine(self, count: int) -> int:
        """The parts, in order, as one file written atomically (one part in memory at a time)."""
        rows = 0
        with atomic_path(self.out) as tmp:
            writer = None
            for number in range(count):
                table = pq.read_table(self.path(number))
                writer = writer or pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
                rows += table.num_rows
            if writer is None:  # no users: an empty file with the columns
                pq.write_table(pa.table({"user_id": pa.array([], pa.int64())}), tmp)
            else:
                writer.close()
        shutil.rmtree(self.folder)
        return rows
