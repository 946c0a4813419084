"""--lerobot-policy: LeRobot diffusion / ACT checkpoints (random weights, saved with their own save_pretrained and
processors, built on a tiny store exported with export-lerobot) in chunkpolicy's harness: the same actions as
LeRobot's own select_action, the same observation history as its queue, an end-to-end evaluation, clear errors;
and LeRobot's own trainer for a few CPU steps (through the study runner) producing a checkpoint the adapter runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("lerobot", reason="`lerobot` is not installed (install the `lerobot` extra)")
pytest.importorskip("metaworld", reason="`metaworld` is not installed (install the `sim` extra)")

from chunkpolicy.evaluation.lerobot_policy import (  # noqa: E402
    inspect_lerobot_policy, lerobot_predict_fn, load_lerobot_policy, native_executor, observation_batch,
)
from chunkpolicy.runtime.executors import make_executor  # noqa: E402

HW = (64, 64)  # ResNet18 needs > 32 pixels: a 1×1 feature map breaks BatchNorm in LeRobot's shape probe
CAM = "corner"


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny metaworld_sawyer store (2 random episodes, one 64×64 camera) and its export-lerobot dataset."""
    from chunkpolicy.data.lerobot_io import export_lerobot
    from chunkpolicy.data.store import EpisodeStore
    from chunkpolicy.sim.base import env_spec

    d = tmp_path_factory.mktemp("lr")
    spec = env_spec("metaworld", cameras=(CAM,))
    EpisodeStore.create(d / "s.zarr", spec, fps=spec.control_hz, image_shapes={CAM: HW})
    st = EpisodeStore.open(d / "s.zarr", mode="a")
    rng = np.random.default_rng(0)
    for _ in range(2):
        st.append_episode({"action": rng.uniform(-1, 1, (12, 4)).astype(np.float32),
                           "state": rng.uniform(0, 1, (12, 4)).astype(np.float32),
                           "images": {CAM: rng.integers(0, 255, (12, *HW, 3), dtype=np.uint8)},
                           "task": "reach the goal"})
    st.compute_stats(save=True)
    export_lerobot(d / "s.zarr", d / "ds", repo_id="local/tiny", progress=False)
    return d


def _make(exported: Path, kind: str, **kw) -> Path:
    from lerobot.datasets.lerobot_dataset import LeRobotDatasetMetadata
    from lerobot.policies.factory import make_policy, make_policy_config, make_pre_post_processors

    meta = LeRobotDatasetMetadata("local/tiny", root=exported / "ds")
    torch.manual_seed(0)
    cfg = make_policy_config(kind, device="cpu", push_to_hub=False, pretrained_backbone_weights=None, **kw)
    policy = make_policy(cfg, ds_meta=meta)
    pre, post = make_pre_post_processors(cfg, dataset_stats=meta.stats)
    out = exported / kind
    policy.save_pretrained(out)
    pre.save_pretrained(out)
    post.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def act_dir(exported):
    return _make(exported, "act", dim_model=32, n_heads=2, dim_feedforward=64, n_encoder_layers=1, n_decoder_layers=1,
                 chunk_size=8, n_action_steps=4, latent_dim=8)


@pytest.fixture(scope="module")
def diffusion_dir(exported):
    return _make(exported, "diffusion", down_dims=(16, 32), horizon=8, n_action_steps=4, n_obs_steps=2,
                 num_inference_steps=2, diffusion_step_embed_dim=16, spatial_softmax_num_keypoints=8)


def _ticks(n: int, B: int = 2, seed: int = 1) -> list[list[dict]]:
    rng = np.random.default_rng(seed)
    return [[{"images": {CAM: rng.integers(0, 255, (*HW, 3), dtype=np.uint8)},
              "state": rng.uniform(0, 1, 4).astype(np.float32)} for _ in range(B)] for _ in range(n)]


def _lerobot_batch(runner, obs):
    return runner.preprocessor(observation_batch([obs], runner.info.cameras, runner.info.state_dim, ["reach"] * len(obs)))


