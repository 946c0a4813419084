import torch

from chunkpolicy.models import flow


def test_convention_tau0_noise_tau1_data():
    a, e = torch.randn(4, 5, 3), torch.randn(4, 5, 3)
    assert torch.equal(flow.interpolate(a, e, torch.zeros(4)), e)
    assert torch.equal(flow.interpolate(a, e, torch.ones(4)), a)
    assert torch.equal(flow.target_velocity(a, e), a - e)


def test_training_tau_skewed_toward_noise():
    tau = flow.sample_tau(200000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert tau.min() >= 0 and tau.max() <= 0.999
    # s ~ Beta(1.5, 1) has mean 0.6, so E[tau] = 1 - (0.999*0.6 + 0.001) = 0.4
    assert abs(tau.mean().item() - 0.4) < 0.005
    assert (tau < 0.5).float().mean() > 0.5  # more mass near noise


def test_euler_integration_exact_for_straight_paths():
    a, e = torch.randn(2, 4, 3), torch.randn(2, 4, 3)
    # the true velocity of the straight path from e to a is constant: Euler lands exactly on a
    out = flow.euler_integrate(lambda x, t: a - e, e, num_steps=10)
    torch.testing.assert_close(out, a)
    seen = []
    flow.euler_integrate(lambda x, t: seen.append(t[0].item()) or torch.zeros_like(x), e, num_steps=4)
    assert seen == [0.0, 0.25, 0.5, 0.75]
