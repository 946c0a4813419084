"""Experiment configs: shipped YAMLs load, overrides apply, and every bad config is one clear error naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from chunkpolicy.config import ConfigError, ExperimentConfig, from_dict, load_config, to_dict
from chunkpolicy.data.synthetic import make_spec, make_synthetic_store
from chunkpolicy.training.cli import main as train_main

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    d = tmp_path_factory.mktemp("cfg")
    make_synthetic_store(d / "a.zarr", make_spec("a", 3, 4), n_episodes=2, episode_len=6, image_hw=(8, 8))
    return str(d / "a.zarr")


def _yaml(tmp_path, doc: dict, name: str = "c.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(doc))
    return p


def _err(path, overrides=()) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(path, overrides)
    return str(e.value)


@pytest.mark.parametrize("name", ["tiny_flow", "mixture_tiny", "small_flow"])
def test_shipped_configs_load_with_path_overrides(name, store):
    raw = yaml.safe_load((REPO / "configs" / f"{name}.yaml").read_text())
    n = len(raw["data"]["datasets"])
    cfg = load_config(REPO / "configs" / f"{name}.yaml", [f"data.datasets.{i}.path={store}" for i in range(n)])
    assert isinstance(cfg, ExperimentConfig) and all(d.path == store for d in cfg.data.datasets)
    assert cfg.posttrain.init_from is None
    assert from_dict(to_dict(cfg)) == cfg


def test_shipped_posttrain_config_loads(store, tmp_path):
    from chunkpolicy.models.policy import ChunkPolicy, PolicyConfig
    from chunkpolicy.spaces import UnifiedSpace

    spec = make_spec("a", 3, 4)
    ChunkPolicy(PolicyConfig(backbone="tiny", horizon=8, max_prompt_tokens=32), UnifiedSpace(32, "pad", embodiments=[spec]),
                {"a": {"action": {k: [0.0] * 3 for k in ("q01", "mean")} | {"q99": [1.0] * 3, "std": [1.0] * 3},
                       "state": {"mean": [0.0] * 4, "std": [1.0] * 4}}}).save_pretrained(tmp_path / "run/checkpoints/step_000010")
    cfg = load_config(REPO / "configs/posttrain_lora_tiny.yaml", [f"posttrain.init_from={tmp_path / 'run'}", f"data.datasets.0.path={store}"])
    assert cfg.posttrain.mode == "lora" and cfg.posttrain.lora_rank == 8
    # a model value that contradicts the checkpoint is an error, not silently ignored
    msg = _err(REPO / "configs/posttrain_lora_tiny.yaml", [f"posttrain.init_from={tmp_path / 'run'}", f"data.datasets.0.path={store}", "model.horizon=16"])
    assert msg.startswith("model.horizon: 16 differs from the checkpoint's 8")


def test_overrides_and_section_files(store, tmp_path):
    (tmp_path / "model").mkdir()
    _yaml(tmp_path, {"backbone": "tiny", "horizon": 5}, "model/m.yaml")
    p = _yaml(tmp_path, {"model": "model/m.yaml", "data": {"datasets": [{"path": store}]}})
    cfg = load_config(p, ["train.lr=1e-4", "train.betas=[0.8, 0.9]", "model.head_options.width=48", "data.image_size=[16, 24]",
                          "train.mixed_precision=bf16", "posttrain.lora_target_modules=[q_proj]"])
    assert cfg.model.horizon == 5 and cfg.train.lr == 1e-4 and cfg.train.betas == [0.8, 0.9]
    assert cfg.model.head_options == {"width": 48} and cfg.data.image_size == [16, 24]
    assert cfg.model.policy_config().head_options == {"width": 48}


def test_unknown_key_is_named(store, tmp_path):
    p = _yaml(tmp_path, {"data": {"datasets": [{"path": store}]}, "train": {"learning_rate": 1e-3}})
    assert _err(p).startswith("train.learning_rate: unknown key")
    p = _yaml(tmp_path, {"data": {"datasets": [{"path": store, "wieght": 2}]}})
    msg = _err(p)
    assert msg.startswith("data.datasets.0.wieght: unknown key") and "did you mean" in msg
    p = _yaml(tmp_path, {"data": {"datasets": [{"path": store}]}})
    assert _err(p, ["train.lrr=3"]).startswith("train.lrr: unknown key; did you mean 'train.lr'?")
    assert _err(p, ["optim.lr=3"]).startswith("optim.lr: unknown key")
    assert _err(p, ["model.head_options.bogus=1"]).startswith("model.head_options: unknown options ['bogus']")


def test_wrong_type_is_named(store, tmp_path):
    p = _yaml(tmp_path, {"data": {"datasets": [{"path": store}]}, "train": {"steps": "many"}})
    msg = _err(p)
    assert msg.startswith("train.steps:") and "many" in msg
    p = _yaml(tmp_path, {"data": {"datasets": [{"path": store}]}})
    assert _err(p, ["train.lr=fast"]).startswith("train.lr:")
    assert _err(p, ["model.horizon=8.5"]).startswith("model.horizon:")
    assert _err(p, ["data.datasets.0.weight=[1]"]).startswith("data.datasets.0.weight:")
    assert _err(p, ["model.backbone_overrides={depth: two}"]).startswith("model.backbone_overrides.depth: expected int")


def test_bad_values_are_named(store, tmp_path):
    p = _yaml(tmp_path, {"data": {"datasets": [{"path": store}]}})
    for ov, key in [("train.mixed_precision=fp8", "train.mixed_precision"), ("posttrain.mode=adapters", "posttrain.mode"),
                    ("model.head=mlp", "model.head"), ("model.backbone=huge", "model.backbone"),
                    ("train.ema_decay=1.5", "train.ema_decay"), ("data.val_fraction=1.0", "data.val_fraction"),
                    ("posttrain.mode=lora", "posttrain.mode"), ("posttrain.init_from=/nonexistent", "posttrain.init_from"),
                    ("train.final_lr=1", "train.final_lr")]:
        assert _err(p, [ov]).startswith(f"{key}:"), ov


def test_missing_dataset_path_is_named(tmp_path, store):
    p = _yaml(tmp_path, {"data": {"datasets": [{"path": store}, {"path": str(tmp_path / "nope.zarr")}]}})
    msg = _err(p)
    assert msg.startswith("data.datasets.1.path:") and "does not exist" in msg
    (tmp_path / "empty").mkdir()
    assert _err(p, [f"data.datasets.1.path={tmp_path / 'empty'}"]).startswith("data.datasets.1.path:")
    assert "not an episode store" in _err(p, [f"data.datasets.1.path={tmp_path / 'empty'}"])
    p = _yaml(tmp_path, {"data": {"datasets": [{"weight": 1.0}]}})
    assert _err(p) .startswith("data.datasets.0.path: required value is missing")
    assert _err(_yaml(tmp_path, {"train": {"steps": 3}})).startswith("data.datasets: no datasets")
    assert _err(tmp_path / "missing.yaml").startswith("--config:")


def test_cli_reports_config_errors_before_work(tmp_path, store, capsys):
    p = _yaml(tmp_path, {"data": {"datasets": [{"path": store}]}, "train": {"output_dir": str(tmp_path / "run")}})
    assert train_main(["--config", str(p), "train.stepz=3"]) == 2
    err = capsys.readouterr().err
    assert "config error: train.stepz: unknown key" in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()
    assert train_main(["--config", str(p), "--print-config", "train.steps=7"]) == 0
    assert "steps: 7" in capsys.readouterr().out
