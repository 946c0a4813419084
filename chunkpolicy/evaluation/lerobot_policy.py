"""Run a LeRobot policy checkpoint (``lerobot`` 0.6.1: ``diffusion``, ``act``, ...) in chunkpolicy's closed-loop harness.

    chunkpolicy eval --lerobot-policy runs/lr_act/checkpoints/last/pretrained_model --env metaworld --tasks MT10 \\
        --episodes 50 --executor native --out runs/eval_act

Same seeds, episode limits, executors, results JSON / markdown / plot / videos as ``--checkpoint``: only the
``predict_fn`` differs (:func:`lerobot_predict_fn`).

**Checkpoint.** ``--lerobot-policy`` takes a ``save_pretrained`` directory of a LeRobot policy (``config.json``,
``model.safetensors``, ``policy_preprocessor.json``, ``policy_postprocessor.json`` and their state files), a LeRobot
training checkpoint ``OUTPUT_DIR/checkpoints/<step>`` (its ``pretrained_model/``) or a LeRobot training run
``OUTPUT_DIR`` (``checkpoints/last``, else the highest step). The pre- and post-processors saved with the policy do the
normalization, exactly as LeRobot's own ``lerobot-eval`` does; nothing is re-derived here. Local files only.

**Observations.** An env observation ``{"images": {cam: uint8 [h, w, 3]}, "state": float32 [S]}`` becomes the LeRobot
batch ``observation.state`` float32 ``[B, S]`` and ``observation.images.<cam>`` float32 ``[B, 3, h, w]`` in [0, 1]
(``[B, T, ...]`` with ``T = n_obs_steps > 1``: the last ``T`` ticks, oldest first, the first tick repeated at the start
of an episode, as LeRobot's own observation queue does), plus ``task`` (the env's prompt per env). The env renders
exactly the cameras the policy's ``observation.images.*`` features name, at their size. A policy input feature the
adapter has no source for (``observation.environment_state``, language tokens, ...), a state or action size that
differs from the env's embodiment, an unknown camera, or an image size other than the policy's is one ``ValueError``
naming the feature (and the file it came from) before any rollout. When the checkpoint's ``train_config.json`` points
at a local LeRobotDataset, its ``action`` / ``observation.state`` dim names must also equal the env's.

**Actions.** ``policy.predict_action_chunk`` (normalized) → the post-processor (robot units, CPU) → ``[B, H, A]`` in
the env's action order. ``H`` is what the policy returns for one call: ``chunk_size`` for ACT, ``n_action_steps`` for
diffusion (LeRobot's diffusion policy already cuts its ``horizon`` to the ``n_action_steps`` after the current
observation).

**Executors.** LeRobot policies queue actions inside ``select_action``; here the chunk goes to chunkpolicy's executors
instead, so every executor is run by the same code for every method:

* ``native`` = what LeRobot's ``select_action`` does with this checkpoint's config: ``temporal_ensemble:<coeff>`` when
  ACT's ``temporal_ensemble_coeff`` is set (same weights ``exp(-coeff·i)``, ``i = 0`` the oldest chunk), else
  ``open_loop:<n_action_steps>`` (a chunk every ``n_action_steps`` ticks, observation history kept every tick).
* ``open_loop:k`` (``k ≤ H``) and ``temporal_ensemble:m``: as for chunkpolicy checkpoints.
* ``rtc`` needs a flow velocity to guide: refused at start-up for LeRobot policies (their
  :data:`LEROBOT_CAPS` declare none).

Noise: each chunk runs under a torch seed drawn from a generator seeded with the batch's first episode seed, so a
batch's episodes are the same wherever it runs (as for chunkpolicy checkpoints).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from chunkpolicy.evaluation.predictors import observation_history
from chunkpolicy.models.heads.base import HeadCapabilities
from chunkpolicy.sim.base import Obs
from chunkpolicy.spaces import EmbodimentSpec

__all__ = ["LEROBOT_CAPS", "LeRobotPolicyInfo", "resolve_lerobot_checkpoint", "inspect_lerobot_policy",
           "native_executor", "LeRobotRunner", "load_lerobot_policy", "lerobot_predict_fn", "observation_batch"]

IMAGE_PREFIX = "observation.images."
STATE_KEY = "observation.state"
ACTION_KEY = "action"
REQUIRED_FILES = ("config.json", "model.safetensors", "policy_preprocessor.json", "policy_postprocessor.json")
# what a LeRobot policy can drive: chunks only (no flow velocity for RTC guidance, no CUDA-graph capture here)
LEROBOT_CAPS = HeadCapabilities(velocity=False, sync_free_sample=False, may_fail=False)


def _is_policy_dir(p: Path) -> bool:
    return (p / "config.json").is_file() and (p / "model.safetensors").is_file()


def resolve_lerobot_checkpoint(path: str | os.PathLike) -> Path:
    """The ``pretrained_model``-style directory for ``path`` (see the module docstring); ``FileNotFoundError`` naming
    what is missing."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"--lerobot-policy: {p} does not exist")
    candidates = [p, p / "pretrained_model"]
    ck = p / "checkpoints"
    if ck.is_dir():
        steps = sorted((c for c in ck.iterdir() if c.is_dir() and c.name.isdigit()), key=lambda c: int(c.name))
        candidates += [ck / "last" / "pretrained_model"] + [s / "pretrained_model" for s in reversed(steps)]
    for c in candidates:
        if _is_policy_dir(c):
            missing = [f for f in REQUIRED_FILES if not (c / f).is_file()]
            if missing:
                raise FileNotFoundError(f"--lerobot-policy: {c} lacks {missing} (a LeRobot policy saved with "
                                        "policy.save_pretrained + preprocessor/postprocessor.save_pretrained has them)")
            return c
    raise FileNotFoundError(f"--lerobot-policy: {p} is not a LeRobot policy directory (config.json + model.safetensors), "
                            "nor a LeRobot checkpoint (pretrained_model/) or training run (checkpoints/<step>/)")


