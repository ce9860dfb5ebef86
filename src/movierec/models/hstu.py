"""HSTU (Zhai et al., ICML 2024, "Actions Speak Louder than Words"): the Hierarchical Sequential Transduction
Unit, written from the paper's equations for the sequential-recommendation setting of its section 4.1.

Each block, on the LayerNorm'd input X (no affine parameters):

    U, V, Q, K = split(SiLU(X W))                       one projection, no bias
    A = SiLU(Q K^T + rab) / n  * causal mask             pointwise aggregated attention, no softmax
    Y = X + W_o dropout(LayerNorm(A V) * U)              no separate feed-forward block

per head, with d_qk = d_v = model.d_item / model.num_heads. `rab` is a learned bias per relative position
(query minus key, causal), plus with `model.time_bias` a learned bias per bucket of the time gap between the
query's latest item and the key's item, log-bucketed (two buckets per doubling of the gap in seconds). Query i
predicts item i + 1 from items 0..i, so the gaps it sees are t_i - t_j: never the time of the item it
predicts (the published recipe's bias reads the target's time, which a live request does not have).
Without timestamps (`times=None`, e.g. a history sent to the server) the time bias is left out. `n` is
model.max_len, a constant, so a batch padded to fewer positions computes the same function.
Inputs are the item embedding x sqrt(d) plus a learned absolute position (counted from the most recent item,
as SSE-PT's), with dropout. The outputs are L2-normalised, and items are scored by cosine
similarity: `train.temperature` divides the logits of the softmax losses (0.05 in the paper's recipe).
Sequences are left-padded: padding keys are masked and padding positions are zeroed after every block.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from movierec.models.base import ModelConfig, ModelSection, SequentialModel, register
from movierec.models.layers import fast_dropout, unit_length

NORM_EPS = 1e-6
TIME_BUCKETS = 64  # two per doubling of the gap in seconds: 2^32 s (136 years) fill them


def time_gap_buckets(times: torch.Tensor) -> torch.Tensor:
    """(B, L, L) bucket of t_i - t_j for each query position i and key j of (B, L) timestamps:
    floor(2 log2(1 + gap)); gaps below 0 (keys after the query, masked anyway) count as 0."""
    gaps = (times.unsqueeze(-1) - times.unsqueeze(1)).clamp(min=0).double()
    return torch.floor(2 * torch.log2(1 + gaps)).long().clamp(max=TIME_BUCKETS - 1)


class HSTUBlock(nn.Module):
    """One HSTU layer over left-padded (B, L, d) inputs."""

    def __init__(self, d: int, heads: int, dropout: float, max_len: int, time_bias: bool = False):
        super().__init__()
        self.d, self.heads, self.head_dim, self.dropout, self.max_len = d, heads, d // heads, dropout, max_len
        self.uvqk = nn.Linear(d, 4 * d, bias=False)  # U, V, Q, K: heads x head_dim each
        self.out = nn.Linear(d, d)
        self.relative_bias = nn.Parameter(torch.zeros(max_len))  # by query position minus key position
        self.time_bias = nn.Parameter(torch.zeros(TIME_BUCKETS)) if time_bias else None  # by time-gap bucket

    def forward(
        self, x: torch.Tensor, allowed: torch.Tensor, last_only: bool = False, gaps: torch.Tensor | None = None
    ) -> torch.Tensor:
        """`allowed` (B, L, L) is 1 where query i may read key j (causal, key not padding), else 0; with
        `last_only` only the last position is computed, (B, 1, d). `gaps` (B, Lq, L): the time-gap buckets
        of `time_gap_buckets` (None: no time bias)."""
        batch, length, d = x.shape
        u, v, q, k = F.silu(self.uvqk(F.layer_norm(x, (d,), eps=NORM_EPS))).split(d, dim=-1)
        if last_only:
            u, q, allowed = u[:, -1:], q[:, -1:], allowed[:, -1:]

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, t.shape[1], self.heads, self.head_dim).transpose(1, 2)

        queries = torch.arange(length - q.shape[1], length, device=x.device)
        distance = (queries[:, None] - torch.arange(length, device=x.device)[None, :]).clamp(0, self.max_len - 1)
        scores = heads(q) @ heads(k).transpose(-1, -2) + self.relative_bias[distance]
        if self.time_bias is not None and gaps is not None:
            scores = scores + self.time_bias[gaps].unsqueeze(1)
        weights = F.silu(scores) * (allowed.unsqueeze(1) / self.max_len)
        attended = (weights @ heads(v)).transpose(1, 2).reshape(batch, q.shape[1], d)
        mixed = F.layer_norm(attended, (d,), eps=NORM_EPS) * u
        residual = x[:, -1:] if last_only else x
        return residual + self.out(fast_dropout(mixed, self.dropout, self.training))


@register("hstu")
class HSTU(SequentialModel):
    """HSTU blocks over item embeddings, cosine scoring. No user embedding (user 0 and every user alike)."""

    @classmethod
    def options(cls, kind: str) -> frozenset[str]:
        return frozenset({"kind", "max_len", "d_item", "num_blocks", "num_heads", "dropout", "time_bias"})

    @classmethod
    def resolve(cls, config: ModelSection) -> None:
        config.d_user, config.keep_user, config.keep_item = 0, 1.0, 1.0  # no user embedding, no SSE
        if config.d_item % config.num_heads:
            raise ValueError(f"model.d_item = {config.d_item} must be divisible by num_heads={config.num_heads}")

    @classmethod
    def flops_per_token(cls, config: ModelConfig) -> float:
        """Multiply-adds of one training position, forward + backward (3x): per block the U/V/Q/K projection
        (4 d^2) and the output one (d^2), scores and weighted values over max_len keys (2 d L), plus the
        target's and a negative's logit (4 d)."""
        d, length = config.d_item, config.max_len
        return 3.0 * (config.num_blocks * (5 * d * d + 2 * d * length) + 4 * d)

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        d = config.d_item
        self.item_emb = nn.Embedding(config.num_items + 1, d, padding_idx=0)
        self.pos_emb = nn.Embedding(config.max_len, d)
        self.blocks = nn.ModuleList(
            HSTUBlock(d, config.num_heads, config.dropout, config.max_len, config.time_bias)
            for _ in range(config.num_blocks)
        )
        for name, param in self.named_parameters():
            if name.endswith("bias"):  # the linear biases, the relative-position and time-gap biases
                nn.init.zeros_(param)
            elif name.endswith("uvqk.weight") or name.endswith("emb.weight"):
                nn.init.normal_(param, std=0.02)
            else:
                nn.init.xavier_uniform_(param)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    @property
    def uses_times(self) -> bool:
        return self.config.time_bias

    def forward(
        self, sequences: torch.Tensor, last_only: bool = False, times: torch.Tensor | None = None
    ) -> torch.Tensor:
        """L2-normalised outputs (B, L, d) of left-padded item sequences (B, L), or of the last position;
        `times` (B, L): the items' Unix seconds, for the time bias."""
        length = sequences.shape[1]
        keep = (sequences != 0).unsqueeze(-1)
        positions = torch.arange(self.config.max_len - length, self.config.max_len, device=sequences.device)
        x = self.item_emb(sequences) * math.sqrt(self.config.d_item) + self.pos_emb(positions)
        x = fast_dropout(x, self.config.dropout, self.training) * keep
        causal = torch.ones(length, length, dtype=torch.bool, device=sequences.device).tril()
        allowed = (causal & (sequences != 0).unsqueeze(1)).to(x.dtype)  # (B, L, L)
        gaps = time_gap_buckets(times) if self.config.time_bias and times is not None else None
        for index, block in enumerate(self.blocks):
            last = last_only and index == len(self.blocks) - 1
            block_gaps = gaps[:, -1:] if last and gaps is not None else gaps
            x = block(x, allowed, last, block_gaps) * (keep[:, -1:] if last else keep)
        return unit_length(x)

    # ------------------------------------------------------------------ the SequentialModel contract

    def queries(
        self, sequences: torch.Tensor, users: torch.Tensor, last_only: bool = False, times: torch.Tensor | None = None
    ) -> torch.Tensor:
        hidden = self(sequences, last_only=last_only, times=times)
        return hidden[:, -1] if last_only else hidden

    def item_vectors(self, items: torch.Tensor | slice) -> torch.Tensor:
        """Unit-length item embeddings: scores are cosine similarities."""
        table = self.item_emb.weight[items] if isinstance(items, slice) else self.item_emb(items)
        return unit_length(table)

    def score(self, queries: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return (queries.unsqueeze(-2) * self.item_vectors(items)).sum(-1)

    def score_shared(self, queries: torch.Tensor, items: torch.Tensor | slice) -> torch.Tensor:
        return queries @ self.item_vectors(items).transpose(-1, -2)

    def sparse_tables(self) -> list[nn.Embedding]:
        return [self.item_emb]
