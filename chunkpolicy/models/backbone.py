"""PaliGemma / SigLIP backbone: images + prompt + state → prefix tokens, encoded once per chunk.

Built from ``transformers`` classes (``PaliGemmaModel`` = SigLIP vision tower + projector + Gemma LM) entirely from a
config: nothing is downloaded. Real weights are an explicit, separate step (:meth:`Backbone.load_pretrained_weights`).

Prefix layout (P tokens): ``[image tokens (N cams × T_obs frames) | text tokens | state token]`` with a blockwise mask:
images + text attend bidirectionally among themselves, the state token attends to everything before it, and nothing
in the prefix attends to the state token or to any later (suffix) token. Invalid tokens (masked cameras, text padding)
are never attended to. The Gemma layers are run here layer by layer (SDPA with an explicit boolean mask) so the
per-layer keys/values can be handed to a head that shares attention with the backbone (π0's action expert).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GemmaConfig, PaliGemmaConfig, SiglipVisionConfig
from transformers.models.gemma.modeling_gemma import apply_rotary_pos_emb
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

    ``hidden [B, P, W]`` final-norm hidden states; ``valid [B, P]``; ``kv`` one ``(key, value)`` per LM layer, each
    ``[B, kv_heads, P, head_dim]`` after RoPE (empty for the ``siglip`` variant); ``next_position [B]`` the RoPE
    position of the first suffix token.
    """

    hidden: torch.Tensor
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


def attend(layer: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """SDPA over ``q [B, h, Lq, d]``, ``k/v [B, h_kv, Lk, d]`` (grouped-query aware) → ``[B, Lq, h·d]``."""
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=layer.self_attn.scaling, enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def qkv(layer: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Pre-norm + projections + RoPE of one Gemma decoder layer: ``x [B, L, W]`` → q, k, v ``[B, heads, L, d]``."""
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    shape = (*h.shape[:-1], -1, attn.head_dim)
    q = attn.q_proj(h).view(shape).transpose(1, 2)
    k = attn.k_proj(h).view(shape).transpose(1, 2)
    v = attn.v_proj(h).view(shape).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


def finish(layer: nn.Module, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """Output projection + residual + post-norm MLP + residual of one Gemma decoder layer."""
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
    ) -> Prefix:
        """Embed ``images [B, N, T, 3, h, w]`` (float in [0, 1] or uint8), ``image_mask [B, N]``, ``input_ids``/``attention_mask``
        ``[B, L]`` and the normalized unified ``state [B, T, D]`` (+ ``state_mask [B, D]``) into a :class:`Prefix`."""
        B, N, T = images.shape[:3]
        dtype = self.state_proj.weight.dtype
        flat = images.reshape(B * N * T, *images.shape[3:])
        flat = flat.to(dtype) / 255.0 if flat.dtype == torch.uint8 else flat.to(dtype)  # uint8 frames from the data path
        pix = self.preprocess_images(flat)
        feats = self.model.get_image_features(pix).pooler_output  # [B*N*T, n_img, W]; masked cameras excluded below
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

    def encode_prefix(self, prefix: Prefix) -> PrefixOutput:
        """Run the Gemma layers over the prefix with the blockwise mask; keep every layer's keys/values."""
        x, kv = prefix.embeds, []
        if self.num_layers:
            mask = blockwise_mask(prefix.valid, prefix.block, prefix.valid, prefix.block)
            cos, sin = self.rope(x, prefix.positions)
            for layer in self.layers:
                q, k, v = qkv(layer, x, cos, sin)
                kv.append((k, v))
                x = finish(layer, x, attend(layer, q, k, v, mask))
        hidden = self.model.language_model.norm(x)
        nxt = prefix.positions.max(dim=1).values + 1
        return PrefixOutput(hidden=hidden, valid=prefix.valid, kv=kv, next_position=nxt)

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
