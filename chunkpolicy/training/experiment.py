"""Assemble a run from an :class:`~chunkpolicy.config.ExperimentConfig`: stores → episode split → chunk windows →
mixture; unified space + normalization stats; the policy (fresh, or from ``posttrain.init_from``); post-training mode;
then :class:`~chunkpolicy.training.trainer.Trainer`.

Normalization stats are computed exactly from what the training split yields (delta actions included), per
embodiment, pooled over every dataset of that embodiment. On ``--resume`` the space and stats come from the
checkpoint, so the resumed run normalizes exactly as before.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from chunkpolicy.atomic import atomic_file
from chunkpolicy.config import POSTTRAIN_MUTABLE, ExperimentConfig, ModelConfig, to_dict
from chunkpolicy.data.collate import collate_windows
from chunkpolicy.data.mixture import MixtureDataset
from chunkpolicy.data.store import EpisodeStore
from chunkpolicy.data.windows import ChunkWindowDataset
from chunkpolicy.models.policy import ChunkPolicy, PolicyConfig
from chunkpolicy.normalize import compute_stats
from chunkpolicy.spaces import UnifiedSpace
from chunkpolicy.training.checkpoint import CheckpointManager


def split_episodes(n: int, val_fraction: float, seed: int, salt: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Episode-level split: ``(train, val)`` sorted episode indices. With ``val_fraction > 0`` and at least two
    episodes, at least one is held out and at least one is kept."""
    if n <= 0:
        raise ValueError("cannot split a store without episodes")
    n_val = int(round(n * val_fraction))
    if val_fraction > 0 and n >= 2:
        n_val = min(max(1, n_val), n - 1)
    else:
        n_val = 0
    perm = np.random.default_rng([seed, salt]).permutation(n)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


def embodiment_stats(datasets: list[ChunkWindowDataset]) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """``{embodiment: {"action": stats, "state": stats}}`` of everything the datasets yield, pooled per embodiment."""
    acts: dict[str, list[np.ndarray]] = {}
    states: dict[str, list[np.ndarray]] = {}
    for d in datasets:
        a, s = d.numeric_windows()
        acts.setdefault(d.spec.name, []).append(a)
        states.setdefault(d.spec.name, []).append(s)
    return {
        name: {"action": compute_stats(np.concatenate(acts[name]), field=f"{name}.action"),
               "state": compute_stats(np.concatenate(states[name]), field=f"{name}.state")}
        for name in acts
    }


@dataclass
class Prepared:
    policy: ChunkPolicy
    train_set: MixtureDataset
    val_set: MixtureDataset | None
    export_fn: Callable | None
    info: dict[str, Any] = field(default_factory=dict)


def _windows(cfg: ExperimentConfig, mcfg: PolicyConfig, space: UnifiedSpace, stores: list[EpisodeStore],
             image_size: tuple[int, int], n_cameras: int, split: int) -> tuple[list[ChunkWindowDataset], list[float]]:
    """Chunk windows of split 0 (train) or 1 (val) of every store that has episodes in it, and their weights."""
    out, weights = [], []
    for i, (ds, store) in enumerate(zip(cfg.data.datasets, stores)):
        eps = split_episodes(store.num_episodes, cfg.data.val_fraction, cfg.data.split_seed, salt=i)[split]
        if len(eps) == 0:
            continue
        out.append(ChunkWindowDataset(
            store, space, horizon=mcfg.horizon, n_obs_steps=mcfg.n_obs_steps,
            cameras=list(ds.cameras) if ds.cameras is not None else None, n_cameras=n_cameras,
            image_size=image_size, delta_actions=mcfg.delta_actions, episodes=eps,
        ))
        weights.append(ds.weight)
    return out, weights


