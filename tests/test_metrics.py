"""Ranking metrics on hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from movierec.evaluation.metrics import metrics_from_ranks, rank_of_target


def test_rank_counts_candidates_scored_at_least_as_high():
    target = np.array([0.5, 0.5, 2.0])
    others = np.array([[0.9, 0.1, 0.2], [0.5, 0.5, 0.1], [1.0, -np.inf, 0.0]])
    # row 0: one higher; row 1: two ties count against the target; row 2: none higher, -inf excluded
    np.testing.assert_array_equal(rank_of_target(target, others), [1, 2, 0])


def test_metrics_by_hand():
    ranks = np.array([0, 1, 4, 12])
    m = metrics_from_ranks(ranks, ks=(1, 5, 10))
    assert m["hr@1"] == pytest.approx(0.25)
    assert m["hr@5"] == pytest.approx(0.75)
    assert m["hr@10"] == pytest.approx(0.75)
    assert m["ndcg@1"] == pytest.approx(0.25)
    assert m["ndcg@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 4)
    assert m["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 5 + 1 / 13) / 4)


def test_k_larger_than_the_candidate_list():
    # with 3 candidates every rank is < 100, so HR@100 is 1 and NDCG@100 is the full discounted gain
    ranks = rank_of_target(np.array([0.1, 0.9]), np.array([[0.5, 0.2], [0.1, 0.3]]))
    m = metrics_from_ranks(ranks, ks=(100,))
    assert m["hr@100"] == 1.0
    assert m["ndcg@100"] == pytest.approx((1 / math.log2(4) + 1) / 2)  # ranks 2 and 0


def test_all_scores_equal_gets_the_worst_rank():
    ranks = rank_of_target(np.zeros(5), np.zeros((5, 100)))
    assert np.all(ranks == 100)
    assert metrics_from_ranks(ranks, ks=(10,))["hr@10"] == 0.0


def test_empty_input_is_nan():
    assert math.isnan(metrics_from_ranks(np.array([]), ks=(10,))["ndcg@10"])
