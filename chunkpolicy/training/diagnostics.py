"""Numerical health of a training run: what to look at when a loss turns non-finite, and the trends before it.

Two tools, both used by the trainer (``train.probe_nonfinite``, ``train.probe_every``):

* :func:`optimizer_health` — on the device, no host sync of its own: the largest absolute weight, AdamW first moment
  and second moment over all parameters. Read together with the loss at each ``train`` record, so slow growth (weights
  or ``exp_avg_sq`` running away) shows in ``metrics.jsonl`` long before a step overflows.
* :func:`probe_step` — replays one training batch eagerly (compiled layers forced eager, no CUDA graph, gradients
  taken with ``torch.autograd.grad`` so neither ``.grad`` buffers nor the optimizer are touched) a few times with
  different noise, watching every torch call: the first call whose floating output is not finite (function name and
  the chunkpolicy source line that made it), the largest attention logit ``q·kᵀ·scale`` per call site, the largest
  activations, and the backward pass under anomaly detection (the backward function that first produced a NaN and
  its forward call site), or, when everything is finite, the parameters with the largest gradient norms. The
  trainer runs it on the batches of steps that its non-finite guard skipped, so a skipped step leaves a report
  naming where the overflow happened (``run_dir/nonfinite/step_XXXXXX.json``, the batch beside it for replay).
  :func:`write_probe_report` runs it and writes that report.

Everything here is a diagnostic: slow (one host sync per torch call in a probe), called rarely, and it leaves the
model, the optimizer and the random number generators as they were.
"""

from __future__ import annotations

import json
import math
import traceback
import warnings
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from chunkpolicy.atomic import atomic_file

__all__ = ["optimizer_health", "HEALTH_KEYS", "probe_step", "write_probe_report"]

HEALTH_KEYS = ("weight_absmax", "adam_m_absmax", "adam_v_max")
_PKG = str(Path(__file__).resolve().parents[1])  # .../chunkpolicy
_SELF = str(Path(__file__).resolve())


