"""Post-training: start from a checkpoint, add embodiments, merge normalization stats, choose what trains.

Modes (``posttrain.mode``):

* ``full``: every parameter trains.
* ``lora``: ``peft`` LoRA adapters on the backbone's linear layers named in ``lora_target_modules`` (the language
  model; the vision tower too with ``lora_vision``); the backbone's own weights are frozen. The action head is trained
  fully (``lora_head="full"``), gets adapters too (``"lora"``) or is frozen (``"frozen"``). Checkpoints hold the
  merged weights (``W + B·A·alpha/r``), so they load as a plain :class:`ChunkPolicy`; the adapters themselves are in the
  training state for resuming.
* ``head_only``: only the action head trains; the whole backbone (vision tower, projector, LM, state projection) is
  frozen.
* ``freeze_vision``: the SigLIP vision tower is frozen; everything else trains.

A new embodiment is appended to the checkpoint's unified space (ids of the old ones never change) and gets stats
computed from the new data; embodiments the checkpoint already knows keep its stats unless ``recompute_stats``.
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from chunkpolicy.models.policy import ChunkPolicy
from chunkpolicy.spaces import EmbodimentSpec, UnifiedSpace


def load_base(init_from: str | Path) -> tuple[ChunkPolicy, Path]:
    """The policy of ``init_from`` (a checkpoint dir, or a run / checkpoints dir: its latest checkpoint)."""
    from chunkpolicy.config import resolve_checkpoint

    ck = resolve_checkpoint(init_from)
    if ck is None:
        raise FileNotFoundError(f"posttrain.init_from: {init_from} is not a checkpoint and holds no step_* checkpoints")
    return ChunkPolicy.from_pretrained(ck), ck


def extend_space(space: UnifiedSpace, specs: Sequence[EmbodimentSpec]) -> tuple[UnifiedSpace, list[str]]:
    """A copy of ``space`` with ``specs`` registered (existing ids unchanged) and the names that were new."""
    out = UnifiedSpace.from_dict(space.to_dict())
    old = [s.name for s in out.embodiments]
    added = []
    for spec in specs:
        if spec.name not in old and spec.name not in added:
            added.append(spec.name)
        out.register(spec)  # raises if a known name comes with a different spec
    assert [s.name for s in out.embodiments[: len(old)]] == old
    return out, added


def merge_stats(old: Mapping[str, Any], new: Mapping[str, Any], recompute: bool = False) -> dict[str, Any]:
    """Checkpoint stats plus new embodiments' stats; with ``recompute`` new-data stats replace known ones too."""
    out = {k: v for k, v in old.items()}
    for name, st in new.items():
        if name not in out or recompute:
            out[name] = st
    return out


def rebase(policy: ChunkPolicy, space: UnifiedSpace, stats: Mapping[str, Any], **config_changes: Any) -> ChunkPolicy:
    """The same weights, tokenizer and head state in a policy over ``space`` with ``stats`` (and config changes that
    keep the architecture, e.g. ``modality_dropout``)."""
    config = dataclasses.replace(policy.config, **config_changes) if config_changes else policy.config
    new = ChunkPolicy(config, space, stats, tokenizer=policy.tokenizer)
    files = policy.head.state_files()  # non-tensor head state, e.g. a fitted FAST BPE (ActionHead interface)
    if files:
        new.head.load_state_files(files)
    new.load_state_dict(policy.state_dict())
    return new


# -- modes -------------------------------------------------------------------------------------------------------
def _freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def vision_tower(policy: ChunkPolicy) -> nn.Module:
    return policy.backbone.model.vision_tower


def lora_targets(module: nn.Module, names: Sequence[str], skip_prefixes: Sequence[str] = ()) -> list[str]:
    """Full names of the ``nn.Linear`` layers of ``module`` whose last name component is in ``names``."""
    out = []
    for full, m in module.named_modules():
        if isinstance(m, nn.Linear) and full.rsplit(".", 1)[-1] in names and not any(full.startswith(p) for p in skip_prefixes):
            out.append(full)
    return out


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict of a model with injected LoRA layers as the plain model would have it: ``W + ΔW`` per layer."""
    from peft.tuners.lora import LoraLayer

    sd = {}
    for name, t in model.state_dict().items():
        if any(part.startswith("lora_") for part in name.split(".")):
            continue
        sd[name.replace(".base_layer.", ".")] = t
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, LoraLayer):
                w = m.get_base_layer().weight.detach().clone()
                for adapter in m.active_adapters:
                    if adapter in m.lora_A:
                        w += m.get_delta_weight(adapter).to(w.dtype)
                sd[f"{name}.weight"] = w
    return sd


def apply_mode(policy: ChunkPolicy, pt: Any, seed: int = 0) -> tuple[ChunkPolicy, Callable[[nn.Module, Path], None] | None, dict[str, Any]]:
    """Freeze / inject adapters per ``pt`` (a :class:`~chunkpolicy.config.PosttrainConfig`) in place.

    Returns ``(policy, export_fn or None, info)``; ``export_fn`` writes a plain checkpoint (LoRA merged)."""
    mode = pt.mode
    info: dict[str, Any] = {"mode": mode}
    if mode == "full":
        return policy, None, info
    if mode == "head_only":
        _freeze(policy.backbone)
        return policy, None, info
    if mode == "freeze_vision":
        _freeze(vision_tower(policy))
        return policy, None, info
    if mode != "lora":
        raise ValueError(f"posttrain.mode: unknown mode {mode!r}")
    from peft import LoraConfig, inject_adapter_in_model

    export_copy = copy.deepcopy(policy).cpu().eval()  # a plain policy that receives the merged weights at export
    for p in export_copy.parameters():
        p.requires_grad_(False)
    _freeze(policy)
    skip = () if pt.lora_vision else ("model.vision_tower",)
    targets = lora_targets(policy.backbone, list(pt.lora_target_modules), skip)
    if not targets:
        raise ValueError(f"posttrain.lora_target_modules: {list(pt.lora_target_modules)} match no linear layer of the backbone")
    torch.manual_seed(seed + 1)  # adapter init is part of the run's determinism
    lcfg = dict(r=pt.lora_rank, lora_alpha=pt.lora_alpha, lora_dropout=pt.lora_dropout, bias="none")
    inject_adapter_in_model(LoraConfig(target_modules=targets, **lcfg), policy.backbone)
    info["backbone_lora_layers"] = len(targets)
    if pt.lora_head == "lora":
        head_targets = lora_targets(policy.head, list(pt.lora_target_modules))
        if head_targets:
            inject_adapter_in_model(LoraConfig(target_modules=head_targets, **lcfg), policy.head)
        info["head_lora_layers"] = len(head_targets)
    # exactly the adapters (and the head when it trains fully) are trainable
    for name, p in policy.named_parameters():
        is_adapter = any(part.startswith("lora_") for part in name.split("."))
        p.requires_grad_(is_adapter or (pt.lora_head == "full" and name.startswith("head.")))

    def export(model: nn.Module, path: Path) -> None:
        merged = merged_state_dict(model)
        export_copy.load_state_dict({k: v.detach().cpu() for k, v in merged.items()}, strict=True)
        export_copy.save_pretrained(path)

    return policy, export, info
