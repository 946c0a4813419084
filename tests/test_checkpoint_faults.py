"""Fault injection on checkpoints and evaluation inputs (issue 14, cases 5 and 9).

An edited ``config.json`` (horizon, n_obs_steps, delta_actions, action_norm, head options) is refused naming the file
and the field; untouched and older checkpoints (without the recorded fields) load; a tokenizer that needs custom code
is refused without a prompt and without running the code; eval refuses an image size other than the training data's
and accepts a run directory for ``--checkpoint``.
"""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from chunkpolicy.models.heads.configs import DiTConfig
from chunkpolicy.models.policy import ChunkPolicy
from chunkpolicy.models.tokenizer import build_char_tokenizer, load_tokenizer
from helpers import toy_batch, toy_policy

REPO = Path(__file__).resolve().parents[1]


def _edit(ck: Path, name: str, fn) -> None:
    doc = json.loads((ck / name).read_text())
    fn(doc)
    (ck / name).write_text(json.dumps(doc))


def _set_policy(field, value):
    def fn(doc):
        doc["policy"][field] = value
    return fn


def _strip_new_fields(ck: Path) -> None:
    """Make ``ck`` look like a checkpoint written before the cross-check records existed."""
    with safe_open(str(ck / "model.safetensors"), framework="pt") as f:
        meta = dict(f.metadata())
    assert "built_for" in meta
    state = load_file(str(ck / "model.safetensors"))
    save_file(state, str(ck / "model.safetensors"), metadata={"format_version": meta["format_version"]})
    _edit(ck, "normalizer.json", lambda d: d.pop("delta_actions"))
    _edit(ck, "config.json", lambda d: d.pop("trained_on", None))


def _predict(policy, horizon):
    b = toy_batch(B=2, horizon=horizon)
    return policy.eval().predict_unified(b, noise=torch.randn(2, horizon, 32, generator=torch.Generator().manual_seed(1)))


# -- config.json edits ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head", ["flow_expert", "dit"])
@pytest.mark.parametrize("field, value, where", [
    ("horizon", 8, r"model\.safetensors records built_for\.horizon = 4"),
    ("n_obs_steps", 2, r"model\.safetensors records built_for\.n_obs_steps = 1"),
    ("delta_actions", False, r"normalizer\.json records delta_actions\.enabled = True"),
    ("action_norm", "mean_std", r"normalizer\.json records modes\.action = 'quantile'"),
    ("state_norm", "min_max", r"normalizer\.json records modes\.state = 'mean_std'"),
])
def test_edited_config_is_refused_naming_file_and_field(tmp_path, head, field, value, where):
    cfg = DiTConfig(depth=1, hidden=32, objective="flow") if head == "dit" else head
    ck = toy_policy(cfg, horizon=4, delta_actions=True).save_pretrained(tmp_path / "ck")
    ChunkPolicy.from_pretrained(ck)  # untouched: loads
    _edit(ck, "config.json", _set_policy(field, value))
    with pytest.raises(ValueError, match=rf"config\.json: policy\.{field} is {value!r}, but .*{where}"):
        ChunkPolicy.from_pretrained(ck)


def test_delta_actions_turned_on_and_delta_dims_changed(tmp_path):
    ck = toy_policy(horizon=4).save_pretrained(tmp_path / "ck")
    _edit(ck, "config.json", _set_policy("delta_actions", True))
    with pytest.raises(ValueError, match=r"policy\.delta_actions is True, but .*normalizer\.json records delta_actions\.enabled = False"):
        ChunkPolicy.from_pretrained(ck)
    # delta stats were computed on ['x', 'y']; space.json edited so that 'y' stays absolute
    ck2 = toy_policy(horizon=4, delta_actions=True).save_pretrained(tmp_path / "ck2")
    _edit(ck2, "space.json", lambda d: d["embodiments"][0].__setitem__("absolute_dims", ["y"]))
    with pytest.raises(ValueError, match=r"space\.json: embodiment 'toy' makes action dims \['x'\] deltas.*"
                                         r"normalizer\.json delta_actions\.dims\.toy is \['x', 'y'\]"):
        ChunkPolicy.from_pretrained(ck2)


