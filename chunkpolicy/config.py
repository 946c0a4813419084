"""Typed experiment configs: dataclasses checked by OmegaConf, loaded from YAML with dotted ``key=value`` overrides.

``ExperimentConfig`` = ``model`` (the policy's :class:`~chunkpolicy.models.policy.PolicyConfig` plus the unified space
and optional pretrained backbone weights) · ``data`` (stores, mixture weights, image size, split, loader) · ``train``
(optimizer, schedule, EMA, precision, intervals, run dir) · ``posttrain`` (init checkpoint and fine-tuning mode).

:func:`load_config` raises one :class:`ConfigError` naming the offending key (unknown key, wrong type, bad value,
missing dataset path, missing checkpoint) before any model is built or data is read. Relative paths are relative to
the current working directory. A section may name a YAML file holding it (``model: model/tiny_flow.yaml``, relative
to the config file). Overrides address list items by index: ``data.datasets.1.path=/data/b.zarr``; a whole
list can be replaced: ``'data.datasets=[{path: a.zarr}, {path: b.zarr, weight: 2}]'``.

``model.head`` is a typed section selected by its ``type`` tag (see :func:`load_config`): YAML
``head: {type: tokens, tokenizer: fast}``, overrides ``model.head.type=tokens model.head.tokenizer=fast`` or the
shorthand ``model.head=tokens``; its options are checked against that head's dataclass
(:mod:`chunkpolicy.models.heads.configs`).
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from chunkpolicy.atomic import read_json
from chunkpolicy.models.heads.configs import HeadConfig, head_config_class, head_types
from chunkpolicy.models.policy import PolicyConfig

MIXED_PRECISION = ("no", "bf16")
TRAIN_PRECISION = ("fp32", "bf16")
SCHEDULE_OVER = ("steps", "time")
POSTTRAIN_MODES = ("full", "lora", "head_only", "freeze_vision")
LORA_HEAD = ("full", "lora", "frozen")


class ConfigError(ValueError):
    """A bad experiment config; the message starts with the dotted key."""


@dataclass
class ModelConfig(PolicyConfig):
    """:class:`PolicyConfig` (backbone preset, typed head config, horizon, n_obs_steps, normalization modes, delta
    actions, ...) plus the unified space and optional real backbone weights.

    ``delta_actions`` lives here (the policy needs it at inference); the data pipeline reads it from the model.
    """

    unified_dim: int = 32
    layout: str = "pad"  # "pad" (π0) or "slots" (RDT)
    pretrained_backbone: Optional[str] = None  # local PaliGemma save_pretrained dir (fresh runs only)

    def policy_config(self) -> PolicyConfig:
        names = {f.name for f in fields(PolicyConfig)}
        return PolicyConfig(**{k: _plain(getattr(self, k)) for k in names})


@dataclass
class DatasetConfig:
    path: str = MISSING  # episode store (zarr)
    weight: float = 1.0
    cameras: Optional[list[str]] = None  # store cameras to use, in order; None: all of the embodiment's


@dataclass
class DataConfig:
    datasets: list[DatasetConfig] = field(default_factory=list)
    alpha: float = 1.0  # p_i ∝ weight_i · n_i**alpha (π0: 0.43)
    image_size: Optional[list[int]] = None  # [h, w] frames are resized to; None: the backbone's image size
    n_cameras: Optional[int] = None  # camera slots; None: the largest camera count among the datasets
    val_fraction: float = 0.1  # episodes held out per dataset (episode-level split)
    split_seed: int = 0
    num_workers: int = 0


@dataclass
class TrainConfig:
    steps: int = 1000  # optimizer steps
    batch_size: int = 8  # per process and micro-batch; global = batch_size · processes · grad_accum
    lr: float = 2.5e-5  # peak
    final_lr: float = 2.5e-6  # end of the cosine decay
    warmup_steps: int = 100
    weight_decay: float = 1e-10
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0: off
    grad_accum: int = 1
    ema_decay: float = 0.99  # 0: off
    mixed_precision: str = "no"  # "no" | "bf16"
    seed: int = 0
    log_every: int = 10
    ckpt_every: int = 500
    val_every: int = 500
    val_batches: int = 8
    keep_last: int = 3
    output_dir: str = "runs/default"
    cpu: bool = False  # force CPU even when a GPU is present
    find_unused_parameters: Optional[bool] = None  # DDP; None: detected from one probe step on the first batch
    # several processes: "ddp" (replicated weights, gradients all-reduced) | "fsdp" (FSDP2: weights, gradients and
    # AdamW moments sharded per transformer layer; chunkpolicy.training.fsdp); fsdp needs 2+ processes
    distributed: str = "ddp"
    fsdp_reshard_after_forward: bool = True  # fsdp: free gathered layers after forward (re-gathered in backward)
    # DDP knobs (torch's DistributedDataParallel arguments through accelerate); defaults are torch's
    ddp_bucket_cap_mb: Optional[float] = None  # None: torch's 25 MB
    ddp_static_graph: bool = False
    ddp_gradient_as_bucket_view: bool = False
    progress: bool = True
    compile: bool = False  # torch.compile the model's per-layer training work (ChunkPolicy.compile_layers)
    cuda_graph: bool = False  # one GPU: the whole step (forward, backward, clipping, AdamW) as one CUDA graph
    # weights and AdamW moments: "fp32" (default: fp32 master weights and fp32 moments; compute in bf16 with
    # mixed_precision=bf16) | "bf16" (opt-in fast path: bf16 weights and bf16 moments, no fp32 copy; drifts in long runs)
    precision: str = "fp32"
    # non-finite guard: a step whose loss or gradient norm is not finite is skipped (no optimizer / EMA update) and
    # counted; after max_bad_steps consecutive ones (checked when a train record is logged) the run rolls back to its
    # latest checkpoint with the learning rate × rollback_lr_factor, at most max_rollbacks times, then stops
    max_bad_steps: int = 20
    max_rollbacks: int = 3
    rollback_lr_factor: float = 0.5
    # time budget: end the run after this many minutes of training (validation and checkpoint time not counted),
    # with a final checkpoint; None: no limit (train.steps still caps the run)
    max_minutes: Optional[float] = None
    schedule_over: str = "steps"  # "steps" | "time": warm-up in steps, then the cosine decay over max_minutes
    # experiment trackers (chunkpolicy.training.trackers): [] | [tensorboard] | [tensorboard, wandb] (wandb offline
    # unless WANDB_MODE=online); files under output_dir/tensorboard and output_dir/wandb
    log_with: list[str] = field(default_factory=list)
    # numerical health (chunkpolicy.training.diagnostics): max |weight| and AdamW moment ranges in each train record;
    # the batches of the first probe_nonfinite skipped steps replayed eagerly to name where the overflow happened
    # (run_dir/nonfinite/); every probe_every steps (0: never) the same probe on the current batch, for trends
    # (attention logits, activations, gradient norms per parameter); probe_repeats noise draws per probe
    log_health: bool = True
    probe_nonfinite: int = 3
    probe_every: int = 0
    probe_repeats: int = 3


@dataclass
class PosttrainConfig:
    init_from: Optional[str] = None  # checkpoint dir (or a run dir / checkpoints dir: its latest checkpoint)
    mode: str = "full"  # full | lora | head_only | freeze_vision
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    lora_vision: bool = False  # also put adapters into the vision tower
    lora_head: str = "full"  # the action head in LoRA mode: "full" (trained), "lora" (adapters), "frozen"
    recompute_stats: bool = False  # replace the checkpoint's stats of embodiments that the new data also has


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    posttrain: PosttrainConfig = field(default_factory=PosttrainConfig)


# ---------------------------------------------------------------------------------------------------------------
def _plain(v: Any) -> Any:
    if isinstance(v, (DictConfig, ListConfig)):
        return OmegaConf.to_container(v, resolve=True)
    if isinstance(v, dict):
        return {k: _plain(w) for k, w in v.items()}
    if isinstance(v, list):
        return [_plain(w) for w in v]
    return v


def _dotted(key: str) -> str:
    return re.sub(r"\[(\d+)\]", r".\1", key or "")


def _omega_error(e: OmegaConfBaseException, source: str) -> ConfigError:
    key = _dotted(getattr(e, "full_key", None) or "")
    msg = str(e).split("\n")[0]
    if "missing mandatory value" in msg.lower():
        return ConfigError(f"{key}: required value is missing [{source}]")
    if "not in" in msg and key:
        parent = key.rsplit(".", 1)[0] if "." in key else ""
        msg = f"unknown key{_suggest(key)}" + (f" (in {parent!r})" if parent else "")
    return ConfigError(f"{key or '<root>'}: {msg} [{source}]")


def _all_keys(node: Any, prefix: str = "") -> list[str]:
    out: list[str] = []
    if isinstance(node, DictConfig):
        for k in node.keys():
            full = f"{prefix}.{k}" if prefix else str(k)
            out.append(full)
            out += _all_keys(node._get_node(k), full)
    return out


_SCHEMA_KEYS: list[str] = []


def _suggest(key: str) -> str:
    if not _SCHEMA_KEYS:
        _SCHEMA_KEYS.extend(_all_keys(OmegaConf.structured(ExperimentConfig)))
    close = difflib.get_close_matches(key, _SCHEMA_KEYS, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value (e.g. train.lr=1e-4)")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse value {raw!r} ({e})") from None
    if isinstance(value, str) and raw.strip() != "" and _looks_float(raw):
        value = float(raw)  # YAML 1.1 reads 1e-4 as a string
    if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
        value = raw.strip()  # YAML 1.1 reads no / yes / on / off as booleans: train.mixed_precision=no means "no"
    return key, value


def _looks_float(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def _check_keys(raw: Any, cls: type, prefix: str, source: str) -> None:
    """Unknown keys anywhere in the YAML, with their full dotted path (OmegaConf names list items relative)."""
    if not isinstance(raw, dict):
        return
    hints = typing.get_type_hints(cls)
    for k, v in raw.items():
        key = f"{prefix}{k}"
        if k not in hints and issubclass(cls, HeadConfig):
            raise ConfigError(_unknown_head_key(key, cls, source))
        if k not in hints:
            close = difflib.get_close_matches(str(k), list(hints), n=1, cutoff=0.6)
            hint = f"; did you mean {prefix + close[0]!r}?" if close else f"; {prefix.rstrip('.') or 'top level'} has {sorted(hints)}"
            raise ConfigError(f"{key}: unknown key{hint} [{source}]")
        t = hints[k]
        args = [a for a in typing.get_args(t) if a is not type(None)]
        if typing.get_origin(t) in (typing.Union, types.UnionType) and len(args) == 1:
            t = args[0]
        if dataclasses.is_dataclass(t):
            if v is not None and not isinstance(v, dict):
                raise ConfigError(f"{key}: expected a mapping, got {v!r} [{source}]")
            if issubclass(t, HeadConfig) and v is not None:  # the selected head's dataclass (_select_head set the type)
                t = head_config_class(v["type"])
            _check_keys(v, t, f"{key}.", source)  # type: ignore[arg-type]
        elif typing.get_origin(t) is dict and v is not None and not isinstance(v, dict):
            raise ConfigError(f"{key}: expected a mapping, got {v!r} [{source}]")
        elif typing.get_origin(t) is list:
            if v is not None and not isinstance(v, list):
                raise ConfigError(f"{key}: expected a list, got {v!r} [{source}]")
            (elem,) = typing.get_args(t) or (None,)
            if elem is not None and dataclasses.is_dataclass(elem):
                for i, item in enumerate(v or []):
                    if not isinstance(item, dict):
                        raise ConfigError(f"{key}.{i}: expected a mapping, got {item!r} [{source}]")
                    _check_keys(item, elem, f"{key}.{i}.", source)
                    try:  # types of the item's fields, named with the item's full path
                        OmegaConf.merge(OmegaConf.structured(elem), OmegaConf.create(item))
                    except OmegaConfBaseException as e:
                        err = _omega_error(e, source)
                        raise ConfigError(f"{key}.{i}.{err}") from None


def _load_section(config_path: Path, section: str, ref: str) -> Any:
    """A section given as a YAML file name: relative to the config file's directory, else to the working dir."""
    for cand in (config_path.parent / ref, Path(ref)):
        if cand.is_file():
            try:
                return yaml.safe_load(cand.read_text()) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{section}: invalid YAML in {str(cand)!r} ({e})") from None
    raise ConfigError(f"{section}: section file {ref!r} not found (relative to {str(config_path.parent)!r} or the working directory)")


