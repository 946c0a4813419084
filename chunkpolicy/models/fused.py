"""Inference snapshots of transformer layers with fused projections.

:class:`FusedLayer` is a snapshot of one Gemma layer's weights with q/k/v and gate/up concatenated (one GEMM each);
:func:`~chunkpolicy.models.attention.qkv` / :func:`~chunkpolicy.models.attention.finish` accept it in place of the
``transformers`` layer, so the same code runs both. :class:`FusedVisionLayer` does the same for a SigLIP layer and is
called like the layer. At batch 1 a chunk is thousands of tiny kernels, so fewer, larger GEMMs matter more than FLOPs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FusedLayer:
    """Inference snapshot of one Gemma decoder layer: ``qkv_w [(h + 2·h_kv)·d, W]`` and ``gate_up_w [2·mlp, W]`` are the
    concatenated projections, norms keep Gemma's ``(1 + w)`` scale in fp32. Same arithmetic as the ``transformers``
    layer; not trainable (no autograd to the weights). :meth:`refresh` copies newer weights into the same buffers, so a
    CUDA graph captured on them stays valid."""

    def __init__(self, layer: nn.Module) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj, mlp.gate_proj, mlp.up_proj, mlp.down_proj)
        if any(type(m) is not nn.Linear or m.bias is not None for m in linears):
            raise ValueError("FusedLayer needs plain bias-free nn.Linear projections (merge LoRA adapters first, "
                             "e.g. peft's merge_and_unload)")
        self.head_dim, self.scaling, self.act = attn.head_dim, attn.scaling, mlp.act_fn
        self.sizes = (attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features)
        self.eps = (layer.input_layernorm.eps, layer.post_attention_layernorm.eps)
        with torch.no_grad():
            self.qkv_w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
            self.gate_up_w = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
            self.o_w, self.down_w = attn.o_proj.weight.detach().clone(), mlp.down_proj.weight.detach().clone()
            self.in_scale = 1.0 + layer.input_layernorm.weight.detach().float()
            self.post_scale = 1.0 + layer.post_attention_layernorm.weight.detach().float()

    @torch.no_grad()
    def refresh(self, layer: nn.Module) -> None:
        """Copy ``layer``'s current weights into this snapshot in place."""
        new = FusedLayer(layer)
        for name in ("qkv_w", "gate_up_w", "o_w", "down_w", "in_scale", "post_scale"):
            getattr(self, name).copy_(getattr(new, name))


class FusedVisionLayer:
    """Inference snapshot of one SigLIP encoder layer with q/k/v concatenated (one GEMM with bias); called like the
    layer: ``x [M, T, Wv]`` → ``[M, T, Wv]``. Not trainable; :meth:`refresh` as for :class:`FusedLayer`."""

    def __init__(self, layer: nn.Module) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        linears = (attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, mlp.fc1, mlp.fc2)
        if any(type(m) is not nn.Linear for m in linears):
            raise ValueError("FusedVisionLayer needs plain nn.Linear projections (merge LoRA adapters first)")
        self.heads, self.scale, self.act = attn.num_heads, attn.scale, mlp.activation_fn
        self.ln = [(ln.normalized_shape, ln.eps) for ln in (layer.layer_norm1, layer.layer_norm2)]
        with torch.no_grad():
            self.qkv_w = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
            self.qkv_b = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
            self.tensors = {name: t.detach().clone() for name, t in (
                ("ln1_w", layer.layer_norm1.weight), ("ln1_b", layer.layer_norm1.bias), ("o_w", attn.out_proj.weight),
                ("o_b", attn.out_proj.bias), ("ln2_w", layer.layer_norm2.weight), ("ln2_b", layer.layer_norm2.bias),
                ("fc1_w", mlp.fc1.weight), ("fc1_b", mlp.fc1.bias), ("fc2_w", mlp.fc2.weight), ("fc2_b", mlp.fc2.bias))}

    @torch.no_grad()
    def refresh(self, layer: nn.Module) -> None:
        new = FusedVisionLayer(layer)
        self.qkv_w.copy_(new.qkv_w)
        self.qkv_b.copy_(new.qkv_b)
        for k, t in self.tensors.items():
            t.copy_(new.tensors[k])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        t = self.tensors
        M, T, W = x.shape
        h = F.layer_norm(x, self.ln[0][0], t["ln1_w"], t["ln1_b"], self.ln[0][1])
        q, k, v = F.linear(h, self.qkv_w, self.qkv_b).view(M, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        a = F.scaled_dot_product_attention(q, k, v, scale=self.scale).transpose(1, 2).reshape(M, T, W)
        x = x + F.linear(a, t["o_w"], t["o_b"])
        h = F.layer_norm(x, self.ln[1][0], t["ln2_w"], t["ln2_b"], self.ln[1][1])
        return x + F.linear(self.act(F.linear(h, t["fc1_w"], t["fc1_b"])), t["fc2_w"], t["fc2_b"])
