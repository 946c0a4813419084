"""Assemble a run from an :class:`~chunkpolicy.config.ExperimentConfig`: stores → episode split → chunk windows →
mixture; unified space + normalization stats; the policy (fresh, or from ``posttrain.init_from``); post-training mode;
then :class:`~chunkpolicy.training.trainer.Trainer`.

Normalization stats are computed exactly from what the training split yields (delta actions included), per
embodiment, pooled over every dataset of that embodiment. On ``--resume`` the space and stats come from the
checkpoint, so the resumed run normalizes exactly as before.

A head that must be fitted to data before training (``head.caps.needs_data_fit``, e.g. the FAST tokenizer's BPE) is
fitted here on normalized training chunks (:func:`head_fit_chunks`) when a run starts fresh; a resumed run takes the
fitted state from its checkpoint and a post-training run from ``posttrain.init_from``, never refitting it.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from chunkpolicy.atomic import atomic_file, read_json
from chunkpolicy.config import POSTTRAIN_MUTABLE, ExperimentConfig, ModelConfig, to_dict
from chunkpolicy.data.collate import collate_windows
from chunkpolicy.data.mixture import MixtureDataset, MixtureSampler
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


HEAD_FIT_WINDOWS = 4096  # at most this many training windows fit a head's data-dependent state (FAST's BPE)


def head_fit_chunks(policy: ChunkPolicy, train_set: MixtureDataset, max_windows: int = HEAD_FIT_WINDOWS,
                    seed: int = 0) -> tuple[list[np.ndarray], int]:
    """The chunks :meth:`~chunkpolicy.models.heads.base.ActionHead.fit_to_data` is fitted on, and how many windows
    they came from.

    Windows: every training window when there are at most ``max_windows``, else a draw of ``max_windows`` weighted
    like training (:class:`MixtureSampler` with ``seed``): deterministic either way. Each chunk is what training
    feeds the head: the window's actions as the dataset yields them (delta actions included), normalized by
    ``policy.normalizer`` in float32, its valid dims (``action_mask``) as ``[H, d]`` float64, padded steps holding
    the last real action (as the tokens head does before tokenizing)."""
    n = len(train_set)
    idx = list(range(n)) if n <= max_windows else list(MixtureSampler(train_set, num_samples=max_windows, seed=seed))
    chunks: list[np.ndarray] = []
    for start in range(0, len(idx), 256):
        items = [train_set[i] for i in idx[start : start + 256]]
        actions = torch.stack([it["actions"] for it in items]).to(policy.device).float()
        emb = torch.stack([torch.as_tensor(it["embodiment"]) for it in items]).long()
        with torch.no_grad():
            y = policy.normalizer.normalize("action", actions, emb.to(policy.device)).double().cpu().numpy()
        for it, yi in zip(items, y):
            chunk = yi[:, it["action_mask"].bool().numpy()]  # a copy: [H, d]
            real = ~it["action_is_pad"].bool().numpy()
            chunk[~real] = chunk[int(np.flatnonzero(real)[-1]) if real.any() else 0]  # hold the last real action
            chunks.append(chunk)
    return chunks, len(idx)


def _describe_fit(policy: ChunkPolicy) -> str:
    """Best effort, for the log: the fitted tokenizer's vocabulary (learned / requested)."""
    try:
        d = policy.head.tokenizer.to_dict()  # type: ignore[union-attr]
        return f"; {d['name']} tokenizer vocab {len(json.loads(d['bpe_json'])['model']['vocab'])} of {d['vocab_size']}"
    except Exception:
        return ""