def _in_free_dict(cfg: DictConfig, key: str) -> bool:
    """``key``'s parent is a free-form dict (``backbone_overrides``): new keys are allowed there."""
    if "." not in key:
        return False
    try:
        parent = OmegaConf.select(cfg, key.rsplit(".", 1)[0])
    except OmegaConfBaseException:
        return False
    return isinstance(parent, DictConfig) and OmegaConf.get_type(parent) is dict


def _unknown_head_key(key: str, cls: type, source: str) -> str:
    options = [f.name for f in fields(cls) if f.name != "type"]
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], options, n=1, cutoff=0.6)
    hint = f" (did you mean {'model.head.' + close[0]!r}?)" if close else ""
    return f"{key}: unknown key; head {cls.TAG or cls.__name__!r} has {sorted(options)}{hint} [{source}]"


_HEAD_SPELLING = "a head name or a mapping with a 'type' tag"


def _select_head(raw: dict[str, Any], overrides: Sequence[tuple[str, Any, str]], source: str) -> str:
    """The head type from the YAML and the overrides, decided before anything is merged so that ``model.head`` gets
    that head's dataclass as its schema. The last override naming a type wins (``model.head=NAME``,
    ``model.head.type=NAME`` or ``model.head={type: NAME, ...}``); option overrides are checked against that head
    whatever their order. Switching the type away from the YAML's drops the YAML's options of the old head (they
    mean nothing to the new one); the options given as overrides are kept. Rewrites ``raw``'s ``model.head`` into
    the mapping form with the final type."""
    default = PolicyConfig().head.type
    model = raw.get("model")
    yaml_head = model.get("head") if isinstance(model, dict) else None
    if isinstance(yaml_head, str):
        yaml_head = {"type": yaml_head}
    elif yaml_head is not None and not isinstance(yaml_head, dict):
        raise ConfigError(f"model.head: expected {_HEAD_SPELLING}, got {yaml_head!r} [{source}]")
    yaml_tag = (yaml_head or {}).get("type", default)
    tag, where = yaml_tag, ("model.head.type" if yaml_head and "type" in yaml_head else "model.head", source)
    for key, value, item in overrides:
        if (key == "model.head" and isinstance(value, dict) and "type" in value) or key == "model.head.type":
            tag, where = (value["type"] if key == "model.head" else value), (key, f"override {item!r}")
        elif key == "model.head" and isinstance(value, str):
            tag, where = value, (key, f"override {item!r}")
        elif key == "model.head" and not isinstance(value, dict):
            raise ConfigError(f"model.head: expected {_HEAD_SPELLING}, got {value!r} [override {item!r}]")
    if not isinstance(tag, str) or tag not in head_types():
        raise ConfigError(f"{where[0]}: unknown head {tag!r}; heads: {head_types()} [{where[1]}]")
    if isinstance(model, dict) and yaml_head is not None:
        model["head"] = {**yaml_head, "type": tag} if tag == yaml_tag else {"type": tag}
    return tag


