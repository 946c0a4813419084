"""``ChunkPolicy`` = unified space + normalizer + backbone + action head + prompt tokenizer.

Training: ``compute_loss(batch)`` takes the batch schema in robot units (as the data pipeline yields it), normalizes
state and actions with the per-embodiment normalizer, encodes the prefix once and asks the head for its loss.
Inference: ``predict_chunk(observation)`` returns ``[B, H, robot action dims]`` in robot units. Normalization happens
here and only here, for both.

The one inference path, in public steps that executors, guidance and CUDA graphs plug into::

    inputs = policy.prepare_inputs(obs, policy.validate(obs, training=False))   # host work: checks, prompt tokens
    prefix = policy.encode(inputs)                                             # prefix encoded once per chunk
    x = policy.sample(inputs, prefix, noise, guidance=...)                     # normalized unified [B, H, D]
    actions = policy.postprocess(x, inputs)                                    # robot units (delta → absolute)

:meth:`infer` is the three device steps in a row. A guidance hook (e.g. real-time chunking) steers the head's sampler
from inside (heads with ``caps.velocity``); it never re-implements inference. :meth:`preprocess_actions` is the
inverse of :meth:`postprocess`, for actions given in robot units (e.g. a guidance target).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from chunkpolicy.atomic import atomic_dir, read_json
from chunkpolicy.delta_actions import DeltaActions
from chunkpolicy.models.backbone import Backbone
from chunkpolicy.models.backbone_config import backbone_config
from chunkpolicy.models.heads.base import Guidance, build_head, head_class
from chunkpolicy.models.heads.configs import FlowExpertConfig, HeadConfig, as_head_config, head_config
from chunkpolicy.models.tokenizer import build_char_tokenizer, load_tokenizer, tokenize_prompts
from chunkpolicy.normalize import Normalizer
from chunkpolicy.spaces import UnifiedSpace

FORMAT_VERSION = 1
FILES = ("config.json", "model.safetensors", "normalizer.json", "space.json")


@dataclass
class PolicyConfig:
    """Everything needed to rebuild a policy (saved as ``config.json``).

    ``head`` is the head's typed config (:mod:`chunkpolicy.models.heads.configs`), selected by its ``type`` tag. For
    convenience a head name (``head="dit"``) or a mapping (``head={"type": "dit", "depth": 2}``, what ``asdict``
    writes) is converted on construction, so every spelling is checked by the same dataclass.
    """

    backbone: str = "tiny"
    backbone_overrides: dict[str, Any] = field(default_factory=dict)
    head: HeadConfig = field(default_factory=FlowExpertConfig)
    horizon: int = 50
    n_obs_steps: int = 1
    max_prompt_tokens: int = 72
    tokenizer_dir: str | None = None  # None: the built-in character tokenizer
    action_norm: str = "quantile"
    state_norm: str = "mean_std"
    modality_dropout: float = 0.0  # per-sample probability of dropping each camera / the prompt while training
    delta_actions: bool = False
    # π0.5: the normalized state, discretized into 256 bins, is written into the prompt (see ChunkPolicy.state_prompts)
    state_in_prompt: bool = False

    def __post_init__(self) -> None:
        self.head = as_head_config(self.head)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PolicyConfig":
        """Inverse of ``asdict``; also reads the legacy ``{"head": NAME, "head_options": {...}}`` of older checkpoints."""
        d = dict(d)
        if "head_options" in d:
            if not isinstance(d.get("head"), str):
                raise ValueError(f"policy config: legacy head_options needs a head name in 'head', got {d.get('head')!r}")
            d["head"] = head_config(d["head"], d.pop("head_options") or {})
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"policy config: unknown fields {unknown}")
        return cls(**d)


def _to(t: torch.Tensor, device: torch.device, pin: bool = False) -> torch.Tensor:
    """``t`` on ``device``; a host→GPU copy is queued without waiting for the GPU (``pin``: from page-locked memory,
    so that the copy cannot wait either), leaving the host free to prepare the next batch while the GPU works."""
    if t.device == device or device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    if pin and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


class ChunkPolicy(nn.Module, PyTorchModelHubMixin, library_name="chunkpolicy", tags=["robotics", "action-chunking"]):
    """See the module docstring. ``stats``: ``{embodiment: {"action": {...}, "state": {...}}}`` in robot dims."""

    def __init__(self, config: PolicyConfig, space: UnifiedSpace, stats: Mapping[str, Any], tokenizer: Any = None) -> None:
        super().__init__()
        self.config, self.space = config, space
        self.normalizer = Normalizer(space, stats, {"action": config.action_norm, "state": config.state_norm})
        caps = head_class(config.head.type).capabilities(config.head)  # decides whether the prefix has a state token
        self.backbone = Backbone(backbone_config(config.backbone, **config.backbone_overrides), state_dim=space.dim,
                                 state_token=caps.prefix_state_token)
        self.head = build_head(config.head.type, config.head, self.backbone, config.horizon, space.dim)
        _check(config.action_norm in self.head.caps.action_norms,
               f"action_norm: the {config.head.type} head cannot represent {config.action_norm!r} actions "
               f"(it accepts {list(self.head.caps.action_norms)})")
        if tokenizer is None:
            tokenizer = load_tokenizer(config.tokenizer_dir) if config.tokenizer_dir else build_char_tokenizer()
        _check(len(tokenizer) <= self.backbone.vocab_size,
               f"tokenizer has {len(tokenizer)} ids but the backbone vocabulary has {self.backbone.vocab_size}")
        reserved = self.head.reserved_token_base
        if reserved is not None and self.head.reserved_token_pattern is not None:
            _check_overwritable(tokenizer, range(reserved, self.head.reserved_token_end), self.head.reserved_token_pattern,
                                config.head.type)
        else:
            _check(reserved is None or len(tokenizer) <= reserved,
                   f"tokenizer ids (< {len(tokenizer)}) overlap the {config.head.type} head's reserved ids (>= {reserved})")
        self.tokenizer = tokenizer
        self._token_cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._host_masks: dict[str, torch.Tensor] = {}  # CPU copies: checking a host batch needs no device round trip
        for kind in ("action", "state"):  # a space may start empty (an imported PaliGemma: post-training adds robots)
            table = space.mask_table(kind) if space.embodiments else torch.zeros(0, space.dim, dtype=torch.bool)
            self.register_buffer(f"_{kind}_masks", table, persistent=False)
            self._host_masks[kind] = table.clone()
        self.deltas = DeltaActions.for_space(space)  # used only when config.delta_actions

    @property
    def trained_image_size(self) -> tuple[int, int]:
        """``(h, w)`` of the training frames: ``trained_on.image_size`` from the checkpoint, else the backbone's square
        image size (what training resizes to unless ``data.image_size`` was set)."""
        hw = (getattr(self, "trained_on", None) or {}).get("image_size")
        if hw is not None:
            return int(hw[0]), int(hw[1])
        s = int(self.backbone.config.image_size)
        return s, s

    @property
    def device(self) -> torch.device:
        return self.backbone.state_proj.weight.device

    def _apply(self, fn: Any, recurse: bool = True) -> "ChunkPolicy":
        """``nn.Module._apply`` (behind ``.to()``, ``.bfloat16()``, ``.half()``, ``.cuda()``) with one precision rule:
        a cast to bf16 / fp16 leaves the normalization stats and the head's ``fp32_modules()`` with their fp32 values,
        as LeRobot's and openpi's bf16 π0 / π0.5 do (their pre/post-processing is never cast, nor are the action
        projections). Device moves apply to everything."""
        keep = []
        for mod in (self.normalizer, *self.head.fp32_modules()):
            for m in mod.modules():
                for store in (m._parameters, m._buffers):
                    keep += [(store, k, t.data) for k, t in store.items() if t is not None and t.dtype == torch.float32]
        super()._apply(fn, recurse)
        for store, k, old in keep:
            t = store[k]
            if t.dtype not in (torch.bfloat16, torch.float16):
                continue
            if isinstance(t, nn.Parameter):
                t.data = old.to(t.device)
                if t.grad is not None:
                    t.grad = t.grad.float()
            else:
                store[k] = old.to(t.device)
        return self

    # -- input checks ---------------------------------------------------------------------------------------------
    def validate(self, batch: Mapping[str, Any], training: bool) -> list[int]:
        """Shapes, dtypes, finiteness, ids and masks of a batch; raises one ValueError naming the field. Returns the
        embodiment ids as host ints: pass them to :meth:`prepare_inputs` / :meth:`prepare_train_inputs` to say the
        batch was checked. The checks run where the batch is: a batch still on the host (the trainer checks the
        loader's batch before copying it) costs no device round trip, so the GPU never waits for them."""
        need = ["images", "image_mask", "state", "prompt", "embodiment"] + (["actions", "action_is_pad"] if training else [])
        missing = [k for k in need if k not in batch]
        _check(not missing, f"batch: missing keys {missing}")
        D, H = self.space.dim, self.config.horizon
        im = batch["images"]
        _check(im.ndim == 6 and im.shape[3] == 3, f"images: expected [B, N, T_obs, 3, h, w], got {tuple(im.shape)}")
        B, N = im.shape[:2]
        _check(tuple(batch["image_mask"].shape) == (B, N), f"image_mask: expected [{B}, {N}], got {tuple(batch['image_mask'].shape)}")
        st = batch["state"]
        _check(st.ndim == 3 and st.shape[0] == B and st.shape[2] == D, f"state: expected [{B}, T_obs, {D}], got {tuple(st.shape)}")
        emb = torch.as_tensor(batch["embodiment"])
        _check(tuple(emb.shape) == (B,), f"embodiment: expected [{B}] ids, got {tuple(emb.shape)}")
        # one host sync for every value check (each separate .item()/bool() would cost a GPU round trip per call)
        finite = torch.stack([torch.isfinite(st).all(), torch.isfinite(im).all()]).to(emb.device, torch.long)
        host = torch.cat([finite, emb.long()]).cpu().tolist()
        _check(bool(host[0]), "state: contains NaN or inf")
        _check(bool(host[1]), "images: contains NaN or inf")
        E = len(self.space.embodiments)
        _check(all(0 <= e < E for e in host[2:]), f"embodiment: ids {host[2:]} outside the {E} registered embodiments")
        _check(len(batch["prompt"]) == B, f"prompt: expected {B} strings, got {len(batch['prompt'])}")
        ids = host[2:]
        for kind in ("state", "action"):
            self._check_mask(batch, kind, ids)
        if training:
            a = batch["actions"]
            _check(tuple(a.shape) == (B, H, D), f"actions: expected [{B}, {H}, {D}], got {tuple(a.shape)}")
            _check(tuple(batch["action_is_pad"].shape) == (B, H), f"action_is_pad: expected [{B}, {H}], got {tuple(batch['action_is_pad'].shape)}")
            table = self._mask_rows("action", ids, a.device)
            valid = table[:, None, :] & ~torch.as_tensor(batch["action_is_pad"]).to(a.device).bool()[:, :, None]
            _check(bool(torch.isfinite(torch.where(valid, a, torch.zeros_like(a))).all()), "actions: contains NaN or inf in valid entries")
        return ids

    def _mask_rows(self, kind: str, ids: Sequence[int], device: torch.device) -> torch.Tensor:
        """``[B, D]`` masks of the embodiments ``ids`` (host ints), built on ``device`` (the host table for a CPU batch)."""
        table = self._host_masks[kind] if device.type == "cpu" else getattr(self, f"_{kind}_masks").to(device)
        return table[torch.as_tensor(list(ids), dtype=torch.long, device=table.device)]

    def _check_mask(self, batch: Mapping[str, Any], kind: str, ids: Sequence[int]) -> None:
        """A batch's ``{kind}_mask``, when given, must be the space's masks of its embodiments."""
        key = f"{kind}_mask"
        if key not in batch:
            return
        m = torch.as_tensor(batch[key])
        table = self._mask_rows(kind, ids, m.device)
        _check(tuple(m.shape) == tuple(table.shape), f"{key}: expected {tuple(table.shape)}, got {tuple(m.shape)}")
        _check(bool((m.bool() == table).all()), f"{key}: does not match the unified space's mask for the embodiment")

    def _masks(self, batch: Mapping[str, Any], kind: str, emb: torch.Tensor, ids: Sequence[int],
               checked: bool = False) -> torch.Tensor:
        """The space's ``[B, D]`` masks for ``emb`` (device ids; ``ids``: the same on the host); a batch's own
        ``{kind}_mask`` must equal them, checked here unless :meth:`validate` already did (``checked``)."""
        if not checked:
            self._check_mask(batch, kind, ids)
        return (self._action_masks if kind == "action" else self._state_masks).to(emb.device)[emb]

    # -- shared forward -------------------------------------------------------------------------------------------
    def prepare_inputs(self, batch: Mapping[str, Any], host_ids: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """Tensors for :meth:`infer` on the policy's device: tokenized prompt, masks, embodiment ids (checked on the
        host; ``host_ids``: :meth:`validate`'s return value for this batch, which spares a device→host copy)."""
        dev = self.device
        checked = host_ids is not None
        emb_in = torch.as_tensor(batch["embodiment"])
        ids = emb_in.long().tolist() if host_ids is None else list(host_ids)
        for key in ("state", "action"):
            self.normalizer.check_ids(key, ids)
        emb = _to(emb_in, dev).long()
        state = _to(batch["state"], dev).float()
        prompts = list(batch["prompt"])
        if self.config.state_in_prompt:
            prompts = self.state_prompts(prompts, state, emb, ids)
        tok, am = self._tokenize(prompts, raw=self.config.state_in_prompt)
        return {
            "images": _to(batch["images"], dev), "image_mask": _to(torch.as_tensor(batch["image_mask"]), dev).bool(),
            "input_ids": tok, "attention_mask": am, "state": state,
            "state_mask": self._masks(batch, "state", emb, ids, checked),
            "action_mask": self._masks(batch, "action", emb, ids, checked),
            "embodiment": emb,
        }

    def state_prompts(self, tasks: Sequence[str], state: torch.Tensor, embodiment: torch.Tensor,
                      host_ids: Sequence[int]) -> list[str]:
        """π0.5 prompts (``config.state_in_prompt``): the normalized state of the last observation step, in each
        robot's own dims and order, discretized into 256 bins over [-1, 1] (bin ``digitize(x, linspace(-1, 1, 257)[:-1])
        - 1``: values below -1 give -1, above 1 give 255, as openpi / LeRobot compute it) and written as
        ``"Task: {task}, State: {b_0 b_1 ...};\nAction: "`` (task stripped, ``_`` and newlines → spaces).
        ``state [B, T_obs, D]`` robot units; one device→host copy of the normalized state."""
        import numpy as np

        if isinstance(tasks, str) or not all(isinstance(t, str) for t in tasks):
            raise ValueError(f"prompt: expected a list of strings, got {type(tasks).__name__}")
        norm = self.normalizer.normalize("state", state[:, -1], embodiment, check=False).cpu().numpy()
        edges = np.linspace(-1.0, 1.0, 256 + 1)[:-1]
        out = []
        for task, row, e in zip(tasks, norm, host_ids):
            bins = np.digitize(self.space.unpad(row, int(e), "state"), bins=edges) - 1
            text = task.strip().replace("_", " ").replace("\n", " ")
            out.append(f"Task: {text}, State: {' '.join(map(str, bins))};\nAction: ")
        return out

    def _tokenize(self, prompts: list[str], raw: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`tokenize_prompts` on the policy's device, memoised per prompt list: a control loop repeats one
        instruction, and tokenizing it anew (plus two host→device copies) costs ~0.1–0.3 ms per chunk. ``raw``: the
        prompts are complete (π0.5's state prompts), tokenized as given."""
        ok = all(isinstance(p, str) for p in prompts)
        key = (id(self.tokenizer), str(self.device), raw, *prompts) if ok else None  # tokenizer or device swapped: a miss
        hit = self._token_cache.get(key) if key is not None else None
        if hit is None:
            ids, am = tokenize_prompts(self.tokenizer, prompts, self.config.max_prompt_tokens, raw=raw)
            hit = _to(ids, self.device, pin=True), _to(am, self.device, pin=True)
            if key is not None:
                if len(self._token_cache) >= 256:  # bounded: training batches rarely repeat
                    self._token_cache.pop(next(iter(self._token_cache)))
                self._token_cache[key] = hit
        return hit

    def _encode(self, inp: Mapping[str, torch.Tensor], image_mask: torch.Tensor, attention_mask: torch.Tensor,
                layers: Any = None, hidden: bool = True, vision_layers: Any = None):
        state = self.normalizer.normalize("state", inp["state"], inp["embodiment"], check=False)
        prefix = self.backbone.embed_prefix(inp["images"], image_mask, inp["input_ids"], attention_mask, state, inp["state_mask"],
                                            vision_layers=vision_layers)
        return self.backbone.encode_prefix(prefix, layers=layers, hidden=hidden), prefix

    def _prefix(self, batch: Mapping[str, Any], generator: torch.Generator | None = None, hidden: bool = True):
        inp = self.prepare_inputs(batch)
        image_mask, am = inp["image_mask"], inp["attention_mask"]
        if self.training and self.config.modality_dropout > 0:
            image_mask, am = self._modality_dropout(image_mask, am, generator)
        pout, prefix = self._encode(inp, image_mask, am, hidden=hidden)
        return inp["embodiment"], pout, prefix

    def _modality_dropout(self, image_mask: torch.Tensor, am: torch.Tensor, generator: torch.Generator | None):
        """RDT-style: drop each present camera and the prompt independently with probability p, never all of them."""
        p = self.config.modality_dropout
        B, N = image_mask.shape
        drop = torch.rand(B, N + 1, generator=generator, device=image_mask.device) < p
        present = torch.cat([image_mask, am.any(1, keepdim=True)], 1)
        kept = present & ~drop
        # keep everything for samples that would lose every modality (torch.where, not boolean indexing: no host
        # sync, so the training step can be captured in a CUDA graph)
        kept = torch.where(kept.any(1, keepdim=True), kept, present)
        return kept[:, :N], am & kept[:, N:]

    # -- training -------------------------------------------------------------------------------------------------
    def compute_loss(self, batch: Mapping[str, Any], generator: torch.Generator | None = None,
                     host_ids: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """Loss on a batch of the schema in robot units (see CONTRIBUTING.md); returns ``{"loss", ...}``.

        = :meth:`prepare_train_inputs` (validation, tokens, normalization: host work) + :meth:`loss_from_inputs`
        (device work only). ``host_ids``: :meth:`validate`'s return value when the caller checked the batch."""
        return self.loss_from_inputs(self.prepare_train_inputs(batch, host_ids), generator)

    def prepare_train_inputs(self, batch: Mapping[str, Any], host_ids: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """Validated device tensors for :meth:`loss_from_inputs`: :meth:`prepare_inputs` plus normalized ``actions
        [B, H, D]``, ``action_mask [B, D]`` (bool) and ``action_is_pad [B, H]`` (bool). ``host_ids``:
        :meth:`validate`'s return value when the caller already checked this batch (on the host, before copying it
        to the device: then nothing here waits for the device)."""
        if host_ids is None:
            host_ids = self.validate(batch, training=True)
        inp = self.prepare_inputs(batch, host_ids)
        emb = inp["embodiment"]
        inp["actions"] = self.normalizer.normalize("action", _to(batch["actions"], self.device).float(), emb, check=False)  # ids checked above
        inp["action_is_pad"] = _to(torch.as_tensor(batch["action_is_pad"]), self.device).bool()
        return inp

    def loss_from_inputs(self, inputs: Mapping[str, torch.Tensor], generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """Loss from :meth:`prepare_train_inputs` output. No validation and no host syncs for the flow heads, so a
        whole training step can be captured in a CUDA graph (:class:`chunkpolicy.training.graphed_step.GraphedTrainStep`)."""
        image_mask, am = inputs["image_mask"], inputs["attention_mask"]
        if self.training and self.config.modality_dropout > 0:
            image_mask, am = self._modality_dropout(image_mask, am, generator)
        pout, _ = self._encode(inputs, image_mask, am, hidden=self.head.caps.reads_prefix_hidden)
        head_batch = {k: inputs[k] for k in ("actions", "action_mask", "action_is_pad")}
        if self.head.caps.embeds_state:
            head_batch["state"] = self._head_state(inputs)
        return self.head.loss(self.backbone, pout, head_batch, generator=generator)

    def _head_state(self, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Normalized state of the last observation step with invalid dims 0, ``[B, D]``, for heads that embed the
        state themselves (``caps.embeds_state``, π0's expert); the same values the backbone's state token gets."""
        st = self.normalizer.normalize("state", inputs["state"], inputs["embodiment"], check=False)[:, -1]
        return torch.where(inputs["state_mask"].bool(), st, torch.zeros_like(st))

    def compile_layers(self, **compile_kw: Any) -> None:
        """``torch.compile`` the per-layer training work of the backbone and, where it has one, of the head
        (:meth:`Backbone.compile_layers`); the first steps after this compile (tens of seconds for pi0 size)."""
        self.backbone.compile_layers(**compile_kw)
        self.head.compile_layers(**compile_kw)

    # -- inference ------------------------------------------------------------------------------------------------
    def fused_layers(self) -> dict[str, list]:
        """Inference snapshots of the Gemma-shaped layers with fused projections for :meth:`infer`
        (``{"vision": [...], "backbone": [...], "head": [...]}``; the head's only if it runs Gemma layers). They copy
        the weights: rebuild them, or ``refresh`` each, after the weights change."""
        out = {"vision": self.backbone.fused_vision_layers(), "backbone": self.backbone.fused_layers()}
        if self.head.caps.fused_layers:
            out["head"] = self.head.fused_layers()
        return out

    def encode(self, inputs: Mapping[str, torch.Tensor], fused: Mapping[str, list] | None = None):
        """The prefix (images, prompt, normalized state) encoded once per chunk, from :meth:`prepare_inputs` output:
        a :class:`~chunkpolicy.models.prefix.PrefixOutput` (per-layer keys/values, last hidden states)."""
        fused = fused or {}
        pout, _ = self._encode(inputs, inputs["image_mask"], inputs["attention_mask"], layers=fused.get("backbone"),
                               hidden=self.head.caps.reads_prefix_hidden, vision_layers=fused.get("vision"))
        return pout

    def sample(self, inputs: Mapping[str, torch.Tensor], prefix_out: Any, noise: torch.Tensor, num_steps: int | None = None,
               fused: Mapping[str, list] | None = None, guidance: Guidance | None = None) -> torch.Tensor:
        """Normalized unified chunk ``[B, H, D]`` from the head's sampler (``noise [B, H, D]``, invalid dims 0).
        ``guidance``: a hook that steers a flow sampler (``head.caps.velocity``); see
        :data:`~chunkpolicy.models.heads.base.Guidance`. A sample the head could not produce is NaN on its valid
        dims (``head.last_valid``)."""
        if guidance is not None and not self.head.caps.velocity:
            raise ValueError(f"guidance: {type(self.head).__name__} has no flow velocity to guide "
                             "(real-time chunking needs flow_expert, or dit with objective=flow)")
        kw: dict[str, Any] = {"guidance": guidance} if guidance is not None else {}
        if fused and "head" in fused:
            kw["layers"] = fused["head"]
        head_batch = {"action_mask": inputs["action_mask"]}
        if self.head.caps.embeds_state:
            head_batch["state"] = self._head_state(inputs)  # fp32: the head casts it at its state projection
        return self.head.sample(self.backbone, prefix_out, head_batch, num_steps=num_steps, noise=noise, **kw)

    def postprocess(self, actions: torch.Tensor, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Normalized unified ``actions [B, H, D]`` → robot units (unified dims; invalid dims 0): unnormalize, then
        add the chunk-start state back to delta dims when the policy predicts delta actions."""
        emb = inputs["embodiment"]
        out = self.normalizer.unnormalize("action", actions.float(), emb, check=False)
        if self.config.delta_actions:
            out = self.deltas.to_absolute(out, inputs["state"][:, -1], emb)
        return out

    def preprocess_actions(self, actions: torch.Tensor, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`postprocess`: unified robot-unit ``actions [B, H, D]`` → normalized model space (deltas
        relative to this observation's state when the policy predicts delta actions)."""
        emb = inputs["embodiment"]
        a = actions.to(self.device).float()
        if self.config.delta_actions:
            a = self.deltas.to_delta(a, inputs["state"][:, -1], emb)
        return self.normalizer.normalize("action", a, emb, check=False)

    def infer(self, inputs: Mapping[str, torch.Tensor], noise: torch.Tensor, num_steps: int | None = None,
              fused: Mapping[str, list] | None = None, guidance: Guidance | None = None) -> torch.Tensor:
        """Chunk ``[B, H, D]`` in robot units from :meth:`prepare_inputs` output and initial ``noise [B, H, D]``:
        :meth:`encode` → :meth:`sample` → :meth:`postprocess`.

        No validation and no host syncs for heads with ``caps.sync_free_sample``, so it can be captured in a CUDA graph
        (:class:`chunkpolicy.runtime.graphs.CudaGraphPolicy`), guidance included. ``fused``: :meth:`fused_layers` to
        run instead of the modules (same numbers up to float rounding, fewer kernels)."""
        pout = self.encode(inputs, fused)
        return self.postprocess(self.sample(inputs, pout, noise, num_steps, fused, guidance), inputs)

    @torch.no_grad()
    def predict_unified(self, observation: Mapping[str, Any], *, num_steps: int | None = None,
                        generator: torch.Generator | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """Chunk ``[B, H, D]`` in robot units in the unified space (invalid dims exactly 0)."""
        inputs = self.prepare_inputs(observation, self.validate(observation, training=False))
        B = inputs["embodiment"].shape[0]
        if noise is None:
            noise = torch.randn(B, self.config.horizon, self.space.dim, generator=generator, device=self.device)
        _check(tuple(noise.shape) == (B, self.config.horizon, self.space.dim),
               f"noise: expected [{B}, {self.config.horizon}, {self.space.dim}], got {tuple(noise.shape)}")
        return self.infer(inputs, noise.to(self.device, torch.float32), num_steps)  # sampling runs in fp32 (flow.euler_integrate)

    def predict_chunk(self, observation: Mapping[str, Any], embodiment: str | None = None, **kw: Any) -> torch.Tensor:
        """Chunk ``[B, H, A]`` in the robot's own action dims and units; the batch must be one embodiment."""
        emb = torch.as_tensor(observation["embodiment"]).long()
        ids = emb.unique().tolist()
        _check(len(ids) == 1, f"embodiment: predict_chunk needs one embodiment per batch, got ids {ids} (use predict_unified)")
        if embodiment is not None:
            _check(self.space.id_of(embodiment) == ids[0], f"embodiment: batch ids {ids} are not {embodiment!r}")
        return self.space.unpad(self.predict_unified(observation, **kw), ids[0], "action")

    # -- checkpoints ----------------------------------------------------------------------------------------------
    # What the weights and the stats were built for is recorded in the files they belong to, so that from_pretrained
    # can refuse a config.json edited afterwards (horizon, n_obs_steps, delta_actions, normalization, head, backbone):
    #   model.safetensors metadata "built_for": horizon, n_obs_steps, head config, resolved backbone config
    #   normalizer.json: "modes" (always written) and "delta_actions" {"enabled", "horizon", "dims": {emb: [names]}}
    #   config.json "trained_on" (optional, set by training): the image size and cameras of the training data
    _INFERENCE_HEAD_FIELDS = ("num_steps", "sampler")  # sampling choices a user may change after training

    def _built_for(self) -> dict[str, Any]:
        """What the weights were built for (``model.safetensors`` metadata)."""
        bb = backbone_config(self.config.backbone, **self.config.backbone_overrides)
        return {"horizon": int(self.config.horizon), "n_obs_steps": int(self.config.n_obs_steps),
                "state_in_prompt": bool(self.config.state_in_prompt), "head": asdict(self.config.head), "backbone": asdict(bb)}

    def _delta_record(self) -> dict[str, Any]:
        """What the action stats were computed on (``normalizer.json`` ``delta_actions``): absolute actions, or deltas
        over chunks of ``horizon`` steps on the named action dims of each embodiment."""
        if not self.config.delta_actions:
            return {"enabled": False}
        return {"enabled": True, "horizon": int(self.config.horizon), "dims": _delta_dims(self.space)}

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> Path:  # type: ignore[override]
        """Write ``config.json``, ``model.safetensors``, ``normalizer.json``, ``space.json`` and ``tokenizer/`` into a
        temp directory next to the target, then rename it into place (never a half-written checkpoint)."""
        from safetensors.torch import save_file

        dst = Path(save_directory)
        with atomic_dir(dst) as tmp:
            doc: dict[str, Any] = {"format_version": FORMAT_VERSION, "policy": asdict(self.config)}
            if getattr(self, "trained_on", None):  # image size / cameras of the training data (set by training)
                doc["trained_on"] = self.trained_on
            (tmp / "config.json").write_text(json.dumps(doc, indent=2))
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / "model.safetensors"),
                      metadata={"format_version": str(FORMAT_VERSION), "built_for": json.dumps(self._built_for())})
            (tmp / "normalizer.json").write_text(json.dumps({**self.normalizer.to_dict(), "delta_actions": self._delta_record()}))
            (tmp / "space.json").write_text(json.dumps(self.space.to_dict(), indent=2))
            self.tokenizer.save_pretrained(str(tmp / "tokenizer"))
            extra = self.head.state_files()
            if extra:  # non-tensor head state, e.g. a fitted FAST BPE
                (tmp / "head").mkdir()
                for name, text in extra.items():
                    (tmp / "head" / name).write_text(text)
        return dst

    def _save_pretrained(self, save_directory: Path) -> None:  # used by the hub mixin's push_to_hub
        tmp_target = Path(save_directory) / "_policy"
        self.save_pretrained(tmp_target)
        for p in tmp_target.iterdir():
            shutil.move(str(p), str(Path(save_directory) / p.name))
        tmp_target.rmdir()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, map_location: str | torch.device = "cpu", **kwargs: Any) -> "ChunkPolicy":  # type: ignore[override]
        """Load a checkpoint directory written by :meth:`save_pretrained` (local only; download it first for the hub)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        path = Path(path)
        missing = [f for f in FILES if not (path / f).exists()]
        if missing:
            raise FileNotFoundError(f"{path}: not a chunkpolicy checkpoint, missing {missing}")
        cfg = read_json(path / "config.json")
        if cfg.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{path}: checkpoint format_version {cfg.get('format_version')!r} is not supported (expected {FORMAT_VERSION})")
        try:
            config = PolicyConfig.from_dict(cfg["policy"])
        except (ValueError, TypeError) as e:
            raise ValueError(f"{path / 'config.json'}: {e}") from None
        space = UnifiedSpace.from_dict(read_json(path / "space.json"))
        norm = read_json(path / "normalizer.json")
        built_for = _read_built_for(path / "model.safetensors")
        _cross_check(path, config, space, norm, built_for)
        tok_dir = path / "tokenizer"
        tokenizer = load_tokenizer(tok_dir) if tok_dir.is_dir() else None
        policy = cls(config, space, norm["stats"], tokenizer=tokenizer)
        trained_on = cfg.get("trained_on")
        if trained_on is not None and not isinstance(trained_on, dict):
            raise ValueError(f"{path / 'config.json'}: trained_on must be a mapping, got {trained_on!r}")
        policy.trained_on = trained_on
        if (path / "head").is_dir():
            policy.head.load_state_files({p.name: p.read_text() for p in (path / "head").iterdir()})
        try:
            state = load_file(str(path / "model.safetensors"), device=str(map_location))
        except (SafetensorError, OSError, ValueError) as e:
            raise ValueError(f"{path / 'model.safetensors'}: corrupt or truncated ({e})") from e
        own = policy.state_dict()
        miss = sorted(set(own) - set(state))
        extra = sorted(set(state) - set(own))
        wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
        arch = _arch_diffs(path, config, built_for)
        if miss or extra or wrong:
            raise ValueError(
                f"{path}: weights do not match config.json: missing {miss[:5]}, unexpected {extra[:5]}, "
                f"shape mismatch {[(k, tuple(state[k].shape), tuple(own[k].shape)) for k in wrong[:5]]}"
                + ("".join(f"\n  {e}" for e in arch) if arch else
                   " (policy.head / policy.backbone / policy.backbone_overrides in config.json, or space.json's dim, edited?)")
            )
        _raise_disagreement(path, arch)
        policy.load_state_dict(state)
        return policy.to(map_location)


def _check_overwritable(tokenizer: Any, ids: range, pattern: str, head: str) -> None:
    """The ids a head overwrites must be ordinary tokens of ``tokenizer`` matching ``pattern`` (never a special token)."""
    import re

    _check(len(tokenizer) >= ids.stop, f"tokenizer has {len(tokenizer)} ids; the {head} head overwrites ids "
                                       f"[{ids.start}, {ids.stop}) expecting tokens {pattern!r} there")
    toks = tokenizer.convert_ids_to_tokens(list(ids))
    special = set(getattr(tokenizer, "all_special_ids", []) or [])
    bad = [(i, t) for i, t in zip(ids, toks) if i in special or not isinstance(t, str) or not re.fullmatch(pattern, t)]
    _check(not bad, f"the {head} head overwrites tokenizer ids [{ids.start}, {ids.stop}) expecting tokens {pattern!r}, "
                    f"but the tokenizer has {bad[:3]} there (not a PaliGemma tokenizer?)")


def _delta_dims(space: UnifiedSpace) -> dict[str, list[str]]:
    """``{embodiment: [action dims that are deltas]}`` as ``space`` defines them."""
    return {spec.name: [n for n, m in zip(spec.action_names, spec.delta_action_mask()) if m] for spec in space.embodiments}


def _read_built_for(path: Path) -> dict[str, Any] | None:
    """The ``built_for`` record of ``model.safetensors`` (None for checkpoints written before it existed)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path}: corrupt or truncated ({e})") from e
    if "built_for" not in meta:
        return None
    try:
        rec = json.loads(meta["built_for"])
        if not isinstance(rec, dict):
            raise ValueError("not a mapping")
    except ValueError as e:
        raise ValueError(f"{path}: metadata 'built_for' is unreadable ({e})") from None
    return rec


def _cross_check(path: Path, config: PolicyConfig, space: UnifiedSpace, norm: Mapping[str, Any],
                 built_for: Mapping[str, Any] | None) -> None:
    """Raise one ValueError naming file and field for every way ``config.json`` disagrees with what the weights
    (``model.safetensors`` metadata), the stats (``normalizer.json``) and the space (``space.json``) were built for.
    Records missing from older checkpoints are skipped (their normalization modes are always checked)."""
    cj, wf, nf, sf = (str(path / f) for f in ("config.json", "model.safetensors", "normalizer.json", "space.json"))
    errs: list[str] = []

    def differ(field: str, have: Any, other: str, key: str, want: Any) -> None:
        errs.append(f"{cj}: policy.{field} is {have!r}, but {other} records {key} = {want!r}")

    if built_for is not None:
        for k in ("horizon", "n_obs_steps", "state_in_prompt"):
            if k in built_for and getattr(config, k) != built_for[k]:
                differ(k, getattr(config, k), wf, f"built_for.{k}", built_for[k])
    modes = norm.get("modes")
    if not isinstance(modes, Mapping):
        errs.append(f"{nf}: no 'modes' (the normalization modes the stats are applied with)")
    else:
        for key, field_ in (("action", "action_norm"), ("state", "state_norm")):
            if key in modes and getattr(config, field_) != modes[key]:
                differ(field_, getattr(config, field_), nf, f"modes.{key}", modes[key])
    delta = norm.get("delta_actions")
    if isinstance(delta, Mapping) and "enabled" in delta:
        if bool(config.delta_actions) != bool(delta["enabled"]):
            differ("delta_actions", config.delta_actions, nf, "delta_actions.enabled", bool(delta["enabled"]))
        elif delta["enabled"]:
            if "horizon" in delta and config.horizon != delta["horizon"]:
                differ("horizon", config.horizon, nf, "delta_actions.horizon", delta["horizon"])
            rec_dims = delta.get("dims") or {}
            now = _delta_dims(space)
            for emb in sorted(set(rec_dims) & set(now)):
                if list(rec_dims[emb]) != now[emb]:
                    errs.append(f"{sf}: embodiment {emb!r} makes action dims {now[emb]} deltas (gripper_dims / "
                                f"absolute_dims / names), but {nf} delta_actions.dims.{emb} is {list(rec_dims[emb])}")
    _raise_disagreement(path, errs)


def _raise_disagreement(path: Path, errs: list[str], head: str = "checkpoint files disagree") -> None:
    if errs:
        raise ValueError(f"{path}: {head} (restore the edited file, or retrain):\n  " + "\n  ".join(errs))


def _arch_diffs(path: Path, config: PolicyConfig, built_for: Mapping[str, Any] | None) -> list[str]:
    """``config.json`` head / backbone fields that differ from what ``model.safetensors`` was built for (sampling
    choices such as ``num_steps`` may change; empty for checkpoints written before the record existed)."""
    if built_for is None:
        return []
    cj, wf = str(path / "config.json"), str(path / "model.safetensors")
    errs: list[str] = []
    rec_head = built_for.get("head")
    if isinstance(rec_head, Mapping):
        have = json.loads(json.dumps(asdict(config.head)))  # as recorded: tuples become lists
        defaults = json.loads(json.dumps(asdict(type(config.head)(type=config.head.type))))
        for k in sorted(set(have) | set(rec_head)):
            if k not in rec_head and have.get(k) == defaults.get(k):
                continue  # a head option added after the checkpoint was written, at its default (= old behaviour)
            if k not in ChunkPolicy._INFERENCE_HEAD_FIELDS and have.get(k) != rec_head.get(k):
                errs.append(f"{cj}: policy.head.{k} is {have.get(k)!r}, but {wf} records built_for.head.{k} = {rec_head.get(k)!r}")
    rec_bb = built_for.get("backbone")
    if isinstance(rec_bb, Mapping):
        try:
            have = json.loads(json.dumps(asdict(backbone_config(config.backbone, **config.backbone_overrides))))
        except (ValueError, TypeError, KeyError) as e:
            raise ValueError(f"{cj}: policy.backbone / policy.backbone_overrides: {e}") from None
        for k in sorted(set(have) | set(rec_bb)):
            if have.get(k) != rec_bb.get(k):
                errs.append(f"{cj}: policy.backbone {config.backbone!r} + backbone_overrides gives {k} = "
                            f"{have.get(k)!r}, but {wf} records built_for.backbone.{k} = {rec_bb.get(k)!r}")
    return errs
