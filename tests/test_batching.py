"""Micro-batching in serve: concurrent requests scored together give what each gives alone (to float rounding),
a bad request fails alone, and a lone request is not held back."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from movierec.serving.batching import MicroBatcher, Request
from movierec.serving.loader import load_model

TOLERANCE = 1e-5  # a batched product may round its last bits differently from a single row's


@pytest.fixture(scope="module")
def rec(trained_run):
    return load_model(trained_run.run_dir)


def requests_of(rec, count: int) -> list[Request]:
    users = rec.known_users[:count]
    out = []
    for number, user in enumerate(users):
        offsets, items = rec.histories.gather(np.array([user]))
        out.append(Request(offsets, items, np.array([user]), k=3 + number % 5, exclude_seen=number % 3 != 0))
    return out


def concurrently(batcher: MicroBatcher, requests: list[Request]) -> list:
    results: list = [None] * len(requests)
    start = threading.Barrier(len(requests))

    def one(index: int) -> None:
        start.wait()
        try:
            results[index] = batcher.submit(requests[index])
        except Exception as exc:
            results[index] = exc

    threads = [threading.Thread(target=one, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def test_batched_equals_scored_alone(rec):
    requests = requests_of(rec, 24)
    batcher = MicroBatcher(rec._top_k, window_s=0.05, max_rows=64)
    results = concurrently(batcher, requests)
    assert batcher.requests == 24 and batcher.batches < 24, "requests were scored together"
    for request, (items, scores) in zip(requests, results, strict=True):
        alone_items, alone_scores = rec._top_k(request.offsets, request.items, request.users, request.k,
                                               request.exclude_seen)  # fmt: skip
        assert items.shape == (1, request.k)
        np.testing.assert_allclose(scores, alone_scores, rtol=0, atol=TOLERANCE)
        swapped = items != alone_items
        if swapped.any():  # only near-ties may trade places
            assert np.all(np.abs(np.diff(alone_scores[0]))[swapped[0][:-1]] <= TOLERANCE)


def test_a_failing_request_never_fails_its_neighbours(rec):
    requests = requests_of(rec, 6)
    offsets, items = requests[2].offsets, requests[2].items.copy()
    items[:] = rec.num_items + 10**6  # an item id the model has no row for: scoring it raises
    requests[2] = Request(offsets, items, requests[2].users, requests[2].k, requests[2].exclude_seen)
    results = concurrently(MicroBatcher(rec._top_k, window_s=0.05), requests)
    assert isinstance(results[2], Exception)
    assert all(isinstance(r, tuple) and r[0].shape[1] == q.k for i, (r, q) in enumerate(zip(results, requests,
               strict=True)) if i != 2)  # fmt: skip


def test_the_recommender_serves_through_the_batcher_with_the_same_answers(trained_run):
    plain, batched = load_model(trained_run.run_dir), load_model(trained_run.run_dir)
    batched.enable_batching(window_s=0.0)
    user = int(plain.known_user_ids[0])
    assert [r.movie_id for r in batched.recommend_user(user, 7)] == [r.movie_id for r in plain.recommend_user(user, 7)]
    history = [r.movie_id for r in plain.recommend_user(user, 4)]
    assert [r.movie_id for r in batched.recommend_history(history, 5).recommendations] == [
        r.movie_id for r in plain.recommend_history(history, 5).recommendations]  # fmt: skip
    assert batched.batcher.requests == 2
