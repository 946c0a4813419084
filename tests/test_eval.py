"""eval.py / chunkpolicy eval: closed-loop rollouts of a checkpoint and the do-nothing baseline, reports, errors.

Tiny random policies and a few short Meta-World episodes; needs the `sim` extra (skips with the reason otherwise).
"""

import json

import numpy as np
import pytest
import torch

from chunkpolicy.evaluation.cli import main as eval_main
from chunkpolicy.evaluation.cli import run_eval
from chunkpolicy.evaluation.rollout import Method, do_nothing_predict_fn, evaluate, policy_predict_fn
from chunkpolicy.models.policy import ChunkPolicy, PolicyConfig
from chunkpolicy.normalize import compute_stats
from chunkpolicy.spaces import EmbodimentSpec, UnifiedSpace
from helpers import toy_policy

pytest.importorskip("metaworld", reason="`metaworld` is not installed (install the `sim` extra)")

from chunkpolicy.sim.base import env_spec, make_env  # noqa: E402

HW = (32, 32)


def _mw_policy(tmp_path, n_obs_steps: int = 1, horizon: int = 4, head="flow_expert"):
    spec = env_spec("metaworld")
    rng = np.random.default_rng(0)
    stats = {spec.name: {"action": compute_stats(rng.uniform(-1, 1, (100, 4))),
                         "state": compute_stats(rng.uniform(0, 1, (100, 4)))}}
    torch.manual_seed(0)
    policy = ChunkPolicy(PolicyConfig(backbone="tiny", head=head, horizon=horizon, n_obs_steps=n_obs_steps),
                         UnifiedSpace(32, "pad", embodiments=[spec]), stats)
    if policy.head.caps.needs_data_fit:  # FAST's BPE
        policy.head.fit_to_data([np.clip(rng.normal(0, 0.5, (horizon, 4)), -1, 1) for _ in range(64)])
    return policy, policy.save_pretrained(tmp_path / f"ckpt_t{n_obs_steps}")


HEADS = {  # every head / objective / tokenizer
    "flow_expert": ("flow_expert", {}),
    "dit-diffusion": ("dit", {"depth": 1, "hidden": 32, "num_steps": 3}),
    "dit-flow": ("dit", {"depth": 1, "hidden": 32, "objective": "flow", "num_steps": 3}),
    "tokens-bins": ("tokens", {"tokenizer": "bins"}),
    "tokens-fast": ("tokens", {"tokenizer": "fast", "fast_vocab": 600}),
}


@pytest.mark.parametrize("rtc", [False, True])
@pytest.mark.parametrize("head", HEADS)
def test_cuda_graph_predict_fn_equals_eager_or_is_refused(tmp_path, head, rtc):
    """``policy_predict_fn(cuda_graph=True)``: the same chunks as eager for the same seed where the head can be
    graphed on a CUDA device, and one clear error everywhere else (never a silent eager fallback)."""
    from chunkpolicy.models.heads.configs import head_config

    policy, _ = _mw_policy(tmp_path, head=head_config(*HEADS[head]))
    if rtc and not policy.head.caps.velocity:
        pytest.skip("rtc needs a flow velocity")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    policy = policy.to(device).eval()
    env = make_env("metaworld", "reach-v3", image_size=HW, max_steps=4)
    o = env.reset(3)
    env.close()
    if device != "cuda" or not policy.head.caps.sync_free_sample:
        with pytest.raises(ValueError, match="cuda_graph"):
            policy_predict_fn(policy, env.spec, [env.task_prompt], cuda_graph=True, rtc=rtc)
        return
    eager, _ = policy_predict_fn(policy, env.spec, [env.task_prompt], seed=5, rtc=rtc)
    graph, _ = policy_predict_fn(policy, env.spec, [env.task_prompt], seed=5, rtc=rtc, cuda_graph=True)
    for _ in range(2):  # the second call replays the captured graph
        torch.testing.assert_close(graph([o]), eager([o]), rtol=0, atol=1e-4)


