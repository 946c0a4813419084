"""Simulator adapter interface, observation → batch conversion, a lockstep pool of environments, and the env registry.

Every adapter (:mod:`.metaworld_env`, :mod:`.fetch_env`, :mod:`.pusht_env`, :mod:`.aloha_env`) looks the same to the
rest of the library:

* ``reset(seed) -> obs`` and ``step(action) -> (obs, reward, done, info)`` with ``info["success"]`` (bool);
  ``action`` is float ``[A]`` in robot units (the spec's ``action_names`` order).
* ``obs = {"images": {camera: uint8 [h, w, 3]}, "state": float32 [S]}``. ``step(action, render=False)`` may leave
  the frames out (``"images": None``): rendering costs far more than the physics step, and an executor that runs
  several actions per chunk looks at one observation in several (:meth:`EnvPool.rollout` ``frames``).
  ``render()`` gives the frames of the current state.
* ``spec`` (:class:`EmbodimentSpec`), ``task`` (short name), ``task_prompt`` (natural language), ``max_steps``.
* ``done`` is True once the episode is over: on success (unless the adapter was built with
  ``terminate_on_success=False``) or after ``max_steps`` steps. Stepping a finished episode raises.
* Adapters with a scripted expert set ``has_expert = True`` and implement :meth:`SimEnv.expert_action`
  (privileged: it may read simulator state the policy never sees).

Simulator packages are imported only when an adapter is built (``make_env``), never by ``import chunkpolicy.sim``.
"""

from __future__ import annotations

import importlib
import os
from abc import ABC, abstractmethod
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from chunkpolicy import batch as K
from chunkpolicy.spaces import EmbodimentSpec, UnifiedSpace

Obs = dict[str, Any]

__all__ = [
    "SimEnv",
    "EnvPool",
    "obs_to_batch",
    "check_obs",
    "make_env",
    "env_spec",
    "env_tasks",
    "env_check_task",
    "env_task_prompt",
    "env_has_expert",
    "ENV_REGISTRY",
    "setup_headless_gl",
    "camera_spec",
]


def setup_headless_gl(default: str = "egl") -> str:
    """Choose an off-screen OpenGL backend for MuJoCo before ``mujoco`` is imported; returns the backend.

    Respects an existing ``MUJOCO_GL`` (``egl`` or ``osmesa`` headless); ``PYOPENGL_PLATFORM`` follows it.
    """
    gl = os.environ.setdefault("MUJOCO_GL", default)
    if gl in ("egl", "osmesa"):
        os.environ.setdefault("PYOPENGL_PLATFORM", gl)
    return gl


def camera_spec(name: str, env_label: str, cameras: Sequence[str], available: Sequence[str], **spec: Any) -> EmbodimentSpec:
    """An adapter's :class:`EmbodimentSpec` for a chosen subset of its ``available`` cameras (a ValueError naming
    ``cameras`` and the choices when one is unknown or none is given); ``spec``: the other EmbodimentSpec fields."""
    unknown = [c for c in cameras if c not in available]
    if unknown or not cameras:
        raise ValueError(f"cameras: {unknown or '[]'} not available; {env_label} cameras: {list(available)}")
    return EmbodimentSpec(name=name, cameras=tuple(cameras), **spec)


