import numpy as np
import pytest
import torch

from chunkpolicy.runtime.executors import make_executor
from chunkpolicy.models.flow import euler_integrate
from chunkpolicy.runtime.rtc import RealTimeChunking, RTCGuidance, rtc_predict_fn, rtc_target, rtc_weights
from helpers import toy_batch, toy_policy


def test_weights_shape():
    w = rtc_weights(10, 2, 3)
    assert w[:2].tolist() == [1.0, 1.0] and np.all(w[7:] == 0)
    assert np.all(np.diff(w[2:7]) < 0) and 0 < w[6] < w[2] < 1
    with pytest.raises(ValueError):
        rtc_weights(10, 8, 3)


def test_executor_honours_the_executed_prefix():
    H, s, d = 10, 4, 2
    calls = []

    def predict(obs, prefix=None, prefix_len=0):
        k = len(calls)
        calls.append((prefix, prefix_len))
        return np.arange(H)[:, None] + 100.0 * k  # chunk k: 100k, 100k+1, ...

    ex = make_executor("rtc:4,2")
    assert isinstance(ex, RealTimeChunking)
    acts = [float(ex.act(t, None, predict)[0]) for t in range(12)]
    assert ex.prediction_ticks == [0, 4, 8]
    assert calls[0] == (None, 0)
    np.testing.assert_array_equal(calls[1][0][0, :, 0], np.arange(s, H))  # the old chunk's remaining actions
    assert calls[1][1] == d
    # ticks 0-3 from chunk 0; ticks 4-5 are chunk 0's steps 4-5 (committed during the delay); ticks 6-7 chunk 1's steps 2-3
    assert acts[:8] == [0, 1, 2, 3, 4, 5, 102, 103]
    assert acts[8:] == [104, 105, 202, 203]


def test_guided_sampling_matches_the_frozen_prefix():
    policy = toy_policy(horizon=8).eval()
    batch = {k: v for k, v in toy_batch(B=2, horizon=8).items() if k not in ("actions", "action_is_pad")}
    g = torch.Generator().manual_seed(0)
    target_chunk = policy.predict_chunk(batch, generator=g)  # an in-distribution previous chunk
    prev = target_chunk[:, 3:]  # remaining actions after s = 3 executed steps
    guided = rtc_predict_fn(policy, beta=10.0, exec_horizon=3, generator=torch.Generator().manual_seed(5))
    new = guided(batch, prefix=prev.numpy(), prefix_len=2)
    free = policy.predict_chunk(batch, generator=torch.Generator().manual_seed(5))
    err_guided = (new[:, :2] - prev[:, :2]).abs().mean()
    err_free = (free[:, :2] - prev[:, :2]).abs().mean()
    assert new.shape == (2, 8, 3)
    assert err_guided < 0.3 * err_free, (err_guided, err_free)


def test_guidance_with_zero_weights_is_plain_euler():
    v = lambda x, t: -x + 1.0  # noqa: E731
    noise = torch.randn(1, 4, 2)
    hook = RTCGuidance(torch.zeros(1, 4, 2), torch.zeros(4))
    out = euler_integrate(v, noise, 5, guidance=hook, mask=torch.ones(1, 1, 2))
    x = noise.clone()
    for _ in range(5):
        x = x + 0.2 * (-x + 1.0)
    torch.testing.assert_close(out, x)


def test_guidance_never_writes_invalid_dims():
    """A vector-Jacobian product reaches input dims the velocity never writes: the sampler re-masks every update."""
    w = torch.randn(2, 2)
    v = lambda x, t: (x @ w) * torch.tensor([1.0, 0.0])  # noqa: E731  (dim 1 invalid, but dim 1 feeds dim 0)
    hook = RTCGuidance(torch.ones(1, 4, 2), torch.ones(4))
    noise = torch.randn(1, 4, 2) * torch.tensor([1.0, 0.0])
    out = euler_integrate(v, noise, 5, guidance=hook, mask=torch.tensor([[[1.0, 0.0]]]))
    assert torch.all(out[..., 1] == 0)


@pytest.mark.parametrize("delta", [False, True])
def test_rtc_target_is_in_the_models_space(delta):
    """Regression: the committed prefix was normalized as absolute actions with delta stats, and RTC never added the
    chunk-start state back. Mapping a predicted chunk into the model's space and back must give it unchanged."""
    policy = toy_policy(horizon=8, delta_actions=delta).eval()
    batch = {k: v for k, v in toy_batch(B=2, horizon=8).items() if k not in ("actions", "action_is_pad")}
    batch["state"] = batch["state"] + 5.46  # far from 0: a missing state offset cannot hide
    inp = policy.prepare_inputs(batch)
    chunk = policy.predict_chunk(batch, generator=torch.Generator().manual_seed(0))
    target, w = rtc_target(policy, chunk.numpy(), inp, exec_horizon=3, prefix_len=2)
    back = policy.space.unpad(policy.postprocess(target, inp), 0, "action")
    torch.testing.assert_close(back, chunk, rtol=0, atol=1e-4)
