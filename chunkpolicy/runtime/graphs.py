"""Whole-chunk CUDA graphs: the prefix encoding and every integration step replayed as one graph launch.

Eager PyTorch pays a Python + kernel-launch cost per op; a π0-size chunk is thousands of small kernels at batch 1, so
launch overhead, not FLOPs, dominates. :class:`CudaGraphPolicy` captures :meth:`ChunkPolicy.infer` (which has no host
syncs) once for a fixed observation shape; each call then copies the new inputs into the captured buffers and replays.
Works for heads whose sampling is sync-free (``flow_expert``, ``dit`` with ``objective="flow"``).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

from chunkpolicy.models.policy import ChunkPolicy


class CudaGraphPolicy:
    """Callable like ``policy.predict_unified`` for observations shaped like ``example``; returns ``[B, H, D]``."""

    def __init__(self, policy: ChunkPolicy, example: Mapping[str, Any], num_steps: int | None = None, warmup: int = 3,
                 compile: bool = False) -> None:
        """``compile=True`` first fuses the elementwise work of each layer with ``torch.compile`` (Inductor/Triton
        kernels, captured like any other kernel), which matters at batch 1 where thousands of tiny kernels dominate."""
        if policy.device.type != "cuda":
            raise ValueError(f"CUDA graphs need the policy on a CUDA device, it is on {policy.device}")
        self.policy, self.num_steps = policy.eval(), num_steps
        if compile:
            policy.head.velocity = torch.compile(policy.head.velocity, dynamic=False)
            policy.backbone.encode_prefix = torch.compile(policy.backbone.encode_prefix, dynamic=False)
            policy.backbone.embed_prefix = torch.compile(policy.backbone.embed_prefix, dynamic=False)
        policy.validate(example, training=False)
        with torch.no_grad():
            self.inputs = {k: v.clone() for k, v in policy.prepare_inputs(example).items()}
            B = self.inputs["embodiment"].shape[0]
            self.noise = torch.randn(B, policy.config.horizon, policy.space.dim, device=policy.device,
                                     dtype=policy.backbone.state_proj.weight.dtype)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(warmup):  # warm-up allocations and kernel selection outside the graph
                    policy.infer(self.inputs, self.noise, num_steps)
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.out = policy.infer(self.inputs, self.noise, num_steps)

    @torch.no_grad()
    def __call__(self, observation: Mapping[str, Any], noise: torch.Tensor | None = None,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        self.policy.validate(observation, training=False)
        new = self.policy.prepare_inputs(observation)
        for k, v in new.items():
            if v.shape != self.inputs[k].shape:
                raise ValueError(f"{k}: shape {tuple(v.shape)} differs from the captured {tuple(self.inputs[k].shape)}; capture a new graph")
            self.inputs[k].copy_(v)
        if noise is None:
            self.noise.normal_(generator=generator)
        else:
            self.noise.copy_(noise)
        self.graph.replay()
        return self.out.clone()
