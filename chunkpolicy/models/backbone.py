"""PaliGemma / SigLIP backbone: images + prompt + state → prefix tokens, encoded once per chunk.

Built from ``transformers`` classes (``PaliGemmaModel`` = SigLIP vision tower + projector + Gemma LM) entirely from a
config: nothing is downloaded. Real weights are an explicit, separate step (:meth:`Backbone.load_pretrained_weights`).

Prefix layout (P tokens): ``[image tokens (N cams × T_obs frames) | text tokens | state token]`` with a blockwise mask:
images + text attend bidirectionally among themselves, the state token attends to everything before it, and nothing
in the prefix attends to the state token or to any later (suffix) token. Invalid tokens (masked cameras, text padding)
are never attended to. The Gemma layers are run here layer by layer (SDPA with an explicit boolean mask) so the
per-layer keys/values can be handed to a head that shares attention with the backbone (π0's action expert).

Inference speed: :class:`FusedLayer` is a snapshot of one Gemma layer's weights with q/k/v and gate/up concatenated (one
GEMM each); :func:`qkv` / :func:`finish` accept it in place of the ``transformers`` layer, so the same code runs both.
At batch 1 a chunk is thousands of tiny kernels, so fewer, larger GEMMs matter more than FLOPs.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GemmaConfig, PaliGemmaConfig, SiglipVisionConfig
from transformers.models.paligemma.modeling_paligemma import PaliGemmaModel

VARIANTS = ("paligemma", "siglip")


@dataclass
class BackboneConfig:
    """Sizes of the vision tower and language model (see :data:`PRESETS`)."""

    variant: str = "paligemma"
    image_size: int = 224
    patch_size: int = 14
    vision_width: int = 1152
    vision_depth: int = 27
    vision_heads: int = 16
    vision_mlp: int = 4304
    width: int = 2048  # LM hidden size W
    depth: int = 18
    mlp: int = 16384
    heads: int = 8
    kv_heads: int = 1
    head_dim: int = 256
    vocab_size: int = 257152
    rope_theta: float = 10000.0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"backbone variant must be one of {VARIANTS}, got {self.variant!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} is not a multiple of kv_heads {self.kv_heads}")

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def to_hf(self) -> PaliGemmaConfig:
        vision = SiglipVisionConfig(
            hidden_size=self.vision_width, intermediate_size=self.vision_mlp, num_hidden_layers=self.vision_depth,
            num_attention_heads=self.vision_heads, image_size=self.image_size, patch_size=self.patch_size,
            projection_dim=self.width, vision_use_head=False,
        )
        text = GemmaConfig(
            hidden_size=self.width, intermediate_size=self.mlp, num_hidden_layers=self.depth if self.variant == "paligemma" else 0,
            num_attention_heads=self.heads, num_key_value_heads=self.kv_heads, head_dim=self.head_dim,
            vocab_size=self.vocab_size, rope_theta=self.rope_theta, hidden_activation="gelu_pytorch_tanh",
        )
        cfg = PaliGemmaConfig(vision_config=vision, text_config=text, projection_dim=self.width)
        cfg.vision_config.projection_dim = self.width
        cfg._attn_implementation = "sdpa"
        cfg.text_config._attn_implementation = "sdpa"
        cfg.vision_config._attn_implementation = "sdpa"
        return cfg


PRESETS: dict[str, BackboneConfig] = {
    # π0's backbone: SigLIP So400m/14 at 224 (256 tokens per image) + Gemma-2B (MQA, head_dim 256).
    "paligemma-3b": BackboneConfig(),
    # Same architecture, narrow and shallow: trains from scratch on one GPU in minutes.
    "small": BackboneConfig(
        image_size=112, patch_size=14, vision_width=384, vision_depth=6, vision_heads=6, vision_mlp=1536,
        width=512, depth=6, mlp=2048, heads=8, kv_heads=1, head_dim=64, vocab_size=4096,
    ),
    # Unit tests: seconds on a CPU. vocab holds a character tokenizer plus 1024 reserved action ids.
    "tiny": BackboneConfig(
        image_size=32, patch_size=8, vision_width=32, vision_depth=1, vision_heads=2, vision_mlp=64,
        width=64, depth=2, mlp=128, heads=4, kv_heads=1, head_dim=16, vocab_size=1280,
    ),
}
PRESETS["siglip"] = replace(PRESETS["paligemma-3b"], variant="siglip")


def backbone_config(preset: str, **overrides: Any) -> BackboneConfig:
    """Preset by name with field overrides; unknown presets or fields are errors."""
    if preset not in PRESETS:
        raise ValueError(f"unknown backbone preset {preset!r}; presets: {sorted(PRESETS)}")
    unknown = sorted(set(overrides) - set(BackboneConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown backbone config fields {unknown}")
    return replace(PRESETS[preset], **overrides)


@dataclass
class Prefix:
    """Embedded prefix before the transformer: ``embeds [B, P, W]``, ``valid [B, P]`` (bool), ``block [B, P]``
    (0 = images + text, 1 = state), ``positions [B, P]`` (RoPE positions, counting valid tokens only)."""

    embeds: torch.Tensor
    valid: torch.Tensor
    block: torch.Tensor
    positions: torch.Tensor


@dataclass
class PrefixOutput:
    """Encoded prefix, computed once per chunk.

    ``hidden [B, P, W]`` final-norm hidden states (None when the caller asked for keys/values only); ``valid [B, P]``;
    ``kv`` one ``(key, value)`` per LM layer, each ``[B, kv_heads, P, head_dim]`` after RoPE (empty for the ``siglip``
    variant); ``next_position [B]`` the RoPE position of the first suffix token.
    """

    hidden: torch.Tensor | None
    valid: torch.Tensor
    kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    next_position: torch.Tensor | None = None


def blockwise_mask(q_valid: torch.Tensor, q_block: torch.Tensor, k_valid: torch.Tensor, k_block: torch.Tensor) -> torch.Tensor:
    """bool ``[B, 1, Lq, Lk]``: query i may attend key j iff key j is valid and ``block[j] <= block[i]``.

    Blocks order the sequence (prefix 0 → state 1 → actions 2): bidirectional within a block, causal across blocks.
    An invalid query attends only to itself-equivalent valid keys of its block; a query with no valid key at all is
    given one (its own position when Lq == Lk) so SDPA never returns NaN for padding rows.
    """
    m = (k_block[:, None, :] <= q_block[:, :, None]) & k_valid[:, None, :]
    empty = ~m.any(-1)  # no data-dependent branch: the function stays free of host syncs (CUDA-graph safe)
    m = m | (empty[:, :, None] & torch.eye(m.shape[1], m.shape[2], dtype=torch.bool, device=m.device)[None])
    return m[:, None]


def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean attention mask (True = attend) → additive (0 / -inf) in ``dtype``. Built once per chunk and shared by
    every layer and step: SDPA would otherwise convert a boolean mask on every call (extra kernels per layer)."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


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


def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """Gemma's RMSNorm with a precomputed fp32 ``scale = 1 + w`` (normalise in fp32, scale, cast back)."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * scale).type_as(x)


