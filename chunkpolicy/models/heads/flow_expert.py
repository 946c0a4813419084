"""``flow_expert``: π0-style action expert sharing self-attention with the backbone, layer by layer.

The expert is a Gemma-shaped transformer (its own norms, q/k/v/o projections and MLPs; same head count, KV heads and
head_dim as the backbone, one layer per backbone layer) over the H noisy action tokens. In layer ``l`` the action tokens'
keys/values are concatenated with the prefix's layer-``l`` keys/values, so actions attend to the whole prefix and to
each other (bidirectionally), while the prefix never sees the actions. The prefix KV is computed once per chunk
(:meth:`Backbone.encode_prefix`) and reused by all Euler steps; :meth:`FlowExpertHead.joint_velocity` is the
equivalent single pass over ``[prefix | actions]`` with the blockwise mask (used to check the cache).

Action tokens: ``Linear(D → w)(x_τ)`` concatenated with a sinusoidal embedding of τ, then ``Linear(2w → w)``, swish,
``Linear(w → w)``; output ``Linear(w → D)``. Flow convention and loss: :mod:`chunkpolicy.models.flow`.

Invalid unified dims (``action_mask`` False) are held at exactly 0 in the noisy input during training and sampling,
so what the expert sees for them never depends on data or noise; padded steps are sampled but never supervised.

Sampling speed: what does not change across Euler steps (RoPE of the action positions, the key bias, the prefix KV
placed in one preallocated ``[B, kv_heads, P + H, d]`` buffer per layer whose tail the actions' KV overwrites each step)
is built once per chunk (:class:`SuffixCache`); the actions attend with :func:`attend_few`; ``layers`` may be
:class:`~chunkpolicy.models.fused.FusedLayer` snapshots. The expert reads only the backbone's keys/values, so the
backbone's last-layer query and output projections, MLP and final norm are never used: they are frozen here (and skipped in
:meth:`Backbone.encode_prefix` with ``hidden=False``), which also spares DDP's unused-parameter search.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import GemmaConfig
from transformers.models.gemma.modeling_gemma import GemmaDecoderLayer, GemmaRMSNorm

from chunkpolicy.models import flow
from chunkpolicy.models.attention import attend, attend_few, finish, qkv
from chunkpolicy.models.backbone import Backbone
from chunkpolicy.models.embeddings import sinusoidal_embedding
from chunkpolicy.models.fused import FusedLayer
from chunkpolicy.models.masks import blockwise_mask, mask_bias
from chunkpolicy.models.prefix import Prefix, PrefixOutput
from chunkpolicy.models.heads.base import ActionHead, Guidance, HeadCapabilities, register_head
from chunkpolicy.models.heads.configs import FlowExpertConfig
from chunkpolicy.models.losses import masked_mean


@dataclass
class SuffixCache:
    """Per-chunk constants of the Euler loop: ``cos/sin [B, H, d]`` RoPE of the action positions, additive key
    ``bias [B, 1, 1, P + H]`` (0 or -inf), and per layer ``keys/values [B, kv_heads, K, d]`` holding the prefix KV in
    ``[:P]``, the actions' in ``[P:P + H]``, zeros after (K = P + H rounded up to a multiple of 8, ``bias`` padded with
    -inf to K: unaligned row strides make cuBLAS fall back to slow kernels). ``keys``/``values`` are None when gradients
    are on: then each step concatenates instead of writing in place."""

    cos: torch.Tensor
    sin: torch.Tensor
    bias: torch.Tensor
    keys: list[torch.Tensor] | None
    values: list[torch.Tensor] | None
    prefix_len: int = 0


@register_head("flow_expert")
class FlowExpertHead(ActionHead):
    inference_methods = ("velocity", "suffix_cache")  # per step; per chunk (~40 small kernels eager)

    @classmethod
    def capabilities(cls, cfg: FlowExpertConfig) -> HeadCapabilities:
        # reads only the per-layer keys/values: see the module docstring
        return HeadCapabilities(velocity=True, sync_free_sample=True, sync_free_loss=True, reads_prefix_hidden=False,
                                compile_layers=True, fused_layers=True)

    def __init__(self, cfg: FlowExpertConfig, backbone: Backbone, horizon: int, action_dim: int) -> None:
        super().__init__(cfg, backbone, horizon, action_dim)
        if backbone.num_layers == 0:
            raise ValueError(
                "flow_expert shares attention with the backbone's Gemma layers, and the 'siglip' variant has none; "
                "use the 'dit' head with it"
            )
        bc = backbone.config
        w = cfg.width or (1024 if bc.width == 2048 else max(bc.width // 2, bc.head_dim))
        mlp = cfg.mlp or 4 * w
        gcfg = GemmaConfig(
            hidden_size=w, intermediate_size=mlp, num_hidden_layers=bc.depth, num_attention_heads=bc.heads,
            num_key_value_heads=bc.kv_heads, head_dim=bc.head_dim, vocab_size=1, hidden_activation="gelu_pytorch_tanh",
        )
        self.width = w
        self.layers = nn.ModuleList([GemmaDecoderLayer(gcfg, i) for i in range(bc.depth)])
        self.norm = GemmaRMSNorm(w, eps=gcfg.rms_norm_eps)
        self.action_in = nn.Linear(action_dim, w)
        self.time_in = nn.Linear(2 * w, w)
        self.time_out = nn.Linear(w, w)
        self.action_out = nn.Linear(w, action_dim)
        for lin in (self.action_in, self.time_in, self.time_out, self.action_out):
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        last = backbone.layers[-1]
        for m in (last.self_attn.q_proj, last.self_attn.o_proj, last.post_attention_layernorm, last.mlp, backbone.language_model.norm):
            m.requires_grad_(False)  # never reached from the loss (see the module docstring)
        self._step = _expert_step  # compile_layers() swaps in a compiled version

    def compile_layers(self, **compile_kw: Any) -> None:
        """``torch.compile`` the per-layer training step (once, reused by every layer); see
        :meth:`Backbone.compile_layers`."""
        compile_kw.setdefault("dynamic", False)
        self._step = torch.compile(_expert_step, **compile_kw)

    def fused_layers(self) -> list[FusedLayer]:
        """Inference snapshots of the expert layers (see :class:`~chunkpolicy.models.fused.FusedLayer`)."""
        return [FusedLayer(layer) for layer in self.layers]

    # -- pieces ---------------------------------------------------------------------------------------------------
    def embed_actions(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """``x [B, H, D]``, ``tau [B]`` → action tokens ``[B, H, w]``."""
        a = self.action_in(x)
        t = sinusoidal_embedding(tau, self.width, self.cfg.min_period, self.cfg.max_period).to(a.dtype)
        h = torch.cat([a, t[:, None].expand_as(a)], dim=-1)
        return self.time_out(F.silu(self.time_in(h)))

    def _suffix_positions(self, next_position: torch.Tensor) -> torch.Tensor:
        return next_position[:, None] + torch.arange(self.horizon, device=next_position.device)[None]

    def suffix_cache(self, backbone: Backbone, prefix_out: PrefixOutput, buffers: bool | None = None) -> SuffixCache:
        """The per-chunk constants (:class:`SuffixCache`) for ``prefix_out``; ``buffers``: preallocate the KV buffers
        (default: when gradients are off, the only case in which they are used)."""
        valid, (pk0, _) = prefix_out.valid, prefix_out.kv[0]
        B, P, H = valid.shape[0], valid.shape[1], self.horizon
        cos, sin = backbone.rope(pk0, self._suffix_positions(prefix_out.next_position))
        bias = mask_bias(torch.cat([valid, torch.ones(B, H, dtype=torch.bool, device=valid.device)], 1))[:, None, None]
        keys = values = None
        if (not torch.is_grad_enabled()) if buffers is None else buffers:
            K = -(-(P + H) // 8) * 8
            bias = F.pad(bias, (0, K - P - H), value=float("-inf"))
            keys = [F.pad(pk, (0, 0, 0, K - P)) for pk, _ in prefix_out.kv]  # zeros after the prefix: one kernel each
            values = [F.pad(pv, (0, 0, 0, K - P)) for _, pv in prefix_out.kv]
        return SuffixCache(cos, sin, bias, keys, values, P)

    def velocity(self, backbone: Backbone, prefix_out: PrefixOutput, x: torch.Tensor, tau: torch.Tensor, *,
                 cache: SuffixCache | None = None, layers: Sequence[nn.Module | FusedLayer] | None = None) -> torch.Tensor:
        """Predicted velocity ``[B, H, D]`` for noisy chunk ``x`` at flow time ``tau [B]``, using the cached prefix KV.

        ``cache``: :meth:`suffix_cache` of ``prefix_out`` (built here when None); ``layers``: fused snapshots
        (:meth:`fused_layers`) to run instead of the modules."""
        c = self.suffix_cache(backbone, prefix_out) if cache is None else cache
        h = self.embed_actions(x, tau)
        layers = self.layers if layers is None else layers
        in_place = c.keys is not None and not torch.is_grad_enabled()
        ckpt = backbone.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, (layer, (pk, pv)) in enumerate(zip(layers, prefix_out.kv)):
            if in_place:
                h = _expert_step_in_place(layer, h, c.cos, c.sin, c.bias, c.keys[i], c.values[i], c.prefix_len)
            elif ckpt:
                h = checkpoint(self._step, layer, h, c.cos, c.sin, c.bias, pk, pv, use_reentrant=False)
            else:
                h = self._step(layer, h, c.cos, c.sin, c.bias, pk, pv)
        return self.action_out(self.norm(h))

    def joint_velocity(self, backbone: Backbone, prefix: Prefix, x: torch.Tensor, tau: torch.Tensor,
                       return_prefix: bool = False):
        """Same as :meth:`velocity` without a cache: one pass over ``[prefix | actions]`` with the blockwise mask.

        With ``return_prefix`` also returns the prefix's last hidden states ``[B, P, W]`` from that joint pass."""
        pre, suf = prefix.embeds, self.embed_actions(x, tau)
        B, P, H = pre.shape[0], pre.shape[1], suf.shape[1]
        nxt = prefix.positions.max(dim=1).values + 1
        valid = torch.cat([prefix.valid, torch.ones(B, H, dtype=torch.bool, device=pre.device)], 1)
        block = torch.cat([prefix.block, torch.full((B, H), 2, dtype=torch.long, device=pre.device)], 1)
        mask = blockwise_mask(valid, block, valid, block)
        cos_p, sin_p = backbone.rope(pre, prefix.positions)
        cos_s, sin_s = backbone.rope(suf, self._suffix_positions(nxt))
        for bl, el in zip(backbone.layers, self.layers):
            q1, k1, v1 = qkv(bl, pre, cos_p, sin_p)
            q2, k2, v2 = qkv(el, suf, cos_s, sin_s)
            out = attend(bl, torch.cat([q1, q2], 2), torch.cat([k1, k2], 2), torch.cat([v1, v2], 2), mask)
            pre, suf = finish(bl, pre, out[:, :P]), finish(el, suf, out[:, P:])
        v = self.action_out(self.norm(suf))
        return (v, pre) if return_prefix else v

    # -- interface ------------------------------------------------------------------------------------------------
    def loss(self, backbone: Backbone, prefix_out: PrefixOutput, batch: dict, *,
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        a, amask, pad = batch["actions"], batch["action_mask"].bool(), batch["action_is_pad"].bool()
        gen = generator
        valid_dims = amask[:, None, :]
        a = torch.where(valid_dims, a, torch.zeros_like(a))  # invalid dims: exactly 0 whatever sits there
        noise = torch.randn(a.shape, generator=gen, device=a.device, dtype=a.dtype) * valid_dims
        tau = flow.sample_tau(a.shape[0], generator=gen, device=a.device, dtype=a.dtype)
        x_t = flow.interpolate(a, noise, tau)
        # padded steps are unsupervised; their (data-dependent) content must not leak through attention either
        x_t = torch.where(pad[:, :, None], noise, x_t)
        dt = self.action_in.weight.dtype  # bf16 weights without autocast: the expert runs in bf16, the loss in fp32
        v = self.velocity(backbone, prefix_out, x_t.to(dt), tau.to(dt)).float()
        loss = masked_mean((v - flow.target_velocity(a, noise).float()) ** 2, amask, pad)
        return {"loss": loss}

    def sample(self, backbone: Backbone, prefix_out: PrefixOutput, batch: dict, *, num_steps: int | None = None,
               generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
               layers: Sequence[nn.Module | FusedLayer] | None = None, guidance: Guidance | None = None) -> torch.Tensor:
        amask = batch["action_mask"].bool()[:, None, :]
        pk0 = prefix_out.kv[0][0]
        if noise is None:
            noise = torch.randn(pk0.shape[0], self.horizon, self.action_dim, generator=generator, device=pk0.device, dtype=pk0.dtype)
        noise = noise * amask
        m = amask.to(noise.dtype)
        # guidance differentiates through the velocity: the in-place KV buffers are for gradient-free steps only
        cache = self.suffix_cache(backbone, prefix_out, buffers=guidance is None and not torch.is_grad_enabled())
        return flow.euler_integrate(lambda x, t: self.velocity(backbone, prefix_out, x, t, cache=cache, layers=layers) * m,
                                    noise, num_steps or self.cfg.num_steps, guidance=guidance, mask=m)


def _scaling(layer: nn.Module | FusedLayer) -> float:
    return layer.scaling if isinstance(layer, FusedLayer) else layer.self_attn.scaling


def _expert_step(layer, h, cos, sin, bias, pk, pv):
    """One expert layer over the action tokens ``h [B, H, w]`` against ``[prefix KV | their own KV]``."""
    q, k, v = qkv(layer, h, cos, sin, heads_first=False)
    k, v = torch.cat([pk.to(k.dtype), k.transpose(1, 2)], 2), torch.cat([pv.to(v.dtype), v.transpose(1, 2)], 2)
    return finish(layer, h, attend_few(q, k, v, bias, _scaling(layer)))


def _expert_step_in_place(layer, h, cos, sin, bias, keys, values, P: int):
    """Same as :func:`_expert_step` with the actions' KV written into ``[P:P + H]`` of preallocated ``keys/values``."""
    q, k, v = qkv(layer, h, cos, sin, heads_first=False)
    H = k.shape[1]
    keys[:, :, P:P + H] = k.transpose(1, 2)
    values[:, :, P:P + H] = v.transpose(1, 2)
    return finish(layer, h, attend_few(q, keys, values, bias, _scaling(layer)))