def _schema(head_type: str) -> DictConfig:
    """The experiment schema with ``model.head`` typed as ``head_type``'s config dataclass."""
    schema = OmegaConf.structured(ExperimentConfig)
    schema.model.head = OmegaConf.structured(head_config_class(head_type))
    return schema


def _to_object(cfg: DictConfig, source: str) -> ExperimentConfig:
    """``cfg`` as dataclasses. A head option the head's own checks reject is named by trying each option alone on
    the head's defaults (the checks live in the dataclass, not here); a rejected combination names ``model.head``."""
    head = OmegaConf.to_container(cfg.model.head, resolve=True)
    cls = OmegaConf.get_type(cfg.model.head)
    try:
        cls(**head)
    except (ValueError, TypeError) as e:
        for k, v in head.items():  # type: ignore[union-attr]
            if k == "type":
                continue
            try:
                cls(**{"type": head["type"], k: v})  # type: ignore[index]
            except (ValueError, TypeError) as e1:
                raise ConfigError(f"model.head.{k}: {e1} [{source}]") from None
        raise ConfigError(f"model.head: {e} [{source}]") from None
    try:
        return OmegaConf.to_object(cfg)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise _omega_error(e, source) from None


def load_config(path: str | os.PathLike | None, overrides: Sequence[str] = (), *, check_paths: bool = True) -> ExperimentConfig:
    """YAML file (or None for the defaults) + dotted overrides → validated :class:`ExperimentConfig`.

    Raises :class:`ConfigError` naming the key for unknown keys, wrong types, bad values and missing paths.
    ``model.head``: see :func:`_select_head` for how its type is chosen; the chosen head's dataclass is the schema of
    the section, so OmegaConf checks its option names and types. Switching the type away from the YAML's drops the
    YAML's options of the old head.
    """
    parsed = [(*_parse_override(item), item) for item in overrides]
    source, raw = "defaults", {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"--config: file {str(p)!r} does not exist")
        source = str(p)
        try:
            raw = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{source}: invalid YAML ({e})") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{source}: top level must be a mapping with model/data/train/posttrain sections")
        for section, value in list(raw.items()):
            if isinstance(value, str) and value.endswith((".yaml", ".yml")):  # `model: model/tiny_flow.yaml`
                raw[section] = _load_section(p, section, value)
    head_type = _select_head(raw, parsed, source)
    cfg = _schema(head_type)
    if path is not None:
        _check_keys(raw, ExperimentConfig, "", source)
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.create(raw))
        except OmegaConfBaseException as e:
            raise _omega_error(e, source) from None
        except TypeError as e:
            raise ConfigError(f"<root>: {e} [{source}]") from None
    flat: list[tuple[str, Any, str]] = []
    for key, value, item in parsed:  # the head type is already set: `model.head={...}` is its options, one by one
        if key == "model.head" and isinstance(value, dict):
            flat += [(f"model.head.{k}", v, item) for k, v in value.items() if k != "type"]
        elif key not in ("model.head", "model.head.type"):
            flat.append((key, value, item))
    for key, value, item in flat:
        sentinel = object()
        try:
            exists = OmegaConf.select(cfg, key, default=sentinel, throw_on_missing=False) is not sentinel
        except OmegaConfBaseException:
            exists = False
        if not exists and key.startswith("model.head."):
            raise ConfigError(_unknown_head_key(key, head_config_class(head_type), f"override {item!r}"))
        if not exists and not _in_free_dict(cfg, key):
            raise ConfigError(f"{key}: unknown key{_suggest(key)} [override {item!r}]")
        try:
            OmegaConf.update(cfg, key, value, merge=True)
        except OmegaConfBaseException as e:
            raise _omega_error(e, f"override {item!r}") from None
    obj = _to_object(cfg, source if not parsed else f"{source} + overrides")
    obj.model.backbone_overrides = _typed_backbone_overrides(obj.model)
    validate(obj, check_paths=check_paths)
    return obj