def fit_head(policy: ChunkPolicy, train_set: MixtureDataset, *, resume_ckpt: Path | None = None,
             init_from: Path | None = None, seed: int = 0, max_windows: int = HEAD_FIT_WINDOWS,
             log: Callable[[str], None] = print) -> dict[str, Any] | None:
    """Give ``policy.head`` its data-fitted state before step 1 (see the module docstring): from ``resume_ckpt``'s
    ``head/`` files, from ``init_from`` (already in the policy: :func:`~chunkpolicy.training.finetune.rebase` copies
    it), or fitted now on :func:`head_fit_chunks`. Returns what happened (None for heads that need no fit)."""
    head, name = policy.head, policy.head.cfg.type
    if resume_ckpt is not None and (resume_ckpt / "head").is_dir():  # as ChunkPolicy.from_pretrained loads it
        head.load_state_files({p.name: p.read_text() for p in (resume_ckpt / "head").iterdir()})
    if not head.caps.needs_data_fit:
        return None
    if resume_ckpt is not None or init_from is not None:
        src = resume_ckpt if resume_ckpt is not None else init_from
        if not head.is_fitted():
            raise ValueError(f"{src}: the {name} head needs a data fit, but the checkpoint has no fitted state "
                             "(head/ files); its weights were not trained with one")
        log(f"{name} head: fitted state from {src}{_describe_fit(policy)}")
        return {"source": str(src)}
    t0 = time.perf_counter()
    n = min(len(train_set), max_windows)
    log(f"{name} head: fitting its data-dependent state on {n} of {len(train_set)} training windows ...")
    chunks, n_windows = head_fit_chunks(policy, train_set, max_windows, seed)
    head.fit_to_data(chunks)
    if not head.is_fitted():
        raise RuntimeError(f"the {name} head is still not fitted after fit_to_data")
    log(f"{name} head: fitted on {len(chunks)} normalized training chunks in {time.perf_counter() - t0:.1f}s"
        f"{_describe_fit(policy)}")
    return {"source": "fitted", "chunks": len(chunks), "windows": n_windows}


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
        if store.num_episodes == 0:
            raise ValueError(f"data.datasets.{i}.path: {store.path} has no episodes (an empty store cannot train; "
                             "collect or import episodes into it first, or remove it from data.datasets)")
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


def _trained_on(cfg: ExperimentConfig, stores: list[EpisodeStore], image_size: tuple[int, int],
                n_cameras: int) -> dict[str, Any]:
    """What the policy's inputs looked like in training (``trained_on`` in the checkpoint's ``config.json``): the frame
    size, the camera slots and, per embodiment, the cameras in slot order (left out for an embodiment whose datasets
    use different cameras)."""
    cams: dict[str, list[str] | None] = {}
    for ds, store in zip(cfg.data.datasets, stores):
        used = list(ds.cameras) if ds.cameras is not None else list(store.spec.cameras)
        name = store.spec.name
        cams[name] = used if cams.get(name, used) == used else None
    return {"image_size": [int(image_size[0]), int(image_size[1])], "n_cameras": int(n_cameras),
            "cameras": {k: v for k, v in cams.items() if v is not None}}


def prepare(cfg: ExperimentConfig, resume: bool = False, *, log: Callable[[str], None] = print) -> Prepared:
    """Everything the trainer needs (see the module docstring)."""
    from chunkpolicy.models.backbone_config import backbone_config
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
        space = UnifiedSpace.from_dict(read_json(resume_ckpt / "space.json"))
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
        stats = read_json(resume_ckpt / "normalizer.json")["stats"]
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
    policy.trained_on = _trained_on(cfg, stores, image_size, n_cams)  # saved in config.json; eval checks its inputs
    from chunkpolicy.models.tokenizer import check_prompts  # every task prompt fits (an error before step 1, never cut)
    check_prompts(policy.tokenizer, [t for s in stores for t in s.tasks], policy.config.max_prompt_tokens)
    # before apply_mode: LoRA's export copy must carry the fitted head state too
    head_fit = fit_head(policy, train_set, resume_ckpt=resume_ckpt, init_from=base_path, seed=seed, log=log)
    policy, export_fn, info = apply_mode(policy, cfg.posttrain, seed)
    if head_fit is not None:
        info["head_fit"] = head_fit
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


def run(cfg: ExperimentConfig, resume: bool = False, deadline_s: float | None = None) -> dict[str, Any]:
    """Train per ``cfg``; returns the trainer's summary. ``deadline_s``: wall seconds from now after which the run
    ends at its next step with a checkpoint there (``stopped: stop_after``; a later ``resume`` continues it), for
    sessions shorter than the run (the study runner's ``--session-minutes``)."""
    import threading

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
    timer = None
    if deadline_s is not None:
        timer = threading.Timer(max(0.0, deadline_s), lambda: setattr(trainer, "stop_after", 0))
        timer.daemon = True
        timer.start()
    try:
        summary = trainer.fit()
    finally:
        if timer is not None:
            timer.cancel()
    summary["data"] = prep.info
    if acc.is_main_process:
        with atomic_file(Path(cfg.train.output_dir, "summary.json")) as tmp:
            tmp.write_text(json.dumps(summary, indent=2))
    return summary