def test_end_to_end_report_files_and_baseline(tmp_path):
    _, ckpt = _mw_policy(tmp_path)
    out = tmp_path / "eval"
    res = run_eval(ckpt, "metaworld", ["reach-v3", "button-press-v3"], episodes=3, executor="open_loop:2", num_envs=2,
                   image_size=HW, max_steps=6, baseline=True, videos=1, out=out, progress=False, device="cpu")
    s = res["summary"]
    assert set(s) == {"policy", "do-nothing"}
    for m in s:
        assert [s[m]["tasks"][t]["n"] for t in ("reach-v3", "button-press-v3")] == [3, 3]
        assert s[m]["mean"]["n"] == 6
    # seeds are the held-out evaluation seeds, one per episode, shared by both methods
    seeds = [r["seed"] for r in res["episodes"]["policy"]]
    assert seeds == [r["seed"] for r in res["episodes"]["do-nothing"]] == [100000, 100001, 100002] * 2
    # open_loop:2 over 6 steps re-plans 3 times; the baseline ran every step of every episode (nothing succeeds)
    assert all(r["predictions"] == 3 for r in res["episodes"]["policy"])
    assert all(r["steps"] == 6 and not r["success"] for r in res["episodes"]["do-nothing"])
    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(s)) and saved["executor"] == "open_loop:2"
    assert "| reach-v3 |" in (out / "results.md").read_text()
    assert (out / "success.png").stat().st_size > 1000
    vids = sorted(p.name for p in (out / "videos").iterdir())
    assert vids == ["do-nothing_button-press-v3_0.mp4", "do-nothing_reach-v3_0.mp4",
                    "policy_button-press-v3_0.mp4", "policy_reach-v3_0.mp4"]


def test_workers_give_the_same_episodes(tmp_path):
    _, ckpt = _mw_policy(tmp_path)
    kw = dict(num_envs=2, video_episodes=0, env_kwargs={"image_size": HW, "max_steps": 5}, progress=False)
    m = Method("policy", str(ckpt), horizon=4)
    base = Method("do-nothing", None, horizon=4)
    a = evaluate([m, base], "metaworld", ["reach-v3"], 3, "temporal_ensemble:0.1", workers=0, **kw)
    b = evaluate([m, base], "metaworld", ["reach-v3"], 3, "temporal_ensemble:0.1", workers=2, **kw)
    for name in ("policy", "do-nothing"):
        assert a[name]["episodes"] == b[name]["episodes"] and len(a[name]["episodes"]) == 3
    assert a["policy"]["episodes"] != a["do-nothing"]["episodes"]  # the policy moved the arm


def test_history_for_two_obs_steps(tmp_path):
    policy, _ = _mw_policy(tmp_path, n_obs_steps=2)
    env = make_env("metaworld", "reach-v3", image_size=HW, max_steps=4)
    seen = []
    orig = policy.predict_chunk

    def spy(batch, *a, **k):
        seen.append((tuple(batch["images"].shape), tuple(batch["state"].shape), batch["state"][0, :, 0].tolist()))
        return orig(batch, *a, **k)

    policy.predict_chunk = spy
    predict, on_step = policy_predict_fn(policy, env.spec, [env.task_prompt])
    o0 = env.reset(1)
    on_step(0, [o0])
    predict([o0])
    o1, *_ = env.step(np.array([1.0, 0, 0, 0]))
    on_step(1, [o1])
    predict([o1])
    env.close()
    # [B, N, T, 3, h, w] / [B, T, D]; the first call repeats the first frame, the second sees (t0, t1)
    assert seen[0][:2] == ((1, 2, 2, 3, *HW), (1, 2, 32)) and seen[1][:2] == ((1, 2, 2, 3, *HW), (1, 2, 32))
    x0, x1 = float(o0["state"][0]), float(o1["state"][0])
    assert seen[0][2] == pytest.approx([x0, x0]) and seen[1][2] == pytest.approx([x0, x1])
    assert x1 != x0


