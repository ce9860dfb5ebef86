"""BERT4Rec (Sun et al., CIKM 2019): a bidirectional Transformer trained to fill in masked items (cloze).

Training hides `mask_prob` of a sequence's items behind a [mask] token (id num_items + 1) and predicts them
from both sides; at inference a [mask] is appended after the history and its prediction is the next item.
Blocks follow the paper's BERT layout: multi-head self-attention without a causal mask, a GELU
feed-forward of width 4d, each sub-layer followed by dropout, a residual and LayerNorm (post-norm); the
output head is a dense layer + GELU + LayerNorm, scored against the (tied) item table plus a per-item bias
(`model.head_transform`; without it the encoder's states are scored against the item table alone).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from movierec.models.base import ModelConfig, ModelSection, SequentialModel, register
from movierec.models.layers import attention, attention_bias, fast_dropout


class BidirectionalBlock(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.ffn_in, self.ffn_out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.attn_norm, self.ffn_norm = nn.LayerNorm(d), nn.LayerNorm(d)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        batch, length, d = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attended = attention(q, k, v, attn_bias, self.dropout, self.training)
        attended = attended.transpose(1, 2).reshape(batch, length, d)
        x = self.attn_norm(x + fast_dropout(self.out(attended), self.dropout, self.training))
        hidden = self.ffn_out(fast_dropout(F.gelu(self.ffn_in(x)), self.dropout, self.training))
        return self.ffn_norm(x + fast_dropout(hidden, self.dropout, self.training))


@register("bert4rec")
class BERT4Rec(SequentialModel):
    @classmethod
    def options(cls, kind: str) -> frozenset[str]:
        return frozenset({"kind", "max_len", "d_item", "num_blocks", "num_heads", "dropout", "mask_prob",
                          "head_transform", "mask_last"})  # fmt: skip

    @classmethod
    def resolve(cls, config: ModelSection) -> None:
        config.d_user, config.keep_user, config.keep_item = 0, 1.0, 1.0  # no user embedding, no SSE
        if config.d_item % config.num_heads:
            raise ValueError(f"model.d_item = {config.d_item} must be divisible by num_heads={config.num_heads}")
        if not 0 < config.mask_prob < 1:
            raise ValueError(f"model.mask_prob must be in (0, 1), got {config.mask_prob}")

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        d = config.d_item
        self.mask_id = config.num_items + 1
        self.item_emb = nn.Embedding(config.num_items + 2, d, padding_idx=0)  # + the [mask] token
        self.pos_emb = nn.Embedding(config.max_len, d)
        self.input_norm = nn.LayerNorm(d)
        self.blocks = nn.ModuleList(
            BidirectionalBlock(d, config.num_heads, config.dropout) for _ in range(config.num_blocks)
        )
        self.head = self.head_norm = self.item_bias = None  # model.head_transform false: the item table alone
        if config.head_transform:
            self.head, self.head_norm = nn.Linear(d, d), nn.LayerNorm(d)
            self.item_bias = nn.Parameter(torch.zeros(config.num_items + 2))
        for module in self.modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                nn.init.trunc_normal_(module.weight, std=0.02, a=-0.04, b=0.04)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()

    def _encode(self, sequences: torch.Tensor) -> torch.Tensor:
        """(B, L) left-padded ids, [mask] included -> (B, L, d) output-head states."""
        length = sequences.shape[1]
        positions = torch.arange(self.config.max_len - length, self.config.max_len, device=sequences.device)
        x = self.item_emb(sequences) + self.pos_emb(positions)
        x = fast_dropout(self.input_norm(x), self.config.dropout, self.training)
        attn_bias = attention_bias((sequences != 0)[:, None, None, :])  # padding is never attended to
        for block in self.blocks:
            x = block(x, attn_bias)
        return x if self.head is None else self.head_norm(F.gelu(self.head(x)))

    def queries(
        self, sequences: torch.Tensor, users: torch.Tensor, last_only: bool = False, times: torch.Tensor | None = None
    ) -> torch.Tensor:
        if not last_only:  # training: the cloze positions of `training_batch`'s inputs
            return self._encode(sequences)
        if sequences.shape[1] >= self.config.max_len:  # room for the [mask]: the oldest item leaves the window
            sequences = sequences[:, 1:]
        mask = torch.full_like(sequences[:, :1], self.mask_id)
        return self._encode(torch.cat([sequences, mask], dim=1))[:, -1]

    def score(self, queries: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        return self._with_bias((queries.unsqueeze(-2) * self.item_emb(items)).sum(-1), items)

    def score_shared(self, queries: torch.Tensor, items: torch.Tensor | slice) -> torch.Tensor:
        table = self.item_emb.weight[items] if isinstance(items, slice) else self.item_emb(items)
        return self._with_bias(queries @ table.t(), items)

    def _with_bias(self, scores: torch.Tensor, items: torch.Tensor | slice) -> torch.Tensor:
        return scores if self.item_bias is None else scores + self.item_bias[items]

    def training_batch(
        self, users: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Next-item pairs -> cloze: the window ending at the last target (as wide as the inputs, so the
        batch keeps its shape) with `mask_prob` of its items masked, and the last one always when
        `mask_last` (the position inference asks about); the targets are the hidden items, 0 elsewhere.
        A batch that drew no item at all (short rows, small batches) gets its last items masked, so the
        loss always has a target; the check is a tensor op, so it costs no device sync."""
        window = torch.cat([inputs[:, 1:], targets[:, -1:]], dim=1)
        real = window != 0
        masked = (torch.rand(window.shape, device=window.device) < self.config.mask_prob) & real
        if self.config.mask_last:
            masked[:, -1] |= real[:, -1]
        else:
            masked[:, -1] |= real[:, -1] & ~masked.any()
        return users, torch.where(masked, self.mask_id, window), torch.where(masked, window, 0)

    def sparse_tables(self) -> list[nn.Embedding]:
        return [self.item_emb]
