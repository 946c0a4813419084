"""The flow_expert options that let π0 / π0.5 checkpoints run unchanged (state token in the expert, openpi time,
noisy invalid dims, adaRMS time conditioning): cached sampling = one joint pass, checkpoints round-trip, training runs,
and the defaults keep the old behaviour."""

import json

import pytest
import torch

from chunkpolicy.models.heads.configs import FlowExpertConfig
from chunkpolicy.models.policy import ChunkPolicy
from helpers import toy_batch, toy_policy

PI0 = FlowExpertConfig(state_token="expert", time_convention="openpi", invalid_dims="noise")
PI05 = FlowExpertConfig(state_token="none", time_convention="openpi", invalid_dims="noise", time_conditioning="adarms")


def _randomize_norms(policy):
    """Norm weights and adaRMS projections start at zero; make them matter."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in policy.head.named_parameters():
            if "layernorm" in name or name.startswith("norm"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _inputs(policy, batch):
    inp = policy.prepare_inputs(batch)
    pout = policy.encode(inp)
    _, prefix = policy._encode(inp, inp["image_mask"], inp["attention_mask"])
    state = policy._head_state(inp) if policy.head.caps.embeds_state else None
    return inp, pout, prefix, state


@pytest.mark.parametrize("cfg", [PI0, PI05], ids=["pi0", "pi05"])
def test_cached_sampling_equals_joint_passes(cfg):
    policy = toy_policy(head=cfg).eval()
    _randomize_norms(policy)
    batch = toy_batch()
    batch["image_mask"][1, 1] = False
    inp, pout, prefix, state = _inputs(policy, batch)
    head, bb = policy.head, policy.backbone
    assert bb.state_token is False and not hasattr(bb.state_proj, "bias")  # no state token in the prefix
    x, tau = torch.randn(3, 6, 32), torch.tensor([0.1, 0.5, 0.9])
    with torch.no_grad():
        cached = head.velocity(bb, pout, x, tau, state=state)
        joint = head.joint_velocity(bb, prefix, x, tau, state=state)
        torch.testing.assert_close(cached, joint, rtol=0, atol=1e-5)
        buffered = head.velocity(bb, pout, x, tau, cache=head.suffix_cache(bb, pout, buffers=True, state=state))
        torch.testing.assert_close(buffered, joint, rtol=0, atol=1e-5)
        noise = torch.randn(3, 6, 32)
        hb = {"action_mask": inp["action_mask"]} | ({"state": state} if state is not None else {})
        fast = head.sample(bb, pout, hb, noise=noise, num_steps=4)
        xx = noise.clone()  # invalid_dims="noise": every dim is integrated, invalid ones zeroed only at the end
        for i in range(4):
            xx = xx + 0.25 * head.joint_velocity(bb, prefix, xx, torch.full((3,), i * 0.25), state=state)
    m = inp["action_mask"][:, None].float()
    torch.testing.assert_close(fast, xx * m, rtol=0, atol=1e-5)
    assert (fast[~inp["action_mask"][:, None].expand_as(fast)] == 0).all()


def test_openpi_time_convention_is_the_mirror_of_ours():
    """time_convention='openpi' feeds 1 − τ and negates the output: with the same weights, v_openpi(x, τ) = −v_tau(x, 1 − τ)."""
    a = toy_policy(head=FlowExpertConfig()).eval()
    b = toy_policy(head=FlowExpertConfig(time_convention="openpi")).eval()
    b.load_state_dict(a.state_dict())
    inp, pout, _, _ = _inputs(a, toy_batch())
    x, tau = torch.randn(3, 6, 32), torch.tensor([0.0, 0.3, 0.8])
    with torch.no_grad():
        torch.testing.assert_close(b.head.velocity(b.backbone, pout, x, tau), -a.head.velocity(a.backbone, pout, x, 1 - tau),
                                   rtol=0, atol=1e-6)


def test_pi0_state_token_changes_actions_and_trains(tmp_path):
    policy = toy_policy(head=PI0)
    batch = toy_batch()
    out = policy.compute_loss(batch)["loss"]
    out.backward()
    assert policy.head.state_proj.weight.grad.abs().sum() > 0  # the state reaches the loss through the expert
    assert all(p.grad is None for n, p in policy.backbone.named_parameters() if "state_proj" in n)
    policy.eval()
    noise = torch.randn(3, 6, 32)
    a1 = policy.predict_unified(batch, noise=noise)
    a2 = policy.predict_unified(dict(batch, state=batch["state"] + 1.0), noise=noise)
    assert not torch.allclose(a1, a2)
    policy.save_pretrained(tmp_path / "ck")
    again = ChunkPolicy.from_pretrained(tmp_path / "ck").eval()
    assert torch.equal(again.predict_unified(batch, noise=noise), a1)


def test_pi05_adarms_time_reaches_the_norms_and_trains():
    policy = toy_policy(head=PI05)
    loss = policy.compute_loss(toy_batch())["loss"]
    loss.backward()
    assert policy.head.layers[0].input_layernorm.dense.weight.grad.abs().sum() > 0
    assert not hasattr(policy.head, "state_proj")
    with pytest.raises(NotImplementedError, match="adarms"):
        policy.head.fused_layers()


def test_defaults_unchanged_and_old_checkpoints_load(tmp_path):
    """A checkpoint written before the options existed (no such fields recorded) still loads: missing fields at their
    defaults are not a disagreement."""
    policy = toy_policy()
    assert policy.backbone.state_token and isinstance(policy.backbone.state_proj, torch.nn.Linear)
    policy.save_pretrained(tmp_path / "ck")
    cj = tmp_path / "ck" / "config.json"
    doc = json.loads(cj.read_text())
    for k in ("state_token", "time_convention", "invalid_dims", "time_conditioning"):
        doc["policy"]["head"].pop(k)
    cj.write_text(json.dumps(doc))
    from safetensors.torch import load_file, save_file
    wf = tmp_path / "ck" / "model.safetensors"
    from safetensors import safe_open
    with safe_open(str(wf), framework="pt") as f:
        meta = dict(f.metadata())
    rec = json.loads(meta["built_for"])
    for k in ("state_token", "time_convention", "invalid_dims", "time_conditioning"):
        rec["head"].pop(k)
    meta["built_for"] = json.dumps(rec)
    save_file(load_file(str(wf)), str(wf), metadata=meta)
    ChunkPolicy.from_pretrained(tmp_path / "ck")
    # a recorded option that disagrees is still refused
    doc["policy"]["head"]["state_token"] = "expert"
    cj.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="state_token"):
        ChunkPolicy.from_pretrained(tmp_path / "ck")


def test_bad_options_are_named():
    with pytest.raises(ValueError, match="state_token"):
        FlowExpertConfig(state_token="suffix")
    with pytest.raises(ValueError, match="time_conditioning"):
        toy_policy(head=FlowExpertConfig(state_token="expert", time_conditioning="adarms"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("cfg", [PI0, PI05], ids=["pi0", "pi05"])
@pytest.mark.parametrize("compile_", [False, True], ids=["graph", "compile"])
def test_cuda_graph_chunk_equals_eager(cfg, compile_):
    """GPU only: the whole-chunk CUDA graph (and torch.compile inside it) over the π0 / π0.5 layouts = eager."""
    from chunkpolicy.runtime.graphs import CudaGraphPolicy

    policy = toy_policy(head=cfg, horizon=8).cuda().eval()
    _randomize_norms(policy)
    b = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in toy_batch(B=2, horizon=8).items()
         if k not in ("actions", "action_is_pad")}
    noise = torch.randn(2, 8, 32, device="cuda", generator=torch.Generator("cuda").manual_seed(1))
    eager = policy.predict_unified(b, noise=noise, num_steps=5)
    graphed = CudaGraphPolicy(policy, b, num_steps=5, compile=compile_)
    torch.testing.assert_close(graphed(b, noise=noise), eager, rtol=0, atol=1e-4)
