"""Typed head configs: one dataclass per head, selected by its ``type`` tag.

They live apart from the head modules (as LeRobot keeps ``configuration_*.py`` apart from ``modeling_*.py``) so that
experiment configs can be parsed and checked without building or importing any network. A third-party head adds
``@register_head_config("name")`` on its own ``HeadConfig`` subclass and ``@register_head("name")`` on its head class.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, fields
from typing import Any, Callable, ClassVar, Mapping

from chunkpolicy.models import flow

_CONFIGS: dict[str, type["HeadConfig"]] = {}


@dataclass
class HeadConfig:
    """Base of every head config; ``type`` is the registry tag (the head's name)."""

    TAG: ClassVar[str | None] = None  # set by register_head_config
    type: str = ""

    def __post_init__(self) -> None:
        want = type(self).TAG
        if want is not None and self.type != want:
            raise ValueError(f"head type: {type(self).__name__} is the config of head {want!r}, got type={self.type!r}")


def register_head_config(name: str) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        if not (dataclasses.is_dataclass(cls) and issubclass(cls, HeadConfig)):
            raise TypeError(f"register_head_config({name!r}): {cls!r} is not a HeadConfig dataclass")
        if name in _CONFIGS and _CONFIGS[name] is not cls:
            raise ValueError(f"register_head_config: {name!r} is already registered to {_CONFIGS[name].__name__}")
        cls.TAG = name
        _CONFIGS[name] = cls
        return cls

    return deco


def head_config_class(name: str) -> type["HeadConfig"]:
    if name not in _CONFIGS:
        raise ValueError(f"unknown head {name!r}; heads: {sorted(_CONFIGS)}")
    return _CONFIGS[name]


def head_types() -> list[str]:
    return sorted(_CONFIGS)


def head_config(name: str, options: Mapping[str, Any] | None = None) -> "HeadConfig":
    """The head's config from a plain dict of options (``type`` may be included); unknown names are errors."""
    cls = head_config_class(name)
    options = {k: v for k, v in dict(options or {}).items() if k != "type"}
    known = {f.name for f in fields(cls)} - {"type"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown options {unknown} for head {name!r}; options: {sorted(known)}")
    return cls(type=name, **options)


def as_head_config(value: "HeadConfig | str | Mapping[str, Any]") -> "HeadConfig":
    """A typed head config from the convenience spellings: a config (as is), a head name (``"dit"``: its defaults) or
    a mapping with a ``type`` tag (``{"type": "dit", "depth": 2}``, what ``asdict`` writes)."""
    if isinstance(value, HeadConfig):
        return value
    if isinstance(value, str):
        return head_config(value)
    if isinstance(value, Mapping):
        if not isinstance(value.get("type"), str):
            raise ValueError(f"head: a mapping needs a 'type' tag naming the head (one of {head_types()}), got {dict(value)!r}")
        return head_config(value["type"], value)
    raise TypeError(f"head: expected a HeadConfig, a head name or a mapping with 'type', got {value!r}")


FLOW_STATE_TOKENS = ("prefix", "expert", "none")
FLOW_TIME_CONVENTIONS = ("tau", "openpi")
FLOW_INVALID_DIMS = ("zero", "noise")
FLOW_TIME_CONDITIONING = ("concat", "adarms")


@register_head_config("flow_expert")
@dataclass
class FlowExpertConfig(HeadConfig):
    """``width``/``mlp`` None: π0 sizes for a 2048-wide backbone (1024 / 4096), else half the backbone width / 4×.

    The remaining options exist so that π0 / π0.5 checkpoints (openpi, LeRobot) run exactly; the defaults are this
    library's own design:

    * ``state_token``: ``"prefix"`` — the state is the backbone prefix's last token (``Backbone.state_proj``, width
      W); ``"expert"`` — π0: the state is the first token of the expert's suffix, embedded by the head's own
      ``state_proj`` (D → w) and run through the expert layers (it attends to the prefix and itself; the actions
      attend to it). It does not depend on the noisy actions, so its keys/values are computed once per chunk;
      ``"none"`` — π0.5: no state token anywhere (the policy writes the discretized state into the prompt, see
      ``PolicyConfig.state_in_prompt``).
    * ``time_convention``: ``"tau"`` — the expert is fed τ (0 = noise) and predicts ``a − ε``; ``"openpi"`` — it is
      fed openpi's t = 1 − τ (1 = noise) and its output layer predicts openpi's ``ε − a``, negated here into our
      velocity, so imported weights are used unchanged.
    * ``invalid_dims``: ``"zero"`` — unified dims outside the embodiment's action mask are held at exactly 0 in the
      noisy input; ``"noise"`` — π0: every one of the D dims starts from noise and is integrated (the expert sees
      them), invalid dims are zeroed only in the returned chunk. Losses average over valid dims either way.
    * ``time_conditioning``: ``"concat"`` — π0: ``[action_in(x) | sinusoid(t)]`` → ``time_in`` → swish →
      ``time_out``; ``"adarms"`` — π0.5: action tokens are ``action_in(x)`` alone and ``sinusoid(t)`` → ``time_in``
      → swish → ``time_out`` → swish conditions every expert RMSNorm (scale, shift and a residual gate, each
      ``Linear(w → 3w)``) and the final norm.
    """

    type: str = "flow_expert"
    width: int | None = None
    mlp: int | None = None
    num_steps: int = flow.DEFAULT_STEPS
    min_period: float = 4e-3
    max_period: float = 4.0
    state_token: str = "prefix"
    time_convention: str = "tau"
    invalid_dims: str = "zero"
    time_conditioning: str = "concat"

    def __post_init__(self) -> None:
        super().__post_init__()
        for name, allowed in (("state_token", FLOW_STATE_TOKENS), ("time_convention", FLOW_TIME_CONVENTIONS),
                              ("invalid_dims", FLOW_INVALID_DIMS), ("time_conditioning", FLOW_TIME_CONDITIONING)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"flow_expert {name} must be one of {allowed}, got {getattr(self, name)!r}")


DIT_OBJECTIVES = ("diffusion", "flow")
DIT_SAMPLERS = ("ddim", "dpmsolver")


@register_head_config("dit")
@dataclass
class DiTConfig(HeadConfig):
    type: str = "dit"
    hidden: int | None = None  # None: min(backbone width, 512)
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    objective: str = "diffusion"  # "diffusion" (diffusers schedulers) or "flow"
    prediction: str = "epsilon"  # diffusion target: "epsilon" or "sample"
    train_timesteps: int = 100
    sampler: str = "ddim"  # diffusion sampling: "ddim" or "dpmsolver" (DPM-Solver++)
    num_steps: int = 10

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.objective not in DIT_OBJECTIVES:
            raise ValueError(f"dit objective must be one of {DIT_OBJECTIVES}, got {self.objective!r}")
        if self.sampler not in DIT_SAMPLERS:
            raise ValueError(f"dit sampler must be one of {DIT_SAMPLERS}, got {self.sampler!r}")
        if self.prediction not in ("epsilon", "sample"):
            raise ValueError(f"dit prediction must be 'epsilon' or 'sample', got {self.prediction!r}")


ACTION_TOKENIZERS = ("bins", "mulaw", "fast")
TOKEN_ID_LAYOUTS = ("tail", "paligemma")


@register_head_config("tokens")
@dataclass
class TokensConfig(HeadConfig):
    """``reserved``: where the action ids (+ ``<act>``, ``<end>``) live in the backbone vocabulary.

    * ``"tail"`` — the last ids of the embedding table, which the prompt tokenizer must not reach (the character
      tokenizer and the ``tiny`` / ``small`` presets).
    * ``"paligemma"`` — on a real PaliGemma vocabulary (257,152 ids: Gemma's 256,000, then 1,024 ``<loc0000..1023>``
      at 256,000–257,023, then 128 ``<seg000..127>``): the least-used ids for robot prompts are overwritten, as RT-2 /
      OpenVLA do. The block is the top of the ``<loc>`` range, ``[257,024 − n, 257,024)`` with ``<act>``, ``<end>``
      its last two ids (π0-FAST fills the same range, ``id = 257,023 − t``), so it holds at most 1,024 ids: ``bins`` (256 + 2) fits, ``mulaw`` (1,024 + 2) and
      ``fast`` need ``fast_vocab`` ≤ 1,022. The policy checks that every reserved id is a ``<loc>`` token of its
      tokenizer.
    """

    type: str = "tokens"
    tokenizer: str = "bins"  # "bins" (RT-2 / OpenVLA) | "mulaw" (Gato) | "fast" (FAST DCT + BPE)
    fast_vocab: int = 1024
    fast_scale: float = 10.0
    reserved: str = "tail"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.tokenizer not in ACTION_TOKENIZERS:
            raise ValueError(f"tokens tokenizer must be one of {ACTION_TOKENIZERS}, got {self.tokenizer!r}")
        if self.reserved not in TOKEN_ID_LAYOUTS:
            raise ValueError(f"tokens reserved must be one of {TOKEN_ID_LAYOUTS}, got {self.reserved!r}")