def test_do_nothing_holds_absolute_dims():
    spec = EmbodimentSpec("pt", ("agent_x", "agent_y", "push"), ("agent_x", "agent_y"), ("top",), 10.0,
                          absolute_dims=("agent_x", "agent_y"))
    obs = [{"images": {}, "state": np.array([3.0, -2.0], np.float32)},
           {"images": {}, "state": np.array([7.0, 5.0], np.float32)}]
    chunk = do_nothing_predict_fn(spec, horizon=5)(obs)
    assert chunk.shape == (2, 5, 3)
    np.testing.assert_array_equal(chunk[:, :, 0], [[3.0] * 5, [7.0] * 5])
    np.testing.assert_array_equal(chunk[:, :, 1], [[-2.0] * 5, [5.0] * 5])
    np.testing.assert_array_equal(chunk[:, :, 2], 0.0)
    # Push-T's actions are absolute agent targets: the baseline must hold the agent where it is (regression: it sent
    # the agent to (0, 0) before the adapter declared its action dims absolute)
    pt = do_nothing_predict_fn(env_spec("pusht"), horizon=2)([{"images": {}, "state": np.array([120.0, 300.0], np.float32)}])
    np.testing.assert_array_equal(pt, [[[120.0, 300.0], [120.0, 300.0]]])
    rel = do_nothing_predict_fn(env_spec("metaworld"), horizon=3)([{"images": {}, "state": np.ones(4, np.float32)}])
    np.testing.assert_array_equal(rel, np.zeros((1, 3, 4)))


def test_wrong_embodiment_is_one_clear_error(tmp_path, capsys):
    ckpt = toy_policy(horizon=4).save_pretrained(tmp_path / "toy")
    with pytest.raises(ValueError, match=r"embodiment.*'metaworld_sawyer'.*\['toy'\]"):
        run_eval(ckpt, "metaworld", ["reach-v3"], episodes=1, out=tmp_path / "e", progress=False)
    assert not (tmp_path / "e").exists()  # nothing written
    rc = eval_main(["--checkpoint", str(ckpt), "--env", "metaworld", "--tasks", "reach-v3", "--out", str(tmp_path / "e")])
    assert rc == 2 and "trained on ['toy']" in capsys.readouterr().err


@pytest.mark.parametrize("args, msg", [
    (["--env", "metaworld", "--tasks", "no-such-v3", "--baseline-only"], "unknown Meta-World task"),
    (["--env", "atari", "--tasks", "pong", "--baseline-only"], "unknown env 'atari'"),
    (["--env", "metaworld", "--tasks", "reach-v3", "--baseline-only", "--executor", "greedy"], "unknown executor"),
    (["--env", "metaworld", "--tasks", "reach-v3"], "--checkpoint"),
    (["--env", "metaworld", "--tasks", "reach-v3", "--checkpoint", "/nonexistent/ckpt"], "not a chunkpolicy checkpoint"),
])
def test_cli_errors(tmp_path, capsys, args, msg):
    assert eval_main(args + ["--out", str(tmp_path / "e"), "--no-progress"]) == 2
    assert msg in capsys.readouterr().err


def test_eval_with_cuda_graphs_gives_the_eager_episodes_or_refuses(tmp_path):
    """``chunkpolicy eval --cuda-graph``: on a CUDA device the same episodes as eager (graphs captured once per
    process and reused across batches and tasks); elsewhere one error before any rollout."""
    _, ckpt = _mw_policy(tmp_path)
    kw = dict(episodes=3, executor="open_loop:2", num_envs=2, image_size=HW, max_steps=6, videos=0, progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="cuda_graph: needs a policy on a CUDA device"):
            run_eval(ckpt, "metaworld", ["reach-v3"], out=tmp_path / "g", device="cpu", cuda_graph=True, **kw)
        assert not (tmp_path / "g").exists()
        return
    from chunkpolicy.evaluation import rollout

    eager = run_eval(ckpt, "metaworld", ["reach-v3", "button-press-v3"], out=tmp_path / "e", device="cuda", **kw)
    graph = run_eval(ckpt, "metaworld", ["reach-v3", "button-press-v3"], out=tmp_path / "g", device="cuda",
                     cuda_graph=True, **kw)
    assert graph["cuda_graph"] and not eager["cuda_graph"]
    strip = lambda recs: [{k: r[k] for k in ("task", "seed", "success", "steps", "predictions")} for r in recs]  # noqa: E731
    assert strip(graph["episodes"]["policy"]) == strip(eager["episodes"]["policy"])
    for a, b in zip(graph["episodes"]["policy"], eager["episodes"]["policy"]):
        assert a["return"] == pytest.approx(b["return"], abs=1e-3)
    assert not rollout._GRAPHS  # an in-process evaluation frees its graphs


