"""Evaluation of heads that may fail (tokens: invalid token decodes): do-nothing substitution, counts, reports.

Push-T (absolute actions: the do-nothing chunk holds the agent where it is) with tiny random policies; needs the `sim`
extra (skips with the reason otherwise).
"""

import json

import numpy as np
import pytest
import torch

from chunkpolicy.evaluation import rollout
from chunkpolicy.evaluation.cli import format_results, run_eval
from chunkpolicy.evaluation.report import markdown_table, summarize
from chunkpolicy.evaluation.rollout import Method, evaluate, policy_predict_fn
from chunkpolicy.models.policy import ChunkPolicy, PolicyConfig
from chunkpolicy.normalize import compute_stats
from chunkpolicy.spaces import UnifiedSpace

pytest.importorskip("gym_pusht", reason="`gym-pusht` is not installed (install the `sim` extra)")

from chunkpolicy.sim.base import EnvPool, env_spec, make_env  # noqa: E402

HW = (32, 32)


def _pusht_policy(head: str = "tokens", horizon: int = 4) -> ChunkPolicy:
    spec = env_spec("pusht")
    rng = np.random.default_rng(0)
    stats = {spec.name: {"action": compute_stats(rng.uniform(0, 512, (100, 2))),
                         "state": compute_stats(rng.uniform(0, 512, (100, 2)))}}
    torch.manual_seed(0)
    space = UnifiedSpace(32, "pad", embodiments=[spec])
    return ChunkPolicy(PolicyConfig(backbone="tiny", head=head, horizon=horizon), space, stats).eval()


def _nan_for(policy: ChunkPolicy, bad_envs: set[int]):
    """Wrap ``predict_chunk`` as the contract says a failing head behaves: NaN on the valid dims of the samples it
    could not produce (here: the envs in ``bad_envs``), ``head.last_valid`` False for them."""
    orig = policy.predict_chunk

    def predict_chunk(batch, *a, **k):
        out = orig(batch, *a, **k)
        out = torch.full_like(out, 0.25)  # a fixed valid chunk (the untrained head's own output may be invalid)
        valid = torch.tensor([i not in bad_envs for i in range(out.shape[0])])
        out[~valid] = float("nan")
        policy.head.last_valid = valid
        return out

    policy.predict_chunk = predict_chunk
    return policy


def test_nan_sample_gets_the_do_nothing_chunk():
    policy = _nan_for(_pusht_policy(), {1})
    assert policy.head.caps.may_fail
    envs = [make_env("pusht", "push-t", image_size=HW) for _ in range(2)]
    obs = [e.reset(s) for e, s in zip(envs, (3, 4))]
    seen = []
    predict, on_step = policy_predict_fn(policy, envs[0].spec, [e.task_prompt for e in envs], on_chunk=seen.append)
    on_step(0, obs)
    chunk = predict(obs)
    for e in envs:
        e.close()
    assert chunk.shape == (2, 4, 2) and torch.isfinite(chunk).all()
    torch.testing.assert_close(chunk[0], torch.full((4, 2), 0.25))  # a valid sample is untouched
    # the failed one holds the agent where it is (Push-T actions are absolute target positions)
    hold = torch.as_tensor(obs[1]["state"], dtype=chunk.dtype).expand(4, 2)
    assert torch.equal(chunk[1], hold)
    assert len(seen) == 1 and seen[0].tolist() == [False, True]


def test_flow_head_nan_is_not_hidden():
    """A head that cannot fail gets no substitution: its NaN reaches the executor, which raises."""
    policy = _pusht_policy("flow_expert")
    assert not policy.head.caps.may_fail
    policy.predict_chunk = lambda batch, *a, **k: torch.full((1, 4, 2), float("nan"))
    env = make_env("pusht", "push-t", image_size=HW, max_steps=2)
    pool = EnvPool([env])
    predict, on_step = policy_predict_fn(policy, env.spec, pool.prompts)
    with pytest.raises(ValueError, match="NaN"):
        pool.rollout(predict, "open_loop:2", [0], on_step=on_step)
    pool.close()


