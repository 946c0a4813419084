"""Validation loss: the mean loss over a fixed set of held-out batches, with the EMA weights and a fixed noise seed,
so successive evaluations are comparable and the training random streams are not touched."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Iterable

import torch
from torch import nn

from chunkpolicy.training.distributed import to_device
from chunkpolicy.training.ema import EMA

__all__ = ["validation_loss"]


@torch.no_grad()
def validation_loss(model: nn.Module, batches: Iterable[dict[str, Any]], ema: EMA | None, accelerator: Any, *,
                    seed: int) -> float:
    """Sample-weighted mean of ``model.compute_loss`` over ``batches`` (this process's share), reduced over the
    processes; the EMA weights swapped in when there is an EMA, the RNG forked and seeded with ``seed`` (per process),
    the model's train/eval mode restored."""
    m, dev = model, accelerator.device
    was = m.training
    m.eval()
    total = torch.zeros((), device=dev, dtype=torch.float64)
    count = torch.zeros((), device=dev, dtype=torch.float64)
    fork_devices = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with ema.apply_to(m) if ema is not None else nullcontext(), torch.random.fork_rng(devices=fork_devices):
        torch.manual_seed(seed)
        for batch in batches:
            with accelerator.autocast():
                loss = m.compute_loss(to_device(batch, dev))["loss"].double()
            n = len(batch["prompt"]) if "prompt" in batch else next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
            total += loss * n
            count += n
    m.train(was)
    total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum")
    return float(total / count)
