"""Simulator adapters, observation → batch, EnvPool rollouts with executors, and expert collection into a store.

Needs the `sim` extra (metaworld, mujoco, gymnasium-robotics, gym-pusht); each part skips with the reason otherwise.
"""

import numpy as np
import pytest
import torch

from chunkpolicy import batch as K
from chunkpolicy.sim.base import EnvPool, check_obs, env_spec, make_env, obs_to_batch
from chunkpolicy.spaces import UnifiedSpace

HW = (32, 32)


def _need(*mods):
    for m in mods:
        pytest.importorskip(m, reason=f"`{m}` is not installed (install the `sim` extra)")


@pytest.fixture(scope="module")
def mw_push():
    _need("metaworld", "mujoco")
    env = make_env("metaworld", "push-v3", image_size=HW)
    yield env
    env.close()


@pytest.fixture(scope="module")
def fetch_push():
    _need("gymnasium_robotics", "mujoco")
    env = make_env("fetch", "push", image_size=HW)
    yield env
    env.close()


def _check_schema(env, obs):
    check_obs(obs, env.spec, env.image_size)
    assert set(obs["images"]) == set(env.spec.cameras)
    for img in obs["images"].values():
        assert img.dtype == np.uint8 and img.shape == (*env.image_size, 3)
        assert img.std() > 1  # a real rendering, not a blank frame
    assert obs["state"].dtype == np.float32 and obs["state"].shape == (env.spec.state_dim,)
    assert np.isfinite(obs["state"]).all()


# -- Meta-World -------------------------------------------------------------------------------------------------------
def test_metaworld_schema_spec_and_rate(mw_push):
    env = mw_push
    assert env.spec.name == "metaworld_sawyer" and env.spec.action_dim == 4 and env.spec.state_dim == 4
    assert env.spec.action_names == ("eef_dx", "eef_dy", "eef_dz", "gripper") and "gripper" in env.spec.gripper_dims
    assert env.spec.control_hz == pytest.approx(env.control_hz) == pytest.approx(80.0)  # frame_skip 5 × 2.5 ms
    assert env.task_prompt == "push the puck to the goal" and env.max_steps == 500
    obs = env.reset(seed=3)
    _check_schema(env, obs)
    assert 0.0 <= obs["state"][3] <= 1.0  # gripper opening
    obs2, r, done, info = env.step(np.zeros(4, np.float32))
    _check_schema(env, obs2)
    assert isinstance(r, float) and done is False and info["success"] is False and env.t == 1
    with pytest.raises(ValueError, match=r"action: expected \[4\]"):
        env.step(np.zeros(3))


def test_metaworld_seeds_are_reproducible(mw_push):
    env = mw_push
    env.reset(seed=11)
    a = env.raw_env._get_pos_objects().copy(), env.raw_env._target_pos.copy()
    img_a = env._obs(env._raw)["images"]["corner"]
    env.reset(seed=12)
    b = env.raw_env._get_pos_objects().copy(), env.raw_env._target_pos.copy()
    env.reset(seed=11)
    c = env.raw_env._get_pos_objects().copy(), env.raw_env._target_pos.copy()
    np.testing.assert_array_equal(a[0], c[0])
    np.testing.assert_array_equal(a[1], c[1])
    assert not np.allclose(a[0], b[0]) or not np.allclose(a[1], b[1])
    np.testing.assert_array_equal(img_a, env._obs(env._raw)["images"]["corner"])


def test_metaworld_corner_camera_is_turned_upright(mw_push):
    import mujoco

    env = mw_push
    env.reset(seed=0)
    r = mujoco.Renderer(env.raw_env.model, *HW)  # same model: shadows and multisampling are already off
    try:
        r.update_scene(env.raw_env.data, camera="corner")
        raw = r.render().copy()
    finally:
        r.close()
    ours = env._obs(env._raw)["images"]["corner"]
    np.testing.assert_array_equal(ours, raw[::-1, ::-1])


def test_metaworld_task_lists_match_the_package():
    _need("metaworld")
    from metaworld.env_dict import ALL_V3_ENVIRONMENTS, MT10_V3
    from metaworld.policies import ENV_POLICY_MAP

    from chunkpolicy.sim import metaworld_env as mw

    assert set(mw.TASKS) == set(ALL_V3_ENVIRONMENTS) == set(ENV_POLICY_MAP) and len(mw.TASKS) == 50
    assert set(mw.MT10) == set(MT10_V3)
    assert all(p and p == p.strip() for p in mw.PROMPTS.values()) and len(set(mw.PROMPTS.values())) == 50
    with pytest.raises(ValueError, match="unknown Meta-World task 'push-v2'.*did you mean"):
        mw.check_task("push-v2")
    with pytest.raises(ValueError, match="cameras"):
        mw.make_spec(cameras=("wrist",))


