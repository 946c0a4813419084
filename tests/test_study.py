"""chunkpolicy study: config checks, one row end to end (collect → train → eval of every checkpoint → latency →
results JSON), a row reusing another row's checkpoint, skip / resume, and the aggregated tables and plots.

Tiny settings on Meta-World (CPU): one reach-v3 demo, a 4-step quickstart-sized policy, 2 short episodes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from chunkpolicy.study.config import StudyError, load_study

pytest.importorskip("metaworld", reason="`metaworld` is not installed (install the `sim` extra)")

REPO = Path(__file__).resolve().parents[1]


def _study(tmp_path: Path, **data_over) -> Path:
    doc = {
        "name": "tiny",
        "out_dir": str(tmp_path / "work"),
        "results_dir": str(tmp_path / "results"),
        "defaults": {
            "eval": {"episodes": 1, "max_steps": 4, "num_envs": 1, "videos": 0, "latency_calls": 1,
                     "executor": "open_loop:2", "device": "cpu"},
            "train": {"eval_checkpoints": "all", "ckpt_every": 2, "steps": 4},
        },
        "data": {"reach": {"env": "metaworld", "tasks": ["reach-v3"],
                           **(data_over or {"collect": {"episodes": 1, "image_size": [64, 64], "cameras": ["corner"],
                                                        "workers": 0}})}},
        "rows": {
            "a-flow": {"data": "reach", "eval": {"episodes": 2, "curve_episodes": 1}, "method": {
                "config": str(REPO / "configs" / "quickstart_metaworld.yaml"),
                "overrides": ["model.head=flow_expert", "model.horizon=4", "train.batch_size=4", "data.num_workers=0",
                              "train.log_every=2", "train.progress=false", "train.warmup_steps=1"]}},
            "b-flow-te": {"group": "b", "data": "reach", "method": {"from_row": "a-flow"},
                          "eval": {"executor": "temporal_ensemble:0.1"}, "train": {"eval_checkpoints": "last"}},
        },
    }
    p = tmp_path / "study.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


@pytest.fixture(scope="module")
def row_a(tmp_path_factory):
    """Row a-flow run once through the CLI (collect 1 demo, train 4 steps, evaluate both checkpoints, latency)."""
    from chunkpolicy.study.cli import main

    tmp_path = tmp_path_factory.mktemp("study")
    path = _study(tmp_path)
    assert main(["run", "a-flow", "--study", str(path)]) == 0
    return tmp_path, path


@pytest.mark.slow
def test_row_results(row_a):
    tmp_path, path = row_a
    res = json.loads((tmp_path / "results" / "a-flow.json").read_text())
    assert res["row"] == "a-flow" and res["group"] == "a" and res["label"] == "flow_expert"
    assert res["command"] == f"chunkpolicy study run a-flow --study {path}"
    assert res["train"]["steps"] == 4 and res["train"]["framework"] == "chunkpolicy"
    assert res["train"]["gpus"] == 0 and res["gpu_minutes"] == 0.0 and res["train"]["wall_minutes"] > 0
    assert res["data"]["episodes"] == 1 and res["data"]["expert"]["reach-v3"]["successes"] == 1
    assert res["tasks"] == ["reach-v3"] and res["success"]["tasks"]["reach-v3"]["n"] == 2
    lo, hi = res["success"]["mean"]["ci95"]
    assert 0 <= lo <= res["success"]["mean"]["rate"] <= hi <= 1
    assert [e["step"] for e in res["success_vs_steps"]] == [2, 4]  # every kept checkpoint evaluated
    # the curve's earlier point with curve_episodes, the row's result (last checkpoint) with episodes
    assert [e["episodes_per_task"] for e in res["success_vs_steps"]] == [1, 2]
    assert [e["mean"]["n"] for e in res["success_vs_steps"]] == [1, 2] and res["eval"]["episodes_per_task"] == 2
    assert res["latency"]["calls"] == 1 and res["latency"]["median_ms"] > 0 and res["latency"]["chunk_len"] == 4
    assert res["latency"]["mode"] == "eager" and res["latency"]["cuda_graph"] == {"skipped": "device cpu"}
    assert "commit" in res["git"] and res["eval"]["executor"] == "open_loop:2"
    assert [(e["task"], e["seed"]) for e in res["episodes"]] == [("reach-v3", 100000), ("reach-v3", 100001)]


@pytest.mark.slow
def test_from_row_reuses_the_checkpoint_then_skip_list_aggregate(row_a, capsys):
    from chunkpolicy.study.aggregate import aggregate
    from chunkpolicy.study.cli import main

    tmp_path, path = row_a
    res = json.loads((tmp_path / "results" / "a-flow.json").read_text())
    # the second row evaluates the first row's checkpoint with another executor: no training, no GPU cost of its own
    assert main(["run", "b-flow-te", "--study", str(path)]) == 0
    b = json.loads((tmp_path / "results" / "b-flow-te.json").read_text())
    assert b["train"]["source_row"] == "a-flow" and b["train"]["checkpoint"] == res["train"]["checkpoint"]
    assert b["eval"]["executor"] == "temporal_ensemble:0.1" and len(b["success_vs_steps"]) == 1

    capsys.readouterr()
    assert main(["run", "a-flow", "--study", str(path)]) == 0  # done: skipped
    assert "exists (--force to redo it)" in capsys.readouterr().out
    assert main(["list", "--study", str(path)]) == 0
    listed = capsys.readouterr().out
    assert listed.count("done") == 2 and "chunkpolicy study run b-flow-te" in listed

    agg = aggregate(tmp_path / "results", tmp_path / "agg")
    md = (tmp_path / "agg" / "STUDY.md").read_text()
    assert "## a" in md and "## b" in md and "| reach-v3 |" in md and "GPU-minutes" in md
    assert "chunkpolicy study run a-flow" in md
    names = sorted(Path(p).name for p in agg["plots"])
    assert names == ["steps_a_metaworld.png", "success_a_metaworld.png", "success_b_metaworld.png"]
    assert all(Path(p).stat().st_size > 1000 for p in agg["plots"])


@pytest.mark.slow
def test_interrupted_training_resumes_from_its_checkpoint(row_a, capsys):
    from chunkpolicy.study.runner import run_row

    tmp_path, path = row_a  # runs last in this module: it rewrites row a-flow
    study = load_study(path)
    run = tmp_path / "work" / "rows" / "a-flow" / "train"
    # as if the process had been killed after the step-2 checkpoint: no final checkpoint, summary or results
    import shutil

    shutil.rmtree(run / "checkpoints" / "step_000004")
    (run / "summary.json").unlink()
    (tmp_path / "results" / "a-flow.json").unlink()
    capsys.readouterr()
    res = run_row(study, "a-flow")
    out = capsys.readouterr().out
    assert "resuming from step_000002" in out and "resumed from" in out
    assert res["train"]["steps"] == 4 and [e["step"] for e in res["success_vs_steps"]] == [2, 4]
    assert out.count("reusing the evaluation") == 1  # step 2 (unchanged checkpoint); the new step 4 is evaluated again


def _xemb_study(tmp_path: Path, reach_store: Path) -> Path:
    """A 4c-style pair at tiny settings: a pretrain on a two-embodiment mixture (Meta-World reach + Fetch reach),
    evaluated on Meta-World, and LoRA / head-only post-training rows that start from its final checkpoint."""
    tiny = ["model.head=flow_expert", "model.horizon=4", "train.batch_size=4", "data.num_workers=0",
            "train.log_every=2", "train.progress=false", "train.warmup_steps=1", "data.n_cameras=1"]
    cfg = str(REPO / "configs" / "quickstart_metaworld.yaml")
    doc = {
        "name": "tiny-4c", "out_dir": str(tmp_path / "work"), "results_dir": str(tmp_path / "results"),
        "defaults": {"eval": {"episodes": 1, "max_steps": 4, "num_envs": 1, "videos": 0, "latency_calls": 1,
                              "executor": "open_loop:2", "device": "cpu"},
                     "train": {"steps": 2, "ckpt_every": 2}},
        "data": {"reach": {"env": "metaworld", "tasks": ["reach-v3"], "store": str(reach_store)},
                 "fetch": {"env": "fetch", "tasks": ["reach"],
                           "collect": {"episodes": 1, "image_size": [64, 64], "cameras": ["front"], "workers": 0}}},
        "rows": {
            "c-pretrain": {"data": "reach", "mixture": ["reach", {"data": "fetch", "weight": 2.0}],
                           "method": {"config": cfg, "overrides": tiny + ["data.alpha=0.43"]}},
            "c-lora": {"data": "reach", "method": {"config": cfg, "init_from_row": "c-pretrain",
                                                   "overrides": tiny + ["posttrain.mode=lora"]}},
            "c-head_only": {"data": "reach", "method": {"config": cfg, "init_from_row": "c-pretrain",
                                                        "overrides": tiny + ["posttrain.mode=head_only"]}},
        },
    }
    p = tmp_path / "study.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


@pytest.mark.slow
def test_pretrain_on_a_mixture_then_posttrain_from_its_checkpoint(row_a, tmp_path, capsys):
    """Experiment 4c's row kinds end to end: a post-train row trains its init_from_row first when that checkpoint is
    missing (and counts its GPU time), the pretrain row then reuses that training, a second post-train row starts
    from the same checkpoint, and a retrained pretrain makes an old post-train run an error, not a silent mix."""
    from chunkpolicy.study.cli import main

    src, _ = row_a
    path = _xemb_study(tmp_path, src / "work" / "data" / "reach.zarr")
    assert main(["run", "c-lora", "--study", str(path)]) == 0
    out = capsys.readouterr().out
    assert "[c-pretrain] training flow_expert" in out and "[c-lora] training lora from c-pretrain" in out
    lora = json.loads((tmp_path / "results" / "c-lora.json").read_text())
    init = lora["train"]["init_from"]
    pre_ckpt = tmp_path / "work" / "rows" / "c-pretrain" / "train" / "checkpoints" / "step_000002"
    assert init["row"] == "c-pretrain" and init["trained_now"] is True and init["steps"] == 2
    assert Path(init["checkpoint"]) == pre_ckpt and f"posttrain.init_from={pre_ckpt}" in lora["train"]["config"]["overrides"]
    assert lora["label"] == "lora from c-pretrain" and lora["train"]["steps"] == 2
    assert lora["train"]["datasets"] == [{"name": "reach", "store": str(src / "work" / "data" / "reach.zarr"), "weight": 1.0}]

    assert main(["run", "c-pretrain", "--study", str(path)]) == 0
    out = capsys.readouterr().out
    assert "[c-pretrain] training" not in out  # the post-train row's run trained it: reused
    pre = json.loads((tmp_path / "results" / "c-pretrain.json").read_text())
    assert [d["name"] for d in pre["train"]["datasets"]] == ["reach", "fetch"]
    assert [d["weight"] for d in pre["train"]["datasets"]] == [1.0, 2.0] and len(pre["train"]["mixture_probs"]) == 2
    assert pre["train"]["init_from"] is None and pre["tasks"] == ["reach-v3"]

    assert main(["run", "c-head_only", "--study", str(path)]) == 0
    head = json.loads((tmp_path / "results" / "c-head_only.json").read_text())
    assert head["train"]["init_from"]["trained_now"] is False
    assert head["train"]["init_from"]["checkpoint"] == init["checkpoint"]
    summary = json.loads((tmp_path / "work" / "rows" / "c-head_only" / "train" / "summary.json").read_text())
    assert summary["data"]["mode"] == "head_only" and summary["data"]["init_from"] == str(pre_ckpt)

    # the pretrain retrained (new weights at the same path): the finished LoRA run no longer matches it
    import shutil

    shutil.rmtree(tmp_path / "work" / "rows" / "c-pretrain")
    (tmp_path / "results" / "c-lora.json").unlink()
    capsys.readouterr()
    assert main(["run", "c-lora", "--study", str(path)]) == 2
    assert "started from other weights" in capsys.readouterr().err


@pytest.mark.parametrize("edit, msg", [
    (lambda d: d["rows"]["a-flow"]["method"].update(bogus=1), r"rows.a-flow.method.bogus: unknown key"),
    (lambda d: d["rows"]["a-flow"].update(data="nope"), r"rows.a-flow.data: 'nope' is not a key of data"),
    (lambda d: d["rows"]["a-flow"]["method"].update(lerobot="act"), r"rows.a-flow.method: give exactly one of"),
    (lambda d: d["rows"]["b-flow-te"]["method"].update(from_row="zzz"), r"rows.b-flow-te.method.from_row: 'zzz'"),
    (lambda d: d["rows"]["a-flow"].update(eval={"episodes": 0}), r"rows.a-flow.eval.episodes"),
    (lambda d: d["rows"]["a-flow"].update(eval={"episodes": 2, "curve_episodes": 3}), r"rows.a-flow.eval.curve_episodes"),
    (lambda d: d["rows"]["a-flow"].update(eval={"cuda_graph": "yes"}), r"rows.a-flow.eval.cuda_graph: expected true, false or auto"),
    (lambda d: d["data"]["reach"].pop("collect"), r"data.reach: give store .* or collect"),
    (lambda d: d["rows"].update({"c-lr": {"data": "reach", "method": {"lerobot": "act"}}}), r"rows.c-lr.method.steps"),
    (lambda d: d["rows"]["a-flow"].update(mixture=["reach", "nope"]), r"rows.a-flow.mixture.1: 'nope' is not a key"),
    (lambda d: d["rows"]["a-flow"].update(mixture=[{"data": "reach", "weight": 0}]), r"rows.a-flow.mixture.0.weight"),
    (lambda d: d["rows"]["a-flow"].update(mixture=[{"data": "reach", "w": 1}]), r"rows.a-flow.mixture.0.w: unknown key"),
    (lambda d: d["rows"]["b-flow-te"].update(mixture=["reach"]), r"rows.b-flow-te.mixture: only a method.config row"),
    (lambda d: d["rows"]["a-flow"]["method"].update(init_from_row="b-flow-te"),
     r"rows.a-flow.method.init_from_row: 'b-flow-te' must be a method.config training row"),
    (lambda d: d["rows"]["a-flow"]["method"].update(init_from_row="a-flow"), r"init_from_row: a cycle \(a-flow -> a-flow\)"),
    (lambda d: d["rows"]["b-flow-te"]["method"].update(init_from_row="a-flow"),
     r"rows.b-flow-te.method.init_from_row: post-training needs method.config"),
    (lambda d: d["rows"]["a-flow"]["method"].update(init_from_row="z", overrides=["posttrain.init_from=x"]),
     r"rows.a-flow.method.overrides: posttrain.init_from is set by init_from_row"),
    (lambda d: d.update(comparisons=[{"a": "a-flow", "b": "zzz"}]), r"comparisons.0.b: 'zzz' is not a row"),
    (lambda d: d.update(comparisons=[{"a": "a-flow", "b": "b-flow-te"}]),
     r"comparisons.0: rows a-flow and b-flow-te are not evaluated on the same episodes \(eval.episodes 2 vs 1\)"),
    (lambda d: d.update(comparisons=[{"a": "a-flow", "b": "a-flow", "target_points": "ten"}]),
     r"comparisons.0.target_points: expected a number"),
    (lambda d: d.update(comparisons=[{"a": "a-flow", "b": "a-flow", "by": 1}]), r"comparisons.0.by: unknown key"),
    (lambda d: d.update(comparisons={"a": "a-flow"}), r"comparisons: expected a list"),
])
def test_config_errors_name_the_key(tmp_path, edit, msg):
    path = _study(tmp_path)
    doc = yaml.safe_load(path.read_text())
    edit(doc)
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(StudyError, match=msg):
        load_study(path)


def test_cli_errors_are_one_line(tmp_path, capsys):
    from chunkpolicy.study.cli import main

    assert main(["run", "x", "--study", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["run", "nope", "--study", str(_study(tmp_path))]) == 2
    assert "row 'nope' is not in" in capsys.readouterr().err
    assert main(["collect", "reach", "nope", "--study", str(_study(tmp_path))]) == 2  # checked before collecting
    assert "data 'nope' is not in" in capsys.readouterr().err
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "other.json").write_text("{}")
    assert main(["aggregate", str(tmp_path / "r")]) == 2
    assert "no row results" in capsys.readouterr().err


def test_shipped_study_config_is_valid():
    from chunkpolicy.config import load_config
    from chunkpolicy.evaluation.rollout import EVAL_SEED
    from chunkpolicy.study.config import EVAL_DEFAULTS

    assert EVAL_DEFAULTS["seed"] == EVAL_SEED  # the study's default seeds are chunkpolicy eval's held-out ones

    study = load_study(REPO / "configs" / "study" / "issue16.yaml")
    heads = {r.label for r in study.rows.values() if r.group == "4a"}
    assert {"flow_expert", "lerobot:diffusion", "lerobot:act"} <= heads
    assert {r.data.env for r in study.rows.values()} == {"metaworld", "aloha"}
    for d in study.data.values():  # evaluation seeds are never collection seeds
        assert d.collect is None or d.collect.get("seed", 0) + d.collect["episodes"] <= EVAL_SEED, d.name
    cfgs = {}
    for r in study.rows.values():
        assert r.kind == "from_row" or r.train.get("max_minutes", 99) <= 10, r.name
        assert r.eval["episodes"] >= 50 and r.eval["seed"] == EVAL_SEED
        if r.kind == "chunkpolicy":  # every training config with its overrides loads (before any GPU time)
            init = ["posttrain.init_from=x"] if r.method.get("init_from_row") else []
            cfgs[r.name] = cfg = load_config(REPO / r.method["config"], r.method.get("overrides", []) + init
                                             + ["data.datasets=[{path: x.zarr}]"], check_paths=False)
            assert cfg.train.max_minutes <= 10
            assert cfg.train.schedule_over == ("steps" if r.group == "4c" else "time"), r.name

    # 4c: one pretrain on the three embodiments; post-train rows for 20 and 5 demos per task, each mode against
    # scratch, all the same model and the same optimizer steps
    import metaworld.env_dict

    from chunkpolicy.sim import metaworld_env

    assert set(metaworld_env.ML45_TEST) == set(metaworld.env_dict.ML45_V3["test"])  # Meta-World's own split
    assert set(metaworld_env.ML45_TRAIN) == set(metaworld.env_dict.ML45_V3["train"])
    pre = study.rows["4c-pretrain"]
    assert [d.name for d, _ in pre.train_data] == ["ml45_train", "fetch", "aloha_4c"]
    assert {d.env for d, _ in pre.train_data} == {"metaworld", "fetch", "aloha"} and cfgs["4c-pretrain"].data.alpha < 1
    post = {n: r for n, r in study.rows.items() if n.startswith("4c-ml45")}
    assert sorted(post) == sorted(f"4c-ml45test{n}-{m}" for n in (20, 5) for m in ("full", "lora", "head_only", "scratch"))
    for n, r in post.items():
        demos, mode = n.split("-")[1], n.split("-")[2]
        assert r.data.collect["episodes"] == int(demos[len("ml45test"):]) and r.data.tasks == ["ML45_TEST"]
        assert r.method.get("init_from_row") == (None if mode == "scratch" else "4c-pretrain")
        if mode != "scratch":
            assert cfgs[n].posttrain.mode == mode
        assert cfgs[n].model == cfgs["4c-pretrain"].model, n  # the same architecture
        assert cfgs[n].train.steps == cfgs["4c-ml45test20-full"].train.steps, n


@pytest.mark.slow
def test_session_limit_pauses_training_with_a_checkpoint_then_continues(row_a, tmp_path, capsys, monkeypatch):
    """--session-minutes: a session whose time is up stops training at its next step with a checkpoint (exit 3);
    the same command then finishes the row from there."""
    from chunkpolicy.study.cli import main
    from chunkpolicy.study.runner import Deadline, SessionLimit, run_row

    src, _ = row_a
    path = _study(tmp_path, store=str(src / "work" / "data" / "reach.zarr"))  # reuse the collected demos
    study = load_study(path)
    with pytest.raises(SessionLimit, match="before training a-flow"):
        run_row(study, "a-flow", session_minutes=0)  # already over: nothing starts
    monkeypatch.setattr(Deadline, "check", lambda self, what, need_s=0.0: None)  # let training start: the timer then stops it
    with pytest.raises(SessionLimit, match="training paused at step"):
        run_row(study, "a-flow", session_minutes=0)
    monkeypatch.undo()
    summary = json.loads((tmp_path / "work" / "rows" / "a-flow" / "train" / "summary.json").read_text())
    assert summary["stopped"] == "stop_after" and 1 <= summary["steps"] < 4
    assert not (tmp_path / "results" / "a-flow.json").exists()
    capsys.readouterr()
    assert main(["run", "a-flow", "--study", str(path), "--session-minutes", "30"]) == 0
    assert "resuming from step_" in capsys.readouterr().out
    assert json.loads((tmp_path / "results" / "a-flow.json").read_text())["train"]["steps"] == 4


@pytest.mark.slow
def test_eval_reserve_defers_the_evaluation_to_the_next_session(row_a, tmp_path):
    """--eval-reserve-minutes: training runs to the session's end, but an evaluation starts only with that much time
    left; the next session evaluates the finished training."""
    from chunkpolicy.study.runner import SessionLimit, run_row

    src, _ = row_a
    study = load_study(_study(tmp_path, store=str(src / "work" / "data" / "reach.zarr")))
    with pytest.raises(SessionLimit, match=r"session minutes left, 60.0 needed, before evaluating"):
        run_row(study, "a-flow", session_minutes=30, eval_reserve_minutes=60)
    summary = json.loads((tmp_path / "work" / "rows" / "a-flow" / "train" / "summary.json").read_text())
    assert summary["steps"] == 4 and not (tmp_path / "work" / "rows" / "a-flow" / "eval").exists()
    res = run_row(study, "a-flow", session_minutes=30, eval_reserve_minutes=1)
    assert res["train"]["steps"] == 4 and [e["step"] for e in res["success_vs_steps"]] == [2, 4]


def test_lerobot_same_as_steps_come_from_the_finished_rows_results(tmp_path):
    """same_as:ROW on a fresh machine: a finished ROW's results JSON gives the steps; nothing is trained again."""
    from chunkpolicy.study.lerobot_train import _lerobot_steps

    path = _study(tmp_path)
    doc = yaml.safe_load(path.read_text())
    doc["rows"]["c-act"] = {"data": "reach", "method": {"lerobot": "act", "steps": "same_as:a-flow"}}
    path.write_text(yaml.safe_dump(doc))
    study = load_study(path)

    def train_source(row):
        raise AssertionError(f"trained {row.name} again")

    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "a-flow.json").write_text(json.dumps({"row": "a-flow", "train": {"steps": 1234}}))
    assert _lerobot_steps(study, study.rows["c-act"], lambda m: None, train_source) == 1234


