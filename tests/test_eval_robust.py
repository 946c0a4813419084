"""Evaluation never loses results: results.json before (and independent of) the videos; the do-nothing baseline
is cached per (env, tasks, seeds, episode limit, executor, horizon, env options) and its cost is stated."""

import json

import pytest

pytest.importorskip("metaworld", reason="`metaworld` is not installed (install the `sim` extra)")

from chunkpolicy.evaluation.cli import main as eval_main  # noqa: E402

def _args(max_steps: int = 4) -> list[str]:
    return ["--env", "metaworld", "--tasks", "reach-v3", "--episodes", "2", "--num-envs", "2", "--max-steps",
            str(max_steps), "--image-size", "32", "32", "--executor", "open_loop:2", "--no-progress", "--device", "cpu"]


ARGS = _args()


def test_video_failure_is_a_warning_and_results_are_kept(tmp_path, monkeypatch, capsys):
    import chunkpolicy.evaluation.video as video

    def broken(*a, **k):
        raise RuntimeError("encoder exploded")

    monkeypatch.setattr(video, "write_mp4", broken)
    out = tmp_path / "e"
    assert eval_main(["--baseline-only", *ARGS, "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["summary"]["do-nothing"]["mean"]["n"] == 2 and res["videos"] == []
    assert any("encoder exploded" in w for w in res["warnings"])
    assert (out / "results.md").is_file()
    captured = capsys.readouterr()
    assert "warning: could not write" in captured.out and "encoder exploded" in captured.err


def test_baseline_is_cached_and_its_cost_stated(tmp_path, capsys):
    assert eval_main(["--baseline-only", *ARGS, "--out", str(tmp_path / "a"), "--videos", "0"]) == 0
    first = capsys.readouterr().out
    assert "do-nothing cost" in first and "cached in" in first
    a = json.loads((tmp_path / "a/results.json").read_text())
    assert a["baseline"]["cached"] is False
    assert eval_main(["--baseline-only", *ARGS, "--out", str(tmp_path / "b")]) == 0
    b = json.loads((tmp_path / "b/results.json").read_text())
    assert b["baseline"]["cached"] is True and "(cached" in capsys.readouterr().out
    assert b["episodes"] == a["episodes"] and b["summary"] == a["summary"]
    # another episode limit is another key; --no-baseline-cache recomputes
    assert eval_main(["--baseline-only", *_args(3), "--out", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c/results.json").read_text())["baseline"]["cached"] is False
    assert eval_main(["--baseline-only", *ARGS, "--out", str(tmp_path / "d"), "--no-baseline-cache"]) == 0
    assert json.loads((tmp_path / "d/results.json").read_text())["baseline"] == {
        "cached": False, "cache": None, "rollout_s": pytest.approx(json.loads(
            (tmp_path / "d/results.json").read_text())["rollout_s"]["do-nothing"])}
