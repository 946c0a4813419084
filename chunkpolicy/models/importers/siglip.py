"""A ``transformers`` SigLIP checkpoint (``SiglipModel`` or ``SiglipVisionModel``, ``save_pretrained`` output or a hub
snapshot) → a chunkpolicy checkpoint on the ``siglip`` backbone: SigLIP's vision tower (weights unchanged) + a new
projector to the prefix width + the light text embedding, with a fresh head (``dit`` by default: the flow_expert and
tokens heads need Gemma layers, which the ``siglip`` variant does not have).

Sizes come from ``transformers``' own ``SiglipConfig`` / ``SiglipVisionConfig``. Left out: SigLIP's text tower (a
``SiglipModel``'s) and its attention-pooling head (the prefix keeps every patch token, as PaliGemma does).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Mapping

from chunkpolicy.atomic import read_json
from chunkpolicy.models.importers.report import ImportReport


def import_siglip(src: str | os.PathLike, out: str | os.PathLike | None, *, head: Any = "dit", horizon: int = 50,
                  tokenizer: Any = None, unified_dim: int = 32, layout: str = "pad",
                  policy_options: Mapping[str, Any] | None = None, return_policy: bool = False, **unused: Any):
    """Build a ``siglip``-backbone policy on the SigLIP vision weights in ``src`` and save it at ``out`` (None: build
    only). ``tokenizer``: a local directory or object (default: the built-in character tokenizer, which the light
    text embedding is sized for); the embedding gets ``max(1280, len(tokenizer))`` rows."""

    import torch
    from transformers import SiglipModel, SiglipVisionModel
    from transformers import SiglipConfig, SiglipVisionConfig

    from chunkpolicy.models.backbone_config import PRESETS
    from chunkpolicy.models.policy import ChunkPolicy, PolicyConfig
    from chunkpolicy.models.tokenizer import build_char_tokenizer, load_tokenizer
    from chunkpolicy.spaces import UnifiedSpace

    if unused:
        raise ValueError(f"--format siglip: options {sorted(unused)} do not apply (a SigLIP checkpoint has no embodiment)")
    src = Path(src)
    report = ImportReport(src=src, out=Path(out) if out is not None else None, fmt="siglip")
    cj = src / "config.json"
    mtype = read_json(cj).get("model_type")  # missing / corrupt: one error naming the file
    if mtype == "siglip":
        vcfg = SiglipConfig.from_pretrained(str(src), local_files_only=True).vision_config
        vision = SiglipModel.from_pretrained(str(src), local_files_only=True).vision_model
        report.left_out.append(("text_model.*", "SigLIP's text tower: the siglip backbone has a light token embedding"))
    elif mtype == "siglip_vision_model":
        vcfg = SiglipVisionConfig.from_pretrained(str(src), local_files_only=True)
        vision = SiglipVisionModel.from_pretrained(str(src), local_files_only=True).vision_model
    else:
        raise ValueError(f"{cj}: model_type is {mtype!r}, expected 'siglip' or 'siglip_vision_model'")
    if vcfg.hidden_act != "gelu_pytorch_tanh":
        raise ValueError(f"{cj}: vision activation {vcfg.hidden_act!r} (SigLIP uses 'gelu_pytorch_tanh')")
    if tokenizer is None:
        tokenizer = build_char_tokenizer()
        report.settings.append(("tokenizer", "built-in character tokenizer"))
    elif isinstance(tokenizer, (str, os.PathLike)):
        report.settings.append(("tokenizer", str(tokenizer)))
        tokenizer = load_tokenizer(tokenizer)
    preset = PRESETS["siglip"]
    bb = replace(preset, image_size=vcfg.image_size, patch_size=vcfg.patch_size, vision_width=vcfg.hidden_size,
                 vision_depth=vcfg.num_hidden_layers, vision_heads=vcfg.num_attention_heads,
                 vision_mlp=vcfg.intermediate_size, vocab_size=max(preset.vocab_size, len(tokenizer)))
    overrides = {k: v for k, v in vars(bb).items() if getattr(preset, k) != v}
    pcfg = PolicyConfig(backbone="siglip", backbone_overrides=overrides, head=head, horizon=horizon,
                        **dict(policy_options or {}))
    policy = ChunkPolicy(pcfg, UnifiedSpace(unified_dim, layout), {}, tokenizer=tokenizer)
    ours = policy.backbone.model.vision_tower.vision_model
    theirs = {k: v for k, v in vision.state_dict().items() if not k.startswith("head.")}
    pooling = [k for k in vision.state_dict() if k.startswith("head.")]
    if pooling:
        report.left_out.append((f"vision_model.head.* ({len(pooling)} tensors)",
                                "SigLIP's attention-pooling head: the prefix keeps every patch token"))
    own = ours.state_dict()
    missing, extra = sorted(set(own) - set(theirs)), sorted(set(theirs) - set(own))
    wrong = [k for k in set(own) & set(theirs) if own[k].shape != theirs[k].shape]
    if missing or extra or wrong:
        raise ValueError(f"{src}: SigLIP weights do not match: missing {missing[:4]}, unexpected {extra[:4]}, shapes {wrong[:4]}")
    with torch.no_grad():
        for k, v in theirs.items():
            own[k].copy_(v)
            report.mapped.append((f"vision_model.{k}", f"backbone.model.vision_tower.vision_model.{k}"))
    report.settings.append(("backbone", f"siglip + {overrides or 'no overrides'} (from {cj} via transformers' config)"))
    report.settings.append(("head", f"{pcfg.head.type}, fresh initialization; horizon {horizon}"))
    report.notes.append("new (freshly initialized): multi_modal_projector, the light text embedding, state_proj, the head")
    report.notes.append(f"unified space: dim {unified_dim}, layout {layout!r}, no embodiments yet (posttrain.init_from=OUT)")
    if out is not None:
        policy.save_pretrained(out)
    return (report, policy) if return_policy else report
