"""The shared building blocks: dropout masks, masked attention, and the CPU allocator setting of training."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from movierec.models.layers import attention, attention_bias, fast_dropout


@pytest.mark.parametrize("p", [0.1, 0.2, 0.5])
def test_fast_dropout_keeps_1_minus_p_and_rescales(p: float):
    torch.manual_seed(0)
    x = torch.ones(1_000_003)  # not a multiple of 4: the last 64-bit draw is partly used
    out = fast_dropout(x, p, training=True)
    values = out.unique()
    assert len(values) == 2 and values[0] == 0 and abs(values[1].item() - 1 / (1 - p)) < 1e-6
    kept = (out != 0).double().mean().item()
    assert abs(kept - (1 - p)) < 0.003  # 1e6 draws: the standard error is below 0.0005
    assert abs(out.double().mean().item() - 1.0) < 0.005  # inverted dropout keeps the expectation


def test_fast_dropout_is_identity_outside_training_and_keeps_dtype():
    x = torch.randn(4, 5, dtype=torch.bfloat16)
    assert fast_dropout(x, 0.3, training=False) is x
    assert fast_dropout(x, 0.0, training=True) is x
    assert fast_dropout(x, 0.3, training=True).dtype == torch.bfloat16


def test_attention_training_path_matches_sdpa_and_backpropagates():
    """With a dropout so small that no weight is dropped, the unfused training path (in-place bias) computes
    what the fused kernel does, and gradients reach query, key and value."""
    torch.manual_seed(1)
    q, k, v = (torch.randn(3, 2, 6, 4, requires_grad=True) for _ in range(3))
    allowed = torch.ones(6, 6, dtype=torch.bool).tril() & torch.tensor([0, 1, 1, 1, 1, 1], dtype=torch.bool)
    allowed = (allowed | torch.eye(6, dtype=torch.bool)).expand(3, 1, 6, 6)
    bias = attention_bias(allowed)
    assert torch.equal(bias == 0, allowed) and bool(torch.isinf(bias[~allowed]).all())
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
    tiny = 1e-6  # rounds to a threshold of 0 in 2^-15 steps: every weight kept, scaled by 1/(1 - 1e-6)
    got = attention(q, k, v, bias, tiny, training=True)
    assert torch.allclose(got, expected, atol=1e-5)
    assert torch.allclose(attention(q, k, v, bias, 0.3, training=False), expected, atol=1e-6)
    got.sum().backward()
    assert all(t.grad is not None and bool(t.grad.abs().sum() > 0) for t in (q, k, v))


def test_attention_paths_agree_and_the_unfused_one_can_be_forced(monkeypatch):
    """MOVIEREC_ATTENTION=unfused (layers.ATTENTION_PATH) forces the explicit math, which gpu_check times against
    the fused kernel; without dropout both give the same output. CUDA training takes the fused kernel with
    dropout_p (checked by bench/gpu_check.sh where a GPU is lent)."""
    import movierec.models.layers as layers

    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 1, 5, 4) for _ in range(3))
    bias = attention_bias((torch.ones(5, 5, dtype=torch.bool).tril()).expand(2, 1, 5, 5))
    fused = attention(q, k, v, bias, 0.0, training=True)
    monkeypatch.setattr(layers, "ATTENTION_PATH", "unfused")
    assert torch.allclose(attention(q, k, v, bias, 0.0, training=True), fused, atol=1e-6)
    assert torch.allclose(attention(q, k, v, bias, 0.5, training=False), fused, atol=1e-6)


ALLOCATION_LOOP = """
import resource, sys, torch
from movierec.training.engine import keep_freed_memory_on_cpu
if sys.argv[1] == "keep":
    keep_freed_memory_on_cpu()
torch.empty(16 * 2**20).fill_(1)  # 64 MiB: above glibc's largest mmap threshold
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.empty(16 * 2**20).fill_(1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_training_allocator_setting_reuses_freed_memory():
    """Ten 64 MiB tensors allocated and freed in turn: by default each is a fresh mmap (16,384 page faults
    each); with the training setting they reuse memory the heap already holds (a fresh clone's CI once saw one
    more heap growth of one tensor, 16,385 faults, so the bound allows two)."""

    def faults(mode: str) -> int:
        run = subprocess.run([sys.executable, "-c", ALLOCATION_LOOP, mode], capture_output=True, text=True, check=True)
        return int(run.stdout.split()[-1])

    default, kept = faults("default"), faults("keep")
    assert default > 10 * 16_384 * 0.9
    assert kept < default / 4
