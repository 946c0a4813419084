import numpy as np
import pytest
import torch

from chunkpolicy.models.heads.configs import TokensConfig
from chunkpolicy.models.policy import ChunkPolicy, PolicyConfig
from helpers import toy_batch, toy_policy
from test_policy import _two_mode_setup, two_mode_batch


def test_loss_only_on_action_tokens_and_padding_ignored():
    policy = toy_policy(TokensConfig(tokenizer="bins")).train()
    batch = toy_batch()
    batch["action_is_pad"][0, 3:] = True
    loss = policy.compute_loss(batch)["loss"]
    garbage = batch["actions"].clone()
    garbage[0, 3:] = 100.0  # padded steps
    garbage[:, :, 3:] = -50.0  # invalid dims
    assert policy.compute_loss(dict(batch, actions=garbage))["loss"].item() == loss.item()
    ids, w = policy.head._targets(policy_batch(policy, batch))
    assert ids[0, 0] == policy.head.act_id and (ids >= policy.head.base).all()
    assert w[0, 0] == 0  # the <act> prompt token is never a target
    assert w[0].sum() == 3 * 3 + 1  # 3 real steps x 3 dims + <end>


def policy_batch(policy, batch):
    emb = batch["embodiment"]
    return {"actions": policy.normalizer.normalize("action", batch["actions"], emb), "action_mask": batch["action_mask"],
            "action_is_pad": batch["action_is_pad"]}


@pytest.mark.parametrize("name", ["bins", "fast"])
def test_cached_greedy_equals_uncached(name):
    policy = toy_policy(TokensConfig(tokenizer=name)).eval()
    batch = toy_batch()
    if name == "fast":
        rng = np.random.default_rng(0)
        policy.head.fit_to_data([rng.uniform(-1, 1, (6, 3)) for _ in range(50)])
    _, pout, _ = policy._prefix(batch)
    fast = policy.head.generate(policy.backbone, pout, 12, use_cache=True)
    slow = policy.head.generate(policy.backbone, pout, 12, use_cache=False)
    assert torch.equal(fast, slow)


def test_invalid_decodes_are_counted_not_hidden():
    policy = toy_policy("tokens").eval()  # untrained: greedy output is not a valid chunk
    out = policy.predict_unified(toy_batch())
    head = policy.head
    assert head.last_valid is not None and head.last_invalid_count == int((~head.last_valid).sum())
    assert head.last_invalid_count > 0
    assert out.shape == (3, 6, 32)


def test_fast_tokenizer_saved_with_checkpoint(tmp_path):
    policy = toy_policy(TokensConfig(tokenizer="fast"))
    rng = np.random.default_rng(0)
    policy.head.fit_to_data([rng.uniform(-1, 1, (6, 3)) for _ in range(50)])
    policy.save_pretrained(tmp_path / "ck")
    again = ChunkPolicy.from_pretrained(tmp_path / "ck")
    chunk = rng.uniform(-1, 1, (6, 3))
    assert again.head.tokenizer.encode(chunk) == policy.head.tokenizer.encode(chunk)


@pytest.mark.slow
def test_tokens_head_trains_to_low_loss_and_decodes():
    H = 4
    spec, space, stats = _two_mode_setup(H)
    torch.manual_seed(0)
    policy = ChunkPolicy(PolicyConfig(backbone="tiny", head=TokensConfig(tokenizer="bins"), horizon=H), space, stats)
    opt = torch.optim.AdamW(policy.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    policy.train()
    first = None
    for step in range(150):
        b = two_mode_batch(space, 16, H, g)
        b["actions"][:] = space.pad(torch.full((16, H, 1), 1.0), "line", "action")  # deterministic task: always +1
        out = policy.compute_loss(b)
        first = first if first is not None else out["loss"].item()
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
    print(f"tokens(bins): loss {first:.3f} -> {out['loss'].item():.4f}, token accuracy {out['token_accuracy'].item():.2f}")
    assert out["loss"].item() < 0.05 and out["token_accuracy"].item() == 1.0
    policy.eval()
    obs = {k: v for k, v in two_mode_batch(space, 4, H, g).items() if k not in ("actions", "action_is_pad")}
    pred = policy.predict_chunk(obs)
    assert policy.head.last_invalid_count == 0
    assert torch.allclose(pred, torch.ones_like(pred), atol=1 / 256 * 2)  # q99 maps to the top bin