def test_horizon_with_delta_actions_names_both_files(tmp_path):
    ck = toy_policy(horizon=4, delta_actions=True).save_pretrained(tmp_path / "ck")
    _edit(ck, "config.json", _set_policy("horizon", 6))
    with pytest.raises(ValueError) as e:
        ChunkPolicy.from_pretrained(ck)
    assert "built_for.horizon = 4" in str(e.value) and "delta_actions.horizon = 4" in str(e.value)


@pytest.mark.parametrize("head, option, value", [
    (DiTConfig(depth=1, hidden=32), "depth", 2),         # changes the set of tensors
    (DiTConfig(depth=1, hidden=32), "hidden", 48),       # changes tensor shapes
    ("flow_expert", "width", 48),                        # changes tensor shapes
    (DiTConfig(depth=1, hidden=32), "objective", "flow"),  # no shape change: a different model all the same
])
def test_edited_head_options_are_refused(tmp_path, head, option, value):
    ck = toy_policy(head, horizon=4).save_pretrained(tmp_path / "ck")
    _edit(ck, "config.json", lambda d: d["policy"]["head"].__setitem__(option, value))
    with pytest.raises(ValueError, match=rf"config\.json: policy\.head\.{option} is {value!r}, but .*model\.safetensors "
                                         rf"records built_for\.head\.{option}"):
        ChunkPolicy.from_pretrained(ck)


def test_sampling_options_may_change(tmp_path):
    ck = toy_policy(DiTConfig(depth=1, hidden=32), horizon=4).save_pretrained(tmp_path / "ck")
    _edit(ck, "config.json", lambda d: d["policy"]["head"].update(num_steps=3, sampler="dpmsolver"))
    again = ChunkPolicy.from_pretrained(ck)
    assert again.config.head.num_steps == 3 and again.config.head.sampler == "dpmsolver"


def test_edited_backbone_override_is_refused(tmp_path):
    ck = toy_policy(horizon=4).save_pretrained(tmp_path / "ck")
    _edit(ck, "config.json", _set_policy("backbone_overrides", {"rope_theta": 500.0}))
    with pytest.raises(ValueError, match=r"config\.json: policy\.backbone 'tiny' \+ backbone_overrides gives rope_theta "
                                         r"= 500\.0, but .*records built_for\.backbone\.rope_theta = 10000\.0"):
        ChunkPolicy.from_pretrained(ck)


# -- untouched and older checkpoints ------------------------------------------------------------------------------
@pytest.mark.parametrize("delta", [False, True])
def test_untouched_and_old_format_checkpoints_load(tmp_path, delta):
    policy = toy_policy(DiTConfig(depth=1, hidden=32), horizon=4, delta_actions=delta)
    want = _predict(policy, 4)
    ck = policy.save_pretrained(tmp_path / "ck")
    torch.testing.assert_close(_predict(ChunkPolicy.from_pretrained(ck), 4), want)
    _strip_new_fields(ck)
    old = ChunkPolicy.from_pretrained(ck)
    torch.testing.assert_close(_predict(old, 4), want)
    assert old.trained_on is None
    # an old checkpoint's normalizer.json always held the modes: an edited action_norm is still caught
    _edit(ck, "config.json", _set_policy("action_norm", "min_max"))
    with pytest.raises(ValueError, match=r"policy\.action_norm is 'min_max'.*normalizer\.json records modes\.action"):
        ChunkPolicy.from_pretrained(ck)


def test_old_legacy_head_options_checkpoint_loads(tmp_path):
    policy = toy_policy(DiTConfig(depth=1, hidden=32), horizon=4)
    ck = policy.save_pretrained(tmp_path / "ck")
    _strip_new_fields(ck)

    def legacy(d):
        d["policy"]["head"] = "dit"
        d["policy"]["head_options"] = {"depth": 1, "hidden": 32}
    _edit(ck, "config.json", legacy)
    torch.testing.assert_close(_predict(ChunkPolicy.from_pretrained(ck), 4), _predict(policy, 4))


def test_trained_on_round_trips(tmp_path):
    policy = toy_policy(horizon=4)
    policy.trained_on = {"image_size": [40, 32], "cameras": {"toy": ["top", "wrist"]}, "n_cameras": 2}
    ck = policy.save_pretrained(tmp_path / "ck")
    assert ChunkPolicy.from_pretrained(ck).trained_on == policy.trained_on


