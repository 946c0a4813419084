import pytest
import torch

from chunkpolicy.models.heads.configs import DiTConfig
from helpers import toy_batch, toy_policy
from test_policy import mode_fractions, train_two_mode


@pytest.mark.parametrize("opts", [{"objective": "diffusion"}, {"objective": "diffusion", "prediction": "sample"}, {"objective": "flow"}])
def test_padded_dims_and_steps_zero_gradient(opts):
    policy = toy_policy(DiTConfig(**opts, depth=2, hidden=32)).train()
    with torch.no_grad():  # the output layer starts at zero (adaLN-zero): give it weights so gradients reach the input
        for p in list(policy.head.action_out.parameters()) + list(policy.head.blocks.parameters()):
            p.normal_(0, 0.1)
    batch = toy_batch()
    batch["action_is_pad"][1, 3:] = True
    actions = batch["actions"].clone().requires_grad_(True)
    loss = policy.compute_loss(dict(batch, actions=actions), generator=torch.Generator().manual_seed(0))["loss"]
    loss.backward()
    assert torch.all(actions.grad[:, :, 3:] == 0) and torch.all(actions.grad[1, 3:] == 0)
    assert actions.grad[0, :, :3].abs().sum() > 0
    garbage = batch["actions"].clone()
    garbage[:, :, 3:] = 5e5
    garbage[1, 3:] = -1e4
    loss2 = policy.compute_loss(dict(batch, actions=garbage), generator=torch.Generator().manual_seed(0))["loss"]
    assert loss2.item() == loss.item()


@pytest.mark.parametrize("sampler", ["ddim", "dpmsolver"])
@pytest.mark.parametrize("steps", [1, 4, 10])
def test_samplers_run_with_configurable_steps(sampler, steps):
    policy = toy_policy(DiTConfig(sampler=sampler, depth=1, hidden=32)).eval()
    out = policy.predict_chunk(toy_batch(), num_steps=steps, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 6, 3) and torch.isfinite(out).all()


def test_bad_options():
    with pytest.raises(ValueError, match="objective"):
        toy_policy(DiTConfig(objective="score"))
    with pytest.raises(ValueError, match="sampler"):
        toy_policy({"type": "dit", "sampler": "euler"})


@pytest.mark.slow
@pytest.mark.parametrize("objective, samplers", [("diffusion", ("ddim", "dpmsolver")), ("flow", ("ddim",))])
def test_dit_learns_both_modes(objective, samplers):
    """Trained once per objective; every sampler of that objective decodes the same weights (training does not
    depend on the sampler)."""
    import dataclasses

    from chunkpolicy.models.policy import ChunkPolicy

    H = 4
    head = DiTConfig(objective=objective, sampler=samplers[0], depth=2, hidden=64, num_steps=10)
    policy, space, loss = train_two_mode(head, steps=300, H=H)
    for sampler in samplers:
        if sampler != samplers[0]:
            cfg = dataclasses.replace(policy.config, head=dataclasses.replace(head, sampler=sampler))
            other = ChunkPolicy(cfg, space, policy.normalizer.stats, tokenizer=policy.tokenizer)
            other.load_state_dict(policy.state_dict())
            policy = other
        up, down, middle = mode_fractions(policy, space, H)
        print(f"dit {objective}/{sampler} two-mode: +1 {up:.2f}, -1 {down:.2f}, near 0 {middle:.2f}, "
              f"final loss {loss.item():.3f}")
        assert up >= 0.2 and down >= 0.2 and middle <= 0.1, sampler


def test_siglip_variant_with_dit():
    """The `siglip` variant: vision tower + light language embedding, no Gemma layers; the DiT cross-attends to it."""
    policy = toy_policy(DiTConfig(depth=1, hidden=32), backbone_overrides={"variant": "siglip"})
    assert policy.backbone.num_layers == 0 and len(policy.backbone.layers) == 0
    with torch.no_grad():  # adaLN-zero starts the head at 0: give it weights so the prefix matters
        for p in list(policy.head.action_out.parameters()) + list(policy.head.blocks.parameters()):
            p.normal_(0, 0.1)
    batch = toy_batch()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    loss = policy.compute_loss(batch, g())["loss"]
    other = policy.compute_loss(dict(batch, images=torch.rand_like(batch["images"])), g())["loss"]
    assert loss.item() != other.item()  # the DiT sees the images through the siglip prefix
    loss.backward()
    assert policy.backbone.model.vision_tower.vision_model.embeddings.patch_embedding.weight.grad.abs().sum() > 0
    assert policy.eval().predict_chunk(batch, num_steps=2).shape == (3, 6, 3)
