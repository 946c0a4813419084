"""The head contract, checked for every head × objective × tokenizer (one parametrized test per property)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from chunkpolicy.models.heads.base import head_class
from chunkpolicy.models.heads.configs import head_config
from chunkpolicy.models.policy import ChunkPolicy
from chunkpolicy.runtime.executors import check_executor
from chunkpolicy.runtime.rtc import RTCGuidance, rtc_predict_fn, rtc_target
from helpers import toy_batch, toy_policy

H = 6
VARIANTS = {
    "flow_expert": ("flow_expert", {}),
    "dit-eps-ddim": ("dit", {"depth": 1, "hidden": 32, "prediction": "epsilon", "sampler": "ddim", "num_steps": 3}),
    "dit-sample-dpm": ("dit", {"depth": 1, "hidden": 32, "prediction": "sample", "sampler": "dpmsolver", "num_steps": 3}),
    "dit-flow": ("dit", {"depth": 1, "hidden": 32, "objective": "flow", "num_steps": 3}),
    "tokens-bins": ("tokens", {"tokenizer": "bins"}),
    "tokens-mulaw": ("tokens", {"tokenizer": "mulaw"}),
    "tokens-fast": ("tokens", {"tokenizer": "fast", "fast_vocab": 600}),
}
EXECUTORS = ("open_loop:2", "temporal_ensemble:0.01", "rtc:2,1")


def make(variant: str, **cfg) -> ChunkPolicy:
    name, opts = VARIANTS[variant]
    policy = toy_policy(head=head_config(name, opts), horizon=H, **cfg)
    if policy.head.caps.needs_data_fit:
        rng = np.random.default_rng(0)
        policy.head.fit_to_data([np.clip(rng.normal(0, 0.5, (H, 3)), -1, 1) for _ in range(64)])
    return policy


def obs(B: int = 2, offset: float = 0.0) -> dict:
    b = {k: v for k, v in toy_batch(B=B, horizon=H).items() if k not in ("actions", "action_is_pad")}
    b["state"] = b["state"] + offset * (b["state"] != 0)  # valid state dims only
    return b


@pytest.mark.parametrize("variant", VARIANTS)
def test_loss_ignores_invalid_dims_and_padded_steps(variant):
    """Values at invalid dims and padded steps change neither the loss nor any gradient (parameters and actions)."""
    policy = make(variant).train()
    with torch.no_grad():  # zero-initialised outputs (dit's adaLN-zero) would make every gradient trivially 0
        for prm in policy.head.parameters():
            if prm.ndim >= 2 and not prm.any():
                prm.normal_(0, 0.02)
    batch = toy_batch(B=3, horizon=H)
    batch["action_is_pad"][0, -2:] = True
    batch["action_is_pad"][2, -1:] = True
    results = []
    for junk in (0.0, 7.5):
        b = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
        a = b["actions"]
        a[:, :, 3:] = junk  # invalid unified dims (the toy robot has 3)
        a[b["action_is_pad"]] = junk
        a.requires_grad_(True)
        policy.zero_grad(set_to_none=True)
        loss = policy.compute_loss(b, generator=torch.Generator().manual_seed(0))["loss"]
        loss.backward()
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads, a.grad))
    (l0, g0, a0), (l1, g1, a1) = results
    assert torch.isfinite(l0) and g0, "the loss must train something"
    torch.testing.assert_close(l1, l0, rtol=0, atol=0)
    assert set(g0) == set(g1)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=0, atol=0, msg=n)
    if a0 is not None:  # differentiable targets (flow / diffusion); token targets are discrete
        ignored = torch.zeros_like(a0, dtype=torch.bool)
        ignored[:, :, 3:] = True
        ignored[batch["action_is_pad"]] = True
        assert torch.all(a0[ignored] == 0) and torch.all(a1[ignored] == 0)
        assert a0[~ignored].abs().sum() > 0


@pytest.mark.parametrize("variant", VARIANTS)
def test_save_load_bit_identical_and_chunk_shapes(variant, tmp_path):
    policy = make(variant).eval()
    o = obs()
    chunk = policy.predict_chunk(o, generator=torch.Generator().manual_seed(1))
    unified = policy.predict_unified(o, generator=torch.Generator().manual_seed(1))
    assert chunk.shape == (2, H, 3) and unified.shape == (2, H, 32)
    assert torch.all(unified[..., 3:] == 0), "invalid dims are exactly 0"
    if policy.head.caps.may_fail:  # a chunk is either produced (finite) or NaN on its valid dims, and flagged
        valid = policy.head.last_valid
        assert valid is not None and valid.shape == (2,)
        for i in range(2):
            assert bool(torch.isfinite(unified[i]).all()) == bool(valid[i]) and (valid[i] or torch.isnan(unified[i, :, :3]).all())
    else:
        assert torch.isfinite(unified).all()
    policy.save_pretrained(tmp_path / "ck")
    loaded = ChunkPolicy.from_pretrained(tmp_path / "ck").eval()
    s0, s1 = policy.state_dict(), loaded.state_dict()
    assert s0.keys() == s1.keys() and all(torch.equal(s0[k], s1[k]) for k in s0)
    assert loaded.head.state_files() == policy.head.state_files()
    again = loaded.predict_unified(o, generator=torch.Generator().manual_seed(1))
    assert torch.equal(torch.nan_to_num(again, nan=123.0), torch.nan_to_num(unified, nan=123.0))


@pytest.mark.parametrize("executor", EXECUTORS)
@pytest.mark.parametrize("variant", VARIANTS)
def test_each_executor_works_or_is_refused_up_front(variant, executor):
    policy = make(variant).eval()
    try:
        ex = check_executor(executor, policy.head.caps, variant)
    except ValueError as e:
        assert executor.startswith("rtc") and not policy.head.caps.velocity and "needs a head with velocity" in str(e)
        return
    assert not executor.startswith("rtc") or policy.head.caps.velocity
    o = obs(B=1)
    gen = torch.Generator().manual_seed(0)
    if executor.startswith("rtc"):
        predict = rtc_predict_fn(policy, exec_horizon=2, generator=gen)
    else:
        def predict(_obs, **_):
            chunk = policy.predict_chunk(o, generator=gen)
            # an invalid token decode comes back as NaN (never invented); evaluation substitutes a do-nothing chunk
            return torch.nan_to_num(chunk, nan=0.0) if policy.head.caps.may_fail else chunk
    ex.reset()
    acts = [ex.act(t, o, predict) for t in range(5)]
    assert all(a.shape == (1, 3) and np.isfinite(a).all() for a in acts)
    assert ex.num_predictions >= 2


@pytest.mark.parametrize("delta", [False, True])
@pytest.mark.parametrize("variant", [v for v, (n, o) in VARIANTS.items() if head_class(n).capabilities(head_config(n, o)).velocity])
def test_rtc_with_zero_guidance_equals_plain_sampling(variant, delta):
    """Regression: RTC re-implemented inference without the delta → absolute step (off by the state, 6.67 here)."""
    policy = make(variant, delta_actions=delta).eval()
    o = obs(offset=5.46)
    inp = policy.prepare_inputs(o)
    prev = policy.predict_chunk(o, generator=torch.Generator().manual_seed(3))[:, 2:]
    target, w = rtc_target(policy, prev.numpy(), inp, exec_horizon=2, prefix_len=1)
    noise = torch.randn(2, H, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        plain = policy.infer(inp, noise, 3)
        zero = policy.infer(inp, noise, 3, guidance=RTCGuidance(target, torch.zeros_like(w)))
    torch.testing.assert_close(zero, plain, rtol=0, atol=1e-5)
    # the executor's path (beta = 0 switches guidance off) equals the plain chunk in robot units
    guided = rtc_predict_fn(policy, beta=0.0, num_steps=3, exec_horizon=2, generator=torch.Generator().manual_seed(9))
    plain_chunk = policy.predict_chunk(o, num_steps=3, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(guided(o, prefix=prev.numpy(), prefix_len=1), plain_chunk, rtol=0, atol=1e-5)
    # and guidance does pull the frozen steps onto the committed prefix, in robot units, delta or not
    pulled = rtc_predict_fn(policy, beta=10.0, num_steps=3, exec_horizon=2, generator=torch.Generator().manual_seed(9))
    err_g = (pulled(o, prefix=prev.numpy(), prefix_len=1)[:, :1] - prev[:, :1]).abs().mean()
    err_p = (plain_chunk[:, :1] - prev[:, :1]).abs().mean()
    assert err_g < 0.5 * err_p, (err_g, err_p)


def test_guidance_is_refused_by_heads_without_velocity():
    policy = make("tokens-bins").eval()
    inp = policy.prepare_inputs(obs())
    hook = RTCGuidance(torch.zeros(2, H, 32), torch.zeros(H))
    with pytest.raises(ValueError, match="no flow velocity"):
        policy.infer(inp, torch.zeros(2, H, 32), guidance=hook)
    with pytest.raises(ValueError, match="flow velocity"):
        rtc_predict_fn(policy)


@pytest.mark.parametrize("norm", ["mean_std", "identity"])
def test_tokens_head_refuses_unbounded_action_normalization(norm):
    """Tokenizers quantize [-1, 1]: with mean_std about a third of real actions would be clipped."""
    with pytest.raises(ValueError, match=f"action_norm: the tokens head cannot represent '{norm}'"):
        make("tokens-bins", action_norm=norm)