def attend(layer: nn.Module | FusedLayer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA over ``q [B, h, Lq, d]``, ``k/v [B, h_kv, Lk, d]`` (grouped-query aware) → ``[B, Lq, h·d]``."""
    scale = layer.scaling if isinstance(layer, FusedLayer) else layer.self_attn.scaling
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
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


def mask_bias(mask: torch.Tensor) -> torch.Tensor:
    """bool attention mask → additive fp32 bias (0 where allowed, -inf elsewhere), same shape."""
    return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, float("-inf"))


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


class Backbone(nn.Module):
    """SigLIP + Gemma prefix encoder (see the module docstring). ``state_dim`` is the unified dim D."""

    def __init__(self, config: BackboneConfig, state_dim: int = 32) -> None:
        super().__init__()
        self.config = config
        self.model = PaliGemmaModel(config.to_hf())  # parameter names match PaliGemmaForConditionalGeneration's
        self.state_proj = nn.Linear(state_dim, config.width)
        self.width, self.num_layers = config.width, (config.depth if config.variant == "paligemma" else 0)
        self.num_kv_heads, self.head_dim, self.vocab_size = config.kv_heads, config.head_dim, config.vocab_size
        self.gradient_checkpointing = False
        self._layer_step = _layer_step  # compile_layers() swaps in a compiled version

    def set_gradient_checkpointing(self, on: bool = True) -> None:
        """Recompute each vision and LM layer in the backward pass instead of storing its activations (heads that run
        Gemma-shaped layers read this flag too): ~1/3 more compute for a much smaller activation memory."""
        self.gradient_checkpointing = bool(on)
        if on:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.model.gradient_checkpointing_disable()

    def compile_layers(self, **compile_kw: Any) -> None:
        """``torch.compile`` the per-layer work for training: each vision layer and the LM layer function (compiled
        once, reused by every layer: same code, parameters are inputs). Fuses norms, RoPE, residuals and activations
        in the forward and backward passes. (Inference compiles whole functions: ``CudaGraphPolicy(compile=True)``.)"""
        compile_kw.setdefault("dynamic", False)
        if self.num_layers:
            for layer in self.model.vision_tower.vision_model.encoder.layers:
                layer.compile(**compile_kw)
        self._layer_step = torch.compile(_layer_step, **compile_kw)

    def fused_layers(self) -> list[FusedLayer]:
        """Inference snapshots of the LM layers (see :class:`FusedLayer`), for ``encode_prefix(layers=...)``."""
        return [FusedLayer(layer) for layer in self.layers]

    def fused_vision_layers(self) -> list[FusedVisionLayer]:
        """Inference snapshots of the SigLIP layers, for ``embed_prefix(vision_layers=...)``."""
        return [FusedVisionLayer(layer) for layer in self.model.vision_tower.vision_model.encoder.layers]

    def image_features(self, pix: torch.Tensor, vision_layers: Sequence[FusedVisionLayer] | None = None) -> torch.Tensor:
        """SigLIP + projector: ``pix [M, 3, S, S]`` in [-1, 1] → ``[M, n_img, W]``; ``vision_layers`` replace the
        encoder layers (same computation as ``transformers``' ``get_image_features``)."""
        if vision_layers is None:
            return self.model.get_image_features(pix).pooler_output
        vm = self.model.vision_tower.vision_model
        x = vm.embeddings(pix)
        for layer in vision_layers:
            x = layer(x)
        return self.model.multi_modal_projector(vm.post_layernorm(x))

    @property
    def language_model(self) -> nn.Module:
        return self.model.language_model

    @property
    def layers(self) -> nn.ModuleList:
        return self.model.language_model.layers

    def rope(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for ``positions [B, L]`` (shared by every head that runs Gemma-shaped layers)."""
        return self.model.language_model.rotary_emb(x, positions)

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Tied LM head: ``[B, L, W]`` → ``[B, L, vocab]``."""
        return hidden @ self.model.language_model.embed_tokens.weight.T

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings, scaled by sqrt(W) as Gemma does: ``[B, L]`` → ``[B, L, W]``."""
        return self.model.language_model.embed_tokens(ids)

    # -- prefix ---------------------------------------------------------------------------------------------------
    def preprocess_images(self, images: torch.Tensor) -> torch.Tensor:
        """``[M, 3, h, w]`` in [0, 1] → ``[M, 3, S, S]`` in [-1, 1]: aspect-preserving resize, zero padding."""
        S = self.config.image_size
        h, w = images.shape[-2:]
        if (h, w) != (S, S):
            scale = S / max(h, w)
            nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
            images = F.interpolate(images, size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
            top, left = (S - nh) // 2, (S - nw) // 2
            images = F.pad(images, (left, S - nw - left, top, S - nh - top))
        return images * 2.0 - 1.0

    def embed_prefix(
        self,
        images: torch.Tensor,
        image_mask: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        state: torch.Tensor,
        state_mask: torch.Tensor,
        vision_layers: Sequence[FusedVisionLayer] | None = None,
    ) -> Prefix:
        """Embed ``images [B, N, T, 3, h, w]`` (float in [0, 1] or uint8), ``image_mask [B, N]``, ``input_ids``/``attention_mask``
        ``[B, L]`` and the normalized unified ``state [B, T, D]`` (+ ``state_mask [B, D]``) into a :class:`Prefix`;
        ``vision_layers``: :meth:`fused_vision_layers` snapshots (inference)."""
        B, N, T = images.shape[:3]
        dtype = self.state_proj.weight.dtype
        flat = images.reshape(B * N * T, *images.shape[3:])
        flat = flat.to(dtype) / 255.0 if flat.dtype == torch.uint8 else flat.to(dtype)  # uint8 frames from the data path
        pix = self.preprocess_images(flat)
        feats = self.image_features(pix, vision_layers)  # [B*N*T, n_img, W]; masked cameras excluded below
        n_img = feats.shape[1]
        img = feats.reshape(B, N * T * n_img, self.width)
        img_valid = image_mask.bool()[:, :, None].expand(B, N, T * n_img).reshape(B, -1)
        txt = self.embed_tokens(input_ids).to(dtype)
        st = self.state_proj(torch.where(state_mask.bool(), state[:, -1], torch.zeros_like(state[:, -1])).to(dtype))[:, None]
        embeds = torch.cat([img, txt, st], dim=1)
        valid = torch.cat([img_valid, attention_mask.bool(), torch.ones(B, 1, dtype=torch.bool, device=embeds.device)], 1)
        block = torch.zeros_like(valid, dtype=torch.long)
        block[:, -1] = 1
        positions = (torch.cumsum(valid.long(), 1) - 1).clamp_min(0)
        return Prefix(embeds, valid, block, positions)

    def encode_prefix(self, prefix: Prefix, layers: Sequence[nn.Module | FusedLayer] | None = None,
                      hidden: bool = True) -> PrefixOutput:
        """Run the Gemma layers over the prefix with the blockwise mask; keep every layer's keys/values.

        ``layers``: :meth:`fused_layers` snapshots to run instead of the modules (inference). ``hidden=False``: the
        caller needs only the keys/values (the flow expert), so the last layer's output projection and MLP and the
        final norm are skipped."""
        x, kv = prefix.embeds, []
        layers = self.layers if layers is None else layers
        if self.num_layers:
            mask = blockwise_mask(prefix.valid, prefix.block, prefix.valid, prefix.block)
            cos, sin = self.rope(x, prefix.positions)
            ckpt = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
            for i, layer in enumerate(layers):
                last = i == len(layers) - 1 and not hidden
                if ckpt:
                    x, k, v = checkpoint(self._layer_step, layer, x, cos, sin, mask, last, use_reentrant=False)
                else:
                    x, k, v = self._layer_step(layer, x, cos, sin, mask, last)
                kv.append((k, v))
        out = self.model.language_model.norm(x) if hidden else None
        nxt = prefix.positions.max(dim=1).values + 1
        return PrefixOutput(hidden=out, valid=prefix.valid, kv=kv, next_position=nxt)

    # -- weights --------------------------------------------------------------------------------------------------
    def load_pretrained_weights(self, path: str | Path) -> None:
        """Load a local ``PaliGemmaForConditionalGeneration`` directory (``save_pretrained`` output or a downloaded
        PaliGemma checkpoint) into the tower, projector and LM. transformers reads it, so its key conversions apply.
        Sizes must match this config; ``state_proj`` is ours and keeps its initialization."""
        from transformers import PaliGemmaForConditionalGeneration

        path = Path(path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{path}: no config.json (expected a PaliGemma save_pretrained directory)")
        want = self.config_from_pretrained(path)
        mine = replace(self.config, variant="paligemma")
        if asdict(want) != asdict(mine):
            diff = {k: (v, asdict(mine)[k]) for k, v in asdict(want).items() if asdict(mine)[k] != v}
            raise ValueError(f"{path}: weights do not match backbone config (checkpoint vs ours): {diff}")
        hf = PaliGemmaForConditionalGeneration.from_pretrained(str(path), local_files_only=True, dtype=self.state_proj.weight.dtype)
        state = hf.model.state_dict()
        own = self.model.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or wrong:
            raise ValueError(f"{path}: weights do not match: missing {missing[:5]}, unexpected {unexpected[:5]}, shape mismatch {wrong[:5]}")
        self.model.load_state_dict(state)

    @staticmethod
    def config_from_pretrained(path: str | Path) -> BackboneConfig:
        """Backbone sizes read from a local PaliGemma ``config.json``."""
        cfg = json.loads((Path(path) / "config.json").read_text())
        v, t = cfg["vision_config"], cfg["text_config"]
        return BackboneConfig(
            image_size=v["image_size"], patch_size=v["patch_size"], vision_width=v["hidden_size"],
            vision_depth=v["num_hidden_layers"], vision_heads=v["num_attention_heads"], vision_mlp=v["intermediate_size"],
            width=t["hidden_size"], depth=t["num_hidden_layers"], mlp=t["intermediate_size"],
            heads=t["num_attention_heads"], kv_heads=t["num_key_value_heads"], head_dim=t.get("head_dim", t["hidden_size"] // t["num_attention_heads"]),
            vocab_size=t["vocab_size"], rope_theta=t.get("rope_theta", 10000.0),
        )


def _layer_step(layer, x, cos, sin, mask, kv_only: bool):
    """One prefix layer: ``(x_next, k, v)`` with k/v ``[B, h_kv, P, d]``; with ``kv_only`` x is returned unchanged (its
    output is never read). Training uses SDPA (memory-efficient backward); inference the explicit matmuls."""
    if torch.is_grad_enabled():
        q, k, v = qkv(layer, x, cos, sin)
        return (x if kv_only else finish(layer, x, attend(layer, q, k, v, mask))), k, v
    q, k, v = qkv(layer, x, cos, sin, heads_first=False)
    k, v = k.transpose(1, 2), v.transpose(1, 2)
    if kv_only:
        return x, k, v
    scale = layer.scaling if isinstance(layer, FusedLayer) else layer.self_attn.scaling
    return finish(layer, x, attend_few(q, k, v, mask_bias(mask), scale)), k, v


def config_dict(cfg: BackboneConfig) -> dict[str, Any]:
    return asdict(cfg)


def sinusoidal_embedding(t: torch.Tensor, dim: int, min_period: float = 4e-3, max_period: float = 4.0) -> torch.Tensor:
    """Sinusoidal embedding of scalars ``t [B]`` → ``[B, dim]`` with periods log-spaced in [min_period, max_period]."""
    if dim % 2:
        raise ValueError(f"sinusoidal embedding dim must be even, got {dim}")
    frac = torch.linspace(0.0, 1.0, dim // 2, device=t.device, dtype=torch.float64)
    period = min_period * (max_period / min_period) ** frac
    ang = t.double()[:, None] * (2 * math.pi / period)[None]
    return torch.cat([torch.sin(ang), torch.cos(ang)], dim=-1).to(t.dtype if t.is_floating_point() else torch.float32)