def test_invalid_env_keeps_still_and_is_counted(tmp_path, monkeypatch):
    policy = _nan_for(_pusht_policy(), {1})
    ckpt = str(tmp_path / "ckpt")
    monkeypatch.setitem(rollout._POLICIES, (ckpt, "cpu"), policy)  # what _load_policy would have loaded
    steps = []
    orig_step = EnvPool.step

    def spy(self, actions, render=True):
        steps.append(([np.array(o["state"]) for o in self._obs], np.array(actions)))
        return orig_step(self, actions, render)

    monkeypatch.setattr(EnvPool, "step", spy)
    res = evaluate([Method("policy", ckpt, horizon=4), Method("do-nothing", None, horizon=4)], "pusht", ["push-t"], 2,
                   "open_loop:2", num_envs=2, video_episodes=0, env_kwargs={"image_size": HW, "max_steps": 6},
                   progress=False)
    recs = res["policy"]["episodes"]
    assert [(r["chunks"], r["invalid_chunks"]) for r in recs] == [(3, 0), (3, 3)]  # open_loop:2 over 6 steps
    assert [(r["chunks"], r["invalid_chunks"]) for r in res["do-nothing"]["episodes"]] == [(3, 0), (3, 0)]
    policy_steps = steps[:6]
    for t, (states, actions) in enumerate(policy_steps):
        np.testing.assert_allclose(actions[0], [0.25, 0.25])  # the valid env runs the policy's chunk
        held = policy_steps[t - t % 2][0][1]  # the state when its chunk was requested
        np.testing.assert_array_equal(actions[1], held.astype(np.float32))
    # the report: per task and overall
    from chunkpolicy.evaluation.report import invalid_counts

    s = summarize({"policy": {"push-t": [r["success"] for r in recs]}}, {"policy": invalid_counts(recs)})
    assert s["policy"]["tasks"]["push-t"]["invalid_chunks"] == 3 and s["policy"]["mean"]["invalid_rate"] == 0.5
    assert "| push-t | " in markdown_table(s) and "50.0% (3/6)" in markdown_table(s)


def test_report_invalid_column_only_for_counted_methods():
    s = summarize({"tok": {"a": [1, 0], "b": [1, 1]}, "base": {"a": [0, 0], "b": [0, 0]}},
                  {"tok": {"a": (0, 10), "b": (0, 6)}})
    assert s["tok"]["mean"]["invalid_rate"] == 0.0 and s["tok"]["tasks"]["a"]["chunks"] == 10
    assert "invalid_chunks" not in s["base"]["mean"]
    table = markdown_table(s)
    header = table.splitlines()[0]
    assert header == "| task | tok | base | tok invalid decodes |"
    assert "0.0% (0/16)" in table.splitlines()[-1] and "0.0% (0/10)" in table.splitlines()[2]
    assert "invalid" not in markdown_table(summarize({"flow": {"a": [1]}}))
    with pytest.raises(ValueError, match="no chunk counts for task 'b'"):
        summarize({"tok": {"a": [1], "b": [1]}}, {"tok": {"a": (0, 1)}})


def test_tokens_checkpoint_reports_invalid_rate(tmp_path):
    """A real (untrained) tokens-head checkpoint: its invalid decodes are replaced, counted and reported."""
    ckpt = _pusht_policy().save_pretrained(tmp_path / "tok")
    out = tmp_path / "eval"
    res = run_eval(ckpt, "pusht", ["push-t"], episodes=2, executor="open_loop:2", num_envs=2, image_size=HW,
                   max_steps=4, baseline=True, videos=0, out=out, progress=False, device="cpu")
    recs = res["episodes"]["policy"]
    assert all(r["chunks"] == 2 and r["predictions"] == 2 for r in recs)
    bad = sum(r["invalid_chunks"] for r in recs)
    assert bad > 0  # untrained: greedy decoding does not give a valid chunk, and the rollout still ran
    task, mean = res["summary"]["policy"]["tasks"]["push-t"], res["summary"]["policy"]["mean"]
    assert (task["invalid_chunks"], task["chunks"]) == (mean["invalid_chunks"], mean["chunks"]) == (bad, 4)
    assert mean["invalid_rate"] == bad / 4
    assert "invalid_chunks" not in res["summary"]["do-nothing"]["mean"]  # the baseline cannot fail
    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"]["policy"]["mean"]["invalid_rate"] == bad / 4
    assert saved["episodes"]["policy"][0]["invalid_chunks"] == recs[0]["invalid_chunks"]
    md = (out / "results.md").read_text()
    assert "policy invalid decodes" in md and f"({bad}/4)" in md
    assert f"policy: invalid decodes {bad}/4 chunks" in format_results(res)


def test_too_long_task_prompt_fails_before_any_rollout(tmp_path):
    policy = _pusht_policy("flow_expert")
    policy.config.max_prompt_tokens = 32  # as the tiny configs had: Push-T's prompt is 49 tokens
    ckpt = policy.save_pretrained(tmp_path / "short")
    with pytest.raises(ValueError, match=r"is 49 tokens.*limit of 32.*raise model.max_prompt_tokens to 49"):
        run_eval(ckpt, "pusht", ["push-t"], episodes=1, image_size=HW, max_steps=2, videos=0, out=tmp_path / "e",
                 progress=False, device="cpu")
    assert not (tmp_path / "e").exists()
