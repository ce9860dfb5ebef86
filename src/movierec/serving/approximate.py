"""An approximate top-k index for large catalogues (faiss IVF over inner products), built from the model.

Every model kind scores an item as an affine function of its query: `score(q, j) = q . w_j + b_j` (SSE-PT:
w_j = [e_j ; 1] with the user term as the query's last value; BERT4Rec: its item bias b_j; HSTU: the
unit-length e_j). The index reads w_j and b_j off the model itself (models/catalog.py's
`affine_item_table`, which the exact scorer's bfloat16 screen reads too). It stores [w_j ; b_j] and searches
with [q ; 1]: inner products, not cosine, so the user half of an SSE-PT query and a bias count as they do in
exact scoring.

The search returns `k + seen` candidates per query (the seen items are dropped afterwards), and the scores
of the kept ones are recomputed exactly; only which items are found is approximate. `recall_at_k` measures
that against exact scoring.
"""

from __future__ import annotations

import math

import numpy as np

from movierec.errors import ConfigError
from movierec.models.base import SequentialModel
from movierec.models.catalog import affine_item_table

# serve --index auto: exact scoring below this many items, the index from it (docs/results.md, Serving latency)
APPROXIMATE_FROM_ITEMS = 200_000


class ApproximateIndex:
    """faiss IndexIVFFlat over [w_j ; b_j], inner product; `nprobe` of `nlist` cells searched per query."""

    def __init__(self, model: SequentialModel, nlist: int | None = None, nprobe: int = 32, seed: int = 0):
        try:
            import faiss
        except ImportError as exc:
            raise ConfigError("the approximate index needs faiss: pip install 'movierec[ann]'") from exc

        table = affine_item_table(model)
        self.dim = table.shape[1]
        self.nlist = nlist or max(1, int(4 * math.sqrt(len(table))))
        quantizer = faiss.IndexFlatIP(self.dim)
        self.index = faiss.IndexIVFFlat(quantizer, self.dim, self.nlist, faiss.METRIC_INNER_PRODUCT)
        sample = np.random.default_rng(seed).choice(len(table), min(len(table), 64 * self.nlist), replace=False)
        self.index.train(table[np.sort(sample)])
        self.index.add(table)
        self.index.nprobe = min(nprobe, self.nlist)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, item ids) of about the k best items per query row; ids are 1-based, -1 filled when short."""
        augmented = np.concatenate([queries, np.ones((len(queries), 1), np.float32)], 1).astype(np.float32)
        scores, rows = self.index.search(np.ascontiguousarray(augmented), k)
        return scores, np.where(rows >= 0, rows + 1, -1)


def recall_at_k(approximate: np.ndarray, exact: np.ndarray) -> float:
    """Mean share of each row's exact top-k items that the approximate top-k also holds."""
    hits = [len(set(a[a > 0].tolist()) & set(e[e > 0].tolist())) / max(int((e > 0).sum()), 1)
            for a, e in zip(approximate, exact, strict=True)]  # fmt: skip
    return float(np.mean(hits)) if hits else 1.0