@dataclass(frozen=True)
class LeRobotPolicyInfo:
    """What ``config.json`` of a LeRobot policy says about its inputs and outputs (read without loading weights).

    ``cameras``: camera names in the order of the policy's ``observation.images.*`` features; ``image_size``:
    ``(h, w)`` of those features; ``chunk_len``: actions one ``predict_action_chunk`` call returns (None when the
    policy type is not known here: checked on the first chunk)."""

    path: str
    type: str
    cameras: tuple[str, ...]
    image_size: tuple[int, int] | None
    state_dim: int
    action_dim: int
    n_obs_steps: int
    n_action_steps: int
    chunk_len: int | None
    temporal_ensemble_coeff: float | None = None
    dim_names: dict[str, list[str]] = field(default_factory=dict)  # from the training dataset's meta/info.json
    dim_names_source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()}


def _feature_shape(feats: dict, key: str, cfg_path: Path) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in feats[key]["shape"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"{cfg_path}: feature {key!r} has no valid 'shape'") from None


def _dataset_dim_names(ckpt: Path) -> tuple[dict[str, list[str]], str | None]:
    """``{"action": names, "observation.state": names}`` from the local dataset the checkpoint was trained on (its
    ``train_config.json`` ``dataset.root``), when both files are there; else ``({}, None)``."""
    tc = ckpt / "train_config.json"
    if not tc.is_file():
        return {}, None
    try:
        root = (json.loads(tc.read_text()).get("dataset") or {}).get("root")
    except ValueError as e:
        raise ValueError(f"{tc}: invalid JSON ({e})") from None
    info = Path(root) / "meta" / "info.json" if root else None
    if info is None or not info.is_file():
        return {}, None
    try:
        feats = json.loads(info.read_text())["features"]
    except (ValueError, KeyError) as e:
        raise ValueError(f"{info}: unreadable LeRobotDataset metadata ({e!r})") from None
    out = {}
    for key in (ACTION_KEY, STATE_KEY):
        names = (feats.get(key) or {}).get("names")
        if isinstance(names, dict) and len(names) == 1:
            names = next(iter(names.values()))
        if isinstance(names, list):
            out[key] = [str(n) for n in names]
    return out, str(info)


