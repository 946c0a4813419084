"""The README's main job at toy scale: collect → train → evaluate, and everything it promises to leave behind."""

import json

import pytest

pytest.importorskip("metaworld", reason="`metaworld` is not installed (install the `sim` extra)")


def test_quickstart_toy_scale(tmp_path):
    from chunkpolicy.quickstart import main

    out = tmp_path / "qs"
    rc = main(["--out", str(out), "--tasks", "reach-v3", "--episodes", "2", "--steps", "4", "--eval-episodes", "2",
               "--max-steps", "4", "--workers", "0"])
    assert rc == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["tasks"] == ["reach-v3"] and s["train_steps"] == 4
    assert set(s["success"]) == {"policy", "do-nothing"}
    assert s["success"]["do-nothing"]["mean"]["n"] == 2
    for f in ("demos.zarr", "train/loss.png", "eval/success.png", "eval/results.json", "eval/results.md",
              "eval/videos/policy_reach-v3_0.mp4", "eval/videos/do-nothing_reach-v3_0.mp4"):
        assert (out / f).exists(), f
