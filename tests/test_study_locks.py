"""Study runner pieces that let rows run in parallel processes, without training anything: the shared LeRobot export
is written once, a post-train row keeps counting the pretrain it trained across sessions, an evaluation to redo
respects the session's reserve, and the GPU-sharing count."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from chunkpolicy.study import runner
from chunkpolicy.study.config import load_study
from chunkpolicy.study.lerobot_train import ensure_lerobot_export
from chunkpolicy.study.session import SHARED_GPU_ENV, Deadline, SessionLimit, gpu_shared_by


def test_lerobot_export_shared_by_parallel_rows_is_written_once(tmp_path, monkeypatch):
    from chunkpolicy.data import lerobot_io

    calls, logs = [], []

    def slow_export(store, root, repo_id, progress):
        calls.append(repo_id)
        time.sleep(0.5)  # the other row arrives meanwhile
        (root / "meta").mkdir(parents=True)
        (root / "meta" / "info.json").write_text("{}")

    monkeypatch.setattr(lerobot_io, "export_lerobot", slow_export)
    root = tmp_path / "mt10_lerobot"
    threads = [threading.Thread(target=ensure_lerobot_export, args=(tmp_path / "mt10.zarr", root, "local/mt10",
                                                                     logs.append)) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert calls == ["local/mt10"]  # exported once; before the lock the second row exported too and failed
    assert any("waiting for process" in m for m in logs)


def _tiny_study(tmp_path: Path) -> Path:
    p = tmp_path / "study.yaml"
    p.write_text(f"""
name: t
out_dir: {tmp_path / 'work'}
results_dir: {tmp_path / 'results'}
data:
  reach: {{env: metaworld, tasks: [reach-v3], store: {tmp_path / 'reach.zarr'}}}
rows:
  pre: {{data: reach, method: {{config: configs/quickstart_metaworld.yaml}}}}
  post: {{data: reach, method: {{config: configs/quickstart_metaworld.yaml, init_from_row: pre}}}}
""")
    return p


def test_post_train_row_keeps_counting_the_pretrain_it_trained_in_an_earlier_session(tmp_path, monkeypatch):
    study = load_study(_tiny_study(tmp_path))
    ckpt = tmp_path / "work" / "rows" / "pre" / "train" / "checkpoints" / "step_000010"
    ckpt.mkdir(parents=True)
    (ckpt / "model.safetensors").write_bytes(b"w")
    sessions = iter([True, False])  # session 1 trains the pretrain (then runs out of time); session 2 finds it done
    monkeypatch.setattr(runner, "train_row", lambda study, row, log, deadline: {
        "checkpoints": [(10, str(ckpt))], "steps": 10, "trained_this_session": next(sessions), "stopped": None,
        "gpu_minutes": 6.0})
    run_dir = tmp_path / "work" / "rows" / "post" / "train"
    first = runner._init_from_row(study, study.rows["post"], run_dir, print, Deadline())
    second = runner._init_from_row(study, study.rows["post"], run_dir, print, Deadline())
    assert first["trained_now"] is True and second["trained_now"] is True  # its 6 GPU-minutes are not lost


def test_an_evaluation_to_redo_respects_the_session_reserve(tmp_path):
    study = load_study(_tiny_study(tmp_path))
    row = study.rows["pre"]
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.safetensors").write_bytes(b"w")
    out = tmp_path / "eval"
    out.mkdir()
    (out / "results.json").write_text('{"study_key": {"episodes": 10}}')  # evaluated before with other settings
    with pytest.raises(SessionLimit, match="evaluating"):
        runner._eval_one(row, "chunkpolicy", str(ckpt), ["reach-v3"], out, "cpu", print, "cmd",
                         deadline=Deadline(1.0), reserve_s=3600.0)


def test_gpu_shared_by_reads_the_study_scripts_count(monkeypatch):
    monkeypatch.delenv(SHARED_GPU_ENV, raising=False)
    assert gpu_shared_by() == 1
    monkeypatch.setenv(SHARED_GPU_ENV, "2")
    assert gpu_shared_by() == 2
    monkeypatch.setenv(SHARED_GPU_ENV, "0")
    with pytest.raises(ValueError, match=SHARED_GPU_ENV):
        gpu_shared_by()


def test_smoke_study_keeps_what_decides_whether_a_row_runs_and_cuts_what_decides_how_long():
    from chunkpolicy.study.smoke import SMOKE_OVERRIDES, smoke_study

    real = load_study(Path(__file__).resolve().parents[1] / "configs" / "study" / "issue16.yaml")
    smoke = smoke_study(real)
    assert smoke.out_dir == real.out_dir / "smoke" and smoke.results_dir == real.out_dir / "smoke" / "results"
    assert set(smoke.rows) == set(real.rows) and set(smoke.data) == set(real.data)
    for name, d in smoke.data.items():
        r = real.data[name]
        assert d.env == r.env and len(d.tasks) <= 2 and Path(d.store).is_relative_to(smoke.out_dir)
        assert d.collect["episodes"] == 1 and d.collect["cameras"] == r.collect["cameras"]
        assert d.collect["image_size"] == r.collect["image_size"]
    from chunkpolicy.sim.metaworld_env import ML45_TRAIN

    assert real.data["ml45_train"].tasks == ["ML45_TRAIN"]
    assert smoke.data["ml45_train"].tasks == list(ML45_TRAIN)[:2]  # a task set is expanded, then cut
    for name, row in smoke.rows.items():
        r = real.rows[name]
        assert row.kind == r.kind and row.group == r.group and row.label == r.label
        assert row.train["steps"] == 2 and row.eval["episodes"] == 1 and row.eval["device"] == "cpu"
        assert row.eval["executor"] == r.eval["executor"]
        assert [d.name for d, _ in row.train_data] == [d.name for d, _ in r.train_data]
        assert all(d is smoke.data[d.name] for d, _ in row.train_data) and row.data is smoke.data[r.data.name]
        if r.kind == "chunkpolicy":  # the real method, then the toy-scale overrides
            assert row.method["overrides"] == list(r.method.get("overrides", [])) + list(SMOKE_OVERRIDES)
            assert row.method.get("init_from_row") == r.method.get("init_from_row")
    assert real.rows["4a-mt10-flow_expert"].train.get("steps") is None  # the real study is untouched