def test_act_native_and_temporal_ensemble_equal_lerobots_own(act_dir):
    from lerobot.policies.act.modeling_act import ACTTemporalEnsembler

    info = inspect_lerobot_policy(act_dir)
    assert (info.type, info.cameras, info.image_size, info.chunk_len, info.n_obs_steps) == ("act", (CAM,), HW, 8, 1)
    assert native_executor(info) == "open_loop:4"
    runner = load_lerobot_policy(act_dir, "cpu")
    ticks = _ticks(9)
    # native executor vs LeRobot's select_action queue
    fn, hook = lerobot_predict_fn(runner, ["reach"] * 2, seed=0)
    ex = make_executor(native_executor(info))
    ours = []
    for t, obs in enumerate(ticks):
        hook(t, obs)
        ours.append(ex.act(t, obs, fn))
    assert ex.prediction_ticks == [0, 4, 8]
    pol = runner.policy
    pol.reset()
    theirs = [runner.postprocessor(pol.select_action(_lerobot_batch(runner, obs))).numpy() for obs in ticks]
    np.testing.assert_allclose(np.stack(ours), np.stack(theirs), atol=1e-5)
    assert np.abs(np.stack(ours)).max() > 0
    # temporal_ensemble:m vs LeRobot's ACTTemporalEnsembler (same weights, i = 0 the oldest chunk)
    fn, hook = lerobot_predict_fn(runner, ["reach"] * 2, seed=0)
    ex = make_executor("temporal_ensemble:0.5")
    ens = ACTTemporalEnsembler(0.5, chunk_size=8)
    for t, obs in enumerate(ticks):
        hook(t, obs)
        a = ex.act(t, obs, fn)
        pol.reset()
        b = runner.postprocessor(ens.update(pol.predict_action_chunk(_lerobot_batch(runner, obs)))).numpy()
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_diffusion_sees_the_same_history_as_lerobots_queue(diffusion_dir):
    info = inspect_lerobot_policy(diffusion_dir)
    assert (info.chunk_len, info.n_obs_steps, native_executor(info)) == (4, 2, "open_loop:4")
    runner = load_lerobot_policy(diffusion_dir, "cpu")
    seen: list[dict] = []
    inner = runner.policy.diffusion
    orig = inner.generate_actions

    def spy(batch, noise=None):
        seen.append({k: batch[k].clone() for k in ("observation.state", "observation.images")})
        return orig(batch, noise=noise)

    inner.generate_actions = spy
    try:
        ticks = _ticks(6)
        fn, hook = lerobot_predict_fn(runner, ["reach"] * 2, seed=0)
        ex = make_executor("open_loop:4")
        for t, obs in enumerate(ticks):
            hook(t, obs)
            a = ex.act(t, obs, fn)
            assert a.shape == (2, 4) and np.isfinite(a).all()
        ours, seen[:] = list(seen), []
        runner.policy.reset()
        for obs in ticks:
            runner.policy.select_action(_lerobot_batch(runner, obs))
        theirs = list(seen)
    finally:
        inner.generate_actions = orig
    assert len(ours) == len(theirs) == 2  # ticks 0 and 4
    for o, t in zip(ours, theirs):
        assert o["observation.state"].shape == (2, 2, 4) and o["observation.images"].shape == (2, 2, 1, 3, *HW)
        for k in o:
            torch.testing.assert_close(o[k], t[k])


