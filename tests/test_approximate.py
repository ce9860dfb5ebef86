"""The approximate index: the item table it reads off each model kind reproduces exact scores, its recall@10
against exact scoring is measured, and seen items are never offered."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from movierec.models.base import ModelConfig, build_model
from movierec.serving.approximate import ApproximateIndex, affine_item_table, recall_at_k
from movierec.serving.loader import load_model

pytest.importorskip("faiss")


@pytest.mark.parametrize("kind", ["sse-pt", "sasrec", "bert4rec", "hstu"])
def test_every_kind_scores_affinely_and_the_table_reproduces_exact_scores(kind):
    extra = {"d_user": 4} if kind == "sse-pt" else {}
    config = ModelConfig(kind=kind, num_users=5, num_items=40, max_len=6, d_item=8, num_heads=2, **extra)
    torch.manual_seed(0)
    model = build_model(config).eval()
    if kind == "bert4rec" and model.item_bias is not None:
        with torch.no_grad():
            model.item_bias.normal_()  # a non-zero bias must travel through the table too
    table = affine_item_table(model)
    with torch.no_grad():
        queries = model.queries(torch.randint(1, 41, (3, 6)), torch.tensor([1, 2, 0]), last_only=True)
        exact = model.score_shared(queries, slice(1, 41)).numpy()
    derived = np.concatenate([queries.numpy(), np.ones((3, 1), np.float32)], 1) @ table.T
    np.testing.assert_allclose(derived, exact, rtol=1e-4, atol=1e-4)


def test_the_index_finds_the_exact_top_10_and_never_offers_a_seen_item(trained_run):
    exact = load_model(trained_run.run_dir)
    approximate = load_model(trained_run.run_dir)
    approximate.use_index(ApproximateIndex(approximate.model, nlist=8, nprobe=8))  # every cell: exhaustive
    users = exact.known_users[:50]
    offsets, items = exact.histories.gather(users)
    exact_items, exact_scores = exact._top_k(offsets, items, users, 10, True)
    found_items, found_scores = approximate._top_k(offsets, items, users, 10, True)
    assert recall_at_k(found_items, exact_items) == 1.0
    np.testing.assert_allclose(found_scores, exact_scores, rtol=1e-5, atol=1e-5)
    for row in range(len(users)):
        assert not set(found_items[row]) & set(items[offsets[row] : offsets[row + 1]].tolist())
    partial = load_model(trained_run.run_dir)
    partial.use_index(ApproximateIndex(partial.model, nlist=16, nprobe=2))
    found_items, _ = partial._top_k(offsets, items, users, 10, True)
    assert 0 < recall_at_k(found_items, exact_items) <= 1.0
