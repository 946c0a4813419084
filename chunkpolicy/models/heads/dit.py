"""``dit``: diffusion transformer over the H action tokens, cross-attending to the encoded prefix.

Blocks (adaLN-zero, as in DiT): time conditioning ``c`` modulates pre-norm shift/scale and zero-initialised gates of
a bidirectional self-attention over the actions and an MLP; between them a cross-attention reads the prefix hidden
states (image, text and state tokens; invalid tokens masked). The final layer is adaLN-modulated and zero-initialised,
so an untrained head predicts 0.

Objectives:

* ``diffusion`` — ``diffusers`` schedulers: ``DDPMScheduler`` (squaredcos_cap_v2) for training, predicting ε or the
  clean sample; ``DDIMScheduler`` or ``DPMSolverMultistepScheduler`` (DPM-Solver++) for sampling with a configurable
  number of steps.
* ``flow`` — the convention of :mod:`chunkpolicy.models.flow` (τ=0 noise → τ=1 data, Euler).

As in the flow expert, invalid unified dims are held at exactly 0 in the noisy input, and padded steps see only noise,
so whatever values sit there change neither the loss nor its gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from chunkpolicy.models import flow
from chunkpolicy.models.backbone import Backbone
from chunkpolicy.models.embeddings import sinusoidal_embedding
from chunkpolicy.models.prefix import PrefixOutput
from chunkpolicy.models.heads.base import ActionHead, Guidance, HeadCapabilities, register_head
from chunkpolicy.models.heads.configs import DiTConfig
from chunkpolicy.models.losses import masked_mean

def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    def __init__(self, hidden: int, heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.norm_x = nn.LayerNorm(hidden, eps=1e-6)
        self.cross = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(hidden, int(hidden * mlp_ratio)), nn.GELU(approximate="tanh"), nn.Linear(int(hidden * mlp_ratio), hidden))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(self, x: torch.Tensor, c: torch.Tensor, ctx: torch.Tensor, ctx_pad: torch.Tensor) -> torch.Tensor:
        """``x [B, H, h]`` actions, ``c [B, h]`` time, ``ctx [B, P, h]`` prefix, ``ctx_pad [B, P]`` True = ignore."""
        s1, sc1, g1, s2, sc2, g2 = self.ada(c).chunk(6, dim=-1)
        h = _modulate(self.norm1(x), s1, sc1)
        x = x + g1[:, None] * self.attn(h, h, h, need_weights=False)[0]
        q = self.norm_x(x)
        x = x + self.cross(q, ctx, ctx, key_padding_mask=ctx_pad, need_weights=False)[0]
        return x + g2[:, None] * self.mlp(_modulate(self.norm2(x), s2, sc2))


@register_head("dit")
class DiTHead(ActionHead):
    inference_methods = ("velocity",)

    @classmethod
    def capabilities(cls, cfg: DiTConfig) -> HeadCapabilities:
        flow_obj = cfg.objective == "flow"  # diffusers' scheduler steps read Python scalars: not graph-capturable
        return HeadCapabilities(velocity=flow_obj, sync_free_sample=flow_obj, sync_free_loss=True)
    def __init__(self, cfg: DiTConfig, backbone: Backbone, horizon: int, action_dim: int) -> None:
        super().__init__(cfg, backbone, horizon, action_dim)
        h = cfg.hidden or min(backbone.width, 512)
        if h % cfg.heads:
            raise ValueError(f"dit hidden {h} is not a multiple of heads {cfg.heads}")
        self.hidden = h
        self.action_in = nn.Linear(action_dim, h)
        self.pos = nn.Parameter(torch.randn(1, horizon, h) * 0.02)
        self.time_mlp = nn.Sequential(nn.Linear(h, h), nn.SiLU(), nn.Linear(h, h))
        self.ctx_proj = nn.Linear(backbone.width, h)
        self.blocks = nn.ModuleList([DiTBlock(h, cfg.heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.final_norm = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(h, 2 * h))
        self.action_out = nn.Linear(h, action_dim)
        for m in (self.final_ada[1], self.action_out):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        if cfg.objective == "diffusion":
            from diffusers import DDPMScheduler

            self.train_scheduler = DDPMScheduler(
                num_train_timesteps=cfg.train_timesteps, beta_schedule="squaredcos_cap_v2",
                prediction_type=cfg.prediction, clip_sample=False,
            )

    def _sampler(self):
        from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

        # "trailing" spacing: the first sampling step starts at t = T - 1 (pure noise). diffusers' default "leading"
        # never reaches it, so few-step sampling starts from a wrong noise level (1 step returned the input noise).
        cfg = self.train_scheduler.config
        if self.cfg.sampler == "ddim":
            return DDIMScheduler.from_config(cfg, timestep_spacing="trailing")
        return DPMSolverMultistepScheduler.from_config(cfg, algorithm_type="dpmsolver++", solver_order=2,
                                                       timestep_spacing="trailing")

    def net(self, x: torch.Tensor, t01: torch.Tensor, prefix_out: PrefixOutput) -> torch.Tensor:
        """Network output ``[B, H, D]`` for noisy chunk ``x [B, H, D]`` at time ``t01 [B]`` scaled to [0, 1]."""
        h = self.action_in(x.to(self.action_in.weight.dtype)) + self.pos  # x is fp32 during sampling
        c = self.time_mlp(sinusoidal_embedding(t01, self.hidden, 1e-3, 1.0).to(h.dtype))
        ctx = self.ctx_proj(prefix_out.hidden.to(h.dtype))
        pad = ~prefix_out.valid
        for blk in self.blocks:
            h = blk(h, c, ctx, pad)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        return self.action_out(_modulate(self.final_norm(h), shift, scale))

    def loss(self, backbone: Backbone, prefix_out: PrefixOutput, batch: dict, *,
             generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        a, amask, pad = batch["actions"], batch["action_mask"].bool(), batch["action_is_pad"].bool()
        valid_dims = amask[:, None, :]
        a = torch.where(valid_dims, a, torch.zeros_like(a))
        noise = torch.randn(a.shape, generator=generator, device=a.device, dtype=a.dtype) * valid_dims
        B = a.shape[0]
        if self.cfg.objective == "flow":
            tau = flow.sample_tau(B, generator=generator, device=a.device, dtype=a.dtype)
            x_t, t01, target = flow.interpolate(a, noise, tau), tau, flow.target_velocity(a, noise)
        else:
            T = self.cfg.train_timesteps
            t = torch.randint(0, T, (B,), generator=generator, device=a.device)
            x_t = self.train_scheduler.add_noise(a, noise, t)
            t01, target = t.to(a.dtype) / T, (noise if self.cfg.prediction == "epsilon" else a)
        x_t = torch.where(pad[:, :, None], noise, x_t)
        out = self.net(x_t, t01, prefix_out)
        return {"loss": masked_mean((out - target) ** 2, amask, pad)}

    def velocity(self, backbone: Backbone, prefix_out: PrefixOutput, x: torch.Tensor, tau: torch.Tensor, **_: Any) -> torch.Tensor:
        """Flow velocity ``[B, H, D]`` at noisy chunk ``x [B, H, D]``, flow time ``tau [B]`` (``objective="flow"``)."""
        if self.cfg.objective != "flow":
            raise NotImplementedError(f"dit with objective={self.cfg.objective!r} predicts noise, not a flow velocity")
        return self.net(x, tau, prefix_out)

    def sample(self, backbone: Backbone, prefix_out: PrefixOutput, batch: dict, *, num_steps: int | None = None,
               generator: torch.Generator | None = None, noise: torch.Tensor | None = None,
               layers: Any = None, guidance: Guidance | None = None) -> torch.Tensor:
        amask = batch["action_mask"].bool()[:, None, :]
        m = amask.float()  # sampling runs x (and the time) in fp32 whatever the model's dtype (see flow.euler_integrate)
        B, steps = prefix_out.hidden.shape[0], num_steps or self.cfg.num_steps
        if noise is None:
            noise = torch.randn(B, self.horizon, self.action_dim, generator=generator, device=prefix_out.hidden.device)
        x = noise.float() * m
        if self.cfg.objective == "flow":
            return flow.euler_integrate(lambda z, tau: self.velocity(backbone, prefix_out, z, tau) * m, x, steps,
                                        guidance=guidance, mask=m)
        if guidance is not None:
            raise ValueError("guidance needs a flow velocity; dit with objective='diffusion' has none")
        sched = self._sampler()
        sched.set_timesteps(steps, device=x.device)
        T = self.cfg.train_timesteps
        for t in sched.timesteps:
            out = self.net(x, t.float().expand(B) / T, prefix_out)
            x = sched.step(out.float(), t, x, generator=generator).prev_sample * m
        return x
