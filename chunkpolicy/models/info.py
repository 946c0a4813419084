"""Parameter counts per component, built on the meta device (no memory is allocated for weights)."""

from __future__ import annotations

import torch

from chunkpolicy.models.backbone import Backbone
from chunkpolicy.models.backbone_config import backbone_config
from chunkpolicy.models.heads.base import build_head
from chunkpolicy.models.heads.configs import HeadConfig, as_head_config


def model_info(preset: str, head: str | HeadConfig = "flow_expert", horizon: int = 50, action_dim: int = 32) -> dict:
    """``{"preset", "head", "vision", "projector", "language", "state", "head_params", "total"}`` parameter counts.

    ``head``: a head name (its defaults) or a typed head config. The LM count includes the token embedding once (the
    LM head is tied to it)."""
    head_cfg = as_head_config(head)
    with torch.device("meta"):
        bb = Backbone(backbone_config(preset), state_dim=action_dim)
        hd = build_head(head_cfg.type, head_cfg, bb, horizon, action_dim)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    out = {
        "preset": preset,
        "head": head_cfg.type,
        "vision": n(bb.model.vision_tower),
        "projector": n(bb.model.multi_modal_projector),
        "language": n(bb.model.language_model),
        "state": n(bb.state_proj),
        "head_params": n(hd),
    }
    out["total"] = out["vision"] + out["projector"] + out["language"] + out["state"] + out["head_params"]
    return out


def format_model_info(info: dict) -> str:
    rows = [("vision tower (SigLIP)", info["vision"]), ("projector", info["projector"]),
            ("language model (Gemma, tied embedding)", info["language"]), ("state projection", info["state"]),
            (f"head ({info['head']})", info["head_params"]), ("total", info["total"])]
    lines = [f"preset {info['preset']} + head {info['head']}"]
    lines += [f"  {name:<42} {count / 1e6:>10.1f} M" for name, count in rows]
    return "\n".join(lines)