class SimEnv(ABC):
    """One simulated environment for one task. Subclasses set the attributes below in ``__init__``."""

    spec: EmbodimentSpec
    task: str
    task_prompt: str
    max_steps: int
    image_size: tuple[int, int]
    has_expert: bool = False

    def __init__(self) -> None:
        self._t = 0
        self._done = True
        self._success = False
        self._want_frames = True
        self.episode_seed: int | None = None

    # -- to implement ---------------------------------------------------------------------------------------------
    @abstractmethod
    def _reset(self, seed: int) -> Obs: ...

    @abstractmethod
    def _step(self, action: np.ndarray) -> tuple[Obs, float, bool, dict[str, Any]]:
        """Step the simulator; returns ``(obs, reward, success, info)``, the frames from :meth:`_frames`."""

    @abstractmethod
    def _render(self) -> dict[str, np.ndarray]:
        """The camera frames ``{camera: uint8 [h, w, 3]}`` of the current simulator state."""

    def _frames(self) -> dict[str, np.ndarray] | None:
        """The frames for the observation being built: None when this step was asked for none."""
        return self._render() if self._want_frames else None

    def expert_action(self) -> np.ndarray:
        """Scripted expert's action ``[A]`` for the current state (robot units, within the action bounds)."""
        raise NotImplementedError(f"{type(self).__name__} ({self.task}) has no scripted expert")

    def close(self) -> None:
        """Free renderers and simulator resources (safe to call twice)."""

    # -- public ---------------------------------------------------------------------------------------------------
    terminate_on_success: bool = True

    def reset(self, seed: int | None = None) -> Obs:
        """Start a new episode; the same seed gives the same initial state."""
        if seed is None:
            seed = int(np.random.default_rng().integers(2**31 - 1))
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed: expected a non-negative int, got {seed!r}")
        self._t, self._done, self._success = 0, False, False
        self.episode_seed = int(seed)
        obs = self._reset(int(seed))
        check_obs(obs, self.spec, self.image_size)
        return obs

    def render(self) -> dict[str, np.ndarray]:
        """The camera frames ``{camera: uint8 [h, w, 3]}`` of the current state (what an observation holds)."""
        return self._render()

    def step(self, action: Any, render: bool = True) -> tuple[Obs, float, bool, dict[str, Any]]:
        """One control tick. ``render=False``: the observation may come without frames (``"images": None``)."""
        if self._done:
            raise RuntimeError(f"{type(self).__name__}: episode is over (or reset() was never called); call reset()")
        a = np.asarray(action, dtype=np.float64)
        if a.shape != (self.spec.action_dim,):
            raise ValueError(f"action: expected [{self.spec.action_dim}] ({', '.join(self.spec.action_names)}), "
                             f"got shape {a.shape}")
        if not np.isfinite(a).all():
            raise ValueError(f"action: contains NaN or inf: {a}")
        self._want_frames = bool(render)
        try:
            obs, reward, success, info = self._step(a)
        finally:
            self._want_frames = True
        self._t += 1
        self._success = self._success or bool(success)
        truncated = self._t >= self.max_steps
        self._done = (bool(success) and self.terminate_on_success) or truncated
        info = {**info, "success": bool(success), "ever_success": self._success, "truncated": truncated and not success,
                "t": self._t}
        return obs, float(reward), self._done, info

    @property
    def t(self) -> int:
        """Steps taken in the current episode."""
        return self._t

    @property
    def done(self) -> bool:
        return self._done

    def __enter__(self) -> "SimEnv":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(task={self.task!r}, embodiment={self.spec.name!r}, max_steps={self.max_steps})"


def check_obs(obs: Obs, spec: EmbodimentSpec, image_size: tuple[int, int] | None = None) -> None:
    """Raise a ValueError naming the field when ``obs`` does not follow the adapter observation schema."""
    if not isinstance(obs, Mapping) or set(obs) != {"images", "state"}:
        raise ValueError(f"obs: expected a dict with keys ['images', 'state'], got {sorted(obs) if isinstance(obs, Mapping) else type(obs)}")
    st = obs["state"]
    if not isinstance(st, np.ndarray) or st.dtype != np.float32 or st.shape != (spec.state_dim,):
        raise ValueError(f"obs['state']: expected float32 [{spec.state_dim}], got "
                         f"{getattr(st, 'dtype', type(st))} {getattr(st, 'shape', '')}")
    if set(obs["images"]) != set(spec.cameras):
        raise ValueError(f"obs['images']: expected cameras {list(spec.cameras)}, got {sorted(obs['images'])}")
    for cam, img in obs["images"].items():
        ok = isinstance(img, np.ndarray) and img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3
        if not ok or (image_size is not None and img.shape[:2] != tuple(image_size)):
            want = f"[{image_size[0]}, {image_size[1]}, 3]" if image_size else "[h, w, 3]"
            raise ValueError(f"obs['images'][{cam!r}]: expected uint8 {want}, got "
                             f"{getattr(img, 'dtype', type(img))} {getattr(img, 'shape', '')}")


