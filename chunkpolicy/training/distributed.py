"""Process-level plumbing shared by the trainer and the throughput benchmark: the accelerator, the loss wrapper that
DDP and autocast wrap, per-rank slices of the global batch, and DDP's unused-parameter probe."""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import torch
from torch import nn


class LossModule(nn.Module):
    """``forward(batch) = model.compute_loss(batch)``, so DDP and autocast wrap the call that computes the loss."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: Mapping[str, Any], host_ids: Any = None) -> dict[str, torch.Tensor]:
        """``host_ids``: the batch was checked on the host (``ChunkPolicy.validate``'s return value)."""
        return self.model.compute_loss(batch) if host_ids is None else self.model.compute_loss(batch, host_ids=host_ids)


class ShardedBatchSampler(torch.utils.data.Sampler[list[int]]):
    """Cuts the sampler's index stream into global batches of ``batch_size · num_replicas``; yields this rank's part.
    An incomplete last global batch is dropped."""

    def __init__(self, sampler: torch.utils.data.Sampler[int], batch_size: int, num_replicas: int = 1, rank: int = 0) -> None:
        self.sampler, self.batch_size, self.num_replicas, self.rank = sampler, int(batch_size), int(num_replicas), int(rank)

    def __iter__(self) -> Iterator[list[int]]:
        g = self.batch_size * self.num_replicas
        buf: list[int] = []
        for i in self.sampler:
            buf.append(i)
            if len(buf) == g:
                yield buf[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
                buf = []

    def __len__(self) -> int:
        return len(self.sampler) // (self.batch_size * self.num_replicas)  # type: ignore[arg-type]


def make_accelerator(cfg: Any):
    """``Accelerator`` for a :class:`~chunkpolicy.config.TrainConfig`."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    ddp: dict[str, Any] = {"find_unused_parameters": bool(cfg.find_unused_parameters)}
    if getattr(cfg, "ddp_bucket_cap_mb", None) is not None:  # None keeps torch's default
        ddp["bucket_cap_mb"] = int(cfg.ddp_bucket_cap_mb) if float(cfg.ddp_bucket_cap_mb).is_integer() \
            else float(cfg.ddp_bucket_cap_mb)
    if getattr(cfg, "ddp_static_graph", False):
        ddp["static_graph"] = True
    if getattr(cfg, "ddp_gradient_as_bucket_view", False):
        ddp["gradient_as_bucket_view"] = True
    return Accelerator(
        mixed_precision=cfg.mixed_precision, gradient_accumulation_steps=cfg.grad_accum, cpu=cfg.cpu,
        kwargs_handlers=[DistributedDataParallelKwargs(**ddp)], step_scheduler_with_optimizer=False,
    )


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def unused_parameters(model: nn.Module, batch: Mapping[str, Any], accelerator: Any) -> list[str]:
    """Trainable parameters that get no gradient from ``model.compute_loss(batch)`` (e.g. the last backbone layer's
    MLP when the head reads only the prefix keys/values); DDP needs ``find_unused_parameters`` for those.
    Leaves the RNG state and the gradients as they were."""
    dev = accelerator.device
    devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), accelerator.autocast():
        model.compute_loss(batch)["loss"].backward()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    unused = [name for name, p in params.items() if p.grad is None]
    for p in params.values():
        p.grad = None
    return unused