def inspect_lerobot_policy(path: str | os.PathLike) -> LeRobotPolicyInfo:
    """Read a LeRobot policy's ``config.json`` (no lerobot import, no weights); ``ValueError`` naming the field for
    inputs the adapter cannot feed."""
    ckpt = resolve_lerobot_checkpoint(path)
    cfg_path = ckpt / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except ValueError as e:
        raise ValueError(f"{cfg_path}: invalid JSON ({e})") from None
    for k in ("type", "input_features", "output_features"):
        if k not in cfg:
            raise ValueError(f"{cfg_path}: field {k!r} is missing (not a LeRobot policy config)")
    ins, outs = cfg["input_features"] or {}, cfg["output_features"] or {}
    unknown = [k for k in ins if k != STATE_KEY and not k.startswith(IMAGE_PREFIX)]
    if unknown:
        raise ValueError(f"{cfg_path}: input_features {unknown} have no source in chunkpolicy env observations (the "
                         f"adapter feeds {STATE_KEY!r} and {IMAGE_PREFIX}<camera>)")
    if STATE_KEY not in ins:
        raise ValueError(f"{cfg_path}: input_features has no {STATE_KEY!r} (the adapter needs the robot state input)")
    if ACTION_KEY not in outs:
        raise ValueError(f"{cfg_path}: output_features has no {ACTION_KEY!r}")
    (state_dim,) = _feature_shape(ins, STATE_KEY, cfg_path)[-1:]
    (action_dim,) = _feature_shape(outs, ACTION_KEY, cfg_path)[-1:]
    cams, sizes = [], set()
    for k in ins:
        if k.startswith(IMAGE_PREFIX):
            shape = _feature_shape(ins, k, cfg_path)
            if len(shape) != 3 or shape[0] != 3:
                raise ValueError(f"{cfg_path}: input feature {k!r}: expected shape [3, h, w], got {list(shape)}")
            cams.append(k[len(IMAGE_PREFIX):])
            sizes.add(shape[1:])
    if len(sizes) > 1:
        raise ValueError(f"{cfg_path}: image features have different sizes {sorted(sizes)}; chunkpolicy envs render every "
                         "camera at one size")
    n_obs = int(cfg.get("n_obs_steps", 1))
    n_act = int(cfg.get("n_action_steps", 1))
    chunk = {"act": cfg.get("chunk_size"), "diffusion": n_act}.get(cfg["type"])
    names, src = _dataset_dim_names(ckpt)
    te = cfg.get("temporal_ensemble_coeff")
    return LeRobotPolicyInfo(
        path=str(ckpt), type=str(cfg["type"]), cameras=tuple(cams), image_size=sizes.pop() if sizes else None,
        state_dim=int(state_dim), action_dim=int(action_dim), n_obs_steps=n_obs, n_action_steps=n_act,
        chunk_len=None if chunk is None else int(chunk), temporal_ensemble_coeff=None if te is None else float(te),
        dim_names=names, dim_names_source=src,
    )


def native_executor(info: LeRobotPolicyInfo) -> str:
    """The executor spec equivalent to LeRobot's own ``select_action`` for this policy (see the module docstring)."""
    if info.temporal_ensemble_coeff is not None:
        return f"temporal_ensemble:{info.temporal_ensemble_coeff:g}"
    return f"open_loop:{info.n_action_steps}"


