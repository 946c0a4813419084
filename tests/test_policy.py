import json

import numpy as np
import pytest
import torch

from chunkpolicy.cli import main as cli_main
from chunkpolicy.models.backbone import Backbone
from chunkpolicy.models.backbone_config import backbone_config
from chunkpolicy.models.heads.configs import DiTConfig, HeadConfig
from chunkpolicy.models.info import model_info
from chunkpolicy.models.policy import ChunkPolicy, PolicyConfig
from chunkpolicy.normalize import compute_stats
from chunkpolicy.spaces import EmbodimentSpec, UnifiedSpace
from helpers import toy_batch, toy_policy, toy_space, toy_stats


def test_predict_chunk_shape_units_and_padding():
    policy = toy_policy().eval()
    batch = toy_batch()
    out = policy.predict_chunk(batch, generator=torch.Generator().manual_seed(0))
    assert out.shape == (3, 6, 3)
    uni = policy.predict_unified(batch, generator=torch.Generator().manual_seed(0))
    assert torch.all(uni[..., 3:] == 0) and torch.equal(uni[..., :3], out)
    obs = {k: v for k, v in batch.items() if k not in ("actions", "action_is_pad", "action_mask")}
    assert policy.predict_chunk(obs, "toy", num_steps=2).shape == (3, 6, 3)


def test_save_load_round_trip_identical(tmp_path):
    policy = toy_policy().eval()
    batch = toy_batch()
    policy.save_pretrained(tmp_path / "ck")
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["config.json", "model.safetensors", "normalizer.json", "space.json", "tokenizer"]
    again = ChunkPolicy.from_pretrained(tmp_path / "ck").eval()
    noise = torch.randn(3, 6, 32)
    assert torch.equal(policy.predict_chunk(batch, noise=noise), again.predict_chunk(batch, noise=noise))
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    assert policy.compute_loss(batch, g())["loss"].item() == again.compute_loss(batch, g())["loss"].item()
    # saving over an existing checkpoint replaces it atomically; no temp dirs are left behind
    policy.save_pretrained(tmp_path / "ck")
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]