def test_metaworld_expert_succeeds_and_episode_ends(mw_push):
    env = mw_push
    env.reset(seed=0)
    done = False
    while not done:
        a = env.expert_action()
        assert a.shape == (4,) and a.dtype == np.float32 and np.abs(a).max() <= 1.0
        _, _, done, info = env.step(a)
    assert info["success"] and env.t < env.max_steps
    with pytest.raises(RuntimeError, match="episode is over"):
        env.step(np.zeros(4))


# -- Fetch ------------------------------------------------------------------------------------------------------------
def test_fetch_schema_and_rate(fetch_push):
    env = fetch_push
    assert env.spec.name == "fetch" and env.spec.state_dim == 8 and env.spec.cameras == ("front", "side")
    assert env.spec.control_hz == pytest.approx(env.control_hz) == pytest.approx(25.0)
    obs = env.reset(seed=0)
    _check_schema(env, obs)
    obs, _, done, info = env.step(np.array([1.0, 0, 0, 0]))
    _check_schema(env, obs)
    assert obs["state"][5] > 0.1  # moving +x: positive x velocity in m/s
    assert done is False and info["success"] is False
    a = env.reset(seed=4)
    goal = env.raw_env.goal.copy()
    b = env.reset(seed=4)
    np.testing.assert_array_equal(goal, env.raw_env.goal)
    np.testing.assert_array_equal(a["images"]["front"], b["images"]["front"])
    env.reset(seed=5)
    assert not np.allclose(goal, env.raw_env.goal)


@pytest.mark.parametrize("task", ["reach", "push", "pick_and_place"])
def test_fetch_experts_succeed(task):
    _need("gymnasium_robotics", "mujoco")
    with make_env("fetch", task, image_size=(16, 16)) as env:
        wins = 0
        for seed in range(3):
            env.reset(seed)
            done = False
            while not done:
                _, _, done, info = env.step(env.expert_action())
            wins += info["success"]
        assert wins == 3


def test_embodiments_differ():
    _need("metaworld", "gymnasium_robotics")
    a, b = env_spec("metaworld"), env_spec("fetch")
    space = UnifiedSpace(dim=32, embodiments=[a, b])
    assert a.state_dim != b.state_dim and set(a.cameras).isdisjoint(b.cameras) and a.control_hz != b.control_hz
    assert space.id_of("metaworld_sawyer") == 0 and space.id_of("fetch") == 1


# -- Push-T -----------------------------------------------------------------------------------------------------------
def test_pusht_schema_and_step():
    _need("gym_pusht")
    with make_env("pusht", "push-t") as env:
        assert env.spec.action_dim == 2 and env.spec.cameras == ("top",) and env.control_hz == 10.0
        assert not env.has_expert and env.max_steps == 300
        obs = env.reset(seed=0)
        _check_schema(env, obs)
        assert obs["images"]["top"].shape == (96, 96, 3)
        obs, r, done, info = env.step(np.array([256.0, 256.0]))
        _check_schema(env, obs)
        assert 0.0 <= r <= 1.0 and "coverage" in info and info["success"] is False
        with pytest.raises(NotImplementedError, match="no scripted expert"):
            env.expert_action()


# -- batch conversion -------------------------------------------------------------------------------------------------
def _fake_obs(spec, hw=(8, 10), seed=0):
    rng = np.random.default_rng(seed)
    return {"images": {c: rng.integers(0, 256, (*hw, 3), dtype=np.uint8) for c in spec.cameras},
            "state": rng.normal(size=spec.state_dim).astype(np.float32)}


