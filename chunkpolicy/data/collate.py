"""Batch collation for chunk windows: every tensor of a batch in one shared-memory block.

PyTorch's ``default_collate`` gives each key of a batch its own storage. In a DataLoader worker each storage is a
separate shared-memory segment that the worker creates and fills and the main process maps and later frees: with the
ten tensors of the batch schema that is ten segments per batch, and on a small machine those system calls and page
faults cost more than reading the frames (``benchmarks/data_loading.py``, its ``ceiling`` rows). :func:`collate_windows`
stacks the same tensors into views of **one** block, so a batch crosses the process boundary as one segment. The
tensors it returns are ordinary (views with the stacked shapes and dtypes); values equal ``default_collate``'s. One
difference: any one of them kept alone keeps the whole block (the images too) alive; ``.clone()`` what you keep.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch
from torch.utils.data import default_collate, get_worker_info

_ALIGN = 64  # bytes: every view starts on a cache line, so any dtype can view its slice


def collate_windows(samples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``[sample, ...]`` → batch dict: tensors stacked to ``[B, ...]`` as views of one (shared-memory, inside a
    DataLoader worker) block; other values (prompt strings, numbers) as ``default_collate`` does them."""
    if not samples:
        raise ValueError("collate_windows: empty list of samples")
    first = samples[0]
    if not isinstance(first, Mapping):
        raise TypeError(f"collate_windows: samples must be mappings (the batch schema), got {type(first).__name__}")
    keys = list(first)
    for i, s in enumerate(samples):
        if list(s) != keys:
            raise ValueError(f"collate_windows: sample {i} has keys {sorted(s)}, sample 0 has {sorted(keys)}")
    tensor_keys = [k for k in keys if isinstance(first[k], torch.Tensor)]
    layout: dict[str, tuple[int, int]] = {}
    total = 0
    for k in tensor_keys:
        ref = first[k]
        for i, s in enumerate(samples):
            v = s[k]
            if not isinstance(v, torch.Tensor) or v.shape != ref.shape or v.dtype != ref.dtype:
                got = f"{tuple(v.shape)} {v.dtype}" if isinstance(v, torch.Tensor) else type(v).__name__
                raise ValueError(f"{k}: sample {i} is {got}, sample 0 is {tuple(ref.shape)} {ref.dtype}; "
                                 "samples of one batch must share shapes (set data.n_cameras / data.image_size)")
        total = -(-total // _ALIGN) * _ALIGN
        layout[k] = (total, len(samples) * math.prod(ref.shape) * ref.element_size())
        total += layout[k][1]
    if get_worker_info() is not None:  # allocate in shared memory directly, as default_collate does in a worker
        block = torch.empty(0, dtype=torch.uint8).set_(torch.UntypedStorage._new_shared(max(total, 1)))
    else:
        block = torch.empty(max(total, 1), dtype=torch.uint8)
    out: dict[str, Any] = {}
    for k in keys:
        if k in layout:
            off, n = layout[k]
            ref = first[k]
            view = block[off : off + n].view(ref.dtype).view(len(samples), *ref.shape)
            torch.stack([s[k] for s in samples], out=view)
            out[k] = view
        else:
            out[k] = default_collate([s[k] for s in samples])
    return out
