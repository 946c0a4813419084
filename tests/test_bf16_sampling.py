"""Sampling in bf16 stays close to fp32 for every head that samples iteratively: the sampling state (the noisy chunk)
and the flow / diffusion time stay fp32 whatever the model's dtype.

Regression: the chunk and τ used to be integrated in the model's dtype. In bf16, τ = 0.7 became 0.699, and the time
embedding's shortest periods (a few thousandths) turned that into a different time signal; with π0.5's adaRMS time
conditioning the imported π0.5 chunk moved ~7 % of the action range from its fp32 value (LeRobot's own bf16: 0.15 %).

Regression: ``policy.to(torch.bfloat16)`` also cast the normalization stats and the flow expert's action / state /
time projections, adaRMS modulations and output projection, which LeRobot and openpi keep fp32; their rounding is the
same at every Euler step, and the imported π0 / π0.5 bf16 chunks strayed ~2x further from fp32 than LeRobot's.
"""

import copy
import math

import pytest
import torch

from chunkpolicy.models.heads.configs import DiTConfig, FlowExpertConfig
from helpers import toy_batch, toy_policy

PI0 = FlowExpertConfig(state_token="expert", time_convention="openpi", invalid_dims="noise")
PI05 = FlowExpertConfig(state_token="none", time_convention="openpi", invalid_dims="noise", time_conditioning="adarms")
HEADS = {
    "flow_expert": FlowExpertConfig(),
    "flow_expert-pi0": PI0,
    "flow_expert-pi05": PI05,
    "dit-flow": DiTConfig(objective="flow", depth=2),
    "dit-diffusion-ddim": DiTConfig(objective="diffusion", depth=2, sampler="ddim"),
}


def _randomize(module: torch.nn.Module) -> None:
    """Every parameter random (zero-initialized output layers and norms would hide the time signal)."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            std = 1 / math.sqrt(p.shape[-1]) if p.ndim >= 2 else 0.1
            p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.mark.parametrize("head", list(HEADS.values()), ids=list(HEADS))
def test_bf16_chunk_stays_close_to_fp32(head):
    policy = toy_policy(head=head, horizon=8).eval()
    _randomize(policy.head)
    batch = toy_batch(B=2, horizon=8)
    noise = torch.randn(2, 8, policy.space.dim, generator=torch.Generator().manual_seed(5))
    ref = policy.predict_unified(batch, noise=noise)
    got = copy.deepcopy(policy).to(torch.bfloat16).predict_unified(batch, noise=noise)
    assert got.dtype == torch.float32  # the sampling state is fp32 to the end
    rel = ((got - ref).abs().max() / ref.abs().max()).item()
    # bf16 weights and activations alone: ~1 % here; the old bf16 time and state added several % (see module doc)
    assert rel < 0.02, f"bf16 chunk differs from fp32 by {rel:.3%} of its range"


FLOW = {k: v for k, v in HEADS.items() if k.startswith("flow_expert")}


@pytest.mark.parametrize("head", list(FLOW.values()), ids=list(FLOW))
def test_bf16_cast_keeps_stats_and_flow_projections_fp32(head):
    policy = toy_policy(head=head, horizon=8).eval()
    _randomize(policy.head)
    ref = {n: t.detach().clone() for n, t in [*policy.named_parameters(), *policy.named_buffers()]}
    low = copy.deepcopy(policy).to(torch.bfloat16)
    keep = {n for n, t in [*low.named_parameters(), *low.named_buffers()] if t.dtype == torch.float32}
    want = {f"head.{n}" for n, _ in policy.head.named_parameters()
            if n.split(".")[0] in ("action_in", "time_in", "time_out", "action_out", "state_proj")
            or "layernorm" in n or n.startswith("norm.")}
    assert want and want <= keep  # π0's state_proj, π0.5's adaRMS modulations (dense) included where present
    assert {"normalizer._action_offset", "normalizer._action_scale", "normalizer._state_offset"} <= keep
    for n in keep & set(ref):  # the fp32 values themselves, never rounded through bf16
        assert torch.equal(dict([*low.named_parameters(), *low.named_buffers()])[n], ref[n]), n
    assert low.head.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert low.backbone.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    # the normalization is exactly fp32's, and a policy cast back to fp32 is the original one
    batch = toy_batch(B=2, horizon=8)
    y = torch.randn(2, 8, policy.space.dim, generator=torch.Generator().manual_seed(1))
    inputs = policy.prepare_inputs(batch)
    assert torch.equal(low.postprocess(y, low.prepare_inputs(batch)), policy.postprocess(y, inputs))
    noise = torch.randn(2, 8, policy.space.dim, generator=torch.Generator().manual_seed(5))
    back = low.to(torch.float32)
    assert all(torch.equal(t, ref[n]) for n, t in back.named_parameters() if n in keep)
    v = low.to(torch.bfloat16).predict_unified(batch, noise=noise)
    assert v.dtype == torch.float32 and torch.isfinite(v).all()