def test_obs_to_batch_schema():
    from chunkpolicy.sim.metaworld_env import make_spec as mw_spec

    spec = mw_spec()
    other = mw_spec().__class__(name="other", action_names=("a",), state_names=("s",), cameras=("c",))
    space = UnifiedSpace(dim=32, embodiments=[other, spec])
    obs = [_fake_obs(spec, seed=i) for i in range(3)]
    del obs[1]["images"]["gripperPOV"]  # a missing camera: zeros + mask False
    b = obs_to_batch(obs, space, spec, "push the puck to the goal")
    # uint8 frames, as the training data path delivers them: the backbone scales both the same way
    assert b[K.IMAGES].shape == (3, 2, 1, 3, 8, 10) and b[K.IMAGES].dtype == torch.uint8
    np.testing.assert_array_equal(b[K.IMAGES][0, 0, 0].numpy(), obs[0]["images"]["corner"].transpose(2, 0, 1))
    assert b[K.IMAGE_MASK].tolist() == [[True, True], [True, False], [True, True]]
    assert (b[K.IMAGES][1, 1] == 0).all()
    assert b[K.STATE].shape == (3, 1, 32) and b[K.STATE].dtype == torch.float32
    np.testing.assert_array_equal(b[K.STATE][2, 0, :4].numpy(), obs[2]["state"])
    assert (b[K.STATE][:, :, 4:] == 0).all()
    assert b[K.STATE_MASK].shape == (3, 32) and b[K.STATE_MASK][0].sum() == 4 and b[K.STATE_MASK].dtype == torch.bool
    assert b[K.PROMPT] == ["push the puck to the goal"] * 3
    assert b[K.EMBODIMENT].tolist() == [1, 1, 1] and b[K.EMBODIMENT].dtype == torch.int64
    assert b[K.CONTROL_HZ].tolist() == [80.0] * 3 and b[K.CONTROL_HZ].dtype == torch.float32
    assert set(b) == set(K.OBSERVATION_KEYS)


def test_obs_to_batch_errors():
    from chunkpolicy.sim.metaworld_env import make_spec as mw_spec

    spec = mw_spec()
    space = UnifiedSpace(dim=32, embodiments=[spec])
    with pytest.raises(ValueError, match="prompt: expected 2"):
        obs_to_batch([_fake_obs(spec), _fake_obs(spec)], space, spec, ["a"])
    bad = _fake_obs(spec)
    bad["state"] = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match=r"state: expected \[4\]"):
        obs_to_batch([bad], space, spec, "p")
    mixed = [_fake_obs(spec), _fake_obs(spec, hw=(4, 4))]
    with pytest.raises(ValueError, match="same size"):
        obs_to_batch(mixed, space, spec, "p")
    with pytest.raises(KeyError, match="unknown embodiment 'fetch'"):
        obs_to_batch([_fake_obs(spec)], space, "fetch", "p")
    extra = _fake_obs(spec)
    extra["images"]["wrist"] = extra["images"]["corner"]
    with pytest.raises(ValueError, match="wrist"):
        obs_to_batch([extra], space, spec, "p")


# -- EnvPool + executors ----------------------------------------------------------------------------------------------
def test_envpool_rollout_with_executor_matches_expert():
    """Two Fetch envs in lockstep driven through an executor by a 'policy' that returns expert chunks."""
    _need("gymnasium_robotics", "mujoco")
    from chunkpolicy.runtime.executors import OpenLoop

    with EnvPool.make("fetch", ["reach", "reach"], image_size=(16, 16)) as pool:
        space = UnifiedSpace(dim=32, embodiments=[pool.spec])
        seen = []

        def predict(obs_list):
            batch = obs_to_batch(obs_list, space, pool.spec, pool.prompts)
            seen.append(batch[K.STATE].shape)
            # repeat each env's current expert action H=4 times (the expert is closed-loop: fine for open_loop:1)
            return np.stack([np.repeat(e.expert_action()[None], 4, axis=0) for e in pool.envs])

        ex = OpenLoop(1)
        results = pool.rollout(predict, ex, seeds=[0, 1])
        assert [r["success"] for r in results] == [True, True]
        assert all(0 < r["steps"] < 50 for r in results) and [r["seed"] for r in results] == [0, 1]
        assert seen[0] == (2, 1, 32) and ex.num_predictions == max(r["steps"] for r in results)
        # an env that finished is not stepped again
        assert pool.envs[0].t == results[0]["steps"] and pool.envs[1].t == results[1]["steps"]
        with pytest.raises(ValueError, match=r"actions: expected \[2, 4\]"):
            pool.step(np.zeros((3, 4)))


# -- collection into a store ------------------------------------------------------------------------------------------
def _store_cls():
    try:
        from chunkpolicy.data.store import EpisodeStore
    except ImportError:  # pragma: no cover - the store is written by another engineer
        pytest.skip("chunkpolicy.data.store is not available yet")
    return EpisodeStore