def _absmax(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    if not tensors:
        return torch.zeros((), device=device)
    # the inf-norm of each tensor is its largest |value|, NaN if it holds one (what we want to see)
    return torch.stack([t.float() for t in torch._foreach_norm(tensors, float("inf"))]).max()


@torch.no_grad()
def optimizer_health(optimizer: torch.optim.Optimizer, device: torch.device) -> torch.Tensor:
    """``[3]`` float tensor on ``device``: max |weight|, max |AdamW exp_avg|, max AdamW exp_avg_sq (:data:`HEALTH_KEYS`),
    over the optimizer's parameters (0 for moments not created yet). Launches a few reductions, reads nothing back."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's wrapper
    params = [p.detach() for g in inner.param_groups for p in g["params"]]
    state = [inner.state.get(p, {}) for g in inner.param_groups for p in g["params"]]
    m = [s["exp_avg"] for s in state if isinstance(s.get("exp_avg"), torch.Tensor)]
    v = [s["exp_avg_sq"] for s in state if isinstance(s.get("exp_avg_sq"), torch.Tensor)]
    return torch.stack([_absmax(params, device), _absmax(m, device), _absmax(v, device)]).to(device)


def _site() -> str:
    """The innermost chunkpolicy frame below the caller (``models/attention.py:26 sdpa``), else the innermost frame."""
    frames = traceback.extract_stack()[:-2]
    for fr in reversed(frames):
        if fr.filename.startswith(_PKG) and fr.filename != _SELF:
            return f"{Path(fr.filename).relative_to(_PKG).as_posix()}:{fr.lineno} {fr.name}"
    fr = frames[-1]
    return f"{fr.filename}:{fr.lineno} {fr.name}"


def _tensors(x: Any) -> Iterable[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for y in x:
            yield from _tensors(y)


class _Watch(TorchFunctionMode):
    """Checks the floating outputs of every torch call; records the first non-finite one, the largest attention
    logits per call site and the largest activations. One host sync per call: for probes only."""

    def __init__(self, top: int = 8) -> None:
        super().__init__()
        self.first: dict[str, Any] | None = None
        self.attn: dict[str, float] = {}
        self.act: dict[str, float] = {}
        self.calls = 0
        self.top = top

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Mapping | None = None) -> Any:
        kwargs = dict(kwargs or {})
        out = func(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            self._attention_logits(args, kwargs)
        outs = [t for t in _tensors(out) if t.is_floating_point() and t.numel() > 0]
        if outs:
            self.calls += 1
            with torch.no_grad():
                finite = all(bool(torch.isfinite(t.detach()).all()) for t in outs)
                if not finite and not any(bool(t.isnan().any() | t.isposinf().any()) for t in outs):
                    finite = self._intended_neg_inf(args, kwargs)  # attention masks are built with -inf on purpose
                amax = max(float(t.detach().abs().float().nan_to_num(neginf=0.0).max()) for t in outs) if finite else math.nan
            site = None
            if not finite and self.first is None:
                site = _site()
                ins = [t for t in _tensors(list(args) + list(kwargs.values())) if t.is_floating_point() and t.numel() > 0]
                self.first = {"call": getattr(func, "__name__", str(func)), "site": site,
                              "output_shapes": [list(t.shape) for t in outs],
                              "input_absmax": [float(t.detach().abs().float().nan_to_num(posinf=math.inf).max()) for t in ins][:4],
                              "inputs_finite": [bool(torch.isfinite(t.detach()).all()) for t in ins][:4]}
            if finite and amax > 0:
                site = site or _site()
                self.act[site] = max(self.act.get(site, 0.0), amax)
        return out

    @staticmethod
    def _intended_neg_inf(args: tuple, kwargs: dict) -> bool:
        """A -inf output is intended when -inf was passed in (a fill value such as ``masked_fill(m, -inf)``, or a
        tensor that already held -inf, e.g. an additive mask); an overflow makes -inf out of finite inputs."""
        vals = list(args) + list(kwargs.values())
        if any(isinstance(v, float) and v == -math.inf for v in vals):
            return True
        return any(bool(t.detach().isneginf().any()) for t in _tensors(vals) if t.is_floating_point())

    def _attention_logits(self, args: tuple, kwargs: dict) -> None:
        q = args[0] if len(args) > 0 else kwargs["query"]
        k = args[1] if len(args) > 1 else kwargs["key"]
        scale = kwargs.get("scale") or 1.0 / math.sqrt(q.shape[-1])
        with torch.no_grad():
            qf, kf = q.detach().float(), k.detach().float()
            if kf.shape[-3] != qf.shape[-3]:  # grouped-query attention: repeat the key heads
                kf = kf.repeat_interleave(qf.shape[-3] // kf.shape[-3], dim=-3)
            logit = float((qf @ kf.transpose(-1, -2)).abs().max()) * scale
        site = _site()
        self.attn[site] = max(self.attn.get(site, 0.0), logit)

    def summary(self) -> dict[str, Any]:
        top = sorted(self.act.items(), key=lambda kv: -kv[1])[: self.top]
        return {"first_nonfinite_forward": self.first, "torch_calls": self.calls,
                "attention_logit_absmax": max(self.attn.values(), default=None),
                "attention_logit_by_site": dict(sorted(self.attn.items(), key=lambda kv: -kv[1])[: self.top]),
                "activation_absmax_top": [{"site": s, "absmax": a} for s, a in top]}


def _backward(loss: torch.Tensor, named: list[tuple[str, torch.nn.Parameter]], top: int) -> dict[str, Any]:
    params = [p for _, p in named]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with torch.autograd.detect_anomaly(check_nan=True):
                grads = torch.autograd.grad(loss, params, allow_unused=True)
        except RuntimeError as e:
            fwd = [line.strip() for w in caught for line in str(w.message).splitlines() if "chunkpolicy/" in line]
            return {"backward_error": str(e).splitlines()[0], "forward_trace": fwd[-6:]}
    norms = [(n, float(g.float().norm())) for (n, _), g in zip(named, grads) if g is not None]
    bad = [n for n, v in norms if not math.isfinite(v)]
    total = math.sqrt(sum(v * v for _, v in norms)) if not bad else float("nan")
    return {"grad_norm": total, "nonfinite_grads": bad[:top],
            "grad_norm_top": [{"param": n, "norm": v} for n, v in sorted(norms, key=lambda kv: -kv[1] if math.isfinite(kv[1]) else -math.inf)[:top]]}


def probe_step(policy: torch.nn.Module, batch: Mapping[str, Any], *, seeds: Iterable[int] = (0,),
               autocast: bool = False, device: torch.device | None = None, top: int = 8) -> dict[str, Any]:
    """Replay one training batch eagerly once per seed (a different noise / flow-time draw each) and report what
    :class:`_Watch` and the anomaly-mode backward saw; see the module docstring. ``batch``: a collated host batch
    (what the trainer's loader yields); ``autocast``: bf16 autocast as in training. Returns a JSON-ready dict with
    ``repeats`` (one entry per seed: ``loss``, the forward watch summary, the backward report) and ``reproduced``
    (how many repeats saw a non-finite loss, forward value or gradient)."""
    from chunkpolicy.training.distributed import to_device

    device = device or next(policy.parameters()).device
    named = [(n, p) for n, p in policy.named_parameters() if p.requires_grad]
    was = policy.training
    policy.train()
    fork = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    stance = torch.compiler.set_stance("force_eager") if hasattr(torch.compiler, "set_stance") else nullcontext()
    repeats = []
    try:
        with stance, torch.random.fork_rng(devices=fork):
            dev_batch = to_device(batch, device)
            for seed in seeds:
                torch.manual_seed(seed)
                watch = _Watch(top)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast), watch:
                    loss = policy.compute_loss(dev_batch)["loss"]
                rep: dict[str, Any] = {"seed": seed, "loss": float(loss.detach()), **watch.summary()}
                rep.update(_backward(loss, named, top))
                rep["nonfinite"] = (not math.isfinite(rep["loss"]) or rep["first_nonfinite_forward"] is not None
                                    or "backward_error" in rep or bool(rep.get("nonfinite_grads")))
                repeats.append(rep)
    finally:
        policy.train(was)
    inputs = {k: {"absmax": float(v.detach().abs().float().max()), "finite": bool(torch.isfinite(v).all())}
              for k, v in batch.items() if isinstance(v, torch.Tensor) and v.is_floating_point() and v.numel() > 0}
    return {"reproduced": sum(r["nonfinite"] for r in repeats), "repeats": repeats, "batch_inputs": inputs}


def write_probe_report(policy: torch.nn.Module, micro_batches: list[Mapping[str, Any]], step: int, kind: str,
                       out_dir: Path, tag: str, *, seeds: Iterable[int], autocast: bool,
                       device: torch.device) -> dict[str, Any]:
    """:func:`probe_step` on the first of a step's host ``micro_batches``, written to ``out_dir/{tag}.json`` (for
    ``kind="nonfinite"`` the micro-batches too, as ``{tag}_batch.pt``, for replay); returns the metrics record
    (``kind``, ``step``, where the report is, what it found; ``None`` where a field does not apply)."""
    try:
        rep = probe_step(policy, micro_batches[0], seeds=seeds, autocast=autocast, device=device)
    except Exception as e:  # a diagnostic never stops training; say why it could not run
        rep = {"error": f"{type(e).__name__}: {e}"}
    out_dir.mkdir(parents=True, exist_ok=True)
    with atomic_file(out_dir / f"{tag}.json") as tmp:
        tmp.write_text(json.dumps({"step": step, "kind": kind, **rep}, indent=1, default=str))
    if kind == "nonfinite":
        with atomic_file(out_dir / f"{tag}_batch.pt") as tmp:  # clones: a collated batch is views of one block
            torch.save([{k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in mb.items()} for mb in micro_batches], tmp)
    reps = rep.get("repeats", [])
    first = next((r["first_nonfinite_forward"] for r in reps if r.get("first_nonfinite_forward")), None)
    bwd = next((r["backward_error"] for r in reps if r.get("backward_error")), None)
    logits = [r["attention_logit_absmax"] for r in reps if r.get("attention_logit_absmax") is not None]
    return {"kind": kind, "step": step, "report": str(out_dir / f"{tag}.json"), "error": rep.get("error"),
            "reproduced": rep.get("reproduced"), "repeats": len(reps),
            "losses": [r["loss"] for r in reps], "attention_logit_absmax": max(logits, default=None),
            "first_nonfinite_forward": first and f"{first['call']} at {first['site']}", "backward_error": bwd}
