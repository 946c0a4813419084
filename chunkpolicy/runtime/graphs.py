"""Whole-chunk CUDA graphs: the prefix encoding and every integration step replayed as one graph launch.

Eager PyTorch pays a Python + kernel-launch cost per op; a π0-size chunk is thousands of small kernels at batch 1, so
launch overhead, not FLOPs, dominates. :class:`CudaGraphPolicy` captures :meth:`ChunkPolicy.infer` (which has no host
syncs) once for a fixed observation shape; each call then copies the new inputs into the captured buffers and replays.
Works for heads whose sampling is sync-free (``flow_expert``, ``dit`` with ``objective="flow"``).

By default the graph runs fused-projection snapshots of the Gemma layers (:meth:`ChunkPolicy.fused_layers`): the graph
then reads copies of the weights, so after the policy's weights change call :meth:`CudaGraphPolicy.refresh_weights`.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Mapping

import torch

from chunkpolicy.models.policy import ChunkPolicy


def capture(fn: Callable[[], Any], warmup: int = 3) -> tuple[torch.cuda.CUDAGraph, Any]:
    """Run ``fn`` ``warmup`` times on a side stream (allocations, kernel selection, compilation), then capture one
    call; returns the graph and the call's (static) output. ``fn`` must read and write only tensors that outlive the
    graph and issue no host syncs."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


@contextlib.contextmanager
def compiled_methods(policy: ChunkPolicy, compiled: Mapping[str, Callable]) -> Iterator[None]:
    """Temporarily route ``backbone.embed_prefix`` / ``backbone.encode_prefix`` / ``head.velocity`` (keys
    ``"backbone.<name>"`` / ``"head.<name>"``) through compiled versions; the policy is left as it was."""
    targets = [(policy.backbone if k.startswith("backbone.") else policy.head, k.split(".", 1)[1], f) for k, f in compiled.items()]
    for obj, name, f in targets:
        setattr(obj, name, f)  # an instance attribute shadows the method
    try:
        yield
    finally:
        for obj, name, _ in targets:
            delattr(obj, name)


def compile_policy_methods(policy: ChunkPolicy, step_mode: str | None = None,
                           options: Mapping[str, Any] | None = None) -> dict[str, Callable]:
    """``torch.compile`` (Inductor, static shapes) of the per-chunk and per-step functions: fuses each layer's
    elementwise work (norms, RoPE, residuals, activations, softmax) into a few Triton kernels. ``step_mode``: Inductor
    mode for the per-step ``velocity`` only, e.g. ``"max-autotune-no-cudagraphs"`` (benchmarks Triton GEMM templates
    for the 50-row matmuls; minutes of compilation); ``options``: Inductor options for every function (e.g.
    ``{"combo_kernels": True}``: independent small kernels launched as one)."""
    kw = {"dynamic": False, **({"options": dict(options)} if options else {})}
    out = {"backbone.embed_prefix": torch.compile(policy.backbone.embed_prefix, **kw),
           "backbone.encode_prefix": torch.compile(policy.backbone.encode_prefix, **kw)}
    for name in policy.head.inference_methods:  # declared by the head (per-step velocity, per-chunk constants)
        fn = getattr(policy.head, name)
        if step_mode and name == "velocity":  # torch.compile takes a mode or options, not both
            out[f"head.{name}"] = torch.compile(fn, dynamic=False, mode=step_mode)
        else:
            out[f"head.{name}"] = torch.compile(fn, **kw)
    return out


def shape_key(batch: Mapping[str, Any]) -> tuple:
    """What a captured graph is specific to: the shapes and dtypes of a batch's tensors (prompts are tokenized to a
    fixed length, so any prompt fits a graph captured for the same shapes)."""
    return tuple((k, tuple(v.shape), str(v.dtype)) for k, v in sorted(batch.items()) if isinstance(v, torch.Tensor))


def load_inputs(policy: ChunkPolicy, observation: Mapping[str, Any], buffers: Mapping[str, torch.Tensor]) -> None:
    """Validate ``observation`` and copy its :meth:`ChunkPolicy.prepare_inputs` tensors into a graph's input
    ``buffers`` (same shapes as the observation the graph was captured with)."""
    for k, v in policy.prepare_inputs(observation, policy.validate(observation, training=False)).items():
        if v.shape != buffers[k].shape:
            raise ValueError(f"{k}: shape {tuple(v.shape)} differs from the captured {tuple(buffers[k].shape)}; capture a new graph")
        buffers[k].copy_(v)


class CudaGraphPolicy:
    """Callable like ``policy.predict_unified`` for observations shaped like ``example``; returns ``[B, H, D]``."""

    def __init__(self, policy: ChunkPolicy, example: Mapping[str, Any], num_steps: int | None = None, warmup: int = 3,
                 compile: bool | str = False, fuse: bool = True, compile_options: Mapping[str, Any] | None = None,
                 guidance: Any = None) -> None:
        """``compile=True`` first fuses the elementwise work of each layer with ``torch.compile`` (Inductor/Triton
        kernels, captured like any other kernel), which matters at batch 1 where thousands of tiny kernels dominate;
        a string is the Inductor mode for the per-step function, ``compile_options`` Inductor options
        (:func:`compile_policy_methods`).
        ``fuse=True`` runs fused-projection weight snapshots (see the module docstring).
        ``guidance``: a guidance hook captured with the graph (e.g. :class:`~chunkpolicy.runtime.rtc.RTCGuidance`,
        vector-Jacobian products included); it must read only tensors it updates in place between replays."""
        if policy.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the policy on a CUDA device, it is on {policy.device}")
        if not policy.head.caps.sync_free_sample:
            raise ValueError(f"CUDA graphs need a head whose sampling has no host syncs; {type(policy.head).__name__} "
                             "with this config has none (flow_expert, or dit with objective=flow)")
        self.policy, self.num_steps, self.guidance = policy.eval(), num_steps, guidance
        self.fused = policy.fused_layers() if fuse else None
        step_mode = compile if isinstance(compile, str) else None
        self.compiled = compile_policy_methods(policy, step_mode, compile_options) if compile else {}  # kept alive with the graph
        policy.validate(example, training=False)
        with torch.no_grad(), compiled_methods(policy, self.compiled):
            self.inputs = {k: v.clone() for k, v in policy.prepare_inputs(example).items()}
            B = self.inputs["embodiment"].shape[0]
            self.noise = torch.randn(B, policy.config.horizon, policy.space.dim, device=policy.device)  # fp32, as eager
            self.graph, self.out = capture(
                lambda: policy.infer(self.inputs, self.noise, num_steps, fused=self.fused, guidance=guidance), warmup)

    def refresh_weights(self) -> None:
        """Copy the policy's current weights into the fused snapshots the graph reads."""
        if self.fused is not None:
            bb = self.policy.backbone
            for key, modules in (("vision", bb.model.vision_tower.vision_model.encoder.layers), ("backbone", bb.layers),
                                 ("head", self.policy.head.layers if self.policy.head.caps.fused_layers else [])):
                for snap, layer in zip(self.fused.get(key, []), modules):
                    snap.refresh(layer)

    def load_inputs(self, observation: Mapping[str, Any]) -> None:
        load_inputs(self.policy, observation, self.inputs)

    @torch.no_grad()
    def __call__(self, observation: Mapping[str, Any], noise: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        self.load_inputs(observation)
        if noise is None:
            self.noise.normal_(generator=generator)
        else:
            self.noise.copy_(noise)
        self.graph.replay()
        return self.out.clone()
