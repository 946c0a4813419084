"""Inference speed paths keep the numbers: fused projections, the preallocated suffix KV, keys/values-only prefix,
torch.compile, gradient checkpointing; and the flow expert leaves no trainable parameter without a gradient."""

import pytest
import torch
from torch import nn

from chunkpolicy.models.attention import attend, attend_few, finish, qkv
from chunkpolicy.models.fused import FusedLayer
from chunkpolicy.models.masks import mask_bias
from chunkpolicy.runtime.rtc import RTCGuidance, rtc_target
from helpers import toy_batch, toy_policy


def _obs(B=3, horizon=6, seed=0, square=False):
    obs = {k: v for k, v in toy_batch(B=B, horizon=horizon, seed=seed).items() if k not in ("actions", "action_is_pad")}
    if square:  # the tiny preset's 32x32: no resize (CPU antialiasing has no bf16 kernel)
        obs["images"] = torch.rand(B, obs["images"].shape[1], 1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
    return obs


def _randomize_norms(policy, seed=0):
    """Gemma norms start at w = 0 (scale 1); give them values so a wrong norm scale cannot pass unnoticed."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "layernorm" in name or name.endswith("norm.weight"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def test_fused_layer_matches_the_transformers_layer():
    policy = toy_policy().eval()
    _randomize_norms(policy)
    layer = policy.backbone.layers[0]
    fused = FusedLayer(layer)
    x = torch.randn(2, 5, policy.backbone.width)
    pos = torch.arange(5)[None].repeat(2, 1)
    cos, sin = policy.backbone.rope(x, pos)
    mask = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    with torch.no_grad():
        ref = qkv(layer, x, cos, sin)
        got = qkv(fused, x, cos, sin)
        for a, b in zip(ref, got):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
        a_ref = attend(layer, *ref, mask)
        torch.testing.assert_close(attend(fused, *got, mask), a_ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(finish(fused, x, a_ref), finish(layer, x, a_ref), rtol=0, atol=1e-5)
        # a snapshot: weights changed afterwards are not seen until refresh()
        layer.mlp.up_proj.weight.mul_(2.0)
        assert not torch.allclose(finish(fused, x, a_ref), finish(layer, x, a_ref), atol=1e-4)
        fused.refresh(layer)
        torch.testing.assert_close(finish(fused, x, a_ref), finish(layer, x, a_ref), rtol=0, atol=1e-5)


def test_fused_vision_layers_match_the_transformers_tower():
    policy = toy_policy().eval()
    bb = policy.backbone
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in bb.model.vision_tower.named_parameters():  # LayerNorm 1/0 and zero biases would hide mistakes
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        pix = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
        ref = bb.image_features(pix)
        fused = bb.fused_vision_layers()
        torch.testing.assert_close(bb.image_features(pix, fused), ref, rtol=0, atol=1e-5)
        bb.model.vision_tower.vision_model.encoder.layers[0].mlp.fc1.bias.add_(1.0)
        assert not torch.allclose(bb.image_features(pix, fused), bb.image_features(pix), atol=1e-4)
        fused[0].refresh(bb.model.vision_tower.vision_model.encoder.layers[0])
        torch.testing.assert_close(bb.image_features(pix, fused), bb.image_features(pix), rtol=0, atol=1e-5)


def test_fused_layer_refuses_wrapped_projections():
    policy = toy_policy()
    layer = policy.backbone.layers[0]

    class Wrapped(nn.Module):  # stands in for a LoRA-wrapped projection
        def __init__(self, base):
            super().__init__()
            self.base_layer = base

    layer.self_attn.q_proj = Wrapped(layer.self_attn.q_proj)
    with pytest.raises(ValueError, match="merge LoRA"):
        FusedLayer(layer)


def test_attend_few_matches_sdpa():
    g = torch.Generator().manual_seed(0)
    q, k, v = torch.randn(2, 4, 6, 8, generator=g), torch.randn(2, 1, 11, 8, generator=g), torch.randn(2, 1, 11, 8, generator=g)
    valid = torch.ones(2, 11, dtype=torch.bool)
    valid[0, 3:5] = False
    bias = torch.zeros(2, 11).masked_fill(~valid, float("-inf"))[:, None, None]
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None], scale=0.3, enable_gqa=True)
    got = attend_few(q.transpose(1, 2), k, v, bias, 0.3)
    torch.testing.assert_close(got, ref.transpose(1, 2).reshape(2, 6, 32), rtol=0, atol=1e-6)
    # grouped-query (2 KV heads for 4 query heads) and a per-query mask
    k2, v2 = torch.randn(2, 2, 11, 8, generator=g), torch.randn(2, 2, 11, 8, generator=g)
    mask = torch.rand(2, 1, 6, 11, generator=g) > 0.3
    mask[..., 0] = True
    ref = torch.nn.functional.scaled_dot_product_attention(q, k2, v2, attn_mask=mask, scale=0.3, enable_gqa=True)
    got = attend_few(q.transpose(1, 2), k2, v2, mask_bias(mask), 0.3)
    torch.testing.assert_close(got, ref.transpose(1, 2).reshape(2, 6, 32), rtol=0, atol=1e-6)


def test_kv_only_prefix_gives_the_same_keys_values():
    policy = toy_policy().eval()
    inp = policy.prepare_inputs(_obs())
    full, _ = policy._encode(inp, inp["image_mask"], inp["attention_mask"])
    kv_only, _ = policy._encode(inp, inp["image_mask"], inp["attention_mask"], hidden=False)
    assert kv_only.hidden is None and full.hidden is not None
    for (k1, v1), (k2, v2) in zip(full.kv, kv_only.kv):
        assert torch.equal(k1, k2) and torch.equal(v1, v2)
    with torch.no_grad():  # inference attends with explicit matmuls instead of SDPA: same numbers
        fast, _ = policy._encode(inp, inp["image_mask"], inp["attention_mask"])
    torch.testing.assert_close(fast.hidden, full.hidden, rtol=0, atol=1e-5)
    for (k1, v1), (k2, v2) in zip(full.kv, fast.kv):
        torch.testing.assert_close(k2, k1, rtol=0, atol=1e-5)
        torch.testing.assert_close(v2, v1, rtol=0, atol=1e-5)


def test_preallocated_suffix_kv_equals_concatenation():
    policy = toy_policy().eval()
    _randomize_norms(policy)
    batch = _obs()
    batch["image_mask"][1, 1] = False  # masked keys in play
    inp = policy.prepare_inputs(batch)
    pout, prefix = policy._encode(inp, inp["image_mask"], inp["attention_mask"], hidden=False)
    x, tau = torch.randn(3, 6, 32), torch.tensor([0.1, 0.5, 0.9])
    head = policy.head
    with torch.no_grad():
        cache = head.suffix_cache(policy.backbone, pout)
        assert cache.keys is not None
        buffered = head.velocity(policy.backbone, pout, x, tau, cache=cache)
        again = head.velocity(policy.backbone, pout, x + 1.0, tau, cache=cache)  # the tail is overwritten each step
        joint = head.joint_velocity(policy.backbone, prefix, x + 1.0, tau)
    concatenated = head.velocity(policy.backbone, pout, x, tau)  # gradients on: concatenation path
    torch.testing.assert_close(buffered, concatenated, rtol=0, atol=1e-5)
    torch.testing.assert_close(again, joint, rtol=0, atol=1e-5)


def test_fused_inference_matches_eager():
    policy = toy_policy().eval()
    _randomize_norms(policy)
    inp = policy.prepare_inputs(_obs())
    noise = torch.randn(3, 6, 32)
    with torch.no_grad():
        ref = policy.infer(inp, noise, num_steps=4)
        got = policy.infer(inp, noise, num_steps=4, fused=policy.fused_layers())
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-5)


def test_compiled_bf16_fused_inference_matches_eager_within_bf16_tolerance():
    """What CudaGraphPolicy(compile=True) runs, minus the graph: Inductor-compiled embed/encode/velocity over fused
    bf16 weights, against the eager unfused bf16 path."""
    from chunkpolicy.runtime.graphs import compile_policy_methods, compiled_methods

    policy = toy_policy(horizon=4).eval()
    _randomize_norms(policy)
    policy = policy.to(torch.bfloat16)
    inp = policy.prepare_inputs(_obs(B=1, horizon=4, square=True))
    noise = torch.randn(1, 4, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        ref32 = toy_policy(horizon=4).eval()
        _randomize_norms(ref32)
        exact = ref32.infer(ref32.prepare_inputs(_obs(B=1, horizon=4, square=True)), noise.float(), num_steps=3)
        ref = policy.infer(inp, noise, num_steps=3)
        with compiled_methods(policy, compile_policy_methods(policy)):
            got = policy.infer(inp, noise, num_steps=3, fused=policy.fused_layers())
    assert "velocity" not in vars(policy.head) and "encode_prefix" not in vars(policy.backbone)  # methods restored
    # the compiled bf16 path is as close to the fp32 result as the eager bf16 path is (bf16 rounding, nothing more)
    tol = 2 * (ref - exact).abs().max().item() + 1e-2
    assert (got - exact).abs().max().item() <= tol
    torch.testing.assert_close(got, ref, rtol=0, atol=tol)


def test_every_trainable_parameter_gets_a_gradient():
    """The expert reads only the prefix keys/values; what it never reaches is frozen, so DDP needs no unused search."""
    policy = toy_policy().train()
    frozen = {n for n, p in policy.named_parameters() if not p.requires_grad}
    lm = "backbone.model.language_model."
    last = f"{lm}layers.{policy.backbone.num_layers - 1}."
    assert frozen == {f"{lm}norm.weight", f"{last}post_attention_layernorm.weight"} | {
        f"{last}{m}.weight" for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    policy.compute_loss(toy_batch(), generator=torch.Generator().manual_seed(0))["loss"].backward()
    missing = [n for n, p in policy.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    grads = []
    for ckpt in (False, True):
        policy = toy_policy().train()
        policy.backbone.set_gradient_checkpointing(ckpt)
        loss = policy.compute_loss(toy_batch(), generator=torch.Generator().manual_seed(0))["loss"]
        loss.backward()
        grads.append((loss.item(), {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}))
    (l0, g0), (l1, g1) = grads
    assert l0 == pytest.approx(l1, abs=1e-6) and set(g0) == set(g1)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-4, atol=1e-6)


def test_guided_infer_with_fused_layers_equals_the_modules():
    policy = toy_policy(horizon=8).eval()
    obs = _obs(B=2, horizon=8)
    inp = policy.prepare_inputs(obs)
    prev = policy.predict_chunk(obs, generator=torch.Generator().manual_seed(0))[:, 3:]
    target, w = rtc_target(policy, prev.numpy(), inp, 3, 2)
    noise = torch.randn(2, 8, 32)
    with torch.no_grad():
        got = policy.infer(inp, noise, 5, guidance=RTCGuidance(target, w))
        fused = policy.infer(inp, noise, 5, fused=policy.fused_layers(), guidance=RTCGuidance(target, w))
    torch.testing.assert_close(fused, got, rtol=0, atol=1e-4)


