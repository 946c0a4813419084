"""Export a π0-shaped chunkpolicy checkpoint back to LeRobot's ``PI0Policy`` format, so a model post-trained here runs
in LeRobot too: the inverse of :func:`chunkpolicy.models.importers.lerobot.import_lerobot_pi` for ``variant="pi0"``.

Only what LeRobot's π0 can represent is exported (anything else is an error naming the field): a ``flow_expert`` head
with ``state_token="expert"``, ``time_convention="openpi"``, ``invalid_dims="noise"``, ``time_conditioning="concat"``;
a ``paligemma`` backbone with 8 query heads; one embodiment in the ``pad`` layout; absolute actions; one observation
step. LeRobot builds its networks from variant names (``gemma_2b`` / ``gemma_300m`` and SigLIP So400m), so other sizes
need ``allow_nonstandard_sizes=True`` (LeRobot then cannot build them unmodified; used by the reduced-size tests).

Written with LeRobot's own classes: ``PI0Config._save_pretrained`` (config.json), its processor pipelines
(``policy_preprocessor.json`` / ``policy_postprocessor.json`` + normalizer state files), and ``model.safetensors`` in
its key layout. ``paligemma.lm_head`` is written as a copy of ``embed_tokens`` (PaliGemma ties them) and the expert's
unused ``lm_head`` as zeros (LeRobot loads strictly).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from chunkpolicy.models.importers.lerobot import EXPERT, LM_HEADS, MODES, PALI, VARIANTS
from chunkpolicy.models.importers.report import ImportReport

SO400M = dict(vision_width=1152, vision_depth=27, vision_heads=16, vision_mlp=4304, patch_size=14)


def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(f"export to LeRobot pi0: {msg}")


def export_lerobot_pi0(policy: Any, out: str | os.PathLike, *, tokenizer_name: str = "google/paligemma-3b-pt-224",
                       allow_nonstandard_sizes: bool = False) -> ImportReport:
    """Write ``policy`` (a :class:`ChunkPolicy` or its checkpoint directory) as a LeRobot ``PI0Policy`` directory at
    ``out`` (temp directory, then rename). ``tokenizer_name``: what LeRobot's tokenizer step will load."""
    from lerobot.configs import FeatureType, NormalizationMode, PolicyFeature
    from lerobot.policies.pi0.configuration_pi0 import PI0Config
    from lerobot.policies.pi0.processor_pi0 import Pi0NewLineProcessor
    from lerobot.processor import (AbsoluteActionsProcessorStep, RelativeActionsProcessorStep, TokenizerProcessorStep,
                                   make_default_policy_processor_steps, make_policy_processor_pipelines)
    from safetensors.torch import save_file

    from chunkpolicy.atomic import atomic_dir
    from chunkpolicy.models.backbone_config import backbone_config
    from chunkpolicy.models.policy import ChunkPolicy

    if isinstance(policy, (str, os.PathLike)):
        policy = ChunkPolicy.from_pretrained(policy)
    c, h = policy.config, policy.config.head
    bb = backbone_config(c.backbone, **c.backbone_overrides)
    _need(h.type == "flow_expert", f"head is {h.type!r}; LeRobot's pi0 is a flow_expert")
    for field_, want in (("state_token", "expert"), ("time_convention", "openpi"), ("invalid_dims", "noise"),
                         ("time_conditioning", "concat")):
        _need(getattr(h, field_) == want, f"policy.head.{field_} is {getattr(h, field_)!r}, LeRobot's pi0 needs {want!r}")
    _need(bb.variant == "paligemma" and bb.heads == LM_HEADS, f"backbone must be paligemma with {LM_HEADS} heads")
    _need(len(policy.space.embodiments) == 1, f"{len(policy.space.embodiments)} embodiments; a LeRobot policy has one")
    _need(policy.space.layout == "pad", f"space layout {policy.space.layout!r}; LeRobot pads (layout 'pad')")
    _need(not c.delta_actions and not c.state_in_prompt and c.n_obs_steps == 1,
          "delta_actions, state_in_prompt and n_obs_steps > 1 have no LeRobot pi0 equivalent")
    inv = {v: k for k, v in MODES.items()}
    _need(c.action_norm in inv and c.state_norm in inv, f"normalization {c.action_norm!r}/{c.state_norm!r}")
    report = ImportReport(src=Path("<policy>"), out=Path(out), fmt="export lerobot-pi0")
    w = policy.head.width
    standard = (all(getattr(bb, k) == v for k, v in SO400M.items()) and (bb.width, bb.depth, bb.mlp) == VARIANTS["gemma_2b"]
                and (w, bb.depth, policy.head.layers[0].mlp.gate_proj.out_features) == VARIANTS["gemma_300m"]
                and bb.head_dim == 256 and bb.kv_heads == 1 and bb.vocab_size == 257152)
    if not standard:
        _need(allow_nonstandard_sizes, "sizes differ from LeRobot's gemma_2b / gemma_300m / SigLIP So400m, which its "
                                       "config cannot express (allow_nonstandard_sizes=True writes them anyway)")
        report.notes.append("non-standard sizes: LeRobot's config names gemma_2b / gemma_300m, it cannot build these unmodified")
    spec = policy.space.embodiments[0]
    S, D = bb.image_size, policy.space.dim
    inputs = {f"observation.images.{cam}": PolicyFeature(type=FeatureType.VISUAL, shape=(3, S, S)) for cam in spec.cameras}
    inputs["observation.state"] = PolicyFeature(type=FeatureType.STATE, shape=(spec.state_dim,))
    outputs = {"action": PolicyFeature(type=FeatureType.ACTION, shape=(spec.action_dim,))}
    cfg = PI0Config(device="cpu", dtype="float32", chunk_size=c.horizon, n_action_steps=c.horizon, max_state_dim=D,
                    max_action_dim=D, num_inference_steps=h.num_steps, min_period=h.min_period, max_period=h.max_period,
                    image_resolution=(S, S), tokenizer_max_length=c.max_prompt_tokens, input_features=inputs,
                    output_features=outputs, action_feature_names=list(spec.action_names),
                    normalization_mapping={"VISUAL": NormalizationMode.IDENTITY,
                                           "STATE": NormalizationMode(inv[c.state_norm]),
                                           "ACTION": NormalizationMode(inv[c.action_norm])})
    # weights: the inverse of the importer's map
    back = {"backbone.model.": PALI + "model.", "head.layers.": EXPERT + "model.layers.", "head.norm.": EXPERT + "model.norm.",
            "head.action_in.": "model.action_in_proj.", "head.action_out.": "model.action_out_proj.",
            "head.state_proj.": "model.state_proj.", "head.time_in.": "model.action_time_mlp_in.",
            "head.time_out.": "model.action_time_mlp_out."}
    tensors: dict[str, torch.Tensor] = {}
    for k, v in policy.state_dict().items():
        for ours, theirs in back.items():
            if k.startswith(ours):
                tensors[theirs + k[len(ours):]] = v.detach().float().contiguous().cpu().clone()
                report.mapped.append((k, theirs + k[len(ours):]))
                break
        else:
            report.left_out.append((k, "no LeRobot pi0 equivalent"))
    emb = tensors[PALI + "model.language_model.embed_tokens.weight"]
    tensors[PALI + "lm_head.weight"] = emb.clone()
    tensors[EXPERT + "lm_head.weight"] = torch.zeros(emb.shape[0], w)
    report.notes.append("paligemma.lm_head = embed_tokens (tied in PaliGemma); gemma_expert.lm_head = zeros (unused by pi0)")
    st = policy.normalizer.stats[spec.name]
    to_t = lambda d: {k: torch.as_tensor(v, dtype=torch.float32) for k, v in d.items()}  # noqa: E731
    stats = {"action": to_t(st["action"])}
    if spec.state_dim:
        stats["observation.state"] = to_t(st["state"])
    steps = make_default_policy_processor_steps(cfg, stats)
    relative = RelativeActionsProcessorStep(enabled=False, exclude_joints=list(cfg.relative_exclude_joints),
                                            action_names=cfg.action_feature_names)
    tok_step = TokenizerProcessorStep(tokenizer=policy.tokenizer, max_length=c.max_prompt_tokens, padding_side="right",
                                      padding="max_length")
    pre, post = make_policy_processor_pipelines(  # the order of LeRobot's make_pi0_pre_post_processors
        input_steps=[steps.rename_observations, steps.add_batch_dim, Pi0NewLineProcessor(), tok_step, steps.to_device,
                     relative, steps.normalize],
        output_steps=[steps.unnormalize, AbsoluteActionsProcessorStep(enabled=False, relative_step=relative), steps.to_cpu])
    with atomic_dir(out) as tmp:
        cfg._save_pretrained(tmp)
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        pre.save_pretrained(tmp)
        post.save_pretrained(tmp)
        pj = tmp / "policy_preprocessor.json"  # name the tokenizer LeRobot should load (an object is not serialized)
        doc = json.loads(pj.read_text())
        for step in doc["steps"]:
            if step.get("registry_name") == "tokenizer_processor":
                step["config"]["tokenizer_name"] = tokenizer_name
        pj.write_text(json.dumps(doc, indent=2))
    report.settings.append(("tokenizer_processor.tokenizer_name", tokenizer_name))
    return report