def test_eval_cli_runs_a_lerobot_policy(diffusion_dir, tmp_path):
    from chunkpolicy.evaluation.cli import main

    out = tmp_path / "eval"
    rc = main(["--lerobot-policy", str(diffusion_dir), "--env", "metaworld", "--tasks", "reach-v3", "--episodes", "1",
               "--num-envs", "1", "--max-steps", "5", "--executor", "native", "--videos", "0", "--device", "cpu",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["executor"] == "open_loop:4" and res["checkpoint"] == str(diffusion_dir)
    assert res["env_kwargs"]["cameras"] == [CAM] and res["env_kwargs"]["image_size"] == list(HW)
    assert res["lerobot_policy"]["type"] == "diffusion" and res["lerobot_policy"]["executor_native"] == "open_loop:4"
    ep = res["episodes"]["policy"][0]
    assert ep["steps"] == 5 and ep["predictions"] == 2 and ep["seed"] == 100000
    assert (out / "results.md").is_file() and (out / "success.png").is_file()


def _edited(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    edit(cfg)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def _rename_cam(c):
    c["input_features"]["observation.images.nosuchcam"] = c["input_features"].pop(f"observation.images.{CAM}")


@pytest.mark.parametrize("edit, args, msg", [
    (_rename_cam, [], r"observation.images.nosuchcam.*name cameras env 'metaworld' does not have"),
    (lambda c: c["input_features"].update({"observation.environment_state": {"type": "ENV", "shape": [3]}}), [],
     r"input_features \['observation.environment_state'\] have no source"),
    (lambda c: c["output_features"]["action"].update(shape=[7]), [], r"output feature 'action' has 7 dims"),
    (None, ["--executor", "rtc:4,1"], r"executor 'rtc:4,1' needs a head with velocity; the LeRobot act head"),
    (None, ["--executor", "open_loop:9"], r"returns chunks of 8 actions .* fewer than k=9"),
    (None, ["--image-size", "32", "32"], r"image_size: env 'metaworld' would render 32x32 frames"),
    (None, ["--num-steps", "3"], r"num_steps: a LeRobot act policy"),
])
def test_mismatches_are_one_error_naming_the_field(act_dir, tmp_path, capsys, edit, args, msg):
    from chunkpolicy.evaluation.cli import main

    d = _edited(act_dir, tmp_path / "p", edit) if edit is not None else act_dir
    rc = main(["--lerobot-policy", str(d), "--env", "metaworld", "--tasks", "reach-v3", "--episodes", "1",
               "--out", str(tmp_path / "e"), "--no-progress", *args])
    err = capsys.readouterr().err
    assert rc == 2, err
    import re

    assert re.search(msg, err), err
    assert not (tmp_path / "e").exists()  # nothing ran


def test_missing_files_and_state_size(act_dir, tmp_path, capsys):
    from chunkpolicy.evaluation.cli import main

    d = tmp_path / "p"
    shutil.copytree(act_dir, d)
    (d / "policy_postprocessor.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"lacks \['policy_postprocessor.json'\]"):
        inspect_lerobot_policy(d)
    with pytest.raises(FileNotFoundError, match="not a LeRobot policy directory"):
        inspect_lerobot_policy(tmp_path)
    # pusht: 2-D state and actions, and no `corner` camera
    rc = main(["--lerobot-policy", str(act_dir), "--env", "pusht", "--tasks", "push-t", "--out", str(tmp_path / "e")])
    assert rc == 2 and "observation.images.corner" in capsys.readouterr().err


def test_dim_names_of_the_training_dataset_must_match_the_env(act_dir, exported, tmp_path, capsys):
    from chunkpolicy.evaluation.cli import main

    d = tmp_path / "p"
    shutil.copytree(act_dir, d)
    root = tmp_path / "ds"
    (root / "meta").mkdir(parents=True)
    info = json.loads((exported / "ds" / "meta" / "info.json").read_text())
    assert info["features"]["action"]["names"] == ["eef_dx", "eef_dy", "eef_dz", "gripper"]  # what export-lerobot wrote
    info["features"]["action"]["names"] = ["x", "y", "z", "grip"]
    (root / "meta" / "info.json").write_text(json.dumps(info))
    (d / "train_config.json").write_text(json.dumps({"dataset": {"root": str(root)}}))
    assert inspect_lerobot_policy(d).dim_names["action"] == ["x", "y", "z", "grip"]
    rc = main(["--lerobot-policy", str(d), "--env", "metaworld", "--tasks", "reach-v3", "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert rc == 2 and f"{root / 'meta' / 'info.json'}: feature 'action' names ['x', 'y', 'z', 'grip']" in err


@pytest.fixture(scope="module")
def lerobot_row(exported, tmp_path_factory):
    """LeRobot's own trainer (lerobot.scripts.lerobot_train, CPU, 2 steps) on the exported demos, through a study
    row whose checkpoint the adapter then evaluates and times."""
    import yaml

    from chunkpolicy.study.config import load_study
    from chunkpolicy.study.runner import run_row

    tmp_path = tmp_path_factory.mktemp("lrrow")
    work = tmp_path / "work"
    (work / "data").mkdir(parents=True)
    shutil.copytree(exported / "ds", work / "data" / "tiny_lerobot")  # what the runner's export would write
    doc = {"name": "t", "out_dir": str(work), "results_dir": str(tmp_path / "res"),
           "data": {"tiny": {"env": "metaworld", "tasks": ["reach-v3"], "store": str(exported / "s.zarr")}},
           "rows": {"x-act": {"data": "tiny", "method": {"lerobot": "act", "steps": 1, "args": [
               "--policy.device=cpu", "--policy.pretrained_backbone_weights=null", "--policy.dim_model=32",
               "--policy.n_heads=2", "--policy.dim_feedforward=64", "--policy.n_encoder_layers=1",
               "--policy.n_decoder_layers=1", "--policy.chunk_size=8", "--policy.n_action_steps=4",
               "--batch_size=2", "--num_workers=0", "--log_freq=1"]},
               "train": {"ckpt_every": 1},
               "eval": {"episodes": 1, "max_steps": 3, "num_envs": 1, "videos": 0, "executor": "native",
                        "device": "cpu", "latency_calls": 1}}}}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(doc))
    return tmp_path, run_row(load_study(tmp_path / "s.yaml"), "x-act")


@pytest.mark.slow
def test_lerobot_trainer_checkpoint_runs_in_the_harness(lerobot_row):
    _, res = lerobot_row
    t = res["train"]
    assert t["framework"] == "lerobot" and t["steps"] == 1 and [s for s, _ in t["checkpoints"]] == [1]
    assert t["checkpoint"].endswith("checkpoints/000001/pretrained_model") and t["gpus"] == 0
    assert res["eval"]["executor"] == "open_loop:4" and res["success"]["mean"]["n"] == 1
    assert res["label"] == "lerobot:act" and res["latency"]["chunk_len"] == 8
    # the adapter also takes the training run dir itself (checkpoints/last)
    assert inspect_lerobot_policy(t["run_dir"]).path.endswith("last/pretrained_model")


@pytest.mark.slow
def test_lerobot_row_resumes_from_its_checkpoint(lerobot_row):
    """An unfinished LeRobot training (here: its target raised to 2 steps after 1) continues from its last checkpoint
    with --resume=true, not from scratch; once done, older optimizer states are pruned (the weights stay)."""
    import yaml

    from chunkpolicy.study.config import load_study
    from chunkpolicy.study.runner import run_row

    tmp_path, res = lerobot_row
    run = Path(res["train"]["run_dir"])
    doc = yaml.safe_load((tmp_path / "s.yaml").read_text())
    doc["rows"]["x-act"]["method"]["steps"] = 2
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(doc))
    (run / "chunkpolicy_study_train.json").unlink()
    (tmp_path / "res" / "x-act.json").unlink()
    res2 = run_row(load_study(tmp_path / "s.yaml"), "x-act")
    assert res2["train"]["steps"] == 2 and [s for s, _ in res2["train"]["checkpoints"]] == [1, 2]
    log = (run.parent / "train.log").read_text()
    assert log.count(f"--resume=true --config_path={run / 'checkpoints' / '000001'}") == 1
    ck = run / "checkpoints"
    assert not (ck / "000001" / "training_state").exists() and (ck / "000002" / "training_state").is_dir()
    assert (ck / "000001" / "pretrained_model" / "model.safetensors").is_file()
    sessions = json.loads((run.parent / "train.sessions.json").read_text())
    assert [s["resumed"] for s in sessions] == [False, True]
