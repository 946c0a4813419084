"""gym-pusht adapter (Push-T, 2-D), for evaluation only: gym-pusht ships no scripted expert.

* Action (2): ``agent_x, agent_y`` = target position of the circular agent in pixels of the 512×512 board (absolute,
  [0, 512]; the env's PD controller moves the agent there). Action and state share names, so a policy trained with
  delta actions may express it relative to the current position.
* State (2): ``agent_x, agent_y`` (pixels).
* Camera ``top`` (the env's own top-down frame; default 96×96, as Diffusion Policy).
* Control rate 10 Hz. Success = T-block coverage of the goal > 95 %; episodes end on success or after ``max_steps``
  (default 300, gym-pusht's limit).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from chunkpolicy.sim.base import Obs, SimEnv
from chunkpolicy.spaces import EmbodimentSpec

EMBODIMENT = "pusht"
ACTION_NAMES = ("agent_x", "agent_y")
STATE_NAMES = ("agent_x", "agent_y")
CAMERAS = ("top",)
CONTROL_HZ = 10.0
MAX_STEPS = 300
PROMPTS = {"push-t": "push the T-shaped block onto the T-shaped target"}
TASKS: tuple[str, ...] = tuple(PROMPTS)
HAS_EXPERT = False


def make_spec(cameras: Sequence[str] = CAMERAS, **_: Any) -> EmbodimentSpec:
    if tuple(cameras) != CAMERAS:
        raise ValueError(f"cameras: Push-T has exactly the cameras {list(CAMERAS)}, got {list(cameras)}")
    # actions are absolute target positions: never deltas, and "do nothing" means "stay where you are"
    return EmbodimentSpec(name=EMBODIMENT, action_names=ACTION_NAMES, state_names=STATE_NAMES, cameras=CAMERAS,
                          control_hz=CONTROL_HZ, absolute_dims=ACTION_NAMES)


def check_task(task: str) -> str:
    if task not in PROMPTS:
        raise ValueError(f"unknown Push-T task {task!r}; tasks: {list(TASKS)}")
    return task


class PushTEnv(SimEnv):
    """Push-T. ``task`` is always ``"push-t"``."""

    has_expert = HAS_EXPERT

    def __init__(self, task: str = "push-t", cameras: Sequence[str] = CAMERAS, image_size: tuple[int, int] = (96, 96),
                 max_steps: int | None = None, terminate_on_success: bool = True, **_: Any) -> None:
        super().__init__()
        self.task = check_task(task)
        self.task_prompt = PROMPTS[task]
        self.spec = make_spec(cameras)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.max_steps = int(max_steps or MAX_STEPS)
        self.terminate_on_success = terminate_on_success
        os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # pygame draws off-screen only
        import warnings

        with warnings.catch_warnings():  # pygame warns about pkg_resources on import
            warnings.simplefilter("ignore")
            from gym_pusht.envs.pusht import PushTEnv as _PushT

        self._env = _PushT(obs_type="pixels_agent_pos", render_mode="rgb_array",
                           observation_height=self.image_size[0], observation_width=self.image_size[1])
        self.control_hz = float(self._env.control_hz)

    @property
    def raw_env(self) -> Any:
        return self._env

    def _render(self) -> dict[str, np.ndarray]:
        return {"top": self._pixels}

    def _obs(self, raw: dict[str, np.ndarray]) -> Obs:
        # gym-pusht draws its pixels inside every step anyway: keeping them costs nothing, so they are always sent
        self._pixels = np.ascontiguousarray(raw["pixels"], dtype=np.uint8)
        return {"images": self._render(), "state": np.asarray(raw["agent_pos"], dtype=np.float32)}

    def _reset(self, seed: int) -> Obs:
        raw, _ = self._env.reset(seed=seed)
        return self._obs(raw)

    def _step(self, action: np.ndarray) -> tuple[Obs, float, bool, dict[str, Any]]:
        a = np.clip(action, 0.0, 512.0)
        raw, reward, _, _, info = self._env.step(a)
        return self._obs(raw), float(reward), bool(info["is_success"]), {"coverage": float(info["coverage"])}

    def close(self) -> None:
        if getattr(self, "_env", None) is not None:
            self._env.close()
            self._env = None


def make(task: str = "push-t", **kwargs: Any) -> PushTEnv:
    return PushTEnv(task, **kwargs)
