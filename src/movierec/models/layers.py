"""Building blocks the model kinds share: a cheaper CPU dropout, masked attention built on it, and the
L2 normalisation of cosine scoring.

On CPU, element-wise passes over the (B, heads, L, L) attention weights and their masks cost as much as the
matrix products around them (see the throughput section of docs/results.md), so both helpers keep those
passes few and in place where autograd allows.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F


def fast_dropout(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Inverted dropout, as F.dropout, with a cheaper mask: CPU random numbers come from one Mersenne
    Twister stream, and drawing them is most of dropout's cost, so each 64-bit draw is split into four
    15-bit uniforms (p is rounded to a multiple of 2^-15). The mask, 0 or 1/(1-p), is built with float
    arithmetic in place (bool comparisons and `torch.where` are several times slower on CPU), so applying
    it is a single multiply forward and backward."""
    if not training or p == 0:
        return x
    count = x.numel()
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=x.device).random_()
    uniform15 = words.view(torch.int16)[:count].view(x.shape) & 0x7FFF  # the sign bit of each quarter dropped
    # keep where uniform15 >= threshold: clamp(u - threshold + 1, 0, 1) is 1 there and 0 below (u is integral)
    threshold = round(p * 32768)
    mask = uniform15.to(torch.float32).sub_(threshold - 1).clamp_(0, 1).mul_(1.0 / (1.0 - p))
    return x * mask.to(x.dtype)


def attention_bias(allowed: torch.Tensor) -> torch.Tensor:
    """A boolean attention mask (True = may attend) as the additive float mask `attention` takes: 0 where
    allowed, -inf where not. Built once per forward pass and shared by the blocks."""
    bias = torch.zeros(allowed.shape, dtype=torch.float32, device=allowed.device)
    return bias.masked_fill_(~allowed, float("-inf"))


# "auto": the fused kernel on CUDA always, on CPU without dropout; "unfused": the explicit math everywhere
# (what bench/gpu_check.py times the fused kernel against). Set by MOVIEREC_ATTENTION, read at import.
ATTENTION_PATH = os.environ.get("MOVIEREC_ATTENTION", "auto")


def attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, bias: torch.Tensor, dropout: float, training: bool
) -> torch.Tensor:
    """softmax(q k^T / sqrt(d_head) + bias) v over (B, heads, L, d_head) tensors, with dropout on the
    attention weights while training.

    On CUDA this is `F.scaled_dot_product_attention` with `dropout_p`: its flash or memory-efficient kernels
    never materialise the (L, L) weights. On CPU, training with dropout takes the unfused math below, which is
    what SDPA's CPU path for dropout computes too, with a slower Bernoulli sampler; without dropout it is
    the fused kernel.
    """
    fused = ATTENTION_PATH != "unfused" and (query.device.type == "cuda" or not training or dropout == 0)
    if fused:
        p = dropout if training else 0.0
        return F.scaled_dot_product_attention(query, key, value, attn_mask=bias.to(query.dtype), dropout_p=p)
    scores = (query * query.shape[-1] ** -0.5) @ key.transpose(-2, -1)
    scores.add_(bias)  # in place: the product's backward does not need its output
    weights = torch.softmax(scores, dim=-1)
    return fast_dropout(weights, dropout, training) @ value


UNIT_EPS = 1e-6


def unit_length(x: torch.Tensor) -> torch.Tensor:
    """`x` scaled to unit L2 norm along its last dimension (a zero vector stays zero): the queries and items
    of cosine scoring (HSTU, and SASRec / SSE-PT with model.cosine)."""
    return F.normalize(x, dim=-1, eps=UNIT_EPS)