def prepare(cfg: ExperimentConfig, resume: bool = False, *, log: Callable[[str], None] = print) -> Prepared:
    """Everything the trainer needs (see the module docstring)."""
    from chunkpolicy.models.backbone import backbone_config
    from chunkpolicy.training.finetune import apply_mode, extend_space, load_base, merge_stats, rebase

    seed = cfg.train.seed
    stores = [EpisodeStore.open(ds.path) for ds in cfg.data.datasets]
    specs = [s.spec for s in stores]
    resume_ckpt = CheckpointManager(cfg.train.output_dir).latest() if resume else None
    base, base_path = (load_base(cfg.posttrain.init_from) if cfg.posttrain.init_from else (None, None))
    if base is not None:
        mcfg = base.config
        changes = {k: getattr(cfg.model, k) for k in POSTTRAIN_MUTABLE if getattr(cfg.model, k) != getattr(ModelConfig(), k)}
        mcfg_eff = PolicyConfig(**{**mcfg.__dict__, **changes})
        space, added = extend_space(base.space, specs)
    else:
        mcfg_eff = cfg.model.policy_config()
        changes, added = {}, []
        space = UnifiedSpace(cfg.model.unified_dim, cfg.model.layout)
        for spec in specs:
            space.register(spec)
    if resume_ckpt is not None:  # same space and normalization as the run being resumed
        space = UnifiedSpace.from_dict(json.loads((resume_ckpt / "space.json").read_text()))
        for spec in specs:
            if spec.name not in [s.name for s in space.embodiments]:
                raise ValueError(f"{resume_ckpt}: resumed space has no embodiment {spec.name!r} (were datasets added?)")
    bb = backbone_config(mcfg_eff.backbone, **mcfg_eff.backbone_overrides)
    image_size = tuple(cfg.data.image_size) if cfg.data.image_size is not None else (bb.image_size, bb.image_size)
    n_cams = cfg.data.n_cameras or max(len(ds.cameras) if ds.cameras is not None else len(s.spec.cameras)
                                        for ds, s in zip(cfg.data.datasets, stores))
    train_w, train_p = _windows(cfg, mcfg_eff, space, stores, image_size, n_cams, 0)  # type: ignore[arg-type]
    val_w, val_p = _windows(cfg, mcfg_eff, space, stores, image_size, n_cams, 1)  # type: ignore[arg-type]
    train_set = MixtureDataset(train_w, weights=train_p, alpha=cfg.data.alpha)
    val_set = MixtureDataset(val_w, weights=val_p, alpha=cfg.data.alpha) if val_w else None

    if resume_ckpt is not None:
        stats = json.loads((resume_ckpt / "normalizer.json").read_text())["stats"]
    else:
        new_stats = embodiment_stats(train_w)
        stats = merge_stats(base.normalizer.to_dict()["stats"], new_stats, cfg.posttrain.recompute_stats) if base is not None else new_stats

    torch.manual_seed(seed)
    if base is not None:
        policy = rebase(base, space, stats, **changes)
        del base
    else:
        policy = ChunkPolicy(mcfg_eff, space, stats)
        if cfg.model.pretrained_backbone:
            policy.backbone.load_pretrained_weights(cfg.model.pretrained_backbone)
    policy, export_fn, info = apply_mode(policy, cfg.posttrain, seed)
    info.update({
        "init_from": str(base_path) if base_path else None, "added_embodiments": added,
        "embodiments": [s.name for s in space.embodiments], "train_windows": len(train_set),
        "val_windows": len(val_set) if val_set is not None else 0, "image_size": list(image_size), "n_cameras": n_cams,
        "mixture_probs": [float(p) for p in train_set.probs],
    })
    log(f"data: {len(stores)} store(s), {len(train_set)} train / {info['val_windows']} val windows; "
        f"embodiments {info['embodiments']}" + (f" (new: {added})" if added else "")
        + f"; mixture p = {[round(p, 3) for p in info['mixture_probs']]}")
    if base_path:
        log(f"post-training from {base_path} (mode {cfg.posttrain.mode})")
    return Prepared(policy, train_set, val_set, export_fn, info)


def run(cfg: ExperimentConfig, resume: bool = False) -> dict[str, Any]:
    """Train per ``cfg``; returns the trainer's summary."""
    from chunkpolicy.training.distributed import make_accelerator
    from chunkpolicy.training.trainer import Trainer

    latest = CheckpointManager(cfg.train.output_dir).latest()
    if latest is not None and not resume:  # checked before any data is read or model built
        raise FileExistsError(f"{cfg.train.output_dir} already has checkpoints (latest {latest.name}); pass --resume "
                              "to continue that run, or set train.output_dir to a new directory")
    acc = make_accelerator(cfg.train)
    log = print if acc.is_main_process else (lambda *_: None)
    prep = prepare(cfg, resume, log=log)
    trainer = Trainer(
        prep.policy, prep.train_set, prep.val_set, cfg.train, resume=resume, accelerator=acc,
        export_fn=prep.export_fn, config_dict=to_dict(cfg), data_num_workers=cfg.data.num_workers,
        collate_fn=collate_windows,
    )
    summary = trainer.fit()
    summary["data"] = prep.info
    if acc.is_main_process:
        with atomic_file(Path(cfg.train.output_dir, "summary.json")) as tmp:
            tmp.write_text(json.dumps(summary, indent=2))
    return summary
