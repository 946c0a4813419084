"""AdamW with decay/no-decay parameter groups, linear warmup + cosine decay, and pickle-free optimizer state.

π0's training defaults (openpi's π0 recipe, as summarised in the project's shared REFERENCES.md): AdamW β=(0.9, 0.95), eps 1e-8, clip 1.0, warmup 1k, cosine 2.5e-5 → 2.5e-6.

Schedule (``s`` = optimizer steps taken so far, so the first update uses ``s = 0``)::

    s <  warmup:  lr · (s + 1) / (warmup + 1)
    s >= warmup:  final + (lr − final) · ½ (1 + cos(π · min(1, (s − warmup) / max(1, total − warmup))))
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in ``named_parameters`` order: matrices decay, biases / norm scales / 1-d do not."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 else no_decay).append(p)
    if not decay and not no_decay:
        raise ValueError("optimizer: the model has no trainable parameters (check posttrain.mode)")
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(
    model: nn.Module,
    lr: float,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    weight_decay: float = 1e-10,
    fused: bool | None = None,
    capturable: bool = False,
) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; ``fused=None`` uses the fused kernel when every parameter is a floating
    tensor on CUDA or the CPU (the fused kernel takes a device-side ``found_inf`` flag: the trainer's non-finite guard
    skips a step with it, without a host sync). The moments have the parameters' dtype (PyTorch's AdamW): fp32 for
    fp32 weights (``train.precision=fp32``), bf16 for bf16 weights (``train.precision=bf16``).
    ``capturable``: state on the device and no host syncs in ``step`` (for a CUDA-graphed step; then also call
    :func:`tensor_lrs` once a scheduler is attached)."""
    groups = param_groups(model, weight_decay)
    if fused is None:
        fused = all(p.is_floating_point() and p.device.type in ("cuda", "cpu") for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=bool(fused) or None,
                             capturable=capturable)


def tensor_lrs(optimizer: torch.optim.Optimizer, device: torch.device | str) -> None:
    """Make each group's ``lr`` a 0-d tensor on ``device`` (kept if it already is one), as a CUDA-graphed step needs:
    schedulers then update it in place (``fill_``) instead of replacing a number the graph would have frozen."""
    for g in optimizer.param_groups:
        if not isinstance(g["lr"], torch.Tensor):
            g["lr"] = torch.tensor(float(g["lr"]), device=device)


def set_lr(group: dict[str, Any], lr: float) -> None:
    """Set ``group["lr"]``, in place when it is a tensor (see :func:`tensor_lrs`)."""
    if isinstance(group["lr"], torch.Tensor):
        group["lr"].fill_(float(lr))
    else:
        group["lr"] = lr


