"""Training checkpoints: atomic, keep-last-N, latest found by scanning, no pickles.

Layout of ``RUN/checkpoints/step_000100/``::

    config.json model.safetensors normalizer.json space.json tokenizer/   the policy (``save_pretrained``): EMA weights
                                                                         when EMA is on, LoRA merged — what eval loads
    training_state/
        state.json               step, epoch, position in the epoch, samples seen, sampler, scheduler, EMA counter,
                                 optimizer hyper-parameters, world size, format version
        trainable.safetensors    the raw trained parameters (names of the model being optimized, adapters included)
        optimizer.safetensors    AdamW moments and step counts
        ema.safetensors          EMA shadow of the trainable parameters (when EMA is on)
        rng_rank{r}.safetensors  torch CPU/CUDA generator states; python and numpy states in its metadata
        sharded/                 FSDP runs only, instead of the three tensor files above: a torch.distributed.checkpoint
                                 directory (each process's shards, .metadata); state.json then has extra.sharded = true

The policy files are what the trainer's ``export_fn`` writes (:func:`default_export` for a model without
``save_pretrained``); ``training_state/`` is filled by :mod:`chunkpolicy.training.train_state`.

A checkpoint is written into ``checkpoints/.step_000100.tmp`` and renamed into place, so every ``step_*``
directory is complete; temp directories left by a killed run are removed on the next start.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from chunkpolicy.atomic import atomic_file, read_json

STATE_DIR = "training_state"
STATE_FORMAT_VERSION = 1


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for f in files:
            try:
                fd = os.open(os.path.join(root, f), os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            except OSError:
                pass


class CheckpointManager:
    """Owns ``run_dir/checkpoints``: temp dirs, atomic commit, pruning to the last ``keep_last``, latest lookup."""

    def __init__(self, run_dir: str | os.PathLike, keep_last: int = 3) -> None:
        if keep_last < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep_last}")
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = int(keep_last)

    def checkpoints(self) -> list[tuple[int, Path]]:
        """Complete checkpoints, oldest first."""
        if not self.dir.is_dir():
            return []
        out = []
        for p in self.dir.iterdir():
            if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit() and (p / STATE_DIR / "state.json").is_file():
                out.append((int(p.name[5:]), p))
        return sorted(out)

    def latest(self) -> Path | None:
        cks = self.checkpoints()
        return cks[-1][1] if cks else None

    def temp_dir(self, step: int) -> Path:
        """Where to write checkpoint ``step`` before :meth:`commit` (does not exist yet)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{step_dir_name(step)}.tmp"  # same name on every process of a distributed run
        if tmp.exists():
            shutil.rmtree(tmp)
        return tmp

    def commit(self, step: int, tmp: Path) -> Path:
        """Atomically move a fully written ``tmp`` to ``step_XXXXXX`` (replacing one of the same step), then prune."""
        _fsync_tree(tmp)
        final = self.dir / step_dir_name(step)
        if final.exists():
            old = self.dir / f".{final.name}.old-{os.getpid()}"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        try:
            fd = os.open(self.dir, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
        except OSError:
            pass
        self.prune()
        return final

    def prune(self) -> None:
        cks = self.checkpoints()
        for _, p in cks[: max(0, len(cks) - self.keep_last)]:
            shutil.rmtree(p, ignore_errors=True)

    def cleanup_temp(self) -> None:
        """Remove temp dirs that an interrupted save left behind (every hidden entry of ``checkpoints/``)."""
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                if p.name.startswith("."):
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def default_export(model: torch.nn.Module, path: Path) -> None:
    """The policy part of a checkpoint: ``model.save_pretrained(path)`` if it has one, else its state dict as
    ``path/model.safetensors``."""
    if hasattr(model, "save_pretrained"):
        model.save_pretrained(path)
        return
    path.mkdir(parents=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))