def check_env(info: LeRobotPolicyInfo, env_name: str, env_kwargs: dict[str, Any]) -> EmbodimentSpec:
    """The env's spec with the policy's cameras; ``ValueError`` naming the field when the env cannot feed the policy
    or take its actions (state / action sizes, dim names, cameras, image size)."""
    from chunkpolicy.sim.base import env_spec

    cfg = Path(info.path) / "config.json"
    if not info.cameras:
        raise ValueError(f"{cfg}: the policy has no {IMAGE_PREFIX}* input; chunkpolicy envs always render cameras, and "
                         "state-only LeRobot policies are not supported by this adapter")
    try:
        spec = env_spec(env_name, cameras=info.cameras)
    except ValueError as e:
        raise ValueError(f"{cfg}: input features {[IMAGE_PREFIX + c for c in info.cameras]} name cameras env "
                         f"{env_name!r} does not have: {e}") from None
    if info.state_dim != spec.state_dim:
        raise ValueError(f"{cfg}: input feature {STATE_KEY!r} has {info.state_dim} dims, env {env_name!r} "
                         f"({spec.name}) has state {list(spec.state_names)} ({spec.state_dim})")
    if info.action_dim != spec.action_dim:
        raise ValueError(f"{cfg}: output feature {ACTION_KEY!r} has {info.action_dim} dims, env {env_name!r} "
                         f"({spec.name}) takes actions {list(spec.action_names)} ({spec.action_dim})")
    for key, want in ((ACTION_KEY, spec.action_names), (STATE_KEY, spec.state_names)):
        got = info.dim_names.get(key)
        if got is not None and list(got) != list(want):
            raise ValueError(f"{info.dim_names_source}: feature {key!r} names {got}, env {env_name!r} ({spec.name}) "
                             f"has {list(want)}")
    hw = env_kwargs.get("image_size")
    if hw is not None and info.image_size is not None and tuple(hw) != tuple(info.image_size):
        raise ValueError(f"image_size: env {env_name!r} would render {hw[0]}x{hw[1]} frames, but the policy's "
                         f"{IMAGE_PREFIX}* features are {info.image_size[0]}x{info.image_size[1]} ({cfg}); leave "
                         "--image-size out to use the policy's")
    return spec


# -- the loaded policy ---------------------------------------------------------------------------------------------
@dataclass
class LeRobotRunner:
    """A loaded LeRobot policy with its pre/post-processors, on ``device``."""

    info: LeRobotPolicyInfo
    policy: Any
    preprocessor: Any
    postprocessor: Any
    device: torch.device

    @torch.no_grad()
    def predict_chunk(self, batch: dict[str, Any]) -> torch.Tensor:
        """LeRobot batch (:func:`observation_batch`) → float32 ``[B, H, A]`` in robot units, on the CPU."""
        x = self.preprocessor(batch)
        self.policy.reset()  # empty LeRobot's own queues: predict_action_chunk must use this batch, not queued frames
        y = self.policy.predict_action_chunk(x)
        y = self.postprocessor(y)
        if not isinstance(y, torch.Tensor) or y.ndim != 3 or y.shape[-1] != self.info.action_dim:
            raise ValueError(f"{self.info.path}: predict_action_chunk + postprocessor returned "
                             f"{getattr(y, 'shape', type(y))}; expected [B, H, {self.info.action_dim}]")
        return y.float().cpu()


_RUNNERS: dict[tuple[str, str], LeRobotRunner] = {}  # per process: (checkpoint, device) → loaded policy


def load_lerobot_policy(path: str | os.PathLike, device: str = "cpu") -> LeRobotRunner:
    """Load (once per process and device) a LeRobot policy and the processors saved with it, local files only."""
    info = inspect_lerobot_policy(path)
    key = (info.path, str(device))
    if key in _RUNNERS:
        return _RUNNERS[key]
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        from lerobot.configs.policies import PreTrainedConfig
        from lerobot.policies.factory import get_policy_class, make_pre_post_processors
    except ImportError as e:
        raise ImportError("--lerobot-policy needs the `lerobot` extra: pip install 'chunkpolicy[lerobot]'") from e
    cfg = PreTrainedConfig.from_pretrained(info.path, local_files_only=True)
    cfg.device = str(device)
    cls = get_policy_class(cfg.type)
    policy = cls.from_pretrained(info.path, config=cfg, local_files_only=True)
    policy.to(device).eval()
    pre, post = make_pre_post_processors(
        cfg, pretrained_path=info.path, preprocessor_overrides={"device_processor": {"device": str(device)}},
    )
    runner = LeRobotRunner(info, policy, pre, post, torch.device(device))
    _RUNNERS[key] = runner
    return runner


