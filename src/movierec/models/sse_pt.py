"""SSE-PT (Wu et al., RecSys 2020) and SASRec (Kang & McAuley, ICDM 2018) in one readable module.

SSE-PT is SASRec with a user embedding concatenated to every item embedding, regularised by Stochastic
Shared Embeddings (SSE): during training a sequence's user is replaced by a random user with probability
1 - keep_user and each item by a random item with probability 1 - keep_item. SASRec is the same network
with d_user = 0 and no SSE. Everything below follows the official TensorFlow code (`model_v1.py`,
`modules.py`): queries are LN(x), keys/values are x, no attention output projection, residuals added to
the normalised input, padding re-masked after each block, final LayerNorm with eps 1e-8, output item
embeddings tied to the input table.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from movierec.models.base import ModelConfig, ModelSection, SequentialModel, register
from movierec.models.layers import UNIT_EPS, attention, attention_bias, fast_dropout, unit_length

LN_EPS = 1e-8


class Block(nn.Module):
    """Causal self-attention + point-wise feed-forward, as in SASRec's TensorFlow code."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.attn_norm = nn.LayerNorm(d, eps=LN_EPS)
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.ffn_norm = nn.LayerNorm(d, eps=LN_EPS)
        self.ffn_in, self.ffn_out = nn.Linear(d, d), nn.Linear(d, d)

    def forward(
        self, x: torch.Tensor, attn_bias: torch.Tensor, keep: torch.Tensor, last_only: bool = False
    ) -> torch.Tensor:
        """(B, L, d) -> (B, L, d); with `last_only`, only the last position's output (B, 1, d)."""
        batch, _, d = x.shape
        if last_only:  # inference: the other queries are never read, so they are never computed
            attn_bias, keep = attn_bias[..., -1:, :], keep[:, -1:]
        normed = self.attn_norm(x[:, -1:] if last_only else x)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(batch, t.shape[1], self.heads, d // self.heads).transpose(1, 2)

        query, key, value = split(self.query(normed)), split(self.key(x)), split(self.value(x))
        attended = attention(query, key, value, attn_bias, self.dropout, self.training)
        x = attended.transpose(1, 2).reshape(batch, normed.shape[1], d) + normed
        normed = self.ffn_norm(x)
        hidden = fast_dropout(F.relu(self.ffn_in(normed)), self.dropout, self.training)
        x = fast_dropout(self.ffn_out(hidden), self.dropout, self.training) + normed
        return x * keep


@register("sse-pt", "sasrec")
class SSEPT(SequentialModel):
    """Input at each position: [item_emb(i)·√d_i ; user_emb(u)·√d_u] + positional embedding.

    The logit of item j at a position with hidden state h = [h_i ; h_u] is h_i · item_emb(j) + h_u · u: its
    query is [h_i ; h_u · u] (d_item + 1 values; SASRec's is h, d_item values). With `model.cosine` it is
    cos(h_i, item_emb(j)) + cos(h_u, u): the query is [h_i / |h_i| ; cos(h_u, u)] and the item table is
    L2-normalised. The user term is the same for every item of a query, so it ranks nothing and cancels in a
    softmax; it counts only in BCE-style losses.
    """

    @classmethod
    def options(cls, kind: str) -> frozenset[str]:
        common = {"kind", "max_len", "d_item", "num_blocks", "num_heads", "dropout", "cosine"}
        return frozenset(
            common if kind == "sasrec" else {*common, "d_user", "keep_user", "keep_item", "zero_user_term"}
        )

    @classmethod
    def resolve(cls, config: ModelSection) -> None:
        if config.kind == "sasrec":  # SASRec: no user embedding and no SSE
            config.d_user, config.keep_user, config.keep_item = 0, 1.0, 1.0
        if config.kind == "sse-pt" and config.d_user <= 0:
            raise ValueError("SSE-PT needs model.d_user > 0 (use kind: sasrec for no user embedding)")
        if config.d_model % config.num_heads:
            raise ValueError(f"d_item + d_user = {config.d_model} must be divisible by num_heads={config.num_heads}")

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        c = config
        self.item_emb = nn.Embedding(c.num_items + 1, c.d_item, padding_idx=0)
        self.user_emb = nn.Embedding(c.num_users + 1, c.d_user) if c.d_user else None
        self.pos_emb = nn.Embedding(c.max_len, c.d_model)
        self.blocks = nn.ModuleList(Block(c.d_model, c.num_heads, c.dropout) for _ in range(c.num_blocks))
        self.final_norm = nn.LayerNorm(c.d_model, eps=LN_EPS)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for name, param in self.named_parameters():
            if param.dim() > 1:
                nn.init.xavier_uniform_(param)
            elif name.endswith("bias") and "norm" not in name:
                nn.init.zeros_(param)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
            if self.user_emb is not None and self.config.zero_user_term:
                # the user half of the output h_u scores h_u . u, the same bias for every item at a position;
                # through the residual path h_u starts correlated with u, so that bias starts positive (about
                # +1.5 on ML-1M, a BCE loss of 6.6 instead of 1.4) and the first epochs are spent undoing it
                self.final_norm.weight[self.config.d_item :].zero_()

    def user_vectors(self, users: torch.Tensor) -> torch.Tensor | None:
        """The scaled user embedding used on both the input and the output side (None for SASRec); user 0,
        a person without an embedding, gets the mean of the trained users' vectors (`new_user_vector`)."""
        if self.user_emb is None:
            return None
        vectors = self.user_emb(users) * math.sqrt(self.config.d_user)
        traced = torch.jit.is_tracing() or torch.compiler.is_compiling()  # no data-dependent branch in an export
        # training never has user 0 (and a check per step would make a GPU wait for it)
        if traced or (not self.training and bool((users == 0).any())):
            vectors = torch.where((users == 0).unsqueeze(-1), self.new_user_vector(), vectors)
        return vectors

    def new_user_vector(self) -> torch.Tensor | None:
        """The user vector for a person the model has no embedding for: the mean of all user vectors.

        SSE trains the network for this: with probability 1 - keep_user a training sequence is paired with a
        random user's vector, so predictions must work under vectors drawn from the table.
        """
        if self.user_emb is None:
            return None
        weight = self.user_emb.weight
        if self.training or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return weight[1:].mean(0) * math.sqrt(self.config.d_user)
        # serving asks for it on every request with a new person; a table of millions of users costs tens of
        # ms to average, so the mean is kept until the weights change (their version counter moves)
        key = (weight.data_ptr(), weight._version, weight.device)
        if getattr(self, "_mean_user_key", None) != key:
            with torch.no_grad():
                self._mean_user_vector = weight[1:].mean(0) * math.sqrt(self.config.d_user)
            self._mean_user_key = key
        return self._mean_user_vector

    def forward(self, seqs: torch.Tensor, user_vecs: torch.Tensor | None, last_only: bool = False) -> torch.Tensor:
        """Hidden states (B, L, d) for left-padded item sequences (B, L), L <= max_len.

        A batch may be shorter than max_len (dynamic padding): positions are counted from the right, as
        with the full left-padded width, so the result is the same function. `last_only` returns just the
        last position (B, 1, d), computing the final block for that position alone.
        """
        batch, length = seqs.shape
        keep = (seqs != 0).unsqueeze(-1)
        x = self.item_emb(seqs) * math.sqrt(self.config.d_item)
        if user_vecs is not None:
            x = torch.cat([x, user_vecs.unsqueeze(1).expand(batch, length, -1)], dim=-1)
        positions = torch.arange(self.config.max_len - length, self.config.max_len, device=seqs.device)
        x = fast_dropout(x + self.pos_emb(positions), self.config.dropout, self.training)
        keep = keep.to(x.dtype)
        x = x * keep
        # causal, and padding keys masked; each position always sees itself, so that padding queries
        # (zeroed afterwards) never form an all-masked row
        causal = torch.ones(length, length, dtype=torch.bool, device=seqs.device).tril()
        diagonal = torch.eye(length, dtype=torch.bool, device=seqs.device)
        attn_bias = attention_bias(((causal & (seqs != 0).unsqueeze(1)) | diagonal).unsqueeze(1))  # (B, 1, L, L)
        for index, block in enumerate(self.blocks):
            x = block(x, attn_bias, keep, last_only and index == len(self.blocks) - 1)
        return self.final_norm(x)

    # ------------------------------------------------------------------ the SequentialModel contract

    def queries(
        self, sequences: torch.Tensor, users: torch.Tensor, last_only: bool = False, times: torch.Tensor | None = None
    ) -> torch.Tensor:
        user_vecs = self.user_vectors(users)
        hidden = self(sequences, user_vecs, last_only=last_only)
        if last_only:
            hidden = hidden[:, -1]
        d_i, cosine = self.config.d_item, self.config.cosine
        item_half = unit_length(hidden[..., :d_i]) if cosine else hidden[..., :d_i]
        if user_vecs is None:
            return item_half
        user_half, user_vecs = hidden[..., d_i:], _broadcast_user(user_vecs, hidden)
        if cosine:
            user_term = F.cosine_similarity(user_half, user_vecs, dim=-1, eps=UNIT_EPS).unsqueeze(-1)
        else:
            user_term = (user_half * user_vecs).sum(-1, keepdim=True)
        return torch.cat([item_half, user_term], dim=-1)

    def item_vectors(self, items: torch.Tensor | slice) -> torch.Tensor:
        """Item embeddings as the logits read them: L2-normalised with `model.cosine`."""
        table = self.item_emb.weight[items] if isinstance(items, slice) else self.item_emb(items)
        return unit_length(table) if self.config.cosine else table

    def score(self, queries: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        d_i = self.config.d_item
        logits = (queries[..., :d_i].unsqueeze(-2) * self.item_vectors(items)).sum(-1)
        return logits + queries[..., d_i:] if self.user_emb is not None else logits

    def score_shared(self, queries: torch.Tensor, items: torch.Tensor | slice) -> torch.Tensor:
        d_i = self.config.d_item
        logits = queries[..., :d_i] @ self.item_vectors(items).transpose(-1, -2)
        return logits + queries[..., d_i:] if self.user_emb is not None else logits

    def training_batch(
        self, users: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return apply_sse(users, inputs, targets, self.config)

    def sparse_tables(self) -> list[nn.Embedding]:
        return [t for t in (self.item_emb, self.user_emb) if t is not None]


def _broadcast_user(user_vecs: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    while user_vecs.dim() < hidden.dim():
        user_vecs = user_vecs.unsqueeze(1)
    return user_vecs


def apply_sse(
    users: torch.Tensor,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    config: ModelConfig,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stochastic Shared Embeddings, as the official SSE-PT sampler applies them.

    The user of a sequence becomes a random user with probability 1 - keep_user (input and output side
    alike). At each non-padding position, with probability 1 - keep_item, the input item and the target
    are both replaced by (independent) random items. Because the official sampler walks the sequence
    backwards, a replaced input item is also the previous position's target unless that position was
    replaced itself: inputs are replaced with probability 1 - keep_item, targets with 1 - keep_item².
    """
    device = users.device
    if config.d_user and config.keep_user < 1:
        swap = torch.rand(users.shape, generator=generator, device=device) >= config.keep_user
        random_users = torch.randint(1, config.num_users + 1, users.shape, generator=generator, device=device)
        users = torch.where(swap, random_users, users)
    if config.keep_item < 1:
        real = inputs != 0
        coin = (torch.rand(inputs.shape, generator=generator, device=device) >= config.keep_item) & real
        random_inputs, random_targets = (
            torch.randint(1, config.num_items + 1, inputs.shape, generator=generator, device=device) for _ in range(2)
        )
        inputs = torch.where(coin, random_inputs, inputs)
        carried = torch.cat([inputs[:, 1:], targets[:, -1:]], dim=1)  # target t is the item at t + 1
        targets = torch.where(coin, random_targets, torch.where(targets != 0, carried, targets))
    return users, inputs, targets
