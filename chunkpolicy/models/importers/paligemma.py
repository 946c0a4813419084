"""A ``transformers`` PaliGemma directory (``save_pretrained`` output or a downloaded hub snapshot) → a chunkpolicy
checkpoint with that backbone and a fresh action head, ready for post-training (``posttrain.init_from``).

The config is read by ``transformers``' own ``PaliGemmaConfig`` (:meth:`Backbone.config_from_pretrained`), so hub
configs that leave default values out load; the backbone is built at the checkpoint's sizes (its vocabulary too: hub
PaliGemma has 257,216 embedding rows, 257,152 of them used by the tokenizer), so the weights are loaded unchanged by
``transformers`` itself (:meth:`Backbone.load_pretrained_weights`, its key conversions included). The head,
``Backbone.state_proj`` (when the head uses a prefix state token) and the unified space are new: the checkpoint has no
embodiment and no normalization stats until post-training adds them (``extend_space`` / ``merge_stats``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from chunkpolicy.models.importers.report import ImportReport

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")


def import_paligemma(src: str | os.PathLike, out: str | os.PathLike | None, *, head: Any = "flow_expert",
                     horizon: int = 50, tokenizer: Any = None, unified_dim: int = 32, layout: str = "pad",
                     variant: str = "paligemma", policy_options: Mapping[str, Any] | None = None,
                     return_policy: bool = False, **unused: Any):
    """Build a policy on the PaliGemma weights in ``src`` and save it at ``out`` (None: build only).

    ``head``: head name or typed config; ``tokenizer``: a local directory or object (default: ``src`` itself when it
    holds tokenizer files, as a hub snapshot does); ``policy_options``: further :class:`PolicyConfig` fields.
    ``variant="siglip"``: only PaliGemma's vision tower and projector, on the ``siglip`` backbone (light text
    embedding sized for the tokenizer, no Gemma layers; default head then ``dit``).
    ``embodiment`` / ``control_hz`` (CLI options for the LeRobot formats) are refused: a PaliGemma checkpoint has no
    embodiment; post-training registers the robots it is trained on."""
    from chunkpolicy.models.backbone import Backbone
    from chunkpolicy.models.backbone_config import PRESETS
    from chunkpolicy.models.policy import ChunkPolicy, PolicyConfig
    from chunkpolicy.models.tokenizer import load_tokenizer
    from chunkpolicy.spaces import UnifiedSpace

    if unused:
        raise ValueError(f"--format paligemma: options {sorted(unused)} do not apply (a PaliGemma checkpoint has no "
                         "embodiment; post-training adds the robots it trains on)")
    if variant not in ("paligemma", "siglip"):
        raise ValueError(f"variant must be 'paligemma' or 'siglip', got {variant!r}")
    src = Path(src)
    report = ImportReport(src=src, out=Path(out) if out is not None else None, fmt="paligemma")
    bb = Backbone.config_from_pretrained(src)
    if tokenizer is None:
        if not any((src / f).is_file() for f in TOKENIZER_FILES):
            raise ValueError(f"tokenizer: {src} holds no tokenizer ({' / '.join(TOKENIZER_FILES)}); give PaliGemma's "
                             "tokenizer directory (--tokenizer DIR; nothing is downloaded)")
        tokenizer = src
    if isinstance(tokenizer, (str, os.PathLike)):
        report.settings.append(("tokenizer", str(tokenizer)))
        tokenizer = load_tokenizer(tokenizer)
    if variant == "siglip":
        from dataclasses import replace

        bb = replace(bb, variant="siglip", vocab_size=max(PRESETS["siglip"].vocab_size, len(tokenizer)))
        head = "dit" if head == "flow_expert" else head
    preset = PRESETS["paligemma-3b" if variant == "paligemma" else "siglip"]
    overrides = {k: v for k, v in vars(bb).items() if getattr(preset, k) != v}
    pcfg = PolicyConfig(backbone="paligemma-3b" if variant == "paligemma" else "siglip", backbone_overrides=overrides,
                        head=head, horizon=horizon, **dict(policy_options or {}))
    policy = ChunkPolicy(pcfg, UnifiedSpace(unified_dim, layout), {}, tokenizer=tokenizer)
    if variant == "paligemma":
        policy.backbone.load_pretrained_weights(src)
        for k in policy.backbone.model.state_dict():
            report.mapped.append((k, "backbone.model." + k))
    else:
        import torch
        from transformers import PaliGemmaForConditionalGeneration

        hf = PaliGemmaForConditionalGeneration.from_pretrained(str(src), local_files_only=True, dtype=torch.float32)
        for part in ("vision_tower", "multi_modal_projector"):
            getattr(policy.backbone.model, part).load_state_dict(getattr(hf.model, part).state_dict())
            report.mapped.extend((f"model.{part}.{k}", f"backbone.model.{part}.{k}") for k in getattr(hf.model, part).state_dict())
        report.left_out.append(("model.language_model.*", "the siglip backbone has no Gemma layers and a light text embedding"))
        del hf
    report.settings.append(("backbone", f"{pcfg.backbone} + {overrides or 'no overrides'} (from {src / 'config.json'} "
                                        "via transformers' PaliGemmaConfig)"))
    report.settings.append(("head", f"{pcfg.head.type}, fresh initialization; horizon {horizon}"))
    if variant == "paligemma":
        report.left_out.append(("lm_head", "PaliGemma ties it to embed_tokens; our backbone's LM logits use embed_tokens"))
    if policy.backbone.state_token:
        report.notes.append("backbone.state_proj is new (freshly initialized): PaliGemma has no state input")
    report.notes.append(f"unified space: dim {unified_dim}, layout {layout!r}, no embodiments and no normalization stats "
                        "yet (post-training registers its robots: posttrain.init_from=OUT)")
    if out is not None:
        policy.save_pretrained(out)
    return (report, policy) if return_policy else report
