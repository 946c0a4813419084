"""``flow_expert``: π0-style action expert sharing self-attention with the backbone, layer by layer.

The expert is a Gemma-shaped transformer (its own norms, q/k/v/o projections and MLPs; same head count, KV heads and
head_dim as the backbone, one layer per backbone layer) over the H noisy action tokens. In layer ``l`` the action tokens'
keys/values are concatenated with the prefix's layer-``l`` keys/values, so actions attend to the whole prefix and to
each other (bidirectionally), while the prefix never sees the actions. The prefix KV is computed once per chunk
(:meth:`Backbone.encode_prefix`) and reused by all Euler steps; :meth:`FlowExpertHead.joint_velocity` is the
equivalent single pass over ``[prefix | (state) | actions]`` with the blockwise mask (used to check the cache).

Action tokens (``time_conditioning="concat"``, π0): ``Linear(D → w)(x_τ)`` concatenated with a sinusoidal embedding of
the time, then ``Linear(2w → w)``, swish, ``Linear(w → w)``; output ``Linear(w → D)``. With ``"adarms"`` (π0.5) the
action tokens are ``Linear(D → w)(x_τ)`` and the time conditions every RMSNorm of the expert (:class:`AdaRMSNorm`).
Flow convention and loss: :mod:`chunkpolicy.models.flow`; the π0 options (state token in the expert, openpi time,
noisy invalid dims) are described on :class:`~chunkpolicy.models.heads.configs.FlowExpertConfig`.

Invalid unified dims (``action_mask`` False) are held at exactly 0 in the noisy input during training and sampling
(``invalid_dims="zero"``), so what the expert sees for them never depends on data or noise; padded steps are sampled
but never supervised.

Sampling speed: what does not change across Euler steps (RoPE of the action positions, the key bias, the prefix KV —
plus the state token's KV when the expert embeds the state — placed in one preallocated ``[B, kv_heads, P + H, d]``
buffer per layer whose tail the actions' KV overwrites each step) is built once per chunk (:class:`SuffixCache`); the
actions attend with :func:`attend_few`; ``layers`` may be :class:`~chunkpolicy.models.fused.FusedLayer` snapshots. The
expert reads only the backbone's keys/values, so the backbone's last-layer query and output projections, MLP and final
norm are never used: they are frozen here (and skipped in :meth:`Backbone.encode_prefix` with ``hidden=False``), which
also spares DDP's unused-parameter search.
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
from chunkpolicy.models.attention import attend, attend_few, finish, qkv, rotate
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
    are on: then each step concatenates instead of writing in place. ``kv``: per layer the keys/values the actions
    attend to besides their own, ``[B, kv_heads, P, d]`` (the prefix's, plus the state token's when the expert embeds
    the state; P counts it)."""

    cos: torch.Tensor
    sin: torch.Tensor
    bias: torch.Tensor
    keys: list[torch.Tensor] | None
    values: list[torch.Tensor] | None
    prefix_len: int = 0
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None


