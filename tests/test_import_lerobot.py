"""``chunkpolicy model import --format lerobot-pi0 / lerobot-pi05``: a reduced-size LeRobot π0 / π0.5 with random
weights, written by LeRobot's own ``save_pretrained`` (see ``import_fixtures``), imported here, must give the same action
chunk for the same observation and initial noise (robot units, after both sides' normalization)."""

import json
import shutil

import pytest
import torch

pytest.importorskip("lerobot.policies.pi0.modeling_pi0")

from chunkpolicy.cli import main as cli_main  # noqa: E402
from chunkpolicy.models.importers import import_checkpoint  # noqa: E402
from chunkpolicy.models.policy import ChunkPolicy  # noqa: E402
from chunkpolicy.models.tokenizer import build_char_tokenizer  # noqa: E402
import import_fixtures as fx  # noqa: E402

TOL = 1e-4
TASKS = ["pick up the red cube", "open the drawer"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    build_char_tokenizer().save_pretrained(str(d))
    return d


def _source(kind, tmp_path_factory, tokenizer_dir, prompt_len):
    d = tmp_path_factory.mktemp(kind) / "src"
    from chunkpolicy.models.tokenizer import load_tokenizer
    policy, pre, post = fx.build_lerobot_policy(kind, d, tokenizer=load_tokenizer(tokenizer_dir), prompt_len=prompt_len)
    return d, policy, pre, post


@pytest.fixture(scope="module")
def pi0(tmp_path_factory, tokenizer_dir):
    return _source("pi0", tmp_path_factory, tokenizer_dir, 24)


@pytest.fixture(scope="module")
def pi05(tmp_path_factory, tokenizer_dir):
    return _source("pi05", tmp_path_factory, tokenizer_dir, 96)  # the state is in the prompt: longer prompts


def _observation(B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    imgs = torch.rand(B, 2, 3, fx.IMAGE, fx.IMAGE, generator=g)
    state = torch.randn(B, 8, generator=g) * 2
    noise = torch.randn(B, 6, 32, generator=g)
    return imgs, state, noise


def _compare(src, lerobot, pre, post, ours, drop_wrist=False):
    imgs, state, noise = _observation()
    batch = {"observation.images.top": imgs[:, 0], "observation.state": state, "task": list(TASKS)}
    if not drop_wrist:  # LeRobot: a missing camera is a -1 image with mask 0
        batch["observation.images.wrist"] = imgs[:, 1]
    with torch.no_grad():
        want = post(lerobot.predict_action_chunk(pre(batch), noise=noise.clone()))
    mask = torch.ones(2, 2, dtype=torch.bool)
    mask[:, 1] = not drop_wrist
    obs = {"images": imgs[:, :, None], "image_mask": mask, "state": ours.space.pad(state, 0, "state")[:, None],
           "prompt": list(TASKS), "embodiment": torch.zeros(2, dtype=torch.long)}
    got = ours.predict_chunk(obs, noise=noise.clone())
    assert got.shape == want.shape == (2, 6, 7)
    return (got - want).abs().max().item()


def test_pi0_same_chunk_as_lerobot(pi0, tokenizer_dir, tmp_path, capsys):
    src, lerobot, pre, post = pi0
    out = tmp_path / "ours"
    assert cli_main(["model", "import", str(src), str(out), "--format", "lerobot-pi0", "--tokenizer", str(tokenizer_dir),
                     "--embodiment", "arm", "--control-hz", "15"]) == 0
    text = capsys.readouterr().out
    assert "mapped 72 tensors" in text and "paligemma.lm_head.weight" in text and "vision_heads = 16" in text
    ours = ChunkPolicy.from_pretrained(out).eval()
    assert ours.space.embodiments[0].cameras == ("top", "wrist") and ours.space.embodiments[0].control_hz == 15.0
    assert ours.config.head.state_token == "expert" and ours.config.action_norm == "mean_std"
    diff = _compare(src, lerobot, pre, post, ours)
    print(f"pi0 max|diff| = {diff:.2e}")
    assert diff <= TOL
    diff = _compare(src, lerobot, pre, post, ours, drop_wrist=True)
    print(f"pi0 (wrist camera missing) max|diff| = {diff:.2e}")
    assert diff <= TOL
    # the source weights are unchanged in the checkpoint
    from safetensors.torch import load_file
    a, b = load_file(str(src / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert torch.equal(a["model.action_out_proj.weight"], b["head.action_out.weight"])
    assert torch.equal(a["model.paligemma_with_expert.paligemma.model.language_model.embed_tokens.weight"],
                       b["backbone.model.language_model.embed_tokens.weight"])
    # and it trains (the π0 state token is part of the expert)
    ours.train()
    imgs, state, _ = _observation()
    batch = {"images": imgs[:, :, None], "image_mask": torch.ones(2, 2, dtype=torch.bool),
             "state": ours.space.pad(state, 0, "state")[:, None], "prompt": list(TASKS),
             "embodiment": torch.zeros(2, dtype=torch.long), "actions": ours.space.pad(torch.randn(2, 6, 7), 0, "action"),
             "action_is_pad": torch.zeros(2, 6, dtype=torch.bool)}
    loss = ours.compute_loss(batch)["loss"]
    loss.backward()
    assert torch.isfinite(loss) and ours.head.state_proj.weight.grad is not None


def test_import_errors_name_the_problem(pi0, tokenizer_dir, tmp_path):
    src = pi0[0]
    with pytest.raises(ValueError, match="tokenizer"):
        import_checkpoint(src, tmp_path / "x", "lerobot-pi0")
    with pytest.raises(ValueError, match=r"config.json: type is 'pi0'"):
        import_checkpoint(src, tmp_path / "x", "lerobot-pi05", tokenizer=tokenizer_dir)
    with pytest.raises(ValueError, match="unknown import format"):
        import_checkpoint(src, tmp_path / "x", "openvla")
    bad = tmp_path / "bad"
    bad.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, use_relative_actions=True)))
    with pytest.raises(ValueError, match="use_relative_actions"):
        import_checkpoint(bad, tmp_path / "x", "lerobot-pi0", tokenizer=tokenizer_dir)
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        import_checkpoint(bad, tmp_path / "x", "lerobot-pi0", tokenizer=tokenizer_dir)
    for f in src.glob("policy_*processor*"):
        shutil.copy(f, bad / f.name)
    (bad / "model.safetensors").symlink_to(src / "model.safetensors")
    (bad / "policy_postprocessor_step_0_unnormalizer_processor.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="unnormalizer_processor"):
        import_checkpoint(bad, tmp_path / "x", "lerobot-pi0", tokenizer=tokenizer_dir)
    assert not (tmp_path / "x").exists()  # nothing half-written


def test_pi05_same_chunk_as_lerobot(pi05, tokenizer_dir, tmp_path):
    src, lerobot, pre, post = pi05
    report = import_checkpoint(src, tmp_path / "ours", "lerobot-pi05", tokenizer=tokenizer_dir)
    assert "state_in_prompt" in report.summary() and not any("state_proj" in d for _, d in report.mapped)
    ours = ChunkPolicy.from_pretrained(tmp_path / "ours").eval()
    assert ours.config.state_in_prompt and ours.config.head.time_conditioning == "adarms"
    assert ours.config.action_norm == ours.config.state_norm == "quantile"
    # the same prompt tokens as LeRobot's pre-processor (normalized state discretized into the prompt)
    imgs, state, _ = _observation()
    with torch.no_grad():
        proc = pre({"observation.images.top": imgs[:, 0], "observation.images.wrist": imgs[:, 1],
                    "observation.state": state, "task": list(TASKS)})
    obs = {"images": imgs[:, :, None], "image_mask": torch.ones(2, 2, dtype=torch.bool),
           "state": ours.space.pad(state, 0, "state")[:, None], "prompt": list(TASKS),
           "embodiment": torch.zeros(2, dtype=torch.long)}
    inp = ours.prepare_inputs(obs)
    assert torch.equal(inp["input_ids"], proc["observation.language.tokens"])
    assert torch.equal(inp["attention_mask"], proc["observation.language.attention_mask"].bool())
    diff = _compare(src, lerobot, pre, post, ours)
    print(f"pi05 max|diff| = {diff:.2e}")
    assert diff <= TOL
    # what the weights were trained with is recorded: an edited state_in_prompt is refused
    cj = tmp_path / "ours" / "config.json"
    doc = json.loads(cj.read_text())
    doc["policy"]["state_in_prompt"] = False
    cj.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="state_in_prompt"):
        ChunkPolicy.from_pretrained(tmp_path / "ours")


def test_pi0_exports_back_to_lerobot(pi0, tokenizer_dir, tmp_path):
    """A post-trained (here: perturbed) imported π0 written back in LeRobot's format runs in LeRobot with the same
    chunks; LeRobot loads it with its own from_pretrained and processor pipelines."""
    from lerobot.policies.pi0.modeling_pi0 import PI0Policy
    from lerobot.processor import PolicyProcessorPipeline

    from chunkpolicy.models.importers import export_lerobot_pi0
    from chunkpolicy.models.tokenizer import load_tokenizer

    src = pi0[0]
    _, ours = import_checkpoint(src, None, "lerobot-pi0", tokenizer=tokenizer_dir, return_policy=True)
    with torch.no_grad():
        ours.head.action_out.bias.add_(0.05)
        ours.backbone.model.language_model.layers[0].mlp.up_proj.weight.mul_(1.1)
    with pytest.raises(ValueError, match="sizes differ"):
        export_lerobot_pi0(ours, tmp_path / "lr")
    export_lerobot_pi0(ours, tmp_path / "lr", allow_nonstandard_sizes=True)
    with fx.reduced_sizes():
        back = PI0Policy.from_pretrained(tmp_path / "lr").eval()
    assert torch.equal(back.model.action_out_proj.bias, ours.head.action_out.bias)
    tok = load_tokenizer(tokenizer_dir)
    pre = PolicyProcessorPipeline.from_pretrained(tmp_path / "lr", config_filename="policy_preprocessor.json",
                                                  overrides={"tokenizer_processor": {"tokenizer": tok}})
    from lerobot.processor.converters import policy_action_to_transition, transition_to_policy_action
    post = PolicyProcessorPipeline.from_pretrained(tmp_path / "lr", config_filename="policy_postprocessor.json",
                                                   to_transition=policy_action_to_transition,
                                                   to_output=transition_to_policy_action)
    diff = _compare(src, back, pre, post, ours.eval())
    print(f"pi0 export max|diff| = {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("kind", ["pi0", "pi05"])
def test_bf16_as_close_to_fp32_as_lerobot(kind, pi0, pi05, tmp_path):
    """Both sides in bf16 (LeRobot with its own mixed-precision rules, as benchmarks/import_equivalence.py does), each
    against the fp32 chunk: ours strays no further than LeRobot's (it used to, ~2x: its normalization stats and the
    expert's action / time projections were cast to bf16, which LeRobot keeps fp32)."""
    import copy

    src, lerobot, pre, post = {"pi0": pi0, "pi05": pi05}[kind]
    ours = import_checkpoint(src, tmp_path / "ours", f"lerobot-{kind}", tokenizer=build_char_tokenizer(),
                             return_policy=True)[1].eval()
    g = torch.Generator().manual_seed(0)
    imgs, state = torch.rand(2, 2, 3, fx.IMAGE, fx.IMAGE, generator=g), torch.randn(2, 8, generator=g) * 2
    batch = {"observation.images.top": imgs[:, 0], "observation.images.wrist": imgs[:, 1], "observation.state": state,
             "task": list(TASKS)}
    obs = {"images": imgs[:, :, None], "image_mask": torch.ones(2, 2, dtype=torch.bool),
           "state": ours.space.pad(state, 0, "state")[:, None], "prompt": list(TASKS),
           "embodiment": torch.zeros(2, dtype=torch.long)}
    lr16 = fx.lerobot_to_bf16(copy.deepcopy(lerobot))
    ours16 = copy.deepcopy(ours).to(torch.bfloat16)
    err = {"ours": 0.0, "lerobot": 0.0}
    with torch.no_grad():
        for seed in range(4):
            noise = torch.randn(2, 6, 32, generator=torch.Generator().manual_seed(seed))
            want = post(lerobot.predict_action_chunk(pre(batch), noise=noise.clone()))
            lr_chunk = post(lr16.predict_action_chunk(pre(batch), noise=noise.clone())).float()
            err["lerobot"] += (lr_chunk - want).pow(2).mean().item() / 4
            err["ours"] += (ours16.predict_chunk(obs, noise=noise.clone()) - want).pow(2).mean().item() / 4
    rms = {k: v ** 0.5 for k, v in err.items()}
    print(f"{kind} bf16 rms vs fp32: {rms}")
    assert 0 < rms["ours"] <= 1.3 * rms["lerobot"], rms


def _openpi_layout(lerobot_dir, out, horizon=6):
    """The layout openpi's converter writes, from the LeRobot checkpoint (LeRobot's pi0 is a port of openpi's
    PI0Pytorch): keys without "model.", its config.json and assets/<id>/norm_stats.json (no min/max, as openpi)."""
    from safetensors.torch import load_file, save_file

    out.mkdir(parents=True)
    sd = load_file(str(lerobot_dir / "model.safetensors"))
    save_file({k[len("model."):]: v for k, v in sd.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps({"action_dim": 32, "action_horizon": horizon, "precision": "float32",
                                                 "paligemma_variant": "gemma_2b", "action_expert_variant": "gemma_300m"}))
    pre = load_file(str(next(lerobot_dir.glob("policy_preprocessor_step_*_normalizer_processor.safetensors"))))
    post = load_file(str(next(lerobot_dir.glob("policy_postprocessor_step_*_unnormalizer_processor.safetensors"))))
    pick = lambda st, f: {s: st[f"{f}.{s}"].tolist() for s in ("mean", "std", "q01", "q99")}  # noqa: E731
    (out / "assets" / "tiny").mkdir(parents=True)
    (out / "assets" / "tiny" / "norm_stats.json").write_text(json.dumps(
        {"norm_stats": {"state": pick(pre, "observation.state"), "actions": pick(post, "action")}}))
    return out


@pytest.mark.parametrize("kind", ["pi0", "pi05"])
def test_openpi_layout_same_chunk(kind, pi0, pi05, tokenizer_dir, tmp_path):
    src, lerobot, pre, post = pi0 if kind == "pi0" else pi05
    d = _openpi_layout(src, tmp_path / "openpi")
    with pytest.raises(ValueError, match="cameras"):
        import_checkpoint(d, None, f"openpi-{kind}", tokenizer=tokenizer_dir)
    assert cli_main(["model", "import", str(d), str(tmp_path / "ours"), "--format", f"openpi-{kind}", "--tokenizer",
                     str(tokenizer_dir), "--cameras", "top,wrist", "--control-hz", "5"]) == 0
    ours = ChunkPolicy.from_pretrained(tmp_path / "ours").eval()  # prompt length: openpi's default (48 / 200 tokens)
    assert ours.config.max_prompt_tokens == (48 if kind == "pi0" else 200)  # padding is masked: same numbers
    diff = _compare(src, lerobot, pre, post, ours)
    print(f"openpi-{kind} max|diff| = {diff:.2e}")
    assert diff <= TOL