def obs_to_batch(
    observations: Sequence[Obs],
    space: UnifiedSpace,
    spec: EmbodimentSpec | str,
    prompts: str | Sequence[str],
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Turn B env observations of one embodiment into the batch schema (CONTRIBUTING.md), with ``T_obs = 1``.

    Returns ``images`` uint8 ``[B, N, 1, 3, h, w]`` (cameras in ``spec.cameras`` order; a camera missing from an
    observation is zeros with ``image_mask`` False): the dtype the training data path delivers, so the backbone scales
    frames to [0, 1] the same way in training, evaluation and serving, and a quarter of the bytes go to the device;
    ``image_mask`` bool ``[B, N]``, ``state`` float32 ``[B, 1, D]`` (``space.pad``; robot units), ``state_mask`` bool
    ``[B, D]``, ``prompt`` list of B strings, ``embodiment`` int64 ``[B]`` and ``control_hz`` float32 ``[B]``. ``spec`` must be registered in ``space``.
    """
    if not observations:
        raise ValueError("observations: expected at least one observation")
    name = spec if isinstance(spec, str) else spec.name
    emb = space.id_of(name)  # KeyError naming the registered embodiments if missing
    spec = space.spec(emb)
    B = len(observations)
    prompts = [prompts] * B if isinstance(prompts, str) else list(prompts)
    if len(prompts) != B:
        raise ValueError(f"prompt: expected {B} prompts (one per observation), got {len(prompts)}")
    for b, o in enumerate(observations):
        if o.get("images") is None:  # a policy must never see a frameless observation as "no cameras"
            raise ValueError(f"observations[{b}]['images']: not rendered (the env stepped with render=False); the "
                             "caller's frames schedule missed a tick at which the policy reads the observation")
    shapes = {img.shape[:2] for o in observations for img in o["images"].values()}
    if len(shapes) > 1:
        raise ValueError(f"images: every camera must have the same size to be batched, got sizes {sorted(shapes)}")
    h, w = shapes.pop() if shapes else (1, 1)
    N = len(spec.cameras)
    images = np.zeros((B, N, 1, 3, h, w), dtype=np.uint8)
    mask = np.zeros((B, N), dtype=bool)
    states = np.zeros((B, spec.state_dim), dtype=np.float32)
    for b, o in enumerate(observations):
        extra = sorted(set(o["images"]) - set(spec.cameras))
        if extra:
            raise ValueError(f"images: cameras {extra} are not cameras of {spec.name!r} {list(spec.cameras)}")
        for n, cam in enumerate(spec.cameras):
            img = o["images"].get(cam)
            if img is None:
                continue
            if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
                raise ValueError(f"images[{cam!r}]: expected uint8 [h, w, 3], got {img.dtype} {img.shape}")
            images[b, n, 0] = img.transpose(2, 0, 1)
            mask[b, n] = True
        st = np.asarray(o["state"], dtype=np.float32)
        if st.shape != (spec.state_dim,):
            raise ValueError(f"state: expected [{spec.state_dim}] for {spec.name!r}, got shape {st.shape}")
        states[b] = st
    state_u = space.pad(states, emb, "state")[:, None]
    out = {
        K.IMAGES: torch.from_numpy(images),
        K.IMAGE_MASK: torch.from_numpy(mask),
        K.STATE: torch.from_numpy(np.ascontiguousarray(state_u)),
        K.STATE_MASK: torch.from_numpy(np.repeat(space.mask(emb, "state")[None], B, axis=0)),
        K.PROMPT: prompts,
        K.EMBODIMENT: torch.full((B,), emb, dtype=torch.int64),
        K.CONTROL_HZ: torch.full((B,), float(spec.control_hz), dtype=torch.float32),
    }
    if device is not None:
        out = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in out.items()}
    return out


class EnvPool:
    """B environments stepping in lockstep, in this process.

    ``step`` takes ``[B, A]`` actions; an environment whose episode is over is not stepped again (its last observation
    is repeated and its ``done`` stays True), so a batched policy keeps seeing B observations.
    """

    def __init__(self, envs: Sequence[SimEnv]) -> None:
        if not envs:
            raise ValueError("EnvPool: needs at least one env")
        names = {e.spec.name for e in envs}
        if len(names) != 1:
            raise ValueError(f"EnvPool: all envs must share one embodiment, got {sorted(names)}")
        self.envs = list(envs)
        self.spec = self.envs[0].spec
        self._obs: list[Obs] = []
        self.dones = np.ones(len(self.envs), dtype=bool)
        self.successes = np.zeros(len(self.envs), dtype=bool)

    @classmethod
    def make(cls, env_name: str, tasks: str | Sequence[str], num_envs: int | None = None, **kwargs: Any) -> "EnvPool":
        """``num_envs`` copies of one task, or one env per task in ``tasks``."""
        tasks = [tasks] * (num_envs or 1) if isinstance(tasks, str) else list(tasks)
        return cls([make_env(env_name, t, **kwargs) for t in tasks])

    def __len__(self) -> int:
        return len(self.envs)

    @property
    def prompts(self) -> list[str]:
        return [e.task_prompt for e in self.envs]

    @property
    def max_steps(self) -> int:
        return max(e.max_steps for e in self.envs)

    def reset(self, seeds: Sequence[int]) -> list[Obs]:
        if len(seeds) != len(self.envs):
            raise ValueError(f"seeds: expected {len(self.envs)} seeds, got {len(seeds)}")
        self._obs = [e.reset(int(s)) for e, s in zip(self.envs, seeds)]
        self.dones[:] = False
        self.successes[:] = False
        return list(self._obs)

    def step(self, actions: Any, render: bool | Sequence[bool] = True
             ) -> tuple[list[Obs], np.ndarray, np.ndarray, list[dict[str, Any]]]:
        """Step every env still running with its row of ``actions [B, A]``. ``render``: one flag, or one per env,
        whether the new observations need frames; an env whose episode ends here always gets them (its last
        observation is repeated to the policy while the others run)."""
        actions = np.asarray(actions)
        if actions.shape != (len(self.envs), self.spec.action_dim):
            raise ValueError(f"actions: expected [{len(self.envs)}, {self.spec.action_dim}], got {actions.shape}")
        want = np.asarray(render, dtype=bool)
        if want.shape not in ((), (len(self.envs),)):
            raise ValueError(f"render: expected one flag or {len(self.envs)} (one per env), got shape {want.shape}")
        want = np.broadcast_to(want, (len(self.envs),))
        rewards = np.zeros(len(self.envs), dtype=np.float32)
        infos: list[dict[str, Any]] = []
        for i, env in enumerate(self.envs):
            if self.dones[i]:
                infos.append({"success": bool(self.successes[i]), "skipped": True})
                continue
            obs, r, done, info = env.step(actions[i], render=bool(want[i]))
            if done and obs["images"] is None:
                obs = {**obs, "images": env.render()}
            self._obs[i], rewards[i], self.dones[i] = obs, r, done
            self.successes[i] |= bool(info["success"])
            infos.append(info)
        return list(self._obs), rewards, self.dones.copy(), infos

    def rollout(
        self,
        predict_fn: Callable[[list[Obs]], Any],
        executor: Any,
        seeds: Sequence[int],
        max_steps: int | None = None,
        on_step: Callable[[int, list[Obs]], None] | None = None,
        frames: Callable[[int], bool | np.ndarray] | None = None,
    ) -> list[dict[str, Any]]:
        """Run one episode in every env with ``executor`` (a :class:`ChunkExecutor` or spec string).

        ``predict_fn(list_of_B_obs) -> [B, H, A]`` chunks in robot units (e.g.
        ``lambda o: policy.predict(obs_to_batch(o, space, spec, pool.prompts))``). Returns one dict per env:
        ``{"task", "seed", "success", "steps", "return"}``.

        ``frames(t)``: whether the observations of tick ``t`` need camera frames (a bool or ``[B]`` flags), asked
        just before the step that produces them; default: always. Frames left out are ``None`` (a policy handed one
        raises, see :func:`obs_to_batch`); tick 0 always has them.
        """
        from chunkpolicy.runtime.executors import make_executor  # runtime sits left of sim: allowed

        ex = make_executor(executor)
        ex.reset()
        obs = self.reset(seeds)
        steps = np.zeros(len(self.envs), dtype=np.int64)
        returns = np.zeros(len(self.envs), dtype=np.float64)
        limit = max_steps or self.max_steps
        for t in range(limit):
            if on_step is not None:
                on_step(t, obs)
            actions = ex.act(t, obs, predict_fn)
            if actions.ndim == 1:
                actions = actions[None]
            active = ~self.dones
            obs, rewards, dones, _ = self.step(actions, render=True if frames is None else frames(t + 1))
            steps += active
            returns += rewards * active
            if dones.all():
                break
        return [
            {"task": e.task, "seed": int(s), "success": bool(self.successes[i]), "steps": int(steps[i]),
             "return": float(returns[i])}
            for i, (e, s) in enumerate(zip(self.envs, seeds))
        ]

    def close(self) -> None:
        for e in self.envs:
            e.close()

    def __enter__(self) -> "EnvPool":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# -- registry: adapters are imported lazily so `import chunkpolicy.sim` never needs a simulator package -------------
ENV_REGISTRY: dict[str, str] = {
    "metaworld": "chunkpolicy.sim.metaworld_env",
    "fetch": "chunkpolicy.sim.fetch_env",
    "pusht": "chunkpolicy.sim.pusht_env",
    "aloha": "chunkpolicy.sim.aloha_env",
}


def _module(env_name: str):
    if env_name not in ENV_REGISTRY:
        raise ValueError(f"unknown env {env_name!r}; known: {sorted(ENV_REGISTRY)}")
    return importlib.import_module(ENV_REGISTRY[env_name])


def make_env(env_name: str, task: str, **kwargs: Any) -> SimEnv:
    """Build an adapter: ``make_env("metaworld", "push-v3", image_size=(64, 64))``."""
    return _module(env_name).make(task, **kwargs)


def env_spec(env_name: str, **kwargs: Any) -> EmbodimentSpec:
    """The embodiment spec an adapter would have with these options, without starting a simulator."""
    return _module(env_name).make_spec(**kwargs)


def env_tasks(env_name: str) -> list[str]:
    """Task names an adapter accepts."""
    return list(_module(env_name).TASKS)


def env_check_task(env_name: str, task: str) -> str:
    """The canonical task name (raises a ValueError listing the valid names), without starting a simulator."""
    return _module(env_name).check_task(task)


def env_has_expert(env_name: str) -> bool:
    """Whether the adapter has scripted experts (needed by :func:`chunkpolicy.sim.collect.collect`)."""
    return bool(_module(env_name).HAS_EXPERT)


def env_task_prompt(env_name: str, task: str) -> str:
    """The natural-language prompt of ``task``, without starting a simulator."""
    return _module(env_name).PROMPTS[env_check_task(env_name, task)]