def observation_batch(history: Sequence[Sequence[Obs]], cameras: Sequence[str], state_dim: int,
                      prompts: Sequence[str]) -> dict[str, Any]:
    """``T`` ticks (oldest first) of ``B`` env observations → a LeRobot batch: ``observation.state`` float32
    ``[B, S]`` and ``observation.images.<cam>`` float32 ``[B, 3, h, w]`` in [0, 1] for ``T = 1``, ``[B, T, S]`` and
    ``[B, T, 3, h, w]`` for ``T > 1``; ``task``: the ``B`` prompts. A missing camera or a state of the wrong size is a
    ``ValueError`` naming it."""
    T, B = len(history), len(history[0])
    states = np.zeros((B, T, state_dim), dtype=np.float32)
    images: dict[str, np.ndarray] = {}
    for t, obs in enumerate(history):
        for b, o in enumerate(obs):
            st = np.asarray(o["state"], dtype=np.float32)
            if st.shape != (state_dim,):
                raise ValueError(f"{STATE_KEY}: expected [{state_dim}] per observation, got {st.shape}")
            states[b, t] = st
            for cam in cameras:
                img = o["images"].get(cam)
                if img is None:
                    raise ValueError(f"{IMAGE_PREFIX}{cam}: the env observation has no camera {cam!r} "
                                     f"(cameras {sorted(o['images'])})")
                if cam not in images:
                    images[cam] = np.zeros((B, T, 3, *img.shape[:2]), dtype=np.float32)
                images[cam][b, t] = img.transpose(2, 0, 1) * np.float32(1 / 255)
    out: dict[str, Any] = {STATE_KEY: torch.from_numpy(states if T > 1 else states[:, 0])}
    for cam in cameras:
        out[IMAGE_PREFIX + cam] = torch.from_numpy(images[cam] if T > 1 else images[cam][:, 0])
    out["task"] = list(prompts)
    return out


def lerobot_predict_fn(runner: LeRobotRunner, prompts: list[str], *, seed: int = 0,
                       ) -> tuple[Callable[..., torch.Tensor], Callable[[int, list[Obs]], None]]:
    """``(predict_fn, on_step)`` for :meth:`~chunkpolicy.sim.base.EnvPool.rollout`, like
    :func:`~chunkpolicy.evaluation.rollout.policy_predict_fn`: ``on_step`` keeps the last ``n_obs_steps`` ticks;
    ``predict_fn(list of B obs) -> [B, H, A]`` in robot units."""
    info = runner.info
    T = max(1, info.n_obs_steps)
    history, on_step = observation_history(T)
    gen = torch.Generator().manual_seed(int(seed))
    fork = [runner.device.index or 0] if runner.device.type == "cuda" else []

    def predict(obs: list[Obs], prefix: Any = None, prefix_len: int = 0, **_: Any) -> torch.Tensor:
        if prefix is not None:
            raise ValueError(f"{info.path}: a LeRobot {info.type} policy cannot be guided (rtc); use open_loop, "
                             "temporal_ensemble or native")
        if not history:
            on_step(0, obs)
        batch = observation_batch(list(history), info.cameras, info.state_dim, prompts)
        with torch.random.fork_rng(devices=fork):
            torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
            chunk = runner.predict_chunk(batch)
        if chunk.shape[0] != len(obs):
            raise ValueError(f"{info.path}: predict_action_chunk returned {chunk.shape[0]} chunks for {len(obs)} "
                             "observations")
        return chunk

    return predict, on_step
