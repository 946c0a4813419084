"""Training attention (issue 15): PyTorch's cuDNN SDPA backward made the MT10 long runs' NaN gradients on an H200,
so training runs without it, with the key/value heads repeated for the fused kernels. Repeating them is exact."""

from __future__ import annotations

import pytest
import torch

from chunkpolicy.models.attention import attend


class _Attn:
    scaling = 0.125  # what attend() reads from a transformers layer


class _Layer:
    self_attn = _Attn()


def test_training_attention_repeats_kv_heads_exactly():
    layer = _Layer()
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 8, 5, 64, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, 7, 64, generator=g, dtype=torch.float64) for _ in range(2))
    mask = torch.zeros(2, 1, 5, 7, dtype=torch.float64)
    mask[:, :, :, 5:] = float("-inf")
    with torch.no_grad():  # inference: grouped-query SDPA as is
        ref = attend(layer, q, k, v, mask)
    qg, kg, vg = (t.clone().requires_grad_() for t in (q, k, v))
    out = attend(layer, qg, kg, vg, mask)  # training: heads repeated
    assert out.shape == (2, 5, 8 * 64) and torch.allclose(out, ref, atol=1e-12)
    out.square().sum().backward()
    qr, kr, vr = (t.clone().requires_grad_() for t in (q, k, v))
    torch.nn.functional.scaled_dot_product_attention(qr, kr, vr, attn_mask=mask, scale=0.125, enable_gqa=True) \
        .transpose(1, 2).reshape(2, 5, -1).square().sum().backward()
    for a, b in ((qg, qr), (kg, kr), (vg, vr)):
        assert torch.allclose(a.grad, b.grad, atol=1e-10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_trainer_and_graphed_step_take_cudnn_attention_out_of_training(tmp_path):
    from helpers import toy_batch, toy_policy

    from chunkpolicy.training.graphed_step import GraphedTrainStep, capturable_adamw

    torch.backends.cuda.enable_cudnn_sdp(True)
    policy = toy_policy().cuda()
    GraphedTrainStep(policy, capturable_adamw(policy.parameters(), 1e-4), toy_batch())
    assert not torch.backends.cuda.cudnn_sdp_enabled()
