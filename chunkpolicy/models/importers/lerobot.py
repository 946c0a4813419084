"""LeRobot π0 / π0.5 checkpoints (``PI0Policy`` / ``PI05Policy`` of lerobot 0.6.x) → chunkpolicy.

What a LeRobot π0 directory holds and where it goes:

* ``config.json`` (``type: pi0 | pi05``): ``chunk_size`` → ``horizon``; ``num_inference_steps``, ``min_period``,
  ``max_period`` → the flow_expert; ``input_features`` / ``output_features`` → the embodiment (cameras in LeRobot's
  order, state and action sizes); ``max_state_dim`` = ``max_action_dim`` → the unified dim D (``pad`` layout, as π0).
* ``model.safetensors``: ``model.paligemma_with_expert.paligemma.model.*`` → ``backbone.model.*`` (SigLIP, projector,
  Gemma), ``model.paligemma_with_expert.gemma_expert.model.{layers,norm}.*`` → ``head.{layers,norm}.*``,
  ``model.{action_in_proj, action_out_proj, state_proj}`` → ``head.{action_in, action_out, state_proj}``,
  ``model.action_time_mlp_{in,out}`` (π0) / ``model.time_mlp_{in,out}`` (π0.5) → ``head.time_{in,out}``. Sizes are
  read from the tensors (LeRobot's variant names are checked against them and reported). The two untied LM heads
  (``paligemma.lm_head``, ``gemma_expert.lm_head``) are left out: π0 never computes language logits.
* ``policy_preprocessor.json`` / ``policy_postprocessor.json`` + their ``*_normalizer_processor.safetensors`` /
  ``*_unnormalizer_processor.safetensors``: the state stats (preprocessor) and action stats (postprocessor) and their
  modes (``MEAN_STD`` → ``mean_std``, ``MIN_MAX`` → ``min_max``, ``QUANTILES`` → ``quantile``, ``IDENTITY`` →
  ``identity``); the tokenizer step's ``max_length`` → ``max_prompt_tokens``.

Conventions bridged by the head config (weights are used unchanged): LeRobot's flow time is openpi's (t = 1 noise,
network output ε − a) → ``time_convention="openpi"``; the state is a token of the expert's suffix (π0) →
``state_token="expert"``; all 32 dims are integrated from noise → ``invalid_dims="noise"``; π0.5's adaRMS time
conditioning → ``time_conditioning="adarms"`` and its discretized state in the prompt → ``state_token="none"`` +
``PolicyConfig.state_in_prompt``.

Not bridged (an error names them): relative actions (``use_relative_actions``), ``n_obs_steps`` > 1,
``QUANTILE10`` normalization, different ``max_state_dim`` and ``max_action_dim``. Known differences that remain:
LeRobot resizes images of another size without antialiasing (ours antialiases; feed images at ``image_resolution``
for identical numbers), and degenerate normalization dims (std ≈ 0) are handled by our normalizer's rules
(:mod:`chunkpolicy.normalize`) rather than LeRobot's ``std + 1e-8``.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from chunkpolicy.atomic import read_json
from chunkpolicy.models.backbone_config import PRESETS, BackboneConfig
from chunkpolicy.models.importers.report import ImportReport

PALI = "model.paligemma_with_expert.paligemma."
EXPERT = "model.paligemma_with_expert.gemma_expert."
MODES = {"MEAN_STD": "mean_std", "MIN_MAX": "min_max", "QUANTILES": "quantile", "IDENTITY": "identity"}
# LeRobot's get_gemma_config variants (openpi's gemma.py): width, depth, mlp
VARIANTS = {"gemma_2b": (2048, 18, 16384), "gemma_300m": (1024, 18, 4096)}
LM_HEADS = 8  # LeRobot's joint attention reshapes to 8 heads (compute_layer_complete); both Gemma variants have 8
VISION_HEADS = 16  # LeRobot builds SigLIP from PaliGemmaConfig's default vision config (So400m: 16 heads)
STAT_KEYS = ("mean", "std", "min", "max", "q01", "q99")


def _read_json(path: Path) -> dict[str, Any]:
    doc = read_json(path)  # missing / corrupt: one error naming the file
    if not isinstance(doc, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return doc


def _processor_step(src: Path, pipeline: str, registry_name: str) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None] | None:
    """``(config, state)`` of the step named ``registry_name`` in ``{pipeline}.json`` (state from its state file)."""
    from safetensors.torch import load_file

    path = src / f"{pipeline}.json"
    doc = _read_json(path)
    steps = doc.get("steps")
    if not isinstance(steps, list):
        raise ValueError(f"{path}: no 'steps' list")
    for step in steps:
        if isinstance(step, dict) and step.get("registry_name") == registry_name:
            state = None
            if step.get("state_file"):
                f = src / step["state_file"]
                if not f.is_file():
                    raise FileNotFoundError(f"{f}: state file of step {registry_name!r} in {path} is missing")
                state = load_file(str(f))
            return dict(step.get("config") or {}), state
    return None


def _stats(state: Mapping[str, torch.Tensor], feature: str, where: str) -> dict[str, np.ndarray]:
    out = {}
    for name in STAT_KEYS:
        k = f"{feature}.{name}"
        if k in state:
            out[name] = state[k].detach().double().numpy().reshape(-1)
    if not out:
        raise KeyError(f"{where}: no normalization stats for {feature!r} (keys: {sorted(state)[:8]})")
    return out


def _count_layers(keys: Sequence[str], prefix: str) -> int:
    idx = {int(m.group(1)) for k in keys if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if not idx or idx != set(range(max(idx) + 1)):
        raise ValueError(f"model.safetensors: layers under {prefix!r} are missing or not numbered 0..n-1 ({sorted(idx)[:5]})")
    return len(idx)


def _sizes(shape: Mapping[str, tuple[int, ...]], keys: Sequence[str], report: ImportReport, cfg: Mapping[str, Any]):
    """Backbone config and expert (width, mlp, depth) read from tensor shapes."""

    def sh(k: str) -> tuple[int, ...]:
        if k not in shape:
            raise KeyError(f"model.safetensors: missing tensor {k!r}")
        return shape[k]

    v = PALI + "model.vision_tower.vision_model."
    pw = sh(v + "embeddings.patch_embedding.weight")
    n_pos = sh(v + "embeddings.position_embedding.weight")[0]
    side = int(round(n_pos ** 0.5))
    if side * side != n_pos:
        raise ValueError(f"model.safetensors: {n_pos} vision position embeddings is not a square grid")
    lm = PALI + "model.language_model."
    vocab, width = sh(lm + "embed_tokens.weight")
    q = sh(lm + "layers.0.self_attn.q_proj.weight")[0]
    if q % LM_HEADS:
        raise ValueError(f"model.safetensors: language model q_proj has {q} rows, not a multiple of {LM_HEADS} heads")
    head_dim = q // LM_HEADS
    bb = BackboneConfig(
        image_size=side * pw[2], patch_size=pw[2], vision_width=pw[0],
        vision_depth=_count_layers(keys, v + "encoder.layers."), vision_heads=VISION_HEADS,
        vision_mlp=sh(v + "encoder.layers.0.mlp.fc1.weight")[0], width=width,
        depth=_count_layers(keys, lm + "layers."), mlp=sh(lm + "layers.0.mlp.gate_proj.weight")[0],
        heads=LM_HEADS, kv_heads=sh(lm + "layers.0.self_attn.k_proj.weight")[0] // head_dim, head_dim=head_dim,
        vocab_size=vocab, rope_theta=10000.0,
    )
    report.assumed.append(f"vision_heads = {VISION_HEADS} (LeRobot builds SigLIP from PaliGemmaConfig's default vision config)")
    report.assumed.append("rope_theta = 10000 (GemmaConfig default, which LeRobot uses)")
    ex = EXPERT + "model.layers."
    e_width = sh("model.action_in_proj.weight")[0]
    e_mlp = sh(ex + "0.mlp.gate_proj.weight")[0]
    e_depth = _count_layers(keys, ex)
    if e_depth != bb.depth:
        raise ValueError(f"model.safetensors: the expert has {e_depth} layers but the language model {bb.depth}; "
                         "the flow_expert shares attention layer by layer")
    if sh(ex + "0.self_attn.q_proj.weight")[0] != q or sh(ex + "0.self_attn.k_proj.weight")[0] != bb.kv_heads * head_dim:
        raise ValueError("model.safetensors: expert and language model attention shapes differ (heads / head_dim)")
    for field_, got in (("paligemma_variant", (width, bb.depth, bb.mlp)), ("action_expert_variant", (e_width, e_depth, e_mlp))):
        name = cfg.get(field_)
        want = VARIANTS.get(name)
        if want is not None and want != got:
            report.notes.append(f"config.json {field_}={name!r} implies (width, depth, mlp) = {want}, the weights "
                                f"have {got}: the weights' sizes are used")
    return bb, (e_width, e_mlp)


def _embodiment(cfg: Mapping[str, Any], src: Path, name: str, control_hz: float | None,
                action_names: Sequence[str] | None, state_names: Sequence[str] | None, report: ImportReport):
    from chunkpolicy.spaces import EmbodimentSpec

    cj = src / "config.json"
    inputs, outputs = cfg.get("input_features") or {}, cfg.get("output_features") or {}
    cams = [k for k, f in inputs.items() if isinstance(f, dict) and f.get("type") == "VISUAL"]
    bad = [k for k in cams if not k.startswith("observation.images.")]
    if bad:
        raise ValueError(f"{cj}: input_features {bad} are images outside observation.images.*")
    if "action" not in outputs:
        raise KeyError(f"{cj}: output_features has no 'action'")
    a_dim = int(np.prod(outputs["action"]["shape"]))
    st = inputs.get("observation.state")
    s_dim = int(np.prod(st["shape"])) if isinstance(st, dict) else 0
    names = action_names or cfg.get("action_feature_names")
    if names is None:
        names = [f"action_{i}" for i in range(a_dim)]
        report.assumed.append(f"action dim names action_0..{a_dim - 1} (config.json has no action_feature_names)")
    if len(names) != a_dim:
        raise ValueError(f"action names: {len(names)} given, but {cj} output_features.action has {a_dim} dims")
    snames = state_names or [f"state_{i}" for i in range(s_dim)]
    if state_names is None and s_dim:
        report.assumed.append(f"state dim names state_0..{s_dim - 1}")
    if len(snames) != s_dim:
        raise ValueError(f"state names: {len(snames)} given, but {cj} input_features.observation.state has {s_dim} dims")
    if control_hz is None:
        control_hz = 10.0
        report.assumed.append("control_hz = 10 (a LeRobot policy does not record its dataset's fps; pass control_hz)")
    spec = EmbodimentSpec(name=name, action_names=tuple(names), state_names=tuple(snames),
                          cameras=tuple(k[len("observation.images."):] for k in cams), control_hz=float(control_hz))
    report.settings.append(("embodiment", f"{name!r}: {a_dim} action dims, {s_dim} state dims, cameras {list(spec.cameras)} "
                                          f"(LeRobot's order), {control_hz} Hz"))
    return spec


def _weight_map(keys: Sequence[str], variant: str, state_token: bool) -> tuple[dict[str, str], list[tuple[str, str]]]:
    """``{source key: our key}`` and ``[(source key, why it is left out)]``."""
    top = {"model.action_in_proj.": "head.action_in.", "model.action_out_proj.": "head.action_out.",
           "model.state_proj.": "head.state_proj." if state_token else None}
    if variant == "pi0":
        top.update({"model.action_time_mlp_in.": "head.time_in.", "model.action_time_mlp_out.": "head.time_out.",
                    "model.time_mlp_in.": "head.time_in.", "model.time_mlp_out.": "head.time_out."})
    else:
        top.update({"model.time_mlp_in.": "head.time_in.", "model.time_mlp_out.": "head.time_out.",
                    "model.action_time_mlp_in.": "head.time_in.", "model.action_time_mlp_out.": "head.time_out."})
    mapping, left = {}, []
    for k in keys:
        if k.startswith(PALI + "model."):
            mapping[k] = "backbone.model." + k[len(PALI + "model."):]
        elif k.startswith(EXPERT + "model.layers.") or k.startswith(EXPERT + "model.norm."):
            mapping[k] = "head." + k[len(EXPERT + "model."):]
        elif k in (PALI + "lm_head.weight", EXPERT + "lm_head.weight"):
            left.append((k, "language-model output head; π0's flow expert never computes token logits "
                            "(our backbone's LM head is tied to embed_tokens)"))
        elif k.startswith(EXPERT + "model.embed_tokens."):
            left.append((k, "the expert has no token embedding in π0 (LeRobot sets it to None)"))
        else:
            for p, d in top.items():
                if k.startswith(p):
                    if d is None:
                        left.append((k, "π0.5 has no continuous state token (LeRobot skips it too)"))
                    else:
                        mapping[k] = d + k[len(p):]
                    break
            else:
                raise ValueError(f"model.safetensors: tensor {k!r} is not part of LeRobot's {variant} layout; "
                                 "refusing to guess where it goes")
    return mapping, left


def _read_weights(wf: Path) -> dict[str, Any]:
    """Keys (with LeRobot's ``model.`` prefix, added where missing as LeRobot does on load: openpi-converted files
    lack it), shapes and dtypes of ``wf``, without reading the tensors."""
    from safetensors import safe_open

    if not wf.is_file():
        raise FileNotFoundError(f"{wf}: missing")
    with safe_open(str(wf), framework="pt") as f:
        raw_keys = list(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in raw_keys}
        dtypes = sorted({str(f.get_slice(k).get_dtype()) for k in raw_keys})
    keys = [k if k.startswith("model.") else "model." + k for k in raw_keys]
    src_of = dict(zip(keys, raw_keys))
    return {"file": wf, "keys": keys, "src_of": src_of, "shapes": {k: shapes[src_of[k]] for k in keys}, "dtypes": dtypes}


def build_pi_policy(w: Mapping[str, Any], variant: str, bb: BackboneConfig, e_width: int, e_mlp: int, *, D: int,
                    horizon: int, num_steps: int, min_period: float, max_period: float, max_prompt: int,
                    modes: Mapping[str, str], spec: Any, emb_stats: Mapping[str, Any], tokenizer: Any,
                    report: ImportReport):
    """The chunkpolicy π0 / π0.5 policy for weights ``w`` (:func:`_read_weights`), with the tensors copied in one by
    one (peak memory: our model + one source tensor). Shared by the LeRobot and openpi layouts."""
    from safetensors import safe_open

    from chunkpolicy.models.heads.configs import FlowExpertConfig
    from chunkpolicy.models.policy import ChunkPolicy, PolicyConfig
    from chunkpolicy.spaces import UnifiedSpace

    keys, shapes, src_of, wf = w["keys"], w["shapes"], w["src_of"], w["file"]
    if shapes["model.action_in_proj.weight"][1] != D:
        raise ValueError(f"{wf}: action_in_proj takes {shapes['model.action_in_proj.weight'][1]} dims, expected {D}")
    preset = PRESETS["paligemma-3b"]
    overrides = {k: v for k, v in vars(bb).items() if getattr(preset, k) != v}
    head = FlowExpertConfig(
        width=e_width, mlp=e_mlp, num_steps=num_steps, min_period=min_period, max_period=max_period,
        state_token="expert" if variant == "pi0" else "none", time_convention="openpi", invalid_dims="noise",
        time_conditioning="concat" if variant == "pi0" else "adarms",
    )
    pcfg = PolicyConfig(backbone="paligemma-3b", backbone_overrides=overrides, head=head, horizon=horizon,
                        n_obs_steps=1, max_prompt_tokens=max_prompt, action_norm=modes["action"], state_norm=modes["state"],
                        state_in_prompt=variant == "pi05")
    report.settings.append(("policy", f"horizon {horizon}, max_prompt_tokens {max_prompt}, backbone paligemma-3b + "
                                      f"{overrides or 'no overrides'}"))
    report.settings.append(("head", f"flow_expert width {e_width}, mlp {e_mlp}, state_token {head.state_token!r}, "
                                    f"time_convention 'openpi', invalid_dims 'noise', time_conditioning "
                                    f"{head.time_conditioning!r}, num_steps {num_steps}"))
    report.settings.append(("source dtypes", f"{w['dtypes']} (loaded into fp32)"))
    policy = ChunkPolicy(pcfg, UnifiedSpace(D, "pad", embodiments=[spec]), {spec.name: dict(emb_stats)}, tokenizer=tokenizer)
    mapping, left = _weight_map(keys, variant, state_token=variant == "pi0")
    report.left_out.extend(left)
    own = policy.state_dict()
    missing = sorted(set(own) - set(mapping.values()))
    if missing:
        raise ValueError(f"{wf}: no source tensor for {missing[:6]}{' ...' if len(missing) > 6 else ''}")
    wrong = [(s, shapes[s], tuple(own[d].shape)) for s, d in mapping.items() if shapes[s] != tuple(own[d].shape)]
    if wrong:
        raise ValueError(f"{wf}: shape mismatch (source, ours): {wrong[:4]}")
    with safe_open(str(wf), framework="pt") as f, torch.no_grad():
        for s, d in mapping.items():
            own[d].copy_(f.get_tensor(src_of[s]).to(own[d].dtype))
            report.mapped.append((s, d))
    return policy.eval()


def import_lerobot_pi(src: str | os.PathLike, out: str | os.PathLike | None, *, variant: str = "pi0",
                      tokenizer: Any = None, embodiment: str = "lerobot", control_hz: float | None = None,
                      action_names: Sequence[str] | None = None, state_names: Sequence[str] | None = None,
                      return_policy: bool = False):
    """Convert a LeRobot ``PI0Policy`` (``variant="pi0"``) / ``PI05Policy`` (``"pi05"``) directory into a chunkpolicy
    checkpoint at ``out`` (None: build only). See the module docstring for what maps where.

    ``tokenizer``: the prompt tokenizer — a local directory or a tokenizer object (LeRobot's π0 uses PaliGemma's;
    nothing is downloaded, so it must be given). ``embodiment`` / ``control_hz`` / ``action_names`` / ``state_names``:
    what a LeRobot policy does not record (assumed values are listed in the report). Returns the
    :class:`ImportReport` (and the policy with ``return_policy``)."""
    from chunkpolicy.models.tokenizer import load_tokenizer

    if variant not in ("pi0", "pi05"):
        raise ValueError(f"variant must be 'pi0' or 'pi05', got {variant!r}")
    src = Path(src)
    report = ImportReport(src=src, out=Path(out) if out is not None else None, fmt=f"lerobot-{variant}")
    cj = src / "config.json"
    cfg = _read_json(cj)
    if cfg.get("type") != variant:
        raise ValueError(f"{cj}: type is {cfg.get('type')!r}, but --format lerobot-{variant} expects {variant!r}")
    if cfg.get("use_relative_actions"):
        raise ValueError(f"{cj}: use_relative_actions=true is not supported by the importer (LeRobot's relative "
                         "actions exclude joints by name; convert with absolute actions)")
    if int(cfg.get("n_obs_steps", 1)) != 1:
        raise ValueError(f"{cj}: n_obs_steps={cfg.get('n_obs_steps')} (π0 sees one observation step)")
    D = int(cfg.get("max_action_dim", 32))
    if int(cfg.get("max_state_dim", 32)) != D:
        raise ValueError(f"{cj}: max_state_dim {cfg.get('max_state_dim')} != max_action_dim {D}; chunkpolicy has one "
                         "unified dim for state and actions")
    res = cfg.get("image_resolution", [224, 224])
    if res[0] != res[1]:
        raise ValueError(f"{cj}: image_resolution {res} is not square")

    wf = src / "model.safetensors"
    w = _read_weights(wf)
    keys, shapes = w["keys"], w["shapes"]
    bb, (e_width, e_mlp) = _sizes(shapes, keys, report, cfg)
    if bb.image_size != res[0]:
        raise ValueError(f"{cj}: image_resolution {res} but the vision tower's position embeddings give {bb.image_size}")

    # -- normalization ------------------------------------------------------------------------------------------
    pre = _processor_step(src, "policy_preprocessor", "normalizer_processor")
    post = _processor_step(src, "policy_postprocessor", "unnormalizer_processor")
    if pre is None or post is None:
        raise FileNotFoundError(f"{src}: needs policy_preprocessor.json with a normalizer_processor step and "
                                "policy_postprocessor.json with an unnormalizer_processor step (the normalization stats)")
    norm_map = {**(cfg.get("normalization_mapping") or {}), **(pre[0].get("norm_map") or {})}
    modes = {}
    for kind, ftype in (("state", "STATE"), ("action", "ACTION")):
        m = norm_map.get(ftype, "IDENTITY")
        if m not in MODES:
            raise ValueError(f"{src / 'policy_preprocessor.json'}: {ftype} normalization {m!r} has no chunkpolicy "
                             f"equivalent (supported: {sorted(MODES)})")
        modes[kind] = MODES[m]
        report.settings.append((f"{kind}_norm", f"{modes[kind]} (LeRobot {m})"))
    spec = _embodiment(cfg, src, embodiment, control_hz, action_names, state_names, report)
    if spec.state_dim > D or spec.action_dim > D:
        raise ValueError(f"{cj}: state/action dims ({spec.state_dim}, {spec.action_dim}) exceed max dim {D}")
    emb_stats: dict[str, Any] = {}
    if modes["action"] != "identity":
        emb_stats["action"] = _stats(post[1] or {}, "action", str(src / "policy_postprocessor.json"))
    if modes["state"] != "identity" and spec.state_dim:
        emb_stats["state"] = _stats(pre[1] or {}, "observation.state", str(src / "policy_preprocessor.json"))
    for kind in ("action", "state"):
        if kind not in emb_stats:  # identity: the normalizer still needs an entry for the embodiment
            n = spec.action_dim if kind == "action" else spec.state_dim
            emb_stats[kind] = {"mean": np.zeros(n), "std": np.ones(n)}
    report.settings.append(("normalization stats", "state from policy_preprocessor (normalizer_processor), action from "
                                                    "policy_postprocessor (unnormalizer_processor)"))
    tok_step = _processor_step(src, "policy_preprocessor", "tokenizer_processor")
    max_prompt = int((tok_step[0] if tok_step else {}).get("max_length", cfg.get("tokenizer_max_length", 48)))
    tok_name = (tok_step[0] if tok_step else {}).get("tokenizer_name", "google/paligemma-3b-pt-224")
    if variant == "pi05":
        if _processor_step(src, "policy_preprocessor", "pi05_prepare_state_tokenizer_processor_step") is None:
            raise ValueError(f"{src / 'policy_preprocessor.json'}: no pi05_prepare_state_tokenizer_processor_step; π0.5 "
                             "reads its discretized state from the prompt")
        report.settings.append(("state_in_prompt", "true (pi05_prepare_state_tokenizer_processor_step: 256 bins of the "
                                                   "normalized state in 'Task: ..., State: ...;\\nAction: ')"))
    rename = _processor_step(src, "policy_preprocessor", "rename_observations_processor")
    if rename and rename[0].get("rename_map"):
        report.settings.append(("observation rename map (apply it to your data keys)", json.dumps(rename[0]["rename_map"])))

    # -- tokenizer ----------------------------------------------------------------------------------------------
    if tokenizer is None:
        raise ValueError(f"tokenizer: LeRobot {variant} prompts are tokenized with {tok_name!r}; give a local copy of "
                         "it (--tokenizer DIR; nothing is downloaded)")
    if isinstance(tokenizer, (str, os.PathLike)):
        report.settings.append(("tokenizer", str(tokenizer)))
        tokenizer = load_tokenizer(tokenizer)
    if len(tokenizer) > bb.vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} ids, the checkpoint's vocabulary {bb.vocab_size}")

    policy = build_pi_policy(
        w, variant, bb, e_width, e_mlp, D=D, horizon=int(cfg["chunk_size"]), num_steps=int(cfg.get("num_inference_steps", 10)),
        min_period=float(cfg.get("min_period", 4e-3)), max_period=float(cfg.get("max_period", 4.0)), max_prompt=max_prompt,
        modes=modes, spec=spec, emb_stats=emb_stats, tokenizer=tokenizer, report=report)
    if out is not None:
        policy.save_pretrained(out)
    return (report, policy) if return_policy else report