def test_cuda_graph_is_refused_for_lerobot_and_server_methods(tmp_path):
    with pytest.raises(ValueError, match="cuda_graph: only for a chunkpolicy --checkpoint"):
        run_eval(None, "metaworld", ["reach-v3"], lerobot_policy=tmp_path, cuda_graph=True, out=tmp_path / "o")


def test_cuda_graph_auto_resolves_per_head_and_device(tmp_path):
    """``cuda_graph="auto"`` (the study's default): graphs only for heads that sample without host syncs on CUDA;
    what ran is in the results."""
    from chunkpolicy.evaluation.cli import resolve_cuda_graph
    from chunkpolicy.models.heads.base import head_class
    from chunkpolicy.models.heads.configs import head_config

    for name, (head, opts) in HEADS.items():
        caps = head_class(head).capabilities(head_config(head, opts))
        assert resolve_cuda_graph("auto", caps, "cuda") is (name in ("flow_expert", "dit-flow")), name
        assert resolve_cuda_graph("auto", caps, "cpu") is False
        assert resolve_cuda_graph(True, caps, "cpu") is True and resolve_cuda_graph(False, caps, "cuda") is False
    _, ckpt = _mw_policy(tmp_path)
    res = run_eval(ckpt, "metaworld", ["reach-v3"], episodes=1, executor="open_loop:2", num_envs=1, image_size=HW,
                   max_steps=2, videos=0, progress=False, out=tmp_path / "a", device="cpu", cuda_graph="auto")
    assert res["cuda_graph"] is False
    with pytest.raises(ValueError, match="cuda_graph: expected true, false or 'auto'"):
        run_eval(ckpt, "metaworld", ["reach-v3"], out=tmp_path / "b", device="cpu", cuda_graph="yes")


@pytest.mark.parametrize("executor,n_obs_steps", [("open_loop:3", 1), ("open_loop:3", 2), ("rtc:3,1", 1),
                                                  ("temporal_ensemble:0.1", 1)])
def test_frames_are_rendered_only_where_the_policy_or_the_video_reads_them(tmp_path, monkeypatch, executor,
                                                                          n_obs_steps):
    """Evaluation skips camera frames the policy will not read (the executor's will_predict, T_obs ticks back): the
    same episodes and video as rendering every tick, with fewer frames rendered where the executor runs several
    actions per chunk."""
    from chunkpolicy.sim.base import SimEnv
    from chunkpolicy.sim.metaworld_env import MetaWorldEnv

    _, ckpt = _mw_policy(tmp_path, n_obs_steps=n_obs_steps, horizon=6)
    renders = [0]
    orig_render = MetaWorldEnv._render

    def counted(self):
        renders[0] += 1
        return orig_render(self)

    monkeypatch.setattr(MetaWorldEnv, "_render", counted)
    kw = dict(num_envs=2, video_episodes=1, env_kwargs={"image_size": HW, "max_steps": 13}, progress=False, workers=0)
    m = Method("policy", str(ckpt), horizon=6, rtc=executor.startswith("rtc"))
    lazy = evaluate([m], "metaworld", ["reach-v3"], 2, executor, **kw)["policy"]
    n_lazy, renders[0] = renders[0], 0
    orig_step = SimEnv.step
    monkeypatch.setattr(SimEnv, "step", lambda self, action, render=True: orig_step(self, action, True))
    full = evaluate([m], "metaworld", ["reach-v3"], 2, executor, **kw)["policy"]
    assert lazy["episodes"] == full["episodes"] and all(e["steps"] == 13 for e in full["episodes"])
    (v_lazy,), (v_full,) = lazy["videos"]["reach-v3"], full["videos"]["reach-v3"]
    assert len(v_lazy) == 13 and all(np.array_equal(a, b) for a, b in zip(v_lazy, v_full, strict=True))
    assert renders[0] == 2 * 14  # reset + 13 steps, both envs
    if executor == "temporal_ensemble:0.1":
        assert n_lazy == renders[0]  # it reads every tick
    else:  # env 0 (video) every tick; env 1 at reset, at the ticks a prediction reads and at its episode's end
        ticks = {("open_loop:3", 1): {3, 6, 9, 12}, ("open_loop:3", 2): {2, 3, 5, 6, 8, 9, 11, 12},
                 ("rtc:3,1", 1): {3, 6, 9, 12}}[executor, n_obs_steps]
        assert n_lazy == 14 + 1 + len(ticks | {13})