# -- RNG ---------------------------------------------------------------------------------------------------------
def capture_rng() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata strings) of the python, numpy, torch CPU and CUDA generators of this process."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda_{i}"] = s
    py = random.getstate()
    npst = np.random.get_state()
    meta = {
        "python": json.dumps([py[0], list(py[1]), py[2]]),
        "numpy": json.dumps([npst[0], np.asarray(npst[1]).tolist(), int(npst[2]), int(npst[3]), float(npst[4])]),
    }
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted((int(k[5:]), v) for k, v in tensors.items() if k.startswith("cuda_"))
    if cuda and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            raise ValueError(f"checkpoint has {len(cuda)} CUDA generator states, this machine has {torch.cuda.device_count()} GPUs")
        torch.cuda.set_rng_state_all([v for _, v in cuda])
    v, st, g = json.loads(meta["python"])
    random.setstate((v, tuple(st), g))
    name, keys, pos, has_gauss, cached = json.loads(meta["numpy"])
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_rng(state_dir: Path, rank: int) -> None:
    tensors, meta = capture_rng()
    state_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(state_dir / f"rng_rank{rank}.safetensors"), metadata=meta)


def load_rng(state_dir: Path, rank: int) -> None:
    from safetensors import safe_open

    path = state_dir / f"rng_rank{rank}.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no RNG state for process {rank} (was the run saved with fewer processes?)")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    restore_rng(tensors, meta)


# -- state files -------------------------------------------------------------------------------------------------
@dataclass
class TrainingState:
    step: int
    epoch: int
    position: int  # micro-batches of the current epoch already consumed
    samples_seen: int
    world_size: int
    scheduler: dict[str, Any]
    ema_updates: int = 0
    elapsed_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def write_training_state(
    state_dir: Path,
    state: TrainingState,
    trainable: dict[str, torch.Tensor] | None,
    optimizer_tensors: dict[str, torch.Tensor] | None,
    optimizer_meta: str | None,
    ema: dict[str, torch.Tensor] | None,
) -> None:
    """``state.json`` and the tensor files; ``trainable`` / ``optimizer_tensors`` None: only ``state.json`` (an FSDP
    run's tensors are in ``sharded/``, written by every process before this)."""
    state_dir.mkdir(parents=True, exist_ok=True)
    if trainable is not None:
        save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(state_dir / "trainable.safetensors"))
    if optimizer_tensors is not None:
        save_file(optimizer_tensors, str(state_dir / "optimizer.safetensors"), metadata={"meta": optimizer_meta or ""})
    if ema is not None:
        save_file(ema, str(state_dir / "ema.safetensors"))
    doc = {"format_version": STATE_FORMAT_VERSION, **state.__dict__}
    with atomic_file(state_dir / "state.json") as tmp:  # written last: its presence marks a complete state
        tmp.write_text(json.dumps(doc, indent=2))


def read_state_json(ckpt: Path) -> TrainingState:
    """``training_state/state.json`` of checkpoint ``ckpt`` (checked format version)."""
    sd = Path(ckpt) / STATE_DIR
    if not (sd / "state.json").is_file():
        raise FileNotFoundError(f"{ckpt}: no {STATE_DIR}/state.json (not a training checkpoint)")
    doc = read_json(sd / "state.json")
    if doc.pop("format_version", None) != STATE_FORMAT_VERSION:
        raise ValueError(f"{ckpt}: training state format is not {STATE_FORMAT_VERSION}")
    return TrainingState(**doc)


def read_training_state(ckpt: Path) -> tuple[TrainingState, dict[str, torch.Tensor], dict[str, torch.Tensor], str, dict[str, torch.Tensor] | None]:
    from safetensors import safe_open

    sd = Path(ckpt) / STATE_DIR
    state = read_state_json(ckpt)
    if state.extra.get("sharded"):
        raise ValueError(f"{ckpt}: its training state is sharded (FSDP); resume it with train.distributed=fsdp")
    trainable = load_file(str(sd / "trainable.safetensors"))
    with safe_open(str(sd / "optimizer.safetensors"), framework="pt") as f:
        meta = f.metadata()["meta"]
        opt = {k: f.get_tensor(k) for k in f.keys()}
    ema = load_file(str(sd / "ema.safetensors")) if (sd / "ema.safetensors").is_file() else None
    return state, trainable, opt, meta, ema
