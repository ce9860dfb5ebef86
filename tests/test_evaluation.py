"""Full-ranking exclusion and the training batch shift, on hand-built sequences."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from movierec.data.layout import load_sequences
from movierec.data.prepare import Interactions, write_dataset
from movierec.evaluation.evaluate import Evaluator
from movierec.training.batches import TrainBatches


@pytest.fixture
def tiny(tmp_path):
    sequences = {1: [1, 2, 3, 4], 2: [2, 5, 3], 3: [1, 2, 3, 4, 5, 6, 7]}
    users = np.concatenate([[u] * len(s) for u, s in sequences.items()])
    items = np.concatenate(list(sequences.values()))
    interactions = Interactions(users=users, items=items, timestamps=np.arange(len(users)))
    path = write_dataset(
        interactions, tmp_path, "tiny", source={"kind": "test"}, min_user_interactions=0, min_item_interactions=0
    )
    return load_sequences(path)


def test_full_ranking_excludes_the_input_history_and_counts_ties_against_the_target(tiny):
    evaluator = Evaluator(tiny, "evaluation", ("full",))
    h = evaluator.histories
    assert h.users.tolist() == [1, 2, 3] and h.targets.tolist() == [4, 3, 7]
    np.testing.assert_array_equal(h.items[h.offsets[0] : h.offsets[1]], [1, 2, 3])  # train + validation item
    scores = torch.tensor(
        [
            [0, 9, 9, 9, 5, 6, 0, 0],  # user 1: items 1-3 seen; item 5 beats target 4 -> rank 1
            [0, 1, 9, 7, 7, 9, 0, 0],  # user 2: items 2, 5 seen; item 4 ties target 3 -> rank 1
            [0, 9, 9, 9, 9, 9, 9, 2],  # user 3: everything else seen -> rank 0
        ],
        dtype=torch.float32,
    )
    scores[:, 0] = float("-inf")
    ranks = evaluator._full_ranks(scores, np.arange(3), torch.tensor(h.targets))
    assert ranks.tolist() == [1, 1, 0]


def test_training_batches_pair_each_item_with_the_next_one(tiny):
    batches = TrainBatches(tiny, batch_size=2, max_len=3)
    assert batches.users.tolist() == [1, 3]  # user 2 has a single training item
    batch = batches.make_batch(np.array([1, 3]))
    # user 1 trains on [1, 2]; user 3 on [1..5], of which the last max_len transitions are kept
    np.testing.assert_array_equal(batch.inputs, [[0, 0, 1], [2, 3, 4]])
    np.testing.assert_array_equal(batch.targets, [[0, 0, 2], [3, 4, 5]])
    assert batch.num_tokens == 4


def test_token_weights_give_every_target_position_the_same_weight(tiny):
    """train.token_weighting scales each batch's mean loss by num_tokens / mean_tokens: the scale averages
    1 over an epoch (the learning rate keeps its meaning) and every position gets weight 1 / mean_tokens."""
    batches = TrainBatches(tiny, batch_size=1, max_len=3)
    epoch = list(batches.epoch(np.random.default_rng(0)))
    assert sorted(b.num_tokens for b in epoch) == [1, 3]  # user 1: 1 target, user 3: 3 (capped at max_len)
    assert batches.mean_tokens == 2.0
    assert sum(b.num_tokens / batches.mean_tokens for b in epoch) == pytest.approx(len(batches))