@pytest.mark.slow
def test_parallel_posttrain_rows_train_their_shared_pretrain_once(row_a, tmp_path):
    """Two post-train rows started at the same time (parallel streams on one GPU host) on a machine without their
    pretrain: one process trains it, the other waits on its lock and reuses it; both start from the same weights and
    only one counts the pretrain's GPU time."""
    import os
    import subprocess
    import sys

    src, _ = row_a
    path = _xemb_study(tmp_path, src / "work" / "data" / "reach.zarr")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CHUNKPOLICY_STUDY_SHARED_GPU": "2"}  # as study_gpu.sh sets it
    procs = {row: subprocess.Popen([sys.executable, "-m", "chunkpolicy.study.cli", "run", row, "--study", str(path)],
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for row in ("c-lora", "c-head_only")}
    logs = {row: p.communicate(timeout=600)[0] for row, p in procs.items()}
    assert all(p.returncode == 0 for p in procs.values()), logs
    trained = [row for row, out in logs.items() if "[c-pretrain] training flow_expert" in out]
    assert len(trained) == 1, logs  # the pretrain trained by exactly one process
    assert sum("[data fetch] collecting" in out for out in logs.values()) == 1, logs  # its data collected once
    other = "c-head_only" if trained == ["c-lora"] else "c-lora"
    assert "[c-pretrain training] waiting for process" in logs[other], logs[other]
    res = {row: json.loads((tmp_path / "results" / f"{row}.json").read_text()) for row in procs}
    inits = {row: r["train"]["init_from"] for row, r in res.items()}
    assert inits["c-lora"]["checkpoint"] == inits["c-head_only"]["checkpoint"]
    assert inits[trained[0]]["trained_now"] is True and inits[other]["trained_now"] is False
    sessions = json.loads((tmp_path / "work" / "rows" / "c-pretrain" / "train" / "summary.json").read_text())
    assert sessions["steps"] == 2
    # both rows say their minutes and latency were measured on a shared GPU; the study total counts half of each
    from chunkpolicy.study.aggregate import aggregate

    assert all(r["gpu_shared_by"] == 2 for r in res.values())
    md = Path(aggregate(tmp_path / "results", tmp_path / "agg")["markdown"]).read_text()
    assert md.count("(GPU shared by 2 rows)") == 2


def _result(row: str, outcomes: dict[tuple[str, int], bool]) -> dict:
    n, k = len(outcomes), sum(outcomes.values())
    mean = {"successes": k, "n": n, "rate": k / n, "ci95": [0.0, 1.0]}
    return {"row": row, "group": "c", "env": "metaworld", "eval": {"executor": "open_loop:8"}, "data": {"name": "d"},
            "success": {"mean": mean, "tasks": {}},
            "episodes": [{"task": t, "seed": s, "success": v} for (t, s), v in outcomes.items()]}


def test_aggregate_paired_comparisons_with_targets(tmp_path, capsys):
    from chunkpolicy.study.aggregate import aggregate
    from chunkpolicy.study.cli import main
    from chunkpolicy.study.config import Comparison

    keys = [(t, s) for t in ("reach-v3", "push-v3") for s in range(100_000, 100_050)]  # 100 paired episodes
    better = {k: i % 10 < 8 for i, k in enumerate(keys)}  # 80%
    worse = {k: i % 10 < 3 for i, k in enumerate(keys)}  # 30%, solved only where `better` also is
    close = {k: (i % 10 < 7) or i % 10 == 9 for i, k in enumerate(keys)}  # 80%, different episodes
    d = tmp_path / "results"
    d.mkdir()
    for name, out in (("c-better", better), ("c-worse", worse), ("c-close", close)):
        (d / f"{name}.json").write_text(json.dumps(_result(name, out)))
    comps = [Comparison("c-better", "c-worse", 15.0), Comparison("c-better", "c-close", 15.0),
             Comparison("c-close", "c-better", -60.0), Comparison("c-better", "c-lora", 15.0)]
    agg = aggregate(d, tmp_path / "agg", comps)
    md = Path(agg["markdown"]).read_text()
    assert [c["verdict"] for c in agg["comparisons"]] == ["met", "not met", "met", None]
    lines = {ln.split(" | ")[0].strip("| "): ln for ln in md.splitlines() if " − " in ln and ln.startswith("| c-")}
    # +50 points, all 50 discordant episodes favour `better`: interval far above 15, McNemar p = 2 / 2^50
    assert "**+50.0 [" in lines["c-better − c-worse"] and "| 50 / 0 (of 100) |" in lines["c-better − c-worse"]
    assert lines["c-better − c-worse"].endswith("| ≥ +15 | met |")
    assert "**+0.0 [" in lines["c-better − c-close"] and lines["c-better − c-close"].endswith("| not met |")
    assert lines["c-close − c-better"].endswith("| met |")  # ≥ -60 points: a floor, as a target can also be
    assert "not run yet: c-lora" in lines["c-better − c-lora"]
    # episodes that do not pair up are an error naming both rows
    (d / "c-worse.json").write_text(json.dumps(_result("c-worse", dict(list(worse.items())[:-1]))))
    with pytest.raises(ValueError, match="comparison c-better − c-worse: the rows ran different episodes"):
        aggregate(d, tmp_path / "agg", comps)
    # the CLI: --compare A:B, errors in one line
    capsys.readouterr()
    assert main(["aggregate", str(d), "--out", str(tmp_path / "agg2"), "--compare", "c-better:c-close"]) == 0
    assert "c-better − c-close" in (tmp_path / "agg2" / "STUDY.md").read_text()
    assert "c-better − c-close: +0.0 [" in capsys.readouterr().out  # the readable summary ends the run
    capsys.readouterr()
    assert main(["aggregate", str(d), "--compare", "c-better:c-worse"]) == 2
    assert "ran different episodes" in capsys.readouterr().err


def test_shipped_study_comparisons_pair_rows_evaluated_alike():
    study = load_study(REPO / "configs" / "study" / "issue16.yaml")
    targets = {(c.a, c.b): c.target_points for c in study.comparisons}
    assert targets[("4c-ml45test20-full", "4c-ml45test20-scratch")] == 15
    assert targets[("4a-mt10-flow_expert", "4a-mt10-lerobot_act")] == 10


def test_summary_table_shows_eager_and_graph_latency():
    from chunkpolicy.study.aggregate import summary_table

    mean = {"successes": 1, "n": 2, "rate": 0.5, "ci95": [0.1, 0.9]}
    base = {"row": "r", "eval": {"executor": "open_loop:8"}, "success": {"mean": mean, "tasks": {}}, "data": {"name": "d"}}
    graphed = summary_table([{**base, "latency": {"median_ms": 60.0, "cuda_graph": {"median_ms": 3.25, "p90_ms": 3.5}}}])
    eager = summary_table([{**base, "latency": {"median_ms": 60.0, "cuda_graph": {"skipped": "device cpu"}}}])
    assert "| 60.00 / 3.25 |" in graphed and "| 60.00 / — |" in eager


def test_study_gpu_script_restores_row_jsons_of_earlier_calls(tmp_path):
    """benchmarks/study_gpu.sh: a row JSON finished by an earlier call on the same machine comes back when the next
    call's working tree lacks it (the tracked file is replaced by the travelling tree), so the row is not redone."""
    import json as _json
    import os
    import subprocess
    import sys

    path = _study(tmp_path)
    res = tmp_path / "results"
    res.mkdir()
    (res / "a-flow.json").write_text(_json.dumps({"row": "a-flow"}))  # done: `study run` skips it in seconds
    env = {**os.environ, "STUDY": str(path), "GPU_ENV": "/dev/null", "OUT": str(tmp_path / "out1"),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "study_gpu.sh"
    run = lambda: subprocess.run(["bash", str(script), "a-flow"], env=env, capture_output=True, text=True,  # noqa: E731
                                 cwd=script.parents[1], timeout=300)
    first = run()
    assert first.returncode == 0, first.stdout + first.stderr
    assert (tmp_path / "work" / "results_kept" / "a-flow.json").is_file()
    (res / "a-flow.json").unlink()  # the next call's working tree does not have it
    env["OUT"] = str(tmp_path / "out2")
    second = run()
    assert second.returncode == 0, second.stdout + second.stderr
    assert "restored a-flow.json" in second.stdout and "a-flow: done" in second.stdout
    assert _json.loads((res / "a-flow.json").read_text()) == {"row": "a-flow"}
