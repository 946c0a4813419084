"""PaliGemma / SigLIP backbone: images + prompt + state → prefix tokens, encoded once per chunk.

Built from ``transformers`` classes (``PaliGemmaModel`` = SigLIP vision tower + projector + Gemma LM) entirely from a
config: nothing is downloaded. Real weights are an explicit, separate step (:meth:`Backbone.load_pretrained_weights`).

Prefix layout (P tokens): ``[image tokens (N cams × T_obs frames) | text tokens | state token]`` with a blockwise mask:
images + text attend bidirectionally among themselves, the state token attends to everything before it, and nothing
in the prefix attends to the state token or to any later (suffix) token (``state_token=False``: no state token, for heads
that embed the state themselves as π0's expert does, or π0.5's state-in-prompt). Invalid tokens (masked cameras, text
padding) are never attended to. The Gemma layers are run here layer by layer (SDPA with an explicit boolean mask) so the
per-layer keys/values can be handed to a head that shares attention with the backbone (π0's action expert).

Sizes and presets: :mod:`chunkpolicy.models.backbone_config`; the layer pieces: :mod:`chunkpolicy.models.attention`;
inference snapshots (``fused_layers`` / ``fused_vision_layers``): :mod:`chunkpolicy.models.fused`.
"""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.models.paligemma.modeling_paligemma import PaliGemmaModel

from chunkpolicy.atomic import read_json
from chunkpolicy.models.attention import attend, attend_few, finish, qkv
from chunkpolicy.models.backbone_config import BackboneConfig
from chunkpolicy.models.fused import FusedLayer, FusedVisionLayer
from chunkpolicy.models.masks import blockwise_mask, mask_bias
from chunkpolicy.models.prefix import Prefix, PrefixOutput


class Backbone(nn.Module):
    """SigLIP + Gemma prefix encoder (see the module docstring). ``state_dim`` is the unified dim D."""

    def __init__(self, config: BackboneConfig, state_dim: int = 32, state_token: bool = True) -> None:
        super().__init__()
        self.config = config
        self.model = PaliGemmaModel(config.to_hf())  # parameter names match PaliGemmaForConditionalGeneration's
        # state_token=False (a head that embeds the state itself, or π0.5's state-in-prompt): no state token in the
        # prefix and no state_proj weights; the placeholder keeps ``state_proj.weight.dtype/device`` readable.
        self.state_token = bool(state_token)
        self.state_proj = nn.Linear(state_dim, config.width) if state_token else _NoStateProj()
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
        # scaled and resized in fp32 whatever the model's dtype (uint8 frames from the data path, evaluation, serving)
        flat = flat.float() / 255.0 if flat.dtype == torch.uint8 else flat.float()
        pix = self.preprocess_images(flat).to(dtype)
        feats = self.image_features(pix, vision_layers)  # [B*N*T, n_img, W]; masked cameras excluded below
        n_img = feats.shape[1]
        img = feats.reshape(B, N * T * n_img, self.width)
        img_valid = image_mask.bool()[:, :, None].expand(B, N, T * n_img).reshape(B, -1)
        txt = self.embed_tokens(input_ids).to(dtype)
        if not self.state_token:  # the head embeds the state (π0), or it is in the prompt (π0.5)
            embeds = torch.cat([img, txt], dim=1)
            valid = torch.cat([img_valid, attention_mask.bool()], 1)
            block = torch.zeros_like(valid, dtype=torch.long)
            positions = (torch.cumsum(valid.long(), 1) - 1).clamp_min(0)
            return Prefix(embeds, valid, block, positions)
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
            hint = ", ".join(f"{k}={v[0]}" for k, v in diff.items())
            raise ValueError(f"{path}: weights do not match backbone config (checkpoint vs ours): {diff}; build the "
                             f"backbone with backbone_overrides {{{hint}}} (model.backbone_overrides), or convert the "
                             f"directory with `chunkpolicy model import {path} OUT --format paligemma`")
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
        """Backbone sizes of a local PaliGemma directory, read by ``transformers``' own ``PaliGemmaConfig`` (so values
        a hub ``config.json`` leaves out, e.g. ``vision_config.image_size`` or ``text_config.head_dim``, take
        ``transformers``' defaults exactly as ``from_pretrained`` would). The vocabulary is the checkpoint's (hub
        PaliGemma: 257,216 rows, 257,152 of them used by its tokenizer). Raises ``ValueError`` naming the file for a
        config that is not PaliGemma or that this backbone cannot represent."""
        from transformers import PaliGemmaConfig

        path = Path(path)
        cj = path / "config.json"
        raw = read_json(cj)  # missing / corrupt: one error naming the file
        if raw.get("model_type") != "paligemma":
            raise ValueError(f"{cj}: model_type is {raw.get('model_type')!r}, expected 'paligemma'")
        hf = PaliGemmaConfig.from_pretrained(str(path), local_files_only=True)
        v, t = hf.vision_config, hf.text_config
        theta = (getattr(t, "rope_parameters", None) or {}).get("rope_theta", getattr(t, "rope_theta", 10000.0))
        rope_type = (getattr(t, "rope_parameters", None) or {}).get("rope_type", "default")
        problems = []
        if rope_type != "default":
            problems.append(f"text_config rope_type {rope_type!r} (only the default RoPE is supported)")
        if getattr(v, "vision_use_head", False):
            problems.append("vision_config.vision_use_head is true (PaliGemma's tower has no pooling head)")
        if v.projection_dim != t.hidden_size:
            problems.append(f"vision_config.projection_dim {v.projection_dim} != text_config.hidden_size {t.hidden_size}")
        for name, act in (("text_config", t.hidden_act), ("vision_config", v.hidden_act)):
            if act != "gelu_pytorch_tanh":
                problems.append(f"{name} activation {act!r} (Gemma / SigLIP use 'gelu_pytorch_tanh')")
        if problems:
            raise ValueError(f"{cj}: cannot be represented by the chunkpolicy backbone: " + "; ".join(problems))
        return BackboneConfig(
            image_size=v.image_size, patch_size=v.patch_size, vision_width=v.hidden_size, vision_depth=v.num_hidden_layers,
            vision_heads=v.num_attention_heads, vision_mlp=v.intermediate_size, width=t.hidden_size,
            depth=t.num_hidden_layers, mlp=t.intermediate_size, heads=t.num_attention_heads,
            kv_heads=t.num_key_value_heads, head_dim=t.head_dim, vocab_size=t.vocab_size, rope_theta=float(theta),
        )


class _NoStateProj(nn.Module):
    """Stands in for ``Backbone.state_proj`` when the prefix has no state token: no parameters, nothing in the
    state dict; its empty ``weight`` buffer follows ``.to()`` so callers can still read the backbone's dtype/device."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("weight", torch.empty(0), persistent=False)


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