def test_collect_one_episode_in_process(tmp_path):
    _need("metaworld", "mujoco")
    EpisodeStore = _store_cls()
    from chunkpolicy.sim.collect import collect

    out = tmp_path / "mw.zarr"
    summary = collect("metaworld", ["reach-v3"], 1, out, workers=0, seed=5, image_size=(24, 24), progress=False,
                      verbose=False)
    assert summary["tasks"]["reach-v3"]["successes"] == 1 and summary["episodes_written"] == 1
    lo, hi = summary["tasks"]["reach-v3"]["ci95"]
    assert lo == pytest.approx(0.2065, abs=1e-3) and hi == 1.0
    store = EpisodeStore.open(out)
    assert len(store) == 1 and store.spec.name == "metaworld_sawyer" and store.fps == 80.0
    ep = store.read_episode(0)
    T = summary["frames_written"]
    assert ep["action"].shape == (T, 4) and ep["state"].shape == (T, 4)
    assert ep["images"]["corner"].shape == (T, 24, 24, 3) and ep["images"]["gripperPOV"].dtype == np.uint8
    assert ep["task"] == "reach the goal position with the gripper" and ep["seed"] == 5
    assert np.abs(ep["action"]).max() <= 1.0
    # replaying the stored actions from the stored seed reproduces the stored states (determinism)
    with make_env("metaworld", "reach-v3", image_size=(24, 24)) as env:
        obs = env.reset(ep["seed"])
        for t in range(T):
            np.testing.assert_allclose(obs["state"], ep["state"][t], atol=1e-6)
            obs, _, done, info = env.step(ep["action"][t])
        assert done and info["success"]
    assert store.stats["action"]  # normalization stats were saved
    with pytest.raises(FileExistsError):
        collect("metaworld", ["reach-v3"], 1, out, workers=0, progress=False, verbose=False)


