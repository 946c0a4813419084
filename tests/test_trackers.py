"""train.log_with: TensorBoard event files (and offline wandb files) from a tiny CPU training run."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from chunkpolicy.config import ConfigError, load_config
from chunkpolicy.data.synthetic import make_spec, make_synthetic_store
from chunkpolicy.training.trackers import Trackers, check_trackers


def _cfg(tmp_path: Path, log_with: list[str]) -> Path:
    spec = make_spec("arm3", action_dim=3, state_dim=2, cameras=("top",))
    store = make_synthetic_store(tmp_path / "arm3.zarr", spec, n_episodes=2, episode_len=8, image_hw=(16, 16), seed=0)
    cfg = {
        "model": {"backbone": "tiny", "head": "flow_expert", "horizon": 4, "max_prompt_tokens": 24},
        "data": {"datasets": [{"path": str(store.path)}], "image_size": [16, 16], "val_fraction": 0.5},
        "train": {"steps": 4, "batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "log_every": 2, "val_every": 4,
                  "val_batches": 1, "ckpt_every": 4, "keep_last": 1, "progress": False, "log_with": log_with,
                  "output_dir": str(tmp_path / "run")},
    }
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for events in logdir.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events.parent))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return out


def test_tensorboard_and_offline_wandb_get_the_loss(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard", reason="install the `trackers` extra")
    pytest.importorskip("wandb", reason="install the `trackers` extra")
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the default must be offline
    from chunkpolicy.training.experiment import run

    cfg = load_config(_cfg(tmp_path, ["tensorboard", "wandb"]))
    run(cfg)
    scal = _scalars(tmp_path / "run" / "tensorboard")
    assert [s for s, _ in scal["train/loss"]] == [2, 4]
    assert all(v == v and v > 0 for _, v in scal["train/loss"])  # finite, positive
    assert "train/lr" in scal and [s for s, _ in scal["val/loss"]] == [4]
    # wandb ran offline: its files are in the run dir, nothing was synced
    offline = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert offline, sorted(p.name for p in (tmp_path / "run").rglob("*"))[:30]


def test_unknown_tracker_is_a_config_error_naming_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"train.log_with: unknown tracker 'mlflowz'"):
        load_config(_cfg(tmp_path, ["mlflowz"]))
    assert check_trackers([]) == [] and check_trackers(None) == []


def test_no_trackers_by_default_and_records_without_step_are_ignored(tmp_path):
    t = Trackers([], tmp_path)
    t.log_record({"kind": "train", "step": 1, "loss": 1.0})  # no tracker: nothing happens, nothing written
    t.finish()
    assert not any(tmp_path.iterdir())
    from chunkpolicy.config import TrainConfig

    assert TrainConfig().log_with == []