# -- tokenizers never run custom code -----------------------------------------------------------------------------
def _custom_code_tokenizer(d: Path, marker: Path) -> Path:
    build_char_tokenizer().save_pretrained(str(d))
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["auto_map"] = {"AutoTokenizer": [None, "custom_tok.CustomTokenizer"]}
    cfg["tokenizer_class"] = "CustomTokenizer"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "custom_tok.py").write_text(textwrap.dedent(f"""
        import pathlib
        pathlib.Path({str(marker)!r}).write_text("custom code ran")
        from transformers import PreTrainedTokenizerFast
        class CustomTokenizer(PreTrainedTokenizerFast):
            pass
    """))
    return d


def test_custom_code_tokenizer_is_refused(tmp_path):
    marker = tmp_path / "ran.txt"
    tok = _custom_code_tokenizer(tmp_path / "tok", marker)
    with pytest.raises(ValueError, match=rf"tokenizer directory {tok}: tokenizer_config\.json has an auto_map.*custom code"):
        load_tokenizer(tok)
    assert not marker.exists()


def test_checkpoint_with_custom_code_tokenizer_never_prompts(tmp_path):
    """In a fresh process with stdin closed (a y/N prompt would hang or fail on EOF): one clear error, no code run."""
    marker = tmp_path / "ran.txt"
    ck = toy_policy(horizon=4).save_pretrained(tmp_path / "ck")
    _custom_code_tokenizer(ck / "tokenizer", marker)
    code = ("import sys; from chunkpolicy.models.policy import ChunkPolicy\n"
            "try:\n    ChunkPolicy.from_pretrained(sys.argv[1])\n"
            "except ValueError as e:\n    print('REFUSED', e); sys.exit(3)\n")
    r = subprocess.run([sys.executable, "-c", code, str(ck)], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                       timeout=300, cwd=REPO, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 3, r.stdout + r.stderr
    assert f"tokenizer directory {ck / 'tokenizer'}" in r.stdout and "custom code" in r.stdout
    assert "[y/N]" not in r.stdout + r.stderr
    assert not marker.exists()


# -- what training records about its inputs -------------------------------------------------------------------------
def test_training_records_image_size_and_cameras(tmp_path):
    import yaml

    from chunkpolicy.config import load_config
    from chunkpolicy.data.synthetic import make_spec, make_synthetic_store
    from chunkpolicy.training.experiment import prepare

    arm = make_spec("arm7", action_dim=7, state_dim=8, cameras=("top", "wrist"))
    store = make_synthetic_store(tmp_path / "arm7.zarr", arm, n_episodes=2, episode_len=8, image_hw=(24, 24), seed=0)
    cfg = {"model": {"backbone": "tiny", "head": "flow_expert", "horizon": 4, "max_prompt_tokens": 24},
           "data": {"datasets": [{"path": str(store.path), "cameras": ["wrist"]}], "image_size": [16, 20],
                    "val_fraction": 0.0},
           "train": {"steps": 1, "batch_size": 2, "output_dir": str(tmp_path / "run"), "progress": False}}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    prep = prepare(load_config(tmp_path / "cfg.yaml"), log=lambda s: None)
    want = {"image_size": [16, 20], "n_cameras": 1, "cameras": {"arm7": ["wrist"]}}
    assert prep.policy.trained_on == want
    ck = prep.policy.save_pretrained(tmp_path / "ck")
    assert json.loads((ck / "config.json").read_text())["trained_on"] == want
    assert ChunkPolicy.from_pretrained(ck).trained_on == want


# -- evaluation inputs --------------------------------------------------------------------------------------------
def _mw_run(tmp_path, trained_on=None) -> Path:
    """A run directory with two checkpoints of a tiny Meta-World policy (as training lays them out)."""
    pytest.importorskip("metaworld", reason="`metaworld` is not installed (install the `sim` extra)")
    import numpy as np

    from chunkpolicy.models.policy import PolicyConfig
    from chunkpolicy.normalize import compute_stats
    from chunkpolicy.sim.base import env_spec
    from chunkpolicy.spaces import UnifiedSpace

    spec = env_spec("metaworld")
    rng = np.random.default_rng(0)
    stats = {spec.name: {"action": compute_stats(rng.uniform(-1, 1, (100, 4))),
                         "state": compute_stats(rng.uniform(0, 1, (100, 4)))}}
    torch.manual_seed(0)
    policy = ChunkPolicy(PolicyConfig(backbone="tiny", horizon=4), UnifiedSpace(32, "pad", embodiments=[spec]), stats)
    policy.trained_on = trained_on
    run = tmp_path / "run"
    for step in (5, 10):
        policy.save_pretrained(run / "checkpoints" / f"step_{step:06d}")
    return run


def test_eval_image_size_mismatch_is_one_error_before_any_rollout(tmp_path, capsys):
    from chunkpolicy.evaluation.cli import main as eval_main
    from chunkpolicy.evaluation.cli import run_eval

    run = _mw_run(tmp_path, {"image_size": [32, 32], "n_cameras": 1})
    with pytest.raises(ValueError, match=r"image_size: env 'metaworld' would render 48x40 frames, but the policy was "
                                         r"trained on 32x32 images \(trained_on\.image_size"):
        run_eval(run, "metaworld", ["reach-v3"], episodes=1, image_size=(48, 40), out=tmp_path / "e", progress=False,
                 device="cpu")
    assert not (tmp_path / "e").exists()
    rc = eval_main(["--checkpoint", str(run), "--env", "metaworld", "--tasks", "reach-v3", "--image-size", "48", "40",
                    "--out", str(tmp_path / "e"), "--no-progress", "--device", "cpu"])
    assert rc == 2 and "trained_on.image_size" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_eval_cameras_other_than_training_are_refused(tmp_path):
    from chunkpolicy.evaluation.cli import run_eval
    from chunkpolicy.sim.base import env_spec

    pytest.importorskip("metaworld", reason="`metaworld` is not installed (install the `sim` extra)")
    run = _mw_run(tmp_path, {"image_size": [32, 32], "cameras": {env_spec("metaworld").name: ["no_such_camera"]}})
    with pytest.raises(ValueError, match=r"cameras: the policy was trained on cameras \['no_such_camera'\].*trained_on\.cameras"):
        run_eval(run, "metaworld", ["reach-v3"], episodes=1, out=tmp_path / "e", progress=False, device="cpu")


def test_eval_run_dir_resolves_to_latest_checkpoint_at_its_image_size(tmp_path, capsys):
    from chunkpolicy.evaluation.cli import build_parser, run_eval

    run = _mw_run(tmp_path, {"image_size": [32, 32], "n_cameras": 1})
    res = run_eval(run, "metaworld", ["reach-v3"], episodes=1, executor="open_loop:2", num_envs=1, max_steps=2, videos=0,
                   out=tmp_path / "e", progress=False, device="cpu")
    assert res["checkpoint"] == str(run / "checkpoints" / "step_000010")
    assert res["env_kwargs"]["image_size"] == [32, 32]  # the checkpoint's, not a fixed default
    assert res["summary"]["policy"]["mean"]["n"] == 1
    help_text = build_parser().format_help()
    assert "runs/NAME/final" not in help_text and "latest checkpoint" in help_text
    with pytest.raises(FileNotFoundError, match="not a chunkpolicy checkpoint"):
        run_eval(tmp_path / "empty_run", "metaworld", ["reach-v3"], episodes=1, out=tmp_path / "e2", progress=False)


def test_readme_points_at_paths_training_writes():
    readme = (REPO / "README.md").read_text()
    assert "runs/NAME/final" not in readme
    assert "latest checkpoints/step_XXXXXX" in readme


def test_corrupt_checkpoint_json_names_the_file(tmp_path):
    """Regression (issue 14, weak errors): a corrupt JSON file of a checkpoint gave a bare JSONDecodeError."""
    from chunkpolicy.models.policy import ChunkPolicy
    from helpers import toy_policy

    toy_policy().save_pretrained(tmp_path / "ck")
    for name in ("config.json", "normalizer.json", "space.json"):
        bad = tmp_path / f"bad_{name}"
        import shutil

        shutil.copytree(tmp_path / "ck", bad)
        (bad / name).write_text((bad / name).read_text()[:-7])
        with pytest.raises(ValueError, match=f"{name}: corrupt JSON"):
            ChunkPolicy.from_pretrained(bad)