def test_collect_workers_failures_interrupt_and_resume(tmp_path, monkeypatch, capsys):
    _need("gymnasium_robotics", "mujoco")
    EpisodeStore = _store_cls()
    from chunkpolicy.sim import collect as C

    out = tmp_path / "fetch.zarr"
    # two spawned workers, two tasks in one store
    s = C.collect("fetch", ["reach", "push"], 2, out, workers=2, image_size=(16, 16), progress=False)
    assert s["errors"] == [] and s["successes"] == 4 and s["episodes_written"] == 4
    assert "push" in capsys.readouterr().out  # the summary table was printed
    store = EpisodeStore.open(out)
    assert len(store) == 4 and set(store.tasks) == {"move the gripper to the red target",
                                                    "push the black block to the red target"}
    assert sorted((store.episode_task(i)[:4], store.episode_seed(i)) for i in range(4)) == [
        ("move", 0), ("move", 1), ("push", 0), ("push", 1)]

    # a 2-step limit makes the expert fail: failures are dropped unless keep_failures
    s1 = C.collect("fetch", ["push"], 2, tmp_path / "f1.zarr", workers=0, image_size=(16, 16), max_steps=2,
                   progress=False, verbose=False)
    assert s1["tasks"]["push"]["successes"] == 0 and s1["episodes_written"] == 0
    assert len(EpisodeStore.open(tmp_path / "f1.zarr")) == 0
    s2 = C.collect("fetch", ["push"], 2, tmp_path / "f2.zarr", workers=0, image_size=(16, 16), max_steps=2,
                   keep_failures=True, progress=False, verbose=False)
    assert s2["episodes_written"] == 2 and len(EpisodeStore.open(tmp_path / "f2.zarr")) == 2

    # an interruption keeps what was written, and resume skips it
    out3 = tmp_path / "f3.zarr"
    real_append = EpisodeStore.append_episode
    calls = {"n": 0}

    def flaky_append(self, episode, seed=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_append(self, episode, seed=seed)

    monkeypatch.setattr(EpisodeStore, "append_episode", flaky_append)
    with pytest.raises(KeyboardInterrupt):
        C.collect("fetch", ["reach"], 4, out3, workers=0, image_size=(16, 16), progress=False, verbose=False)
    monkeypatch.setattr(EpisodeStore, "append_episode", real_append)
    assert len(EpisodeStore.open(out3)) == 2
    s3 = C.collect("fetch", ["reach"], 4, out3, workers=0, image_size=(16, 16), resume=True, progress=False,
                   verbose=False)
    assert s3["skipped_existing"] == 2 and s3["tasks"]["reach"]["attempts"] == 2
    store = EpisodeStore.open(out3)
    assert sorted(store.episode_seed(i) for i in range(len(store))) == [0, 1, 2, 3]


def test_collect_errors(tmp_path):
    from chunkpolicy.sim.collect import collect

    _need("metaworld", "gym_pusht")
    with pytest.raises(ValueError, match="no scripted expert"):
        collect("pusht", ["push-t"], 1, tmp_path / "x.zarr", workers=0)
    with pytest.raises(ValueError, match="unknown Meta-World task"):
        collect("metaworld", ["push"], 1, tmp_path / "x.zarr", workers=0)
    with pytest.raises(ValueError, match="unknown env"):
        collect("libero", ["x"], 1, tmp_path / "x.zarr", workers=0)
    assert not (tmp_path / "x.zarr").exists()


def test_collect_cli_help(capsys):
    from chunkpolicy.cli import main

    with pytest.raises(SystemExit) as e:
        main(["collect", "--help"])
    assert e.value.code == 0 and "--episodes" in capsys.readouterr().out


# -- frames on demand -------------------------------------------------------------------------------------------------
ADAPTERS = {"metaworld": ("push-v3", ("metaworld", "mujoco")), "fetch": ("push", ("gymnasium_robotics", "mujoco")),
            "aloha": ("transfer-cube", ("dm_control", "gym_aloha")), "pusht": ("push-t", ("gym_pusht",))}


@pytest.mark.parametrize("name", ADAPTERS)
def test_step_without_frames_then_render_gives_the_frames_of_that_state(name):
    """Every adapter: ``step(a, render=False)`` leaves the frames out (PushT draws them anyway and keeps them), the
    state is the same, and ``render()`` gives exactly the frames ``step(a)`` would have returned."""
    task, mods = ADAPTERS[name]
    _need(*mods)
    with make_env(name, task, image_size=(16, 16)) as env:
        a = np.full(env.spec.action_dim, 300.0 if name == "pusht" else 0.1, np.float32)  # PushT: pixels
        env.reset(3)
        skipped, *_ = env.step(a, render=False)
        later = env.render()
        env.reset(3)
        full, *_ = env.step(a)
    np.testing.assert_array_equal(skipped["state"], full["state"])
    assert (skipped["images"] is None) == (name != "pusht")
    assert set(later) == set(full["images"]) == set(env.spec.cameras)
    for cam in later:
        np.testing.assert_array_equal(later[cam], full["images"][cam])


def test_envpool_frames_schedule_and_a_frameless_observation_is_refused():
    """EnvPool.step renders per env as asked, always for an env whose episode ends; obs_to_batch names a frameless
    observation instead of batching it as "no cameras"."""
    _need("gymnasium_robotics", "mujoco")
    with EnvPool.make("fetch", ["reach", "reach"], image_size=(16, 16), max_steps=2) as pool:
        pool.reset([0, 1])
        obs, _, dones, _ = pool.step(np.zeros((2, 4)), render=[True, False])
        assert obs[0]["images"] is not None and obs[1]["images"] is None and not dones.any()
        space = UnifiedSpace(32, "pad", embodiments=[pool.spec])
        with pytest.raises(ValueError, match=r"observations\[1\]\['images'\]: not rendered"):
            obs_to_batch(obs, space, pool.spec, pool.prompts)
        with pytest.raises(ValueError, match=r"render: expected one flag or 2 \(one per env\), got shape \(3,\)"):
            pool.step(np.zeros((2, 4)), render=[True, True, False])
        obs, _, dones, _ = pool.step(np.zeros((2, 4)), render=False)  # the last tick: episodes end
        assert dones.all() and all(o["images"] is not None for o in obs)
        obs_to_batch(obs, space, pool.spec, pool.prompts)


def test_metaworld_first_frame_does_not_depend_on_the_previous_episode():
    """Meta-World's reset left the goal marker where the previous episode's kinematics put it (it is placed only after
    a step), so an env's first frame of a seed differed by a pixel level between its first and later episodes, and a
    policy's whole episode with it: evaluation results depended on what a worker's env ran before."""
    _need("metaworld", "mujoco")
    with make_env("metaworld", "push-v3", image_size=(64, 64)) as env:
        first = env.reset(100000)["images"]
        for _ in range(3):
            env.step(np.array([0.5, -0.5, 0.2, 1.0]))
        again = env.reset(100000)["images"]
    for cam in first:
        np.testing.assert_array_equal(first[cam], again[cam])
