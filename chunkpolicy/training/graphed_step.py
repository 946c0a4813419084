"""A whole training step (forward, backward, gradient clipping, AdamW) replayed as one CUDA graph.

At the batch sizes that fit a pi0-size model on one GPU, eager training is bound by the CPU: Python and kernel
launches for thousands of kernels per step take longer than the GPU needs to run them (on an H100 at batch 8 the GPU
is busy ~half of the step). :class:`GraphedTrainStep` captures :meth:`ChunkPolicy.loss_from_inputs` (no validation, no
host syncs), its backward, ``clip_grad_norm_`` and a capturable AdamW once for a fixed batch shape; each call then
validates and prepares the batch on the host (:meth:`ChunkPolicy.prepare_train_inputs`), copies it into the captured
buffers and replays. This is PyTorch's "whole-network capture"; compiled layers (``Backbone.compile_layers``) are
captured like any other kernels.

Contract, checked where it can be:

* one CUDA device, one process (no DDP: its gradient hooks communicate outside the graph);
* the optimizer was built with ``capturable=True`` and a **tensor** learning rate per group (:func:`capturable_adamw`),
  so a scheduler's in-place updates of ``group["lr"]`` reach the graph (a float would be baked into it);
* the gradients live in the graph's memory pool: do not call ``optimizer.zero_grad()`` or replace ``.grad`` outside;
* non-finite guard (``skip_nonfinite``, default on): the captured step computes a device-side flag "loss or gradient
  norm not finite" and hands it to the fused AdamW as ``found_inf`` (the mechanism ``GradScaler`` uses), so a replay
  with a NaN/inf loss or gradient leaves the weights, the moments and the step counts untouched, with no host sync;
  the flag is returned as ``skipped``;
* the warm-up passes run with the learning rate at 0 and the optimizer state is restored afterwards (zeroed where
  the warm-up created it), and the random number generators are forked around warm-up and capture, so building the
  step leaves the weights, the optimizer and the random streams as they were, also when the optimizer was loaded
  from a checkpoint.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from chunkpolicy.models.attention import training_attention_backends
from chunkpolicy.models.policy import ChunkPolicy
from chunkpolicy.training.optim import tensor_lrs


def check_graphable(model: torch.nn.Module, device: torch.device, *, world: int, grad_accum: int) -> None:
    """Raise ``ValueError`` when a run cannot train with ``train.cuda_graph`` (the contract above)."""
    if device.type != "cuda":
        raise ValueError(f"train.cuda_graph: needs a CUDA device; this run is on {device.type}")
    if world != 1:
        raise ValueError(f"train.cuda_graph: one process only (DDP communicates outside the graph); this run has {world}")
    if grad_accum != 1:
        raise ValueError(f"train.cuda_graph: needs train.grad_accum=1, got {grad_accum}")
    if not (hasattr(model, "prepare_train_inputs") and hasattr(model, "loss_from_inputs")):
        raise ValueError(f"train.cuda_graph: {type(model).__name__} has no prepare_train_inputs/loss_from_inputs")


def capturable_adamw(params: Any, lr: float, device: torch.device | str = "cuda", **kw: Any) -> torch.optim.AdamW:
    """Fused AdamW with ``capturable=True`` and a tensor learning rate on ``device`` (what :class:`GraphedTrainStep`
    needs); ``params`` as for ``torch.optim.AdamW`` (parameters or groups, e.g.
    :func:`chunkpolicy.training.optim.param_groups`)."""
    opt = torch.optim.AdamW(params, lr=torch.tensor(float(lr), device=device), fused=True, capturable=True, **kw)
    tensor_lrs(opt, device)  # per-group lr overrides arrive as floats
    return opt


class GraphedTrainStep:
    """``step(batch) -> {"loss", "grad_norm", "skipped"}`` for batches shaped like ``example``; see the module docstring.

    ``max_grad_norm``: clip the global gradient norm (None: no clipping; ``grad_norm`` is still reported);
    ``autocast``: bf16 autocast around the forward (for fp32 master weights); ``warmup``: eager passes before capture
    (allocations, cuBLAS/Inductor set-up)."""

    def __init__(self, policy: ChunkPolicy, optimizer: torch.optim.Optimizer, example: Mapping[str, Any], *,
                 max_grad_norm: float | None = 1.0, autocast: bool = False, warmup: int = 3,
                 skip_nonfinite: bool = True) -> None:
        if policy.device.type != "cuda":
            raise ValueError(f"GraphedTrainStep needs the policy on a CUDA device, it is on {policy.device}")
        training_attention_backends()  # no cuDNN attention in training: its backward made NaNs (issue 15)
        for i, g in enumerate(optimizer.param_groups):
            if not g.get("capturable", False):
                raise ValueError(f"optimizer: param group {i} is not capturable (build it with capturable_adamw or capturable=True)")
            if not isinstance(g["lr"], torch.Tensor):
                raise ValueError(f"optimizer: param group {i} has a float lr, which a CUDA graph would freeze; use a tensor "
                                 "(capturable_adamw)")
        self.policy, self.optimizer, self.max_grad_norm, self.autocast = policy.train(), optimizer, max_grad_norm, autocast
        self.skip_nonfinite = skip_nonfinite
        if skip_nonfinite and not all(g.get("fused") for g in optimizer.param_groups):
            raise ValueError("skip_nonfinite needs a fused AdamW (its found_inf flag skips the update on the device)")
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.inputs = {k: v.clone() for k, v in policy.prepare_train_inputs(example).items()}
        lrs = [g["lr"].clone() for g in optimizer.param_groups]
        # a resumed optimizer's moments and step counts must survive the warm-up: keep host copies (a fresh
        # optimizer's state is created by the warm-up and zeroed afterwards)
        saved = {id(v): v.detach().to("cpu", copy=True) for st in optimizer.state.values() for v in st.values()
                 if isinstance(v, torch.Tensor)}
        for g in optimizer.param_groups:
            g["lr"].zero_()  # warm-up passes must not move the weights
        # the warm-up and the capture draw noise: fork the RNGs so that the first replay draws what an eager step
        # would have drawn at this point (a resumed run then continues the interrupted one's random stream)
        with torch.random.fork_rng(devices=[policy.device]):
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(warmup):
                    optimizer.zero_grad(set_to_none=True)
                    self._step()
            torch.cuda.current_stream().wait_stream(stream)
            optimizer.zero_grad(set_to_none=True)  # gradients are then allocated inside the graph's pool
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.loss, self.grad_norm, self.skipped = self._step()
        with torch.no_grad():
            for g, lr in zip(optimizer.param_groups, lrs):
                g["lr"].copy_(lr)
            for st in optimizer.state.values():  # undo the warm-up's moments and step counts, in place
                for v in st.values():
                    if isinstance(v, torch.Tensor):
                        v.copy_(saved[id(v)]) if id(v) in saved else v.zero_()

    def _step(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # autocast's weight cache must be off while capturing (cached casts would be freed outside the graph's pool)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast, cache_enabled=False):
            loss = self.policy.loss_from_inputs(self.inputs)["loss"]
        loss.backward()
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads, foreach=True)
        if self.max_grad_norm:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.max_grad_norm, norm, foreach=True)
        skipped = (~(torch.isfinite(loss.detach()) & torch.isfinite(norm))).float()
        if self.skip_nonfinite:
            self.optimizer.found_inf = skipped  # read by the fused kernel: 1 skips the whole update, on the device
        self.optimizer.step()
        return loss.detach(), norm, skipped

    def load_inputs(self, batch: Mapping[str, Any], host_ids: Sequence[int] | None = None) -> None:
        """Validate ``batch`` (schema, robot units; ``host_ids``: the caller already did, with
        :meth:`ChunkPolicy.validate`) and copy its prepared tensors into the captured buffers."""
        for k, v in self.policy.prepare_train_inputs(batch, host_ids).items():
            if v.shape != self.inputs[k].shape:
                raise ValueError(f"{k}: shape {tuple(v.shape)} differs from the captured {tuple(self.inputs[k].shape)}; "
                                 "build a GraphedTrainStep for this shape")
            self.inputs[k].copy_(v)

    def __call__(self, batch: Mapping[str, Any], host_ids: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """One optimizer step on ``batch``; returns copies of the step's loss, (pre-clipping) gradient norm and the
        skip flag (1.0: not finite, the update was skipped). ``host_ids``: see :meth:`load_inputs`."""
        self.load_inputs(batch, host_ids)
        self.graph.replay()
        return {"loss": self.loss.clone(), "grad_norm": self.grad_norm.clone(), "skipped": self.skipped.clone()}