def test_checkpoint_errors(tmp_path):
    policy = toy_policy()
    policy.save_pretrained(tmp_path / "ck")
    # config that does not match the weights
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    cfg["policy"]["head"]["width"] = 48
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="weights do not match config.json: .*shape mismatch"):
        ChunkPolicy.from_pretrained(tmp_path / "ck")
    cfg["policy"]["head"]["bogus"] = 1
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"config.json: unknown options \['bogus'\] for head 'flow_expert'"):
        ChunkPolicy.from_pretrained(tmp_path / "ck")
    cfg["policy"]["head"] = {"type": "flow_expert"}
    cfg["format_version"] = 7
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format_version 7 is not supported"):
        ChunkPolicy.from_pretrained(tmp_path / "ck")
    cfg["format_version"] = 1
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    blob = (tmp_path / "ck" / "model.safetensors").read_bytes()
    (tmp_path / "ck" / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        ChunkPolicy.from_pretrained(tmp_path / "ck")
    (tmp_path / "ck" / "space.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        ChunkPolicy.from_pretrained(tmp_path / "ck")


def test_legacy_head_options_checkpoint_loads(tmp_path):
    """Checkpoints written before typed heads hold ``"head": NAME, "head_options": {...}`` in config.json."""
    policy = toy_policy(DiTConfig(depth=1, hidden=32)).eval()
    policy.save_pretrained(tmp_path / "ck")
    cfg = json.loads((tmp_path / "ck" / "config.json").read_text())
    assert cfg["policy"]["head"]["type"] == "dit"
    cfg["policy"]["head"] = "dit"
    cfg["policy"]["head_options"] = {"depth": 1, "hidden": 32}
    (tmp_path / "ck" / "config.json").write_text(json.dumps(cfg))
    again = ChunkPolicy.from_pretrained(tmp_path / "ck").eval()
    assert again.config == policy.config and isinstance(again.config.head, DiTConfig)
    noise = torch.randn(3, 6, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(policy.predict_chunk(toy_batch(), noise=noise), again.predict_chunk(toy_batch(), noise=noise))


def test_input_errors_name_the_field():
    policy = toy_policy()
    b = toy_batch()
    with pytest.raises(ValueError, match=r"state: expected \[3, T_obs, 32\]"):
        policy.compute_loss(dict(b, state=b["state"][..., :8]))
    with pytest.raises(ValueError, match=r"actions: expected \[3, 6, 32\]"):
        policy.compute_loss(dict(b, actions=b["actions"][:, :5]))
    bad = b["state"].clone()
    bad[0, 0, 1] = float("nan")
    with pytest.raises(ValueError, match="state: contains NaN or inf"):
        policy.compute_loss(dict(b, state=bad))
    with pytest.raises(ValueError, match="embodiment: ids"):
        policy.compute_loss(dict(b, embodiment=torch.tensor([0, 1, 0])))
    with pytest.raises(ValueError, match=r"embodiment: ids \[0, -1, 0\]"):
        policy.compute_loss(dict(b, embodiment=torch.tensor([0, -1, 0])))
    bad_im = b["images"].clone()
    bad_im[1, 0, 0, 2, 3, 4] = float("inf")
    with pytest.raises(ValueError, match="images: contains NaN or inf"):
        policy.compute_loss(dict(b, images=bad_im))
    with pytest.raises(ValueError, match="missing keys"):
        policy.compute_loss({k: v for k, v in b.items() if k != "prompt"})
    wrong_mask = b["action_mask"].clone()
    wrong_mask[:, 5] = True
    with pytest.raises(ValueError, match="action_mask: does not match"):
        policy.compute_loss(dict(b, action_mask=wrong_mask))
    with pytest.raises(ValueError, match="action_mask: does not match"):  # inference inputs without validate
        policy.prepare_inputs(dict(b, action_mask=wrong_mask))
    wrong_state = torch.ones(3, 32, dtype=torch.bool)
    with pytest.raises(ValueError, match="state_mask: does not match"):
        policy.validate(dict(b, state_mask=wrong_state), training=False)
    with pytest.raises(ValueError, match=r"state_mask: expected \(3, 32\)"):
        policy.validate(dict(b, state_mask=wrong_state[:, :5]), training=False)
    with pytest.raises(ValueError, match="unknown backbone preset 'huge'"):
        ChunkPolicy(PolicyConfig(backbone="huge"), toy_space(), toy_stats())
    with pytest.raises(ValueError, match="unknown head 'mlp'"):
        ChunkPolicy(PolicyConfig(head="mlp"), toy_space(), toy_stats())
    with pytest.raises(ValueError, match="unknown options"):
        ChunkPolicy(PolicyConfig(head={"type": "flow_expert", "depthh": 3}), toy_space(), toy_stats())
    with pytest.raises(KeyError, match="no 'action' stats"):
        ChunkPolicy(PolicyConfig(horizon=6), toy_space(), {"toy": {"state": toy_stats()["toy"]["state"]}}).compute_loss(b)


def test_modality_dropout_never_drops_everything():
    policy = toy_policy(modality_dropout=0.9).train()
    im = torch.ones(64, 2, dtype=torch.bool)
    am = torch.ones(64, 5, dtype=torch.bool)
    kept_im, kept_am = policy._modality_dropout(im, am, torch.Generator().manual_seed(0))
    assert (kept_im.any(1) | kept_am.any(1)).all()
    assert (~kept_im).any()  # it does drop


def test_transformers_paligemma_checkpoint_loads_with_identical_activations(tmp_path):
    from transformers import PaliGemmaForConditionalGeneration

    cfg = backbone_config("tiny")
    torch.manual_seed(0)
    hf = PaliGemmaForConditionalGeneration(cfg.to_hf()).eval()
    hf.save_pretrained(tmp_path / "pg")
    ours = Backbone(Backbone.config_from_pretrained(tmp_path / "pg"))
    ours.load_pretrained_weights(tmp_path / "pg")
    ours.eval()
    pix = torch.rand(2, 3, 32, 32) * 2 - 1
    ref = hf.model.get_image_features(pix).pooler_output
    torch.testing.assert_close(ours.model.get_image_features(pix).pooler_output, ref, rtol=0, atol=0)
    # LM hidden states: PaliGemma's Gemma attends bidirectionally over a prefix, as our prefix block does
    ids = torch.randint(0, 100, (2, 7))
    hf_hidden = hf.model.language_model(input_ids=ids).last_hidden_state
    from chunkpolicy.models.prefix import Prefix

    x = ours.embed_tokens(ids)
    pos = torch.arange(7)[None].repeat(2, 1)
    out = ours.encode_prefix(Prefix(x, torch.ones(2, 7, dtype=torch.bool), torch.zeros_like(pos), pos))
    torch.testing.assert_close(out.hidden, hf_hidden, rtol=1e-5, atol=1e-5)
    # mismatched sizes are a clear error
    small = Backbone(backbone_config("tiny", width=32, head_dim=8))
    with pytest.raises(ValueError, match="weights do not match backbone config"):
        small.load_pretrained_weights(tmp_path / "pg")


def test_paligemma_3b_flow_expert_parameter_count():
    info = model_info("paligemma-3b", "flow_expert")
    assert 3.1e9 < info["total"] < 3.5e9, info
    assert 0.38e9 < info["vision"] < 0.45e9 and 2.4e9 < info["language"] < 2.6e9 and 0.25e9 < info["head_params"] < 0.35e9
    assert cli_main(["model", "info", "--preset", "tiny", "--head", "flow_expert"]) == 0
    assert cli_main(["model", "info", "--preset", "nope", "--head", "flow_expert"]) == 2
    assert model_info("tiny", {"type": "dit", "depth": 2})["head"] == "dit"
    assert cli_main(["model", "info", "--preset", "tiny", "--head", "{type: dit, depth: 2}"]) == 0


def _two_mode_setup(horizon=4):
    spec = EmbodimentSpec("line", ("x",), ("x",), ("top",), 10.0)
    space = UnifiedSpace(32, "pad", embodiments=[spec])
    acts = np.concatenate([np.full((100, 1), 1.0), np.full((100, 1), -1.0)])
    stats = {"line": {"action": compute_stats(acts), "state": compute_stats(np.random.default_rng(0).normal(size=(50, 1)))}}
    return spec, space, stats


def two_mode_batch(space, B, horizon, g):
    sign = torch.where(torch.rand(B, generator=g) < 0.5, 1.0, -1.0)
    return {
        "images": torch.full((B, 1, 1, 3, 32, 32), 0.5),
        "image_mask": torch.ones(B, 1, dtype=torch.bool),
        "state": torch.zeros(B, 1, 32),
        "prompt": ["go around the obstacle"] * B,
        "embodiment": torch.zeros(B, dtype=torch.long),
        "actions": space.pad(sign[:, None, None].expand(B, horizon, 1).clone(), "line", "action"),
        "action_is_pad": torch.zeros(B, horizon, dtype=torch.bool),
    }


def mode_fractions(policy, space, horizon, n=64):
    policy.eval()
    obs = two_mode_batch(space, n, horizon, torch.Generator().manual_seed(1))
    obs = {k: v for k, v in obs.items() if k not in ("actions", "action_is_pad")}
    chunk = policy.predict_chunk(obs, generator=torch.Generator().manual_seed(2))[..., 0].mean(1)
    return float((chunk > 0.5).float().mean()), float((chunk < -0.5).float().mean()), float((chunk.abs() < 0.3).float().mean())


def train_two_mode(head: str | HeadConfig, steps: int = 250, H: int = 4):
    """Train a tiny policy (``head``: a name or a typed head config) on the two-mode task; returns (policy, space, last loss)."""
    spec, space, stats = _two_mode_setup(H)
    torch.manual_seed(0)
    policy = ChunkPolicy(PolicyConfig(backbone="tiny", head=head, horizon=H), space, stats)
    opt = torch.optim.AdamW(policy.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(0)
    policy.train()
    for _ in range(steps):
        loss = policy.compute_loss(two_mode_batch(space, 32, H, g), generator=g)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return policy, space, loss


@pytest.mark.slow
def test_flow_expert_learns_both_modes():
    H = 4
    policy, space, loss = train_two_mode("flow_expert", steps=250, H=H)
    up, down, middle = mode_fractions(policy, space, H)
    print(f"flow_expert two-mode: +1 {up:.2f}, -1 {down:.2f}, near 0 {middle:.2f}, final loss {loss.item():.3f}")
    assert up >= 0.2 and down >= 0.2 and middle <= 0.1


def test_delta_actions_are_made_absolute_at_inference():
    batch = toy_batch()
    plain = toy_policy().eval()
    delta = toy_policy(delta_actions=True).eval()
    delta.load_state_dict(plain.state_dict())
    noise = torch.randn(3, 6, 32)
    a, b = plain.predict_unified(batch, noise=noise), delta.predict_unified(batch, noise=noise)
    state = batch["state"][:, -1]
    # toy spec: actions (x, y, gripper), state (x, y): x and y are relative to the state, the gripper is absolute
    torch.testing.assert_close(b[..., 0], a[..., 0] + state[:, None, 0])
    torch.testing.assert_close(b[..., 1], a[..., 1] + state[:, None, 1])
    assert torch.equal(b[..., 2:], a[..., 2:])


def test_uint8_images_equal_float_images():
    policy = toy_policy().eval()
    batch = toy_batch()
    u8 = (batch["images"] * 255).round().to(torch.uint8)
    f32 = u8.float() / 255
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    a = policy.compute_loss(dict(batch, images=u8), g())["loss"]
    b = policy.compute_loss(dict(batch, images=f32), g())["loss"]
    assert a.item() == b.item()


def test_prompt_token_cache_matches_the_tokenizer_and_follows_a_tokenizer_swap():
    from chunkpolicy.models.tokenizer import build_char_tokenizer, tokenize_prompts

    policy = toy_policy()
    b = toy_batch()
    first = policy.prepare_inputs(b)
    again = policy.prepare_inputs(b)  # served from the cache
    ids, am = tokenize_prompts(policy.tokenizer, list(b["prompt"]), policy.config.max_prompt_tokens)
    assert torch.equal(again["input_ids"], ids) and torch.equal(again["attention_mask"], am)
    assert torch.equal(first["input_ids"], again["input_ids"])
    pick = dict(b, prompt=["pick it"] * len(b["prompt"]))
    before = policy.prepare_inputs(pick)["input_ids"]  # cached for the original tokenizer
    other = build_char_tokenizer()
    other.add_tokens(["pick"])  # a different tokenizer: the same prompt must be re-tokenized
    policy.tokenizer = other
    swapped = policy.prepare_inputs(pick)["input_ids"]
    ref, _ = tokenize_prompts(other, pick["prompt"], policy.config.max_prompt_tokens)
    assert torch.equal(swapped, ref) and not torch.equal(swapped, before)
