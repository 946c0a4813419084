"""Random-weight π0 / π0.5 checkpoints written by LeRobot's own code, at a reduced size, for the importer tests.

LeRobot 0.6.1 hard-codes the Gemma sizes (``get_gemma_config``: ``gemma_2b`` / ``gemma_300m``), the 257,152-id
vocabulary and PaliGemma's default SigLIP So400m vision tower, so its smallest π0 has ~1.5 B parameters. The context
manager :func:`reduced_sizes` shrinks only those sizes, by wrapping the two constructors LeRobot looks up at build
time (``get_gemma_config`` and ``PaliGemmaForConditionalGenerationWithPiGemma``); every forward pass, mask, time
convention and processor step that runs is LeRobot's own code. Its prompt tokenizer (a hub download) is replaced by
our offline character tokenizer, which LeRobot's ``TokenizerProcessorStep`` accepts as any tokenizer.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=16, patch_size=8)
LM = dict(width=64, depth=2, mlp_dim=128, num_heads=8, num_kv_heads=1, head_dim=8)
EXPERT = dict(width=32, depth=2, mlp_dim=64, num_heads=8, num_kv_heads=1, head_dim=8)
IMAGE = 32


@contextlib.contextmanager
def reduced_sizes() -> Iterator[None]:
    """Build LeRobot π0 / π0.5 models at :data:`LM` / :data:`EXPERT` / :data:`VISION` sizes (see the module docstring)."""
    from lerobot.policies.pi0 import modeling_pi0
    from lerobot.policies.pi05 import modeling_pi05

    saved = [(m, n, getattr(m, n)) for m in (modeling_pi0, modeling_pi05)
             for n in ("get_gemma_config", "PaliGemmaForConditionalGenerationWithPiGemma")]
    try:
        for mod in (modeling_pi0, modeling_pi05):
            gemma_config, pali = mod.GemmaConfig, mod.PaliGemmaForConditionalGenerationWithPiGemma

            def get_config(variant: str, _g=gemma_config) -> Any:
                return _g(**(LM if variant == "gemma_2b" else EXPERT))

            def build(config: Any, _p=pali) -> Any:
                for k, v in VISION.items():
                    setattr(config.vision_config, k, v)
                config.vision_config.projection_dim = config.text_config.hidden_size
                return _p(config=config)

            mod.get_gemma_config, mod.PaliGemmaForConditionalGenerationWithPiGemma = get_config, build
        yield
    finally:
        for mod, name, value in saved:
            setattr(mod, name, value)


@contextlib.contextmanager
def offline_tokenizer(tokenizer: Any) -> Iterator[None]:
    """LeRobot's processors load ``google/paligemma-3b-pt-224`` from the hub; hand them ``tokenizer`` instead."""
    from lerobot.processor import tokenizer_processor

    orig = tokenizer_processor.AutoTokenizer
    tokenizer_processor.AutoTokenizer = type("OfflineAutoTokenizer", (), {"from_pretrained": staticmethod(lambda *a, **k: tokenizer)})
    try:
        yield
    finally:
        tokenizer_processor.AutoTokenizer = orig


