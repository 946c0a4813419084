"""One Gemma decoder layer in pieces, shared by the backbone and every head that runs Gemma-shaped layers:
:func:`qkv` (pre-norm + projections + RoPE) → :func:`attend` (SDPA) or :func:`attend_few` (explicit matmuls, short
query sets at inference) → :func:`finish` (output projection + MLP + residuals). Splitting the layer at its attention
lets a head attend jointly over the backbone's keys/values (π0's action expert). Each piece takes either the
``transformers`` layer or its :class:`~chunkpolicy.models.fused.FusedLayer` snapshot.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from chunkpolicy.models.fused import FusedLayer


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm with a precomputed fp32 ``scale = 1 + w`` (normalise in fp32, scale, cast back)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * scale).type_as(x)


def training_attention_backends() -> None:
    """Take PyTorch's cuDNN SDPA backend out of training (process-wide; called by the trainer and GraphedTrainStep).

    Its backward returned NaN gradients for finite inputs on an H200 (torch 2.11, bf16, our additive masks): the
    cause of the MT10 long-run NaNs (issue 15; BENCHMARKS.md "Long runs"). Its forward is not affected, so inference
    keeps it. Training then runs the memory-efficient kernel, which needs as many key/value heads as query heads:
    :func:`attend` repeats them while gradients are on."""
    torch.backends.cuda.enable_cudnn_sdp(False)


def attend(layer: nn.Module | FusedLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA over ``q [B, h, Lq, d]``, ``k/v [B, h_kv, Lk, d]`` (grouped-query aware) → ``[B, Lq, h·d]``."""
    scale = layer.scaling if isinstance(layer, FusedLayer) else layer.self_attn.scaling
    gqa = k.shape[1] != q.shape[1]
    if gqa and torch.is_grad_enabled():
        # the fused training kernels (memory-efficient, flash) take no grouped-query attention: without cuDNN
        # (training_attention_backends) SDPA would fall back to the slow math kernel
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
        gqa = False
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def attend_few(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention by two explicit matmuls, for short sequences at inference: ``q [B, Lq, h, d]`` (heads last, as
    :func:`qkv` gives with ``heads_first=False``), ``k/v [B, h_kv, Lk, d]``, additive fp32 ``bias [B, 1, Lq or 1, Lk]``
    (0 or -inf) → ``[B, Lq, h·d]``.

    The query heads that share a KV head are folded into rows (with one KV head, as in Gemma-2B, every reshape here is a
    view), scores and softmax in fp32 as flash attention keeps them. On an H100 the fused SDPA kernels take ~30 µs for
    the action expert's 8×50 queries over ~355 keys (they run on a handful of SMs); this is 3 short kernels."""
    if k.shape[2] % 8:  # pad the keys to a multiple of 8: unaligned row strides send cuBLAS to slow kernels
        pad = (-k.shape[2]) % 8
        k, v = F.pad(k, (0, 0, 0, pad)), F.pad(v, (0, 0, 0, pad))
        bias = F.pad(bias, (0, pad), value=float("-inf"))
    B, L, h, d = q.shape
    hk, Lk = k.shape[1], k.shape[2]
    g = h // hk
    qr = q.reshape(B, L, hk, g, d).transpose(1, 2).reshape(B * hk, L * g, d)
    kr, vr = k.reshape(B * hk, Lk, d), v.reshape(B * hk, Lk, d)
    if qr.is_cuda and qr.dtype != torch.float32 and not torch.is_grad_enabled():
        s = torch.bmm(qr, kr.transpose(1, 2), out_dtype=torch.float32)  # fp32 accumulation without upcast copies
    else:
        s = torch.bmm(qr.float(), kr.float().transpose(1, 2))
    s = s.view(B, hk, L, g, Lk) * scale + bias[:, :, :, None, :]
    p = torch.softmax(s, dim=-1).to(v.dtype).view(B * hk, L * g, Lk)
    out = torch.bmm(p, vr).view(B, hk, L, g, d)
    return out.transpose(1, 2).reshape(B, L, h * d)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as Gemma applies it (rotate-half convention); ``cos/sin`` broadcast against ``x``."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


def qkv(layer: nn.Module | FusedLayer, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads_first: bool = True):
    """Pre-norm + projections + RoPE of one Gemma decoder layer: ``x [B, L, W]`` → q, k, v ``[B, heads, L, d]``
    (``[B, L, heads, d]`` with ``heads_first=False``); ``cos/sin [B, L, d]``."""
    if isinstance(layer, FusedLayer):
        h = rms_norm(x, layer.in_scale, layer.eps[0])
        q, k, v = F.linear(h, layer.qkv_w).split(layer.sizes, dim=-1)
        d = layer.head_dim
    else:
        attn = layer.self_attn
        h = layer.input_layernorm(x)
        q, k, v = attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)
        d = attn.head_dim
    shape = (*x.shape[:-1], -1, d)
    q, k, v = (t.reshape(shape) for t in (q, k, v))
    if heads_first:
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    c, s = (t.unsqueeze(1 if heads_first else 2) for t in (cos, sin))
    return rotate(q, c, s), rotate(k, c, s), v


def finish(layer: nn.Module | FusedLayer, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """Output projection + residual + post-norm MLP + residual of one Gemma decoder layer."""
    if isinstance(layer, FusedLayer):
        x = x + F.linear(attn_out, layer.o_w)
        gate, up = F.linear(rms_norm(x, layer.post_scale, layer.eps[1]), layer.gate_up_w).chunk(2, dim=-1)
        return x + F.linear(layer.act(gate) * up, layer.down_w)
    x = x + layer.self_attn.o_proj(attn_out)
    return x + layer.mlp(layer.post_attention_layernorm(x))
