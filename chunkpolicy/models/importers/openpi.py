"""openpi's PyTorch π0 / π0.5 checkpoints (``examples/convert_jax_model_to_pytorch.py`` output) → chunkpolicy.

The layout documented by openpi's converter: ``model.safetensors`` with ``PI0Pytorch``'s keys (LeRobot's without the
``model.`` prefix: ``paligemma_with_expert.{paligemma,gemma_expert}.*``, ``state_proj`` (π0), ``action_in_proj``,
``action_out_proj``, ``action_time_mlp_{in,out}`` (π0) / ``time_mlp_{in,out}`` (π0.5)), a ``config.json`` with
``action_dim``, ``action_horizon``, ``paligemma_variant``, ``action_expert_variant``, ``precision``, and the training
assets copied beside it: ``assets/<asset_id>/norm_stats.json`` = ``{"norm_stats": {"state": {mean, std, q01, q99},
"actions": {...}}}`` in the robot's own dims. LeRobot's π0 is a port of the same ``PI0Pytorch``, so the network,
masks and time convention are those of :mod:`.lerobot` and the same :func:`~.lerobot.build_pi_policy` builds it.

What openpi keeps in code rather than in the checkpoint must be given: the cameras (in the model's order, e.g.
``base_0_rgb,left_wrist_0_rgb,right_wrist_0_rgb``), the prompt length (openpi's ``max_token_len``: 48 for π0, 200 for
π0.5) and, when ``assets/`` holds several, the asset id. Normalization follows openpi's defaults: ``mean_std`` for π0,
``quantile`` for π0.5 (``use_quantile_norm``), overridable. openpi's prompt cleaning (``_`` → space) is not applied:
write prompts as they were trained.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from chunkpolicy.models.importers.lerobot import VISION_HEADS, _read_json, _read_weights, _sizes, build_pi_policy
from chunkpolicy.models.importers.report import ImportReport


def import_openpi_pi(src: str | os.PathLike, out: str | os.PathLike | None, *, variant: str = "pi0",
                     tokenizer: Any = None, cameras: Sequence[str] | None = None, asset_id: str | None = None,
                     max_prompt_tokens: int | None = None, action_norm: str | None = None, state_norm: str | None = None,
                     embodiment: str = "openpi", control_hz: float | None = None, num_steps: int = 10,
                     return_policy: bool = False):
    """Convert an openpi PyTorch π0 / π0.5 directory into a chunkpolicy checkpoint at ``out`` (None: build only);
    see the module docstring for what must be given."""
    from chunkpolicy.models.tokenizer import load_tokenizer
    from chunkpolicy.spaces import EmbodimentSpec

    if variant not in ("pi0", "pi05"):
        raise ValueError(f"variant must be 'pi0' or 'pi05', got {variant!r}")
    src = Path(src)
    report = ImportReport(src=src, out=Path(out) if out is not None else None, fmt=f"openpi-{variant}")
    cj = src / "config.json"
    cfg = _read_json(cj)
    for k in ("action_dim", "action_horizon"):
        if k not in cfg:
            raise KeyError(f"{cj}: no {k!r} (openpi's converter writes action_dim, action_horizon, variants, precision)")
    if not cameras:
        raise ValueError("cameras: openpi keeps its camera names in code; give them in the model's order "
                         "(--cameras base_0_rgb,left_wrist_0_rgb,right_wrist_0_rgb)")
    w = _read_weights(src / "model.safetensors")
    has_state_proj = "model.state_proj.weight" in w["keys"]
    if has_state_proj != (variant == "pi0"):
        raise ValueError(f"{src / 'model.safetensors'}: {'has' if has_state_proj else 'has no'} state_proj, which "
                         f"does not fit --format openpi-{variant} (π0 has one, π0.5 not)")
    bb, (e_width, e_mlp) = _sizes(w["shapes"], w["keys"], report, cfg)
    D = w["shapes"]["model.action_in_proj.weight"][1]
    # -- normalization stats ----------------------------------------------------------------------------------------
    assets = src / "assets"
    found = sorted(p.parent.name for p in assets.glob("*/norm_stats.json")) if assets.is_dir() else []
    if asset_id is None:
        if len(found) != 1:
            raise FileNotFoundError(f"{assets}: expected one <asset_id>/norm_stats.json, found {found or 'none'} "
                                    "(give asset_id)")
        asset_id = found[0]
    nf = assets / asset_id / "norm_stats.json"
    doc = _read_json(nf)
    ns = doc.get("norm_stats", doc)
    for k in ("state", "actions"):
        if k not in ns:
            raise KeyError(f"{nf}: no norm_stats.{k}")
    modes = {"action": action_norm or ("mean_std" if variant == "pi0" else "quantile"),
             "state": state_norm or ("mean_std" if variant == "pi0" else "quantile")}
    report.settings.append(("normalization", f"action {modes['action']}, state {modes['state']} (openpi's default for "
                                             f"{variant}) from {nf}"))
    stats = {}
    dims = {}
    for ours, theirs in (("action", "actions"), ("state", "state")):
        st = {k: np.asarray(v, dtype=np.float64).reshape(-1) for k, v in ns[theirs].items()
              if k in ("mean", "std", "q01", "q99", "min", "max") and v is not None}
        n = {len(v) for v in st.values()}
        if len(n) != 1:
            raise ValueError(f"{nf}: norm_stats.{theirs} stats have different lengths {sorted(n)}")
        dims[ours] = n.pop()
        if {"q01", "q99"} <= set(st) and not {"min", "max"} & set(st):
            report.notes.append(f"{theirs}: openpi stores no min/max; a dim with std or q99-q01 ≈ 0 is then an error "
                                "in our normalizer (it cannot tell constant from rare)")
        stats[ours] = st
    if dims["action"] > D or dims["state"] > D:
        raise ValueError(f"{nf}: stats have {dims} dims, more than the model's {D}")
    if control_hz is None:
        control_hz = 10.0
        report.assumed.append("control_hz = 10 (not recorded by openpi; pass control_hz)")
    report.assumed.append(f"robot dims = the norm stats' lengths: {dims['action']} action, {dims['state']} state "
                          "(openpi pads to the model's dims after normalizing)")
    spec = EmbodimentSpec(name=embodiment, action_names=tuple(f"action_{i}" for i in range(dims["action"])),
                          state_names=tuple(f"state_{i}" for i in range(dims["state"])), cameras=tuple(cameras),
                          control_hz=float(control_hz))
    report.settings.append(("embodiment", f"{embodiment!r}: cameras {list(cameras)}, {control_hz} Hz"))
    max_prompt = int(max_prompt_tokens or (48 if variant == "pi0" else 200))
    if max_prompt_tokens is None:
        report.assumed.append(f"max_prompt_tokens = {max_prompt} (openpi's default max_token_len for {variant})")
    if tokenizer is None:
        raise ValueError("tokenizer: openpi prompts are tokenized with PaliGemma's tokenizer; give a local copy "
                         "(--tokenizer DIR; nothing is downloaded)")
    if isinstance(tokenizer, (str, os.PathLike)):
        report.settings.append(("tokenizer", str(tokenizer)))
        tokenizer = load_tokenizer(tokenizer)
    report.assumed.append(f"vision_heads = {VISION_HEADS}, flow steps = {num_steps}, sinusoid periods [4e-3, 4]")
    policy = build_pi_policy(w, variant, bb, e_width, e_mlp, D=D, horizon=int(cfg["action_horizon"]), num_steps=num_steps,
                             min_period=4e-3, max_period=4.0, max_prompt=max_prompt, modes=modes, spec=spec,
                             emb_stats=stats, tokenizer=tokenizer, report=report)
    if out is not None:
        policy.save_pretrained(out)
    return (report, policy) if return_policy else report