class AdaRMSNorm(nn.Module):
    """π0.5's adaptive RMSNorm: ``dense = Linear(cond_dim → 3·dim)`` gives ``scale, shift, gate`` from the time
    condition; ``norm(x) = rms(x)·(1 + scale) + shift`` (fp32), ``gate`` multiplies the residual branch that follows.
    ``dense.weight`` starts at zero (the identity norm)."""

    def __init__(self, dim: int, cond_dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.dense = nn.Linear(cond_dim, 3 * dim)
        nn.init.zeros_(self.dense.weight)

    def modulation(self, cond: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``cond [B, c]`` → ``scale, shift, gate``, each ``[B, 1, dim]``: scale and shift in ``dense``'s dtype (fp32 in a
        bf16 policy; :meth:`apply` computes in fp32), the gate in ``dtype`` (the residual stream's)."""
        scale, shift, gate = self.dense(cond.to(self.dense.weight.dtype))[:, None].chunk(3, dim=-1)
        return scale, shift, gate.to(dtype)

    @staticmethod
    def apply(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        return (normed * (1 + scale.float()) + shift.float()).to(x.dtype)


@register_head("flow_expert")
class FlowExpertHead(ActionHead):
    inference_methods = ("velocity", "suffix_cache")  # per step; per chunk (~40 small kernels eager)

    @classmethod
    def capabilities(cls, cfg: FlowExpertConfig) -> HeadCapabilities:
        # reads only the per-layer keys/values: see the module docstring
        return HeadCapabilities(velocity=True, sync_free_sample=True, sync_free_loss=True, reads_prefix_hidden=False,
                                compile_layers=True, fused_layers=cfg.time_conditioning == "concat",
                                prefix_state_token=cfg.state_token == "prefix", embeds_state=cfg.state_token == "expert")

    def __init__(self, cfg: FlowExpertConfig, backbone: Backbone, horizon: int, action_dim: int) -> None:
        super().__init__(cfg, backbone, horizon, action_dim)
        if backbone.num_layers == 0:
            raise ValueError(
                "flow_expert shares attention with the backbone's Gemma layers, and the 'siglip' variant has none; "
                "use the 'dit' head with it"
            )
        if cfg.state_token == "expert" and cfg.time_conditioning != "concat":
            raise ValueError("flow_expert: state_token='expert' needs time_conditioning='concat' (with adaRMS the "
                             "state token would depend on the time, and π0.5 has no state token)")
        if backbone.state_token != (cfg.state_token == "prefix"):
            raise ValueError(f"flow_expert state_token={cfg.state_token!r} needs a backbone built with "
                             f"state_token={cfg.state_token == 'prefix'} (ChunkPolicy does this from the head's capabilities)")
        bc = backbone.config
        w = cfg.width or (1024 if bc.width == 2048 else max(bc.width // 2, bc.head_dim))
        mlp = cfg.mlp or 4 * w
        gcfg = GemmaConfig(
            hidden_size=w, intermediate_size=mlp, num_hidden_layers=bc.depth, num_attention_heads=bc.heads,
            num_key_value_heads=bc.kv_heads, head_dim=bc.head_dim, vocab_size=1, hidden_activation="gelu_pytorch_tanh",
        )
        self.width, self.adarms = w, cfg.time_conditioning == "adarms"
        self.layers = nn.ModuleList([GemmaDecoderLayer(gcfg, i) for i in range(bc.depth)])
        if self.adarms:  # π0.5: every norm is conditioned on the time (names as in LeRobot's PiGemma layers)
            for layer in self.layers:
                layer.input_layernorm = AdaRMSNorm(w, w, gcfg.rms_norm_eps)
                layer.post_attention_layernorm = AdaRMSNorm(w, w, gcfg.rms_norm_eps)
            self.norm = AdaRMSNorm(w, w, gcfg.rms_norm_eps)
        else:
            self.norm = GemmaRMSNorm(w, eps=gcfg.rms_norm_eps)
        self.action_in = nn.Linear(action_dim, w)
        self.time_in = nn.Linear(w if self.adarms else 2 * w, w)
        self.time_out = nn.Linear(w, w)
        self.action_out = nn.Linear(w, action_dim)
        lins = [self.action_in, self.time_in, self.time_out, self.action_out]
        if cfg.state_token == "expert":
            self.state_proj = nn.Linear(action_dim, w)  # the unified state has the same size D as the actions
            lins.append(self.state_proj)
        for lin in lins:
            nn.init.normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        self._sign = -1.0 if cfg.time_convention == "openpi" else 1.0  # openpi's output is ε − a = −(our velocity)
        last = backbone.layers[-1]
        for m in (last.self_attn.q_proj, last.self_attn.o_proj, last.post_attention_layernorm, last.mlp, backbone.language_model.norm):
            m.requires_grad_(False)  # never reached from the loss (see the module docstring)
        self._step = _ada_step if self.adarms else _expert_step  # compile_layers() swaps in a compiled version

    def fp32_modules(self) -> list[nn.Module]:
        """The projections of the noisy chunk, the state and the time, the expert's norms (with π0.5's time
        modulations) and the output projection stay fp32 in a bf16 policy, as in LeRobot's and openpi's π0 / π0.5:
        a small share of the work, but their bf16 rounding is the same at every Euler step, so it adds up over a chunk
        instead of averaging out."""
        norms = [m for m in self.modules() if isinstance(m, (AdaRMSNorm, GemmaRMSNorm))]
        return [self.action_in, self.time_in, self.time_out, self.action_out, *norms] + (
            [self.state_proj] if self.cfg.state_token == "expert" else [])

    @property
    def _layer_dtype(self) -> torch.dtype:
        """dtype of the expert layers' activations (the residual stream)."""
        return self.layers[0].mlp.down_proj.weight.dtype

    def compile_layers(self, **compile_kw: Any) -> None:
        """``torch.compile`` the per-layer training step (once, reused by every layer); see
        :meth:`Backbone.compile_layers`."""
        compile_kw.setdefault("dynamic", False)
        self._step = torch.compile(_ada_step if self.adarms else _expert_step, **compile_kw)

    def fused_layers(self) -> list[FusedLayer]:
        """Inference snapshots of the expert layers (see :class:`~chunkpolicy.models.fused.FusedLayer`)."""
        if self.adarms:
            raise NotImplementedError("flow_expert with time_conditioning='adarms' has no fused layers")
        return [FusedLayer(layer) for layer in self.layers]

    # -- pieces ---------------------------------------------------------------------------------------------------
    def _time_embedding(self, tau: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Sinusoid of the expert's time input ``[B, w]``: τ, or openpi's t = 1 − τ (computed in fp64)."""
        t = tau if self.cfg.time_convention == "tau" else 1.0 - tau.double()
        return sinusoidal_embedding(t, self.width, self.cfg.min_period, self.cfg.max_period).to(dtype)

    def embed_actions(self, x: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        """``x [B, H, D]``, ``tau [B]`` → action tokens ``[B, H, w]`` (``adarms``: the time enters through
        :meth:`time_condition` instead)."""
        a = self.action_in(x.to(self.action_in.weight.dtype))  # x is fp32 during sampling (flow.euler_integrate)
        if not self.adarms:
            t = self._time_embedding(tau, a.dtype)
            h = torch.cat([a, t[:, None].expand_as(a)], dim=-1).to(self.time_in.weight.dtype)
            a = self.time_out(F.silu(self.time_in(h)))
        return a.to(self._layer_dtype)

    def time_condition(self, tau: torch.Tensor, dtype: torch.dtype) -> list[tuple[torch.Tensor, ...]] | None:
        """``adarms``: per expert layer the six modulations ``(scale, shift, gate)`` of its two norms, then the final
        norm's ``(scale, shift)``, each ``[B, 1, w]``; None otherwise."""
        if not self.adarms:
            return None
        c = F.silu(self.time_out(F.silu(self.time_in(self._time_embedding(tau, self.time_in.weight.dtype)))))
        mods = [layer.input_layernorm.modulation(c, dtype) + layer.post_attention_layernorm.modulation(c, dtype)
                for layer in self.layers]
        return mods + [self.norm.modulation(c, dtype)[:2]]

    def _final(self, h: torch.Tensor, mods: list | None) -> torch.Tensor:
        h = self.norm(h) if mods is None else AdaRMSNorm.apply(h, *mods[-1], self.norm.eps)
        out = self.action_out(h.to(self.action_out.weight.dtype))
        return out if self._sign > 0 else -out

    def _suffix_positions(self, next_position: torch.Tensor) -> torch.Tensor:
        off = 1 if self.cfg.state_token == "expert" else 0  # the state token sits at next_position
        return next_position[:, None] + off + torch.arange(self.horizon, device=next_position.device)[None]

    def _state_kv(self, backbone: Backbone, prefix_out: PrefixOutput, state: torch.Tensor | None):
        """π0's state token run through the expert layers (it attends to the valid prefix and itself): per layer its
        ``(k, v)`` ``[B, kv_heads, 1, d]``. ``state [B, D]`` normalized, invalid dims 0."""
        if state is None:
            raise ValueError("state: flow_expert with state_token='expert' needs the normalized state [B, D] in its batch")
        valid, (pk0, _) = prefix_out.valid, prefix_out.kv[0]
        B = valid.shape[0]
        s = self.state_proj(state.to(self.state_proj.weight.dtype))[:, None].to(self._layer_dtype)
        cos, sin = backbone.rope(pk0, prefix_out.next_position[:, None])
        bias = mask_bias(torch.cat([valid, torch.ones(B, 1, dtype=torch.bool, device=valid.device)], 1))[:, None, None]
        out = []
        for layer, (pk, pv) in zip(self.layers, prefix_out.kv):
            q, k, v = qkv(layer, s, cos, sin, heads_first=False)
            k, v = k.transpose(1, 2), v.transpose(1, 2)
            out.append((k, v))
            s = finish(layer, s, attend_few(q, torch.cat([pk.to(k.dtype), k], 2), torch.cat([pv.to(v.dtype), v], 2),
                                            bias, _scaling(layer)))
        return out

    def suffix_cache(self, backbone: Backbone, prefix_out: PrefixOutput, buffers: bool | None = None,
                     state: torch.Tensor | None = None) -> SuffixCache:
        """The per-chunk constants (:class:`SuffixCache`) for ``prefix_out``; ``buffers``: preallocate the KV buffers
        (default: when gradients are off, the only case in which they are used); ``state [B, D]``: the normalized
        state (needed with ``state_token="expert"``, ignored otherwise)."""
        valid, kv = prefix_out.valid, list(prefix_out.kv)
        pk0 = kv[0][0]
        if self.cfg.state_token == "expert":
            skv = self._state_kv(backbone, prefix_out, state)
            kv = [(torch.cat([pk.to(sk.dtype), sk], 2), torch.cat([pv.to(sv.dtype), sv], 2)) for (pk, pv), (sk, sv) in zip(kv, skv)]
            valid = torch.cat([valid, torch.ones(valid.shape[0], 1, dtype=torch.bool, device=valid.device)], 1)
        B, P, H = valid.shape[0], valid.shape[1], self.horizon
        cos, sin = backbone.rope(pk0, self._suffix_positions(prefix_out.next_position))
        bias = mask_bias(torch.cat([valid, torch.ones(B, H, dtype=torch.bool, device=valid.device)], 1))[:, None, None]
        keys = values = None
        if (not torch.is_grad_enabled()) if buffers is None else buffers:
            K = -(-(P + H) // 8) * 8
            bias = F.pad(bias, (0, K - P - H), value=float("-inf"))
            keys = [F.pad(pk, (0, 0, 0, K - P)) for pk, _ in kv]  # zeros after the prefix: one kernel each
            values = [F.pad(pv, (0, 0, 0, K - P)) for _, pv in kv]
        return SuffixCache(cos, sin, bias, keys, values, P, kv)

    def velocity(self, backbone: Backbone, prefix_out: PrefixOutput, x: torch.Tensor, tau: torch.Tensor, *,
                 cache: SuffixCache | None = None, layers: Sequence[nn.Module | FusedLayer] | None = None,
                 state: torch.Tensor | None = None) -> torch.Tensor:
        """Predicted velocity ``[B, H, D]`` (our convention, ``a − ε``) for noisy chunk ``x`` at flow time ``tau [B]``,
        using the cached prefix KV.

        ``cache``: :meth:`suffix_cache` of ``prefix_out`` (built here when None, from ``state`` when the expert embeds
        the state); ``layers``: fused snapshots (:meth:`fused_layers`) to run instead of the modules."""
        c = self.suffix_cache(backbone, prefix_out, state=state) if cache is None else cache
        h = self.embed_actions(x, tau)
        mods = self.time_condition(tau, h.dtype)
        layers = self.layers if layers is None else layers
        in_place = c.keys is not None and not torch.is_grad_enabled()
        ckpt = backbone.gradient_checkpointing and self.training and torch.is_grad_enabled()
        for i, (layer, (pk, pv)) in enumerate(zip(layers, c.kv)):
            if mods is not None:
                if in_place:
                    h = _ada_step_in_place(layer, mods[i], h, c.cos, c.sin, c.bias, c.keys[i], c.values[i], c.prefix_len)
                elif ckpt:
                    h = checkpoint(self._step, layer, mods[i], h, c.cos, c.sin, c.bias, pk, pv, use_reentrant=False)
                else:
                    h = self._step(layer, mods[i], h, c.cos, c.sin, c.bias, pk, pv)
            elif in_place:
                h = _expert_step_in_place(layer, h, c.cos, c.sin, c.bias, c.keys[i], c.values[i], c.prefix_len)
            elif ckpt:
                h = checkpoint(self._step, layer, h, c.cos, c.sin, c.bias, pk, pv, use_reentrant=False)
            else:
                h = self._step(layer, h, c.cos, c.sin, c.bias, pk, pv)
        return self._final(h, mods)

    def joint_velocity(self, backbone: Backbone, prefix: Prefix, x: torch.Tensor, tau: torch.Tensor,
                       return_prefix: bool = False, state: torch.Tensor | None = None):
        """Same as :meth:`velocity` without a cache: one pass over ``[prefix | (state token) | actions]`` with the
        blockwise mask (``state [B, D]``: with ``state_token="expert"``).

        With ``return_prefix`` also returns the prefix's last hidden states ``[B, P, W]`` from that joint pass."""
        pre, suf = prefix.embeds, self.embed_actions(x, tau)
        mods = self.time_condition(tau, suf.dtype)
        B, P, H = pre.shape[0], pre.shape[1], suf.shape[1]
        dev = pre.device
        nxt = prefix.positions.max(dim=1).values + 1
        s_valid, s_block = torch.ones(B, H, dtype=torch.bool, device=dev), torch.full((B, H), 2, dtype=torch.long, device=dev)
        pos = self._suffix_positions(nxt)
        if self.cfg.state_token == "expert":
            if state is None:
                raise ValueError("state: flow_expert with state_token='expert' needs the normalized state [B, D]")
            suf = torch.cat([self.state_proj(state.to(self.state_proj.weight.dtype)).to(suf.dtype)[:, None], suf], 1)
            s_valid = torch.cat([s_valid[:, :1], s_valid], 1)
            s_block = torch.cat([torch.ones(B, 1, dtype=torch.long, device=dev), s_block], 1)
            pos = torch.cat([nxt[:, None], pos], 1)
        valid = torch.cat([prefix.valid, s_valid], 1)
        block = torch.cat([prefix.block, s_block], 1)
        mask = blockwise_mask(valid, block, valid, block)
        cos_p, sin_p = backbone.rope(pre, prefix.positions)
        cos_s, sin_s = backbone.rope(suf, pos)
        for i, (bl, el) in enumerate(zip(backbone.layers, self.layers)):
            q1, k1, v1 = qkv(bl, pre, cos_p, sin_p)
            if mods is None:
                q2, k2, v2 = qkv(el, suf, cos_s, sin_s)
            else:
                q2, k2, v2 = _ada_qkv(el, mods[i], suf, cos_s, sin_s)
                q2, k2, v2 = (t.transpose(1, 2) for t in (q2, k2, v2))
            out = attend(bl, torch.cat([q1, q2], 2), torch.cat([k1, k2], 2), torch.cat([v1, v2], 2), mask)
            pre = finish(bl, pre, out[:, :P])
            suf = finish(el, suf, out[:, P:]) if mods is None else _ada_finish(el, mods[i], suf, out[:, P:])
        v = self._final(suf[:, -H:], mods)
        return (v, pre) if return_prefix else v

    # -- interface ------------------------------------------------------------------------------------------------
    def loss(self, backbone: Backbone, prefix_out: PrefixOutput, batch: dict, *,
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        a, amask, pad = batch["actions"], batch["action_mask"].bool(), batch["action_is_pad"].bool()
        gen = generator
        valid_dims = amask[:, None, :]
        a = torch.where(valid_dims, a, torch.zeros_like(a))  # invalid dims: exactly 0 whatever sits there
        noise = torch.randn(a.shape, generator=gen, device=a.device, dtype=a.dtype)
        if self.cfg.invalid_dims == "zero":
            noise = noise * valid_dims
        tau = flow.sample_tau(a.shape[0], generator=gen, device=a.device, dtype=a.dtype)
        x_t = flow.interpolate(a, noise, tau)
        # padded steps are unsupervised; their (data-dependent) content must not leak through attention either
        x_t = torch.where(pad[:, :, None], noise, x_t)
        dt = self.action_in.weight.dtype  # fp32 unless train.precision=bf16 cast it; the loss is computed in fp32
        v = self.velocity(backbone, prefix_out, x_t.to(dt), tau.to(dt), state=batch.get("state")).float()
        loss = masked_mean((v - flow.target_velocity(a, noise).float()) ** 2, amask, pad)
        return {"loss": loss}

    def sample(self, backbone: Backbone, prefix_out: PrefixOutput, batch: dict, *, num_steps: int | None = None,
               generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
               layers: Sequence[nn.Module | FusedLayer] | None = None, guidance: Guidance | None = None) -> torch.Tensor:
        amask = batch["action_mask"].bool()[:, None, :]
        pk0 = prefix_out.kv[0][0]
        if noise is None:
            noise = torch.randn(pk0.shape[0], self.horizon, self.action_dim, generator=generator, device=pk0.device)
        m = amask.float()
        # guidance differentiates through the velocity: the in-place KV buffers are for gradient-free steps only
        cache = self.suffix_cache(backbone, prefix_out, buffers=guidance is None and not torch.is_grad_enabled(),
                                  state=batch.get("state"))
        steps = num_steps or self.cfg.num_steps
        if self.cfg.invalid_dims == "noise":  # π0: every dim is integrated; invalid dims are zeroed at the end
            x = flow.euler_integrate(lambda x, t: self.velocity(backbone, prefix_out, x, t, cache=cache, layers=layers),
                                     noise, steps, guidance=guidance)
            return x * m
        return flow.euler_integrate(lambda x, t: self.velocity(backbone, prefix_out, x, t, cache=cache, layers=layers) * m,
                                    noise * m, steps, guidance=guidance, mask=m)


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


def _ada_qkv(layer, mods, h, cos, sin):
    """:func:`qkv` of an adaRMS layer (``mods``: its six modulations): q, k, v ``[B, L, heads, d]``."""
    attn = layer.self_attn
    x = AdaRMSNorm.apply(h, mods[0], mods[1], layer.input_layernorm.eps)
    shape = (*h.shape[:-1], -1, attn.head_dim)
    q, k, v = (p(x).reshape(shape) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)
    return rotate(q, c, s), rotate(k, c, s), v


def _ada_finish(layer, mods, h, attn_out):
    """:func:`finish` of an adaRMS layer: gated residuals ``h + o(attn)·gate1``, then ``+ mlp(norm2(h))·gate2``."""
    h = h + layer.self_attn.o_proj(attn_out) * mods[2]
    y = layer.mlp(AdaRMSNorm.apply(h, mods[3], mods[4], layer.post_attention_layernorm.eps))
    return h + y * mods[5]


def _ada_step(layer, mods, h, cos, sin, bias, pk, pv):
    """:func:`_expert_step` for an adaRMS (π0.5) layer."""
    q, k, v = _ada_qkv(layer, mods, h, cos, sin)
    k, v = torch.cat([pk.to(k.dtype), k.transpose(1, 2)], 2), torch.cat([pv.to(v.dtype), v.transpose(1, 2)], 2)
    return _ada_finish(layer, mods, h, attend_few(q, k, v, bias, layer.self_attn.scaling))


def _ada_step_in_place(layer, mods, h, cos, sin, bias, keys, values, P: int):
    """:func:`_expert_step_in_place` for an adaRMS (π0.5) layer."""
    q, k, v = _ada_qkv(layer, mods, h, cos, sin)
    H = k.shape[1]
    keys[:, :, P:P + H] = k.transpose(1, 2)
    values[:, :, P:P + H] = v.transpose(1, 2)
    return _ada_finish(layer, mods, h, attend_few(q, keys, values, bias, layer.self_attn.scaling))
