"""Experiment configs: shipped YAMLs load, overrides apply, and every bad config is one clear error naming the key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from chunkpolicy.config import ConfigError, ExperimentConfig, from_dict, load_config, to_dict, to_yaml
from chunkpolicy.data.synthetic import make_spec, make_synthetic_store
from chunkpolicy.models.heads.configs import DiTConfig, FlowExpertConfig, TokensConfig
from chunkpolicy.models.policy import PolicyConfig
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
    ov = [f"posttrain.init_from={tmp_path / 'run'}", f"data.datasets.0.path={store}"]
    msg = _err(REPO / "configs/posttrain_lora_tiny.yaml", [*ov, "model.horizon=16"])
    assert msg.startswith("model.horizon: 16 differs from the checkpoint's 8")
    # typed heads: the type, then each option set away from its default, against the checkpoint's
    assert _err(REPO / "configs/posttrain_lora_tiny.yaml", [*ov, "model.head=dit"]).startswith(
        "model.head.type: 'dit' differs from the checkpoint's 'flow_expert'")
    assert _err(REPO / "configs/posttrain_lora_tiny.yaml", [*ov, "model.head.width=48"]).startswith(
        "model.head.width: 48 differs from the checkpoint's None")
    assert load_config(REPO / "configs/posttrain_lora_tiny.yaml", [*ov, "model.head.num_steps=10"]).model.head == FlowExpertConfig()
    # a checkpoint written before typed heads (legacy head + head_options) is compared the same way
    ck = tmp_path / "run/checkpoints/step_000010/config.json"
    saved = json.loads(ck.read_text())
    saved["policy"]["head"], saved["policy"]["head_options"] = "flow_expert", {"width": 48}
    ck.write_text(json.dumps(saved))
    assert load_config(REPO / "configs/posttrain_lora_tiny.yaml", [*ov, "model.head.width=48"]).model.head.width == 48
    assert _err(REPO / "configs/posttrain_lora_tiny.yaml", [*ov, "model.head.width=32"]).startswith(
        "model.head.width: 32 differs from the checkpoint's 48")


def test_overrides_and_section_files(store, tmp_path):
    (tmp_path / "model").mkdir()
    _yaml(tmp_path, {"backbone": "tiny", "horizon": 5}, "model/m.yaml")
    p = _yaml(tmp_path, {"model": "model/m.yaml", "data": {"datasets": [{"path": store}]}})
    cfg = load_config(p, ["train.lr=1e-4", "train.betas=[0.8, 0.9]", "model.head.width=48", "data.image_size=[16, 24]",
                          "train.mixed_precision=bf16", "posttrain.lora_target_modules=[q_proj]"])
    assert cfg.model.horizon == 5 and cfg.train.lr == 1e-4 and cfg.train.betas == [0.8, 0.9]
    assert cfg.model.head == FlowExpertConfig(width=48) and cfg.data.image_size == [16, 24]
    assert cfg.model.policy_config().head == FlowExpertConfig(width=48)
    # YAML 1.1 would read `no` as false: on the command line it means the string
    cfg = load_config(p, ["train.mixed_precision=no", "train.compile=false", "train.cuda_graph=True"])
    assert cfg.train.mixed_precision == "no" and cfg.train.compile is False and cfg.train.cuda_graph is True
    q = _yaml(tmp_path, {"model": "model/m.yaml", "data": {"datasets": [{"path": store}]}, "train": {"mixed_precision": False}}, "q.yaml")
    assert "write 'no' in quotes" in _err(q)


def test_unknown_key_is_named(store, tmp_path):
    p = _yaml(tmp_path, {"data": {"datasets": [{"path": store}]}, "train": {"learning_rate": 1e-3}})
    assert _err(p).startswith("train.learning_rate: unknown key")
    p = _yaml(tmp_path, {"data": {"datasets": [{"path": store, "wieght": 2}]}})
    msg = _err(p)
    assert msg.startswith("data.datasets.0.wieght: unknown key") and "did you mean" in msg
    p = _yaml(tmp_path, {"data": {"datasets": [{"path": store}]}})
    assert _err(p, ["train.lrr=3"]).startswith("train.lrr: unknown key; did you mean 'train.lr'?")
    assert _err(p, ["optim.lr=3"]).startswith("optim.lr: unknown key")
    assert _err(p, ["model.head.bogus=1"]).startswith("model.head.bogus: unknown key; head 'flow_expert' has ['invalid_dims', 'max_period', ")


def test_wrong_type_is_named(store, tmp_path):
    p = _yaml(tmp_path, {"data": {"datasets": [{"path": store}]}, "train": {"steps": "many"}})
    msg = _err(p)
    assert msg.startswith("train.steps:") and "many" in msg
    p = _yaml(tmp_path, {"data": {"datasets": [{"path": store}]}})
    assert _err(p, ["train.lr=fast"]).startswith("train.lr:")
    assert _err(p, ["model.horizon=8.5"]).startswith("model.horizon:")
    assert _err(p, ["data.datasets.0.weight=[1]"]).startswith("data.datasets.0.weight:")
    assert _err(p, ["model.backbone_overrides={depth: two}"]).startswith("model.backbone_overrides.depth: Value 'two'")
    assert load_config(_yaml(tmp_path, {"data": {"datasets": [{"path": store}]}, "model": {"backbone_overrides": {"depth": "3"}}})
                       ).model.backbone_overrides == {"depth": 3}  # converted to the field's type
    assert _err(p, ["model.backbone_overrides.image_size=33"]).startswith("model.backbone_overrides: image_size 33 is not a multiple")


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


# -- typed heads ---------------------------------------------------------------------------------------------------
def test_head_spellings(store, tmp_path):
    data = {"data": {"datasets": [{"path": store}]}}
    p = _yaml(tmp_path, {**data, "model": {"head": {"type": "tokens", "tokenizer": "fast"}}})
    assert load_config(p).model.head == TokensConfig(tokenizer="fast")
    p = _yaml(tmp_path, data)
    assert load_config(p, ["model.head.type=tokens", "model.head.tokenizer=fast"]).model.head == TokensConfig(tokenizer="fast")
    assert load_config(p, ["model.head=tokens"]).model.head == TokensConfig()  # shorthand
    assert load_config(p, ["model.head=dit", "model.head.objective=flow"]).model.head == DiTConfig(objective="flow")
    # option overrides are checked against the final type whatever their order; a mapping sets type and options
    assert load_config(p, ["model.head.objective=flow", "model.head=dit"]).model.head == DiTConfig(objective="flow")
    assert load_config(p, ["model.head={type: dit, depth: 2}"]).model.head == DiTConfig(depth=2)
    assert load_config(_yaml(tmp_path, {**data, "model": {"head": "dit"}})).model.head == DiTConfig()  # YAML shorthand


def test_head_type_switch_drops_old_options(store, tmp_path):
    p = _yaml(tmp_path, {"data": {"datasets": [{"path": store}]}, "model": {"head": {"type": "dit", "depth": 2, "hidden": 32}}})
    assert load_config(p, ["model.head=tokens"]).model.head == TokensConfig()  # dit's depth/hidden mean nothing to tokens
    assert load_config(p, ["model.head.type=flow_expert", "model.head.width=48"]).model.head == FlowExpertConfig(width=48)
    # the same type keeps the YAML's options
    assert load_config(p, ["model.head=dit", "model.head.heads=2"]).model.head == DiTConfig(depth=2, hidden=32, heads=2)


def test_head_unknown_option_and_wrong_type_name_the_key(store, tmp_path):
    p = _yaml(tmp_path, {"data": {"datasets": [{"path": store}]}})
    dit_options = "['depth', 'heads', 'hidden', 'mlp_ratio', 'num_steps', 'objective', 'prediction', 'sampler', 'train_timesteps']"
    assert _err(p, ["model.head=dit", "model.head.bogus=1"]) == (
        f"model.head.bogus: unknown key; head 'dit' has {dit_options} [override 'model.head.bogus=1']")
    assert "did you mean 'model.head.depth'?" in _err(p, ["model.head=dit", "model.head.deph=1"])
    assert _err(p, ["model.head.width=1", "model.head=dit"]).startswith("model.head.width: unknown key; head 'dit' has")
    assert _err(p, ["model.head={type: dit, bogus: 1}"]).startswith("model.head.bogus: unknown key; head 'dit' has")
    q = _yaml(tmp_path, {"data": {"datasets": [{"path": store}]}, "model": {"head": {"type": "dit", "bogus": 1}}}, "q.yaml")
    assert _err(q).startswith(f"model.head.bogus: unknown key; head 'dit' has {dit_options}")
    msg = _err(p, ["model.head=dit", "model.head.depth=two"])
    assert msg.startswith("model.head.depth: Value 'two'") and "Integer" in msg
    q = _yaml(tmp_path, {"data": {"datasets": [{"path": store}]}, "model": {"head": {"type": "tokens", "fast_vocab": [1]}}}, "q.yaml")
    assert _err(q).startswith("model.head.fast_vocab:")
    # values the head's dataclass rejects name the option
    assert _err(p, ["model.head=dit", "model.head.objective=score"]).startswith("model.head.objective: dit objective must be one of")
    assert _err(p, ["model.head=mlp"]).startswith("model.head: unknown head 'mlp'; heads: ['dit', 'flow_expert', 'tokens']")
    assert _err(p, ["model.head.type=mlp"]).startswith("model.head.type: unknown head 'mlp'")
    assert _err(p, ["model.head=[1]"]).startswith("model.head: expected a head name or a mapping")


def test_tokens_head_rejects_mean_std_at_config_time(store, tmp_path):
    p = _yaml(tmp_path, {"data": {"datasets": [{"path": store}]}, "model": {"head": {"type": "tokens"}, "action_norm": "mean_std"}})
    assert _err(p) == "model.action_norm: head 'tokens' cannot represent 'mean_std' actions; it accepts ['quantile', 'min_max']"
    assert load_config(p, ["model.action_norm=min_max"]).model.action_norm == "min_max"
    assert load_config(p, ["model.head=dit"]).model.action_norm == "mean_std"


def test_policy_config_head_spellings_and_legacy_dict():
    assert PolicyConfig().head == FlowExpertConfig()
    assert PolicyConfig(head="dit").head == DiTConfig()
    assert PolicyConfig(head={"type": "dit", "depth": 2}).head == DiTConfig(depth=2)
    with pytest.raises(ValueError, match="needs a 'type' tag"):
        PolicyConfig(head={"depth": 2})
    with pytest.raises(ValueError, match=r"unknown options \['deph'\] for head 'dit'"):
        PolicyConfig(head={"type": "dit", "deph": 2})
    # config.json of checkpoints written before typed heads
    legacy = {"backbone": "tiny", "head": "dit", "head_options": {"depth": 2, "hidden": 32}, "horizon": 8}
    assert PolicyConfig.from_dict(legacy) == PolicyConfig(head=DiTConfig(depth=2, hidden=32), horizon=8)
    assert PolicyConfig.from_dict({"head": "tokens", "head_options": {}}).head == TokensConfig()
    with pytest.raises(ValueError, match="legacy head_options needs a head name"):
        PolicyConfig.from_dict({"head": {"type": "dit"}, "head_options": {"depth": 2}})


@pytest.mark.parametrize("head", [FlowExpertConfig(width=48), DiTConfig(depth=2, objective="flow"), TokensConfig(tokenizer="fast")])
def test_typed_head_round_trips(head, store, tmp_path):
    from dataclasses import asdict

    cfg = PolicyConfig(head=head, horizon=8)
    again = PolicyConfig.from_dict(yaml.safe_load(yaml.safe_dump(asdict(cfg))))  # what save_pretrained writes
    assert again == cfg and type(again.head) is type(head)
    exp = load_config(_yaml(tmp_path, {"data": {"datasets": [{"path": store}]}, "model": {"head": asdict(head)}}))
    assert exp.model.head == head
    assert from_dict(to_dict(exp)) == exp and from_dict(yaml.safe_load(to_yaml(exp))) == exp
    with pytest.raises(ConfigError, match="^model.head.bogus: unknown key"):
        from_dict({**to_dict(exp), "model": {**to_dict(exp)["model"], "head": {**asdict(head), "bogus": 1}}})