def to_dict(cfg: ExperimentConfig) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def from_dict(d: dict[str, Any]) -> ExperimentConfig:
    """Inverse of :func:`to_dict` (schema-checked, paths not checked)."""
    d = copy.deepcopy(d)  # _select_head rewrites model.head
    try:
        cfg = OmegaConf.merge(_schema(_select_head(d, (), "saved config")), OmegaConf.create(d))
    except OmegaConfBaseException as e:
        raise _omega_error(e, "saved config") from None
    return _to_object(cfg, "saved config")


# -- semantic checks ---------------------------------------------------------------------------------------------
def _need(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


DISTRIBUTED = ("ddp", "fsdp")


def _check_distributed(t: TrainConfig, pt: PosttrainConfig) -> None:
    """``train.distributed`` and the DDP knobs; what FSDP does not support yet is refused here, by name."""
    _need(t.distributed in DISTRIBUTED, "train.distributed", f"must be one of {DISTRIBUTED}, got {t.distributed!r}")
    _need(t.ddp_bucket_cap_mb is None or t.ddp_bucket_cap_mb > 0, "train.ddp_bucket_cap_mb",
          f"must be > 0 (or null: torch's default), got {t.ddp_bucket_cap_mb}")
    if t.distributed != "fsdp":
        return
    fsdp = "with train.distributed=fsdp"
    _need(not t.cuda_graph, "train.cuda_graph", f"not supported {fsdp} (the graphed step is one process, unsharded)")
    _need(not t.compile, "train.compile", f"not supported {fsdp} yet (compiled layers are not sharded)")
    _need(t.precision == "fp32", "train.precision", f"must be 'fp32' {fsdp} (sharded fp32 master weights; "
          "train.mixed_precision=bf16 gathers them in bf16)")
    _need(pt.mode != "lora", "posttrain.mode", f"'lora' is not supported {fsdp} yet (use ddp for LoRA)")
    _need(t.probe_every == 0, "train.probe_every", f"must be 0 {fsdp} (the eager probe runs one process alone)")
    _need(t.find_unused_parameters is None, "train.find_unused_parameters", f"is a DDP option; leave it null {fsdp}")
    for k, default in (("ddp_bucket_cap_mb", None), ("ddp_static_graph", False), ("ddp_gradient_as_bucket_view", False)):
        _need(getattr(t, k) == default, f"train.{k}", f"is a DDP option; leave it at {default} {fsdp}")


def is_store(path: Path) -> bool:
    return path.is_dir() and (path / "zarr.json").is_file()


def resolve_checkpoint(path: str | os.PathLike) -> Path | None:
    """A checkpoint dir itself, or the latest ``step_*`` under ``path`` or ``path/checkpoints`` (None if none)."""
    p = Path(path)
    if (p / "config.json").is_file() and (p / "model.safetensors").is_file():
        return p
    for d in (p / "checkpoints", p):
        if d.is_dir():
            steps = sorted(c for c in d.iterdir() if c.is_dir() and c.name.startswith("step_") and c.name[5:].isdigit())
            if steps:
                return steps[-1]
    return None


TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # train.log_with name → the package it needs


def check_trackers(names: Sequence[str] | None) -> list[str]:
    """The tracker names of ``train.log_with``, checked: a ``ValueError`` naming the key for an unknown tracker or a
    missing package."""
    import importlib.util

    out = []
    for n in list(names or []):
        if n not in TRACKERS:
            raise ValueError(f"train.log_with: unknown tracker {n!r}; known: {sorted(TRACKERS)}")
        if importlib.util.find_spec(TRACKERS[n]) is None:
            raise ValueError(f"train.log_with: tracker {n!r} needs the {TRACKERS[n]!r} package "
                             "(pip install 'chunkpolicy[trackers]')")
        if n not in out:
            out.append(n)
    return out


def validate(cfg: ExperimentConfig, check_paths: bool = True) -> None:
    """Value checks beyond types (OmegaConf checked those); raises :class:`ConfigError` naming the key."""
    from chunkpolicy.models.backbone_config import PRESETS
    from chunkpolicy.models.heads.base import head_class
    from chunkpolicy.normalize import MODES
    from chunkpolicy.spaces import LAYOUTS

    m, d, t, pt = cfg.model, cfg.data, cfg.train, cfg.posttrain
    _need(m.backbone in PRESETS, "model.backbone", f"unknown preset {m.backbone!r}; presets: {sorted(PRESETS)}")
    _typed_backbone_overrides(m)
    _need(isinstance(m.head, HeadConfig), "model.head", f"expected a head config, got {m.head!r}")
    for k in ("horizon", "n_obs_steps", "max_prompt_tokens", "unified_dim"):
        _need(getattr(m, k) >= 1, f"model.{k}", f"must be >= 1, got {getattr(m, k)}")
    _need(m.action_norm in MODES, "model.action_norm", f"must be one of {MODES}, got {m.action_norm!r}")
    norms = head_class(m.head.type).capabilities(m.head).action_norms  # asked here, so a bad pair fails before training
    _need(m.action_norm in norms, "model.action_norm",
          f"head {m.head.type!r} cannot represent {m.action_norm!r} actions; it accepts {list(norms)}")
    _need(m.state_norm in MODES, "model.state_norm", f"must be one of {MODES}, got {m.state_norm!r}")
    _need(m.layout in LAYOUTS, "model.layout", f"must be one of {LAYOUTS}, got {m.layout!r}")
    _need(0.0 <= m.modality_dropout < 1.0, "model.modality_dropout", f"must be in [0, 1), got {m.modality_dropout}")

    _need(len(d.datasets) > 0, "data.datasets", "no datasets; add at least one {path: STORE.zarr}")
    for i, ds in enumerate(d.datasets):
        _need(ds.weight >= 0, f"data.datasets.{i}.weight", f"must be >= 0, got {ds.weight}")
        if check_paths:
            p = Path(ds.path)
            _need(p.exists(), f"data.datasets.{i}.path", f"{str(p)!r} does not exist (create stores with "
                  "`chunkpolicy quickstart` or chunkpolicy.data.synthetic, or override the path)")
            _need(is_store(p), f"data.datasets.{i}.path", f"{str(p)!r} is not an episode store (no zarr.json)")
    _need(sum(ds.weight for ds in d.datasets) > 0, "data.datasets", "all weights are 0")
    _need(d.alpha >= 0, "data.alpha", f"must be >= 0, got {d.alpha}")
    if d.image_size is not None:
        _need(len(d.image_size) == 2 and all(s >= 1 for s in d.image_size), "data.image_size", f"expected [h, w] > 0, got {list(d.image_size)}")
    _need(0.0 <= d.val_fraction < 1.0, "data.val_fraction", f"must be in [0, 1), got {d.val_fraction}")
    _need(d.num_workers >= 0, "data.num_workers", f"must be >= 0, got {d.num_workers}")
    if d.n_cameras is not None:
        _need(d.n_cameras >= 1, "data.n_cameras", f"must be >= 1, got {d.n_cameras}")

    for k in ("steps", "batch_size", "grad_accum", "log_every", "ckpt_every", "val_every", "val_batches", "keep_last"):
        _need(getattr(t, k) >= 1, f"train.{k}", f"must be >= 1, got {getattr(t, k)}")
    _need(t.lr > 0, "train.lr", f"must be > 0, got {t.lr}")
    _need(0 <= t.final_lr <= t.lr, "train.final_lr", f"must be in [0, train.lr={t.lr}], got {t.final_lr}")
    _need(t.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {t.warmup_steps}")
    _need(t.weight_decay >= 0, "train.weight_decay", f"must be >= 0, got {t.weight_decay}")
    _need(len(t.betas) == 2 and all(0 <= b < 1 for b in t.betas), "train.betas", f"expected two numbers in [0, 1), got {list(t.betas)}")
    _need(t.eps > 0, "train.eps", f"must be > 0, got {t.eps}")
    _need(t.grad_clip >= 0, "train.grad_clip", f"must be >= 0 (0: off), got {t.grad_clip}")
    _need(0 <= t.ema_decay < 1, "train.ema_decay", f"must be in [0, 1) (0: off), got {t.ema_decay}")
    _need(t.mixed_precision in MIXED_PRECISION, "train.mixed_precision", f"must be one of {MIXED_PRECISION}, got "
          f"{t.mixed_precision!r}" + (" (YAML reads a bare no as false: write 'no' in quotes)" if str(t.mixed_precision) in ("False", "True") else ""))
    _need(bool(t.output_dir), "train.output_dir", "must be set")
    _need(t.precision in TRAIN_PRECISION, "train.precision", f"must be one of {TRAIN_PRECISION}, got {t.precision!r}")
    _need(t.probe_nonfinite >= 0, "train.probe_nonfinite", f"must be >= 0, got {t.probe_nonfinite}")
    _need(t.probe_every >= 0, "train.probe_every", f"must be >= 0 (0: off), got {t.probe_every}")
    _need(t.probe_repeats >= 1, "train.probe_repeats", f"must be >= 1, got {t.probe_repeats}")
    _need(t.max_bad_steps >= 1, "train.max_bad_steps", f"must be >= 1, got {t.max_bad_steps}")
    _need(t.max_rollbacks >= 0, "train.max_rollbacks", f"must be >= 0, got {t.max_rollbacks}")
    _need(0 < t.rollback_lr_factor <= 1, "train.rollback_lr_factor", f"must be in (0, 1], got {t.rollback_lr_factor}")
    _need(t.max_minutes is None or t.max_minutes > 0, "train.max_minutes", f"must be > 0 (or null), got {t.max_minutes}")
    try:
        check_trackers(t.log_with)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check_distributed(t, pt)
    _need(t.schedule_over in SCHEDULE_OVER, "train.schedule_over", f"must be one of {SCHEDULE_OVER}, got {t.schedule_over!r}")
    _need(t.schedule_over != "time" or t.max_minutes is not None, "train.schedule_over",
          "'time' needs train.max_minutes (the schedule's length)")

    _need(pt.mode in POSTTRAIN_MODES, "posttrain.mode", f"must be one of {POSTTRAIN_MODES}, got {pt.mode!r}")
    _need(pt.lora_head in LORA_HEAD, "posttrain.lora_head", f"must be one of {LORA_HEAD}, got {pt.lora_head!r}")
    _need(pt.lora_rank >= 1, "posttrain.lora_rank", f"must be >= 1, got {pt.lora_rank}")
    _need(pt.lora_alpha > 0, "posttrain.lora_alpha", f"must be > 0, got {pt.lora_alpha}")
    _need(0 <= pt.lora_dropout < 1, "posttrain.lora_dropout", f"must be in [0, 1), got {pt.lora_dropout}")
    _need(len(pt.lora_target_modules) > 0, "posttrain.lora_target_modules", "empty")
    if pt.mode == "lora":
        _need(pt.init_from is not None or m.pretrained_backbone is not None, "posttrain.mode",
              "lora needs pretrained weights: set posttrain.init_from (a checkpoint) or model.pretrained_backbone")
    if check_paths and m.pretrained_backbone is not None:
        _need((Path(m.pretrained_backbone) / "config.json").is_file(), "model.pretrained_backbone",
              f"{m.pretrained_backbone!r} is not a local PaliGemma directory (no config.json)")
    if pt.init_from is not None:
        _need(m.pretrained_backbone is None, "model.pretrained_backbone", "cannot be combined with posttrain.init_from")
        if check_paths:
            ck = resolve_checkpoint(pt.init_from)
            _need(ck is not None, "posttrain.init_from", f"{pt.init_from!r} is not a checkpoint directory and holds no step_* checkpoints")
            _check_model_vs_checkpoint(m, ck)  # type: ignore[arg-type]


def _typed_backbone_overrides(m: ModelConfig) -> dict[str, Any]:
    """``model.backbone_overrides`` checked by OmegaConf against the preset's :class:`BackboneConfig` (names, types,
    then the dataclass's own value checks); returns the values converted to the fields' types."""
    from chunkpolicy.models.backbone_config import PRESETS, BackboneConfig

    over = _plain(m.backbone_overrides or {})
    if m.backbone not in PRESETS:
        return over  # validate names model.backbone
    names = [f.name for f in fields(BackboneConfig)]
    for k in over:
        _need(k in names, f"model.backbone_overrides.{k}", f"unknown backbone field{_close(k, names)}; fields: {sorted(names)}")
    try:
        node = OmegaConf.merge(OmegaConf.structured(PRESETS[m.backbone]), over)
    except OmegaConfBaseException as e:
        raise ConfigError(f"model.backbone_overrides.{_dotted(getattr(e, 'full_key', '') or '')}: {str(e).splitlines()[0]}") from None
    try:
        OmegaConf.to_object(node)
    except ValueError as e:
        raise ConfigError(f"model.backbone_overrides: {e}") from None
    return {k: node[k] for k in over}


def _close(k: str, names: Any) -> str:
    c = difflib.get_close_matches(k, list(names), n=1)
    return f" (did you mean {c[0]!r}?)" if c else ""


# fields that may differ from the checkpoint when post-training (they do not change the architecture or units)
POSTTRAIN_MUTABLE = ("modality_dropout",)


def _set_and_different(mine: Any, saved: Any, cls: type, prefix: str) -> Iterator[tuple[str, Any, Any]]:
    """``(key, mine, saved)`` for the fields of dataclass ``cls`` that ``mine`` sets (not the default) to something
    other than ``saved``'s. A typed head compares its type, then (same type) its options against its own defaults."""
    for f in fields(cls):
        if f.name in POSTTRAIN_MUTABLE or (f.name == "type" and issubclass(cls, HeadConfig)):
            continue
        a, b = _plain(getattr(mine, f.name)), _plain(getattr(saved, f.name))
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if isinstance(a, HeadConfig) and a.type == b.type:
            yield from _set_and_different(a, b, type(a), f"{prefix}{f.name}.")
        elif isinstance(a, HeadConfig):
            if a != default:
                yield f"{prefix}{f.name}.type", a.type, b.type
        elif a != default and a != b:
            yield f"{prefix}{f.name}", a, b


def _check_model_vs_checkpoint(m: ModelConfig, ckpt: Path) -> None:
    """In post-training the architecture comes from the checkpoint: a model.* value set to something other than its
    default that disagrees with the checkpoint is an error (it would be silently ignored otherwise)."""
    try:  # as from_pretrained reads it (legacy head spelling included; missing fields take their defaults)
        saved = PolicyConfig.from_dict(read_json(ckpt / "config.json")["policy"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"posttrain.init_from: cannot read {ckpt / 'config.json'} ({e})") from None
    for key, mine, theirs in _set_and_different(m, saved, PolicyConfig, "model."):
        raise ConfigError(f"{key}: {mine!r} differs from the checkpoint's {theirs!r} "
                          f"({ckpt}); post-training takes the model from posttrain.init_from")
    space = ckpt / "space.json"
    if space.is_file():
        sd = read_json(space)
        for k, key in (("dim", "unified_dim"), ("layout", "layout")):
            default = {"unified_dim": 32, "layout": "pad"}[key]
            if getattr(m, key) != default and getattr(m, key) != sd.get(k):
                raise ConfigError(f"model.{key}: {getattr(m, key)!r} differs from the checkpoint's {sd.get(k)!r} ({ckpt})")

