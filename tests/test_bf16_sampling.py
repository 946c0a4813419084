"""Sampling in bf16 stays close to fp32 for every head that samples iteratively: the sampling state (the noisy chunk)
and the flow / diffusion time stay fp32 whatever the model's dtype.

Regression: the chunk and τ used to be integrated in the model's dtype. In bf16, τ = 0.7 became 0.699, and the time
embedding's shortest periods (a few thousandths) turned that into a different time signal; with π0.5's adaRMS time
conditioning the imported π0.5 chunk moved ~7 % of the action range from its fp32 value (LeRobot's own bf16: 0.15 %).
"""

import copy
import math

import pytest
import torch

from chunkpolicy.models.heads.configs import DiTConfig, FlowExpertConfig
from helpers import toy_batch, toy_policy

PI05 = FlowExpertConfig(state_token="none", time_convention="openpi", invalid_dims="noise", time_conditioning="adarms")
HEADS = {
    "flow_expert": FlowExpertConfig(),
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
