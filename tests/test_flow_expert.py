import numpy as np
import pytest
import torch

from chunkpolicy.models.backbone import Backbone
from chunkpolicy.models.backbone_config import backbone_config
from chunkpolicy.models.heads.base import build_head
from chunkpolicy.models.heads.configs import head_config
from helpers import toy_batch, toy_policy


def _prefix(policy, batch):
    emb, pout, prefix = policy._prefix(batch)
    return pout, prefix


def test_prefix_does_not_see_suffix_or_state():
    policy = toy_policy().eval()
    batch = toy_batch()
    pout, prefix = _prefix(policy, batch)
    # in one joint pass over [prefix | actions], the prefix's hidden states ignore the actions and tau
    x1, x2 = torch.randn(3, 6, 32), 10 * torch.randn(3, 6, 32)
    v1, pre1 = policy.head.joint_velocity(policy.backbone, prefix, x1, torch.full((3,), 0.3), return_prefix=True)
    v2, pre2 = policy.head.joint_velocity(policy.backbone, prefix, x2, torch.full((3,), 0.7), return_prefix=True)
    assert not torch.allclose(v1, v2)
    assert torch.equal(pre1, pre2)
    # image/text tokens ignore the state token
    b2 = dict(batch, state=batch["state"] + 5.0)
    pout2, _ = _prefix(policy, b2)
    n_before_state = prefix.embeds.shape[1] - 1
    torch.testing.assert_close(pout.hidden[:, :n_before_state], pout2.hidden[:, :n_before_state], rtol=0, atol=0)
    assert not torch.allclose(pout.hidden[:, -1], pout2.hidden[:, -1])
    for (k1, v1_), (k2, v2_) in zip(pout.kv, pout2.kv):
        assert torch.equal(k1[:, :, :n_before_state], k2[:, :, :n_before_state])


def test_cached_equals_joint_uncached():
    policy = toy_policy().eval()
    batch = toy_batch()
    batch["image_mask"][1, 1] = False  # masked camera and padded text are in play
    pout, prefix = _prefix(policy, batch)
    x, tau = torch.randn(3, 6, 32), torch.tensor([0.1, 0.5, 0.9])
    cached = policy.head.velocity(policy.backbone, pout, x, tau)
    joint = policy.head.joint_velocity(policy.backbone, prefix, x, tau)
    torch.testing.assert_close(cached, joint, rtol=0, atol=1e-5)
    # and the full sampler: cached loop vs a loop that recomputes everything jointly each step
    noise = torch.randn(3, 6, 32)
    amask = batch["action_mask"]
    fast = policy.head.sample(policy.backbone, pout, {"action_mask": amask}, noise=noise, num_steps=5)
    m = amask[:, None].float()
    x = noise * m
    for i in range(5):
        x = x + 0.2 * policy.head.joint_velocity(policy.backbone, prefix, x, torch.full((3,), i * 0.2)) * m
    torch.testing.assert_close(fast, x, rtol=0, atol=1e-5)


def test_padded_dims_and_steps_get_zero_gradient_and_do_not_change_the_loss():
    policy = toy_policy().train()
    batch = toy_batch()
    batch["action_is_pad"][0, 4:] = True
    batch["action_is_pad"][2, 1:] = True
    actions = batch["actions"].clone().requires_grad_(True)
    loss = policy.compute_loss(dict(batch, actions=actions), generator=torch.Generator().manual_seed(1))["loss"]
    loss.backward()
    g = actions.grad
    assert torch.all(g[:, :, 3:] == 0)  # invalid unified dims
    assert torch.all(g[0, 4:] == 0) and torch.all(g[2, 1:] == 0)  # padded steps
    assert g[:, :, :3][~batch["action_is_pad"]].abs().sum() > 0
    garbage = batch["actions"].clone()
    garbage[:, :, 3:] = 1e6
    garbage[0, 4:] = -7e5
    garbage[2, 1:, :3] = 3e4
    loss2 = policy.compute_loss(dict(batch, actions=garbage), generator=torch.Generator().manual_seed(1))["loss"]
    assert loss2.item() == loss.item()


def test_masked_camera_changes_nothing():
    policy = toy_policy().eval()
    batch = toy_batch()
    batch["image_mask"][:, 1] = False
    other = dict(batch, images=batch["images"].clone())
    other["images"][:, 1] = torch.rand_like(other["images"][:, 1])
    for b in (batch, other):
        b["_loss"] = policy.compute_loss(b, generator=torch.Generator().manual_seed(3))["loss"]
        b["_pred"] = policy.predict_chunk(b, generator=torch.Generator().manual_seed(4))
    assert batch["_loss"].item() == other["_loss"].item()
    assert torch.equal(batch["_pred"], other["_pred"])


def test_siglip_variant_rejects_flow_expert():
    bb = Backbone(backbone_config("tiny", variant="siglip"))
    with pytest.raises(ValueError, match="use the 'dit' head"):
        build_head("flow_expert", head_config("flow_expert"), bb, 4, 32)