def randomize(module: torch.nn.Module, seed: int) -> None:
    """Every parameter random (LeRobot zero-initializes norms and adaRMS projections, which would hide conventions):
    matrices ~ N(0, 1/fan_in), vectors ~ N(0, 0.1²)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(module.named_parameters()):
            std = 1 / math.sqrt(p.shape[-1]) if p.ndim >= 2 else 0.1
            p.copy_((torch.randn(p.shape, generator=g) * std).to(p.device, p.dtype))


def lerobot_to_bf16(policy: Any) -> Any:
    """A LeRobot π0 / π0.5 policy turned into its bf16 one in place, by LeRobot's own
    ``to_bfloat16_for_selected_params`` (what its constructor does for ``dtype="bfloat16"``), with the fp32 weights
    copied back: exact where LeRobot keeps fp32, rounded where it keeps bf16 — the policy a bf16 build from the same
    weights would be, without building and saving a second one. Returns ``policy``."""
    fp32_weights = {n: q.detach().clone() for n, q in policy.named_parameters()}
    policy.model.paligemma_with_expert.to_bfloat16_for_selected_params("bfloat16")
    policy.config.dtype = "bfloat16"
    with torch.no_grad():  # the parameters LeRobot keeps in fp32 must not pass through bf16 on the way
        for n, q in policy.named_parameters():
            q.copy_(fp32_weights.pop(n))
    return policy


def stats(n: int, seed: int) -> dict[str, torch.Tensor]:
    rng = np.random.default_rng(seed)
    mean = rng.normal(size=n)
    std = rng.uniform(0.5, 2.0, size=n)
    lo, hi = mean - 2.5 * std, mean + 2.5 * std
    f = lambda a: torch.tensor(a, dtype=torch.float32)  # noqa: E731
    return {"mean": f(mean), "std": f(std), "min": f(lo - 0.5), "max": f(hi + 0.5), "q01": f(lo), "q99": f(hi),
            "count": torch.tensor([1000])}


def build_lerobot_policy(kind: str, out: Path, *, action_dim: int = 7, state_dim: int = 8, horizon: int = 6,
                         cameras: tuple[str, ...] = ("top", "wrist"), seed: int = 0, tokenizer: Any = None,
                         prompt_len: int = 24, reduced: bool = True, image: int = IMAGE, dtype: str = "float32",
                         device: str = "cpu"):
    """A reduced-size LeRobot ``PI0Policy`` (``kind="pi0"``) or ``PI05Policy`` (``"pi05"``) with random weights, its
    pre/post-processors (normalization stats included), all written with LeRobot's ``save_pretrained`` into ``out``.
    ``reduced=False``: LeRobot's real sizes (``image`` 224; ~4 B parameters: a GPU machine,
    ``benchmarks/import_equivalence.py``). Returns ``(policy, preprocessor, postprocessor)``."""
    from lerobot.configs import FeatureType, PolicyFeature

    from chunkpolicy.models.tokenizer import build_char_tokenizer

    tokenizer = tokenizer or build_char_tokenizer()
    inputs = {f"observation.images.{c}": PolicyFeature(type=FeatureType.VISUAL, shape=(3, image, image)) for c in cameras}
    inputs["observation.state"] = PolicyFeature(type=FeatureType.STATE, shape=(state_dim,))
    outputs = {"action": PolicyFeature(type=FeatureType.ACTION, shape=(action_dim,))}
    common = dict(device=device, dtype=dtype, chunk_size=horizon, n_action_steps=horizon,
                  image_resolution=(image, image), input_features=inputs, output_features=outputs,
                  tokenizer_max_length=prompt_len)
    ds_stats = {"observation.state": stats(state_dim, seed + 1), "action": stats(action_dim, seed + 2)}
    if kind == "pi0":
        from lerobot.policies.pi0.configuration_pi0 import PI0Config
        from lerobot.policies.pi0.modeling_pi0 import PI0Policy
        from lerobot.policies.pi0.processor_pi0 import make_pi0_pre_post_processors as make_proc

        cfg, cls = PI0Config(**common), PI0Policy
    elif kind == "pi05":
        from lerobot.policies.pi05.configuration_pi05 import PI05Config
        from lerobot.policies.pi05.modeling_pi05 import PI05Policy
        from lerobot.policies.pi05.processor_pi05 import make_pi05_pre_post_processors as make_proc

        cfg, cls = PI05Config(**common), PI05Policy
    else:
        raise ValueError(kind)
    with reduced_sizes() if reduced else contextlib.nullcontext():
        torch.manual_seed(seed)
        policy = cls(cfg)
    randomize(policy, seed)
    policy.eval()
    with offline_tokenizer(tokenizer):
        pre, post = make_proc(cfg, ds_stats)
    policy.save_pretrained(out)
    pre.save_pretrained(out)
    post.save_pretrained(out)
    return policy, pre, post
