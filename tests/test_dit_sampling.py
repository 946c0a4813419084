"""dit diffusion sampling with an exact ε-oracle for Gaussian data (regression: diffusers' default "leading" timestep
spacing never starts at t = T − 1, so 1-step DDIM treated pure noise as an almost clean sample and returned it)."""

from __future__ import annotations

import pytest
import torch

from chunkpolicy.models.heads.configs import head_config
from helpers import toy_batch, toy_policy

H, B = 6, 16
MU, S = 0.3, 0.5  # data: every valid entry ~ N(MU, S²), independent


def _sample(sampler: str, steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    policy = toy_policy(head=head_config("dit", {"depth": 1, "hidden": 32, "sampler": sampler, "num_steps": steps}),
                        horizon=H).eval()
    head = policy.head
    T = head.cfg.train_timesteps
    abar = head.train_scheduler.alphas_cumprod.double()

    def posterior_mean(x: torch.Tensor, t: int) -> torch.Tensor:  # E[x0 | x_t] for Gaussian data
        a = abar[t]
        return MU + (a.sqrt() * S**2 / (a * S**2 + 1 - a)) * (x.double() - a.sqrt() * MU)

    def oracle(x, t01, prefix_out):  # exact E[ε | x_t]
        t = int(round(float(t01[0]) * T))
        a = abar[t]
        return ((x.double() - a.sqrt() * posterior_mean(x, t)) / (1 - a).sqrt()).to(x.dtype)

    head.net = oracle
    obs = {k: v for k, v in toy_batch(B=B, horizon=H).items() if k not in ("actions", "action_is_pad")}
    inp = policy.prepare_inputs(obs)
    noise = torch.randn(B, H, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = policy.sample(inp, policy.encode(inp), noise)
    return out, posterior_mean(noise, T - 1).float(), noise


@pytest.mark.parametrize("sampler", ["ddim", "dpmsolver"])
def test_one_step_returns_the_posterior_mean_given_pure_noise(sampler):
    out, mean, noise = _sample(sampler, 1)
    torch.testing.assert_close(out[..., :3], mean[..., :3], rtol=0, atol=1e-3)
    assert out[..., :3].std() < 0.05 < noise[..., :3].std()  # not the input noise
    assert torch.all(out[..., 3:] == 0)


@pytest.mark.parametrize("steps", [10])
@pytest.mark.parametrize("sampler", ["ddim", "dpmsolver"])
def test_few_steps_reach_the_data_distribution(sampler, steps):
    out, _, _ = _sample(sampler, steps)
    x = out[..., :3]
    assert abs(float(x.mean()) - MU) < 0.1 and abs(float(x.std()) - S) < 0.1, (float(x.mean()), float(x.std()))
