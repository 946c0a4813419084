"""Backbone sizes: :class:`BackboneConfig` (SigLIP vision tower + Gemma LM), named :data:`PRESETS`
(``paligemma-3b``, ``small``, ``tiny``, ``siglip``) and :func:`backbone_config` (preset + checked overrides).

Only ``transformers`` config classes are touched here: nothing is built or downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from transformers import GemmaConfig, PaliGemmaConfig, SiglipVisionConfig

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
# SigLIP So400m/14 + a light text path: no Gemma layers, and a small token embedding (the character tokenizer's ~104 ids
# with room to spare, 2.6 M parameters) instead of Gemma's 257,152 × 2048 table (526.6 M). With a real tokenizer set
# vocab_size = len(tokenizer). Vision weights: `chunkpolicy model import DIR OUT --format siglip` (a transformers
# SigLIP checkpoint) or --format paligemma. Checkpoints written before this change recorded vocab_size 257152: they
# load with backbone_overrides {vocab_size: 257152}.
PRESETS["siglip"] = replace(PRESETS["paligemma-3b"], variant="siglip", vocab_size=1280)


def backbone_config(preset: str, **overrides: Any) -> BackboneConfig:
    """Preset by name with field overrides; unknown presets or fields are errors."""
    if preset not in PRESETS:
        raise ValueError(f"unknown backbone preset {preset!r}; presets: {sorted(PRESETS)}")
    unknown = sorted(set(overrides) - set(BackboneConfig.__dataclass_fields__))
    if unknown:
        raise ValueError(f"unknown backbone config fields {unknown}")
    return replace(PRESETS[preset], **overrides)