def plain_numbers(obj: Any) -> Any:
    """``obj`` (nested dicts / lists / tuples) with 0-d tensors, such as a capturable optimizer's learning rates, as
    Python numbers, for JSON."""
    if isinstance(obj, torch.Tensor):
        return obj.item()
    if isinstance(obj, dict):
        return {k: plain_numbers(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(plain_numbers(v) for v in obj)
    return obj


def lr_factor(step: int, warmup: int, total: int, lr: float, final_lr: float) -> float:
    """Multiplier of the peak ``lr`` after ``step`` optimizer steps (see the module docstring)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return (final_lr + (lr - final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))) / lr


class LRSchedule:
    """The multiplier a :class:`~torch.optim.lr_scheduler.LambdaLR` applies to the peak ``lr`` at step ``s``:
    warm-up over steps, then the cosine decay over steps (``over="steps"``: :func:`lr_factor`) or over training time
    (``over="time"``: progress = ``clock() / budget_s``, ``clock`` returning the run's training seconds so far; the
    warm-up is still in steps, and the decay runs from the start of the budget, so its first ``warmup`` steps' share of
    the budget is already spent when the warm-up ends). ``scale`` multiplies everything (the non-finite guard lowers it
    on a rollback). A schedule over time depends on measured time: runs with it are not bit-reproducible."""

    def __init__(self, warmup: int, total: int, lr: float, final_lr: float, over: str = "steps",
                 budget_s: float | None = None, clock: Any = None) -> None:
        if over not in ("steps", "time"):
            raise ValueError(f"schedule over {over!r}: expected 'steps' or 'time'")
        if over == "time" and not (budget_s and clock):
            raise ValueError("a schedule over time needs budget_s and clock")
        self.warmup, self.total, self.lr, self.final_lr = warmup, total, lr, final_lr
        self.over, self.budget_s, self.clock = over, budget_s, clock
        self.scale = 1.0

    def __call__(self, step: int) -> float:
        if self.over == "steps" or step < self.warmup:
            f = lr_factor(step, self.warmup, self.total, self.lr, self.final_lr)
        else:
            progress = min(1.0, max(0.0, self.clock() / self.budget_s))
            f = (self.final_lr + (self.lr - self.final_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))) / self.lr
        return f * self.scale


def build_scheduler(optimizer: torch.optim.Optimizer, warmup: int, total: int, lr: float, final_lr: float,
                    schedule: LRSchedule | None = None) -> torch.optim.lr_scheduler.LambdaLR:
    """``LambdaLR`` over :class:`LRSchedule` (by default over steps), wrapped in a plain function so that the
    scheduler's state dict holds none of it; :func:`schedule_of` returns it."""
    schedule = schedule or LRSchedule(warmup, total, lr, final_lr)

    def fn(s: int) -> float:
        return schedule(s)

    fn.schedule = schedule  # type: ignore[attr-defined]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fn)


def schedule_of(scheduler: torch.optim.lr_scheduler.LambdaLR) -> LRSchedule:
    """The :class:`LRSchedule` of a scheduler made by :func:`build_scheduler`."""
    return scheduler.lr_lambdas[0].schedule  # type: ignore[attr-defined]


def set_lrs(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Each group's lr from the schedule at its current step (after a load or a change of scale)."""
    for g, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas):
        set_lr(g, base * fn(scheduler.last_epoch))


# -- precision of weights and moments ----------------------------------------------------------------------------
def precision_label(mode: str) -> str:
    """How ``train.precision`` reads in the start-up line."""
    return {"fp32": "fp32", "bf16": "bf16 (fast path)"}[mode]


def apply_precision(model: nn.Module, mode: str, *, verbose: bool = True) -> None:
    """``train.precision``: ``fp32`` (default) keeps fp32 weights (master weights) and fp32 AdamW moments, the
    forward/backward computed in bf16 under ``mixed_precision=bf16``; a model handed over in another dtype is cast to
    fp32. ``bf16`` (opt-in fast path) casts the parameters to bf16, so AdamW keeps bf16 moments too (PyTorch's AdamW
    keeps its state in the parameters' dtype) and there is no fp32 copy: faster and smaller, but updates below bf16's
    resolution are lost, which drifts over long runs. Buffers keep their dtype; ``verbose``: say what was cast."""
    if mode not in ("fp32", "bf16"):
        raise ValueError(f"train.precision: expected fp32 or bf16, got {mode!r}")
    want = torch.float32 if mode == "fp32" else torch.bfloat16
    params = [p for p in model.parameters() if p.is_floating_point() and p.dtype != want]
    if not params:
        return
    if verbose:
        print(f"train.precision={mode}: casting {sum(p.numel() for p in params):,} parameters "
              f"from {params[0].dtype} to {want}")
    with torch.no_grad():
        for p in params:  # parameters only: buffers (normalization stats, ...) keep their dtype
            p.data = p.data.to(want)


# -- state without pickles ---------------------------------------------------------------------------------------
def optimizer_state_to_tensors(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], str]:
    """``optimizer.state_dict()`` → (flat tensors for safetensors, JSON of everything else)."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in state_dict["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"{idx}.{k}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    # a capturable optimizer keeps lr (and the scheduler's initial_lr) as 0-d tensors: stored as numbers
    meta = {"param_groups": plain_numbers(state_dict["param_groups"]), "scalars": scalars,
            "indices": [int(i) for i in state_dict["state"]]}
    return tensors, json.dumps(meta)


def optimizer_state_from_tensors(tensors: dict[str, torch.Tensor], meta_json: str) -> dict[str, Any]:
    meta = json.loads(meta_json)
    state: dict[int, dict[str, Any]] = {int(i): {} for i in meta["indices"]}
    for key, v in tensors.items():
        idx, k = key.split(".", 1)
        state[int(idx)][k] = v
    for idx, d in meta["scalars"].items():
        state[int(idx)].update(d)
    groups = meta["param_groups"]
    for g in groups:
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
    return {"state": state, "param_groups": groups}
