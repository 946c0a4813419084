"""CUDA-graph inference (plain and RTC-guided chunks) against eager. GPU only: on a CPU machine these skip; run them
on a GPU with ``pytest tests/test_graph_inference.py``."""

from __future__ import annotations

import pytest
import torch

from chunkpolicy.models.heads.configs import head_config
from chunkpolicy.runtime.graphs import CudaGraphPolicy
from chunkpolicy.runtime.rtc import RTCGuidance, rtc_predict_fn, rtc_target
from helpers import toy_batch, toy_policy

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
H = 8
HEADS = {"flow_expert": head_config("flow_expert"), "dit-flow": head_config("dit", {"objective": "flow", "depth": 2, "hidden": 32})}


def _obs(offset: float = 5.46) -> dict:
    b = {k: v for k, v in toy_batch(B=2, horizon=H).items() if k not in ("actions", "action_is_pad")}
    b["state"] = b["state"] + offset * (b["state"] != 0)
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in b.items()}


@cuda
def test_cuda_graph_refuses_heads_with_host_syncs():
    policy = toy_policy(head=head_config("dit", {"depth": 1, "hidden": 32}), horizon=H).cuda()  # diffusion objective
    with pytest.raises(ValueError, match="host syncs"):
        CudaGraphPolicy(policy, _obs())


@cuda
@pytest.mark.parametrize("delta", [False, True])
@pytest.mark.parametrize("head", HEADS)
def test_graphed_rtc_equals_eager(head, delta):
    policy = toy_policy(head=HEADS[head], horizon=H, delta_actions=delta).cuda().eval()
    obs = _obs()
    inp = policy.prepare_inputs(obs)
    prev = policy.predict_chunk(obs, generator=torch.Generator("cuda").manual_seed(0))[:, 3:]
    target, w = rtc_target(policy, prev.cpu().numpy(), inp, 3, 2)
    noise = torch.randn(2, H, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    with torch.no_grad():
        eager = policy.infer(inp, noise, 5, guidance=RTCGuidance(target, w))
        plain = policy.infer(inp, noise, 5)
    hook = RTCGuidance(torch.zeros_like(target), torch.zeros_like(w))
    graphed = CudaGraphPolicy(policy, obs, num_steps=5, guidance=hook)
    hook.set(target, w)
    torch.testing.assert_close(graphed(obs, noise=noise), eager, rtol=0, atol=1e-4)
    hook.set(target, torch.zeros_like(w))  # new values reach the captured graph; zero weights = plain sampling
    torch.testing.assert_close(graphed(obs, noise=noise), plain, rtol=0, atol=1e-4)
    # the executor's graphed path equals its eager path
    e = rtc_predict_fn(policy, exec_horizon=3, generator=torch.Generator("cuda").manual_seed(2))
    g = rtc_predict_fn(policy, exec_horizon=3, generator=torch.Generator("cuda").manual_seed(2), cuda_graph=True)
    torch.testing.assert_close(g(obs), e(obs), rtol=0, atol=1e-4)
    torch.testing.assert_close(g(obs, prefix=prev.cpu().numpy(), prefix_len=2), e(obs, prefix=prev.cpu().numpy(), prefix_len=2),
                               rtol=0, atol=1e-4)
