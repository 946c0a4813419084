"""gymnasium-robotics Fetch adapter (``FetchReach``, ``FetchPush``, ``FetchPickAndPlace``, MuJoCo ``-v4`` envs) with
scripted experts written here.

A second embodiment next to Meta-World's Sawyer, deliberately different where it matters to a cross-embodiment policy:

* Action (4): ``eef_dx, eef_dy, eef_dz`` in [-1, 1] (×5 cm mocap displacement per step, 5× Meta-World's scale) and
  ``gripper`` (-1 close … +1 open; ignored by Reach/Push, whose gripper is blocked).
* State (8, vs 4 for Meta-World): ``eef_x, eef_y, eef_z`` (m), ``finger_left, finger_right`` (finger joint positions,
  m) and ``eef_vx, eef_vy, eef_vz`` (m/s).
* Cameras ``front`` (the model's ``external_camera_0``) and ``side`` (a free camera looking at the table).
* Control rate 25 Hz (20 substeps × 2 ms). Episodes end on success or after ``max_steps`` (default 50 for Reach,
  100 for Push and PickAndPlace; gymnasium's own limit is 50 for all).
* Success = object (or gripper for Reach) within 5 cm of the goal, as gymnasium-robotics defines it.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from typing import Any, Sequence

import numpy as np

from chunkpolicy.sim.base import Obs, SimEnv, camera_spec, setup_headless_gl
from chunkpolicy.spaces import EmbodimentSpec

EMBODIMENT = "fetch"
ACTION_NAMES = ("eef_dx", "eef_dy", "eef_dz", "gripper")
STATE_NAMES = ("eef_x", "eef_y", "eef_z", "finger_left", "finger_right", "eef_vx", "eef_vy", "eef_vz")
CAMERAS = ("front", "side")
DEFAULT_CAMERAS = CAMERAS
CONTROL_HZ = 25.0  # 1 / (20 substeps × 0.002 s); checked against the env in tests
MAX_STEPS = {"reach": 50, "push": 100, "pick_and_place": 100}
PROMPTS = {
    "reach": "move the gripper to the red target",
    "push": "push the black block to the red target",
    "pick_and_place": "pick up the black block and place it at the red target",
}
TASKS: tuple[str, ...] = tuple(PROMPTS)
HAS_EXPERT = True
_ALIASES = {"FetchReach": "reach", "FetchPush": "push", "FetchPickAndPlace": "pick_and_place",
            "pick-and-place": "pick_and_place", "pickandplace": "pick_and_place"}
_POS_SCALE = 0.05  # metres of mocap motion per unit action (gymnasium-robotics' _set_action)


def make_spec(cameras: Sequence[str] = DEFAULT_CAMERAS, **_: Any) -> EmbodimentSpec:
    return camera_spec(EMBODIMENT, "Fetch", cameras, CAMERAS, action_names=ACTION_NAMES, state_names=STATE_NAMES,
                       control_hz=CONTROL_HZ, gripper_dims=("gripper", "finger_left", "finger_right"))


def check_task(task: str) -> str:
    t = _ALIASES.get(task.split("-v")[0], task)
    if t not in PROMPTS:
        raise ValueError(f"unknown Fetch task {task!r}; tasks: {list(TASKS)} (or FetchReach / FetchPush / "
                         "FetchPickAndPlace)")
    return t


def _import_env_classes() -> dict[str, Any]:
    # gymnasium_robotics prints a notice about Adroit reward versions on import; keep it out of our output
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from gymnasium_robotics.envs.fetch.pick_and_place import MujocoFetchPickAndPlaceEnv
        from gymnasium_robotics.envs.fetch.push import MujocoFetchPushEnv
        from gymnasium_robotics.envs.fetch.reach import MujocoFetchReachEnv
    return {"reach": MujocoFetchReachEnv, "push": MujocoFetchPushEnv, "pick_and_place": MujocoFetchPickAndPlaceEnv}


class FetchEnv(SimEnv):
    """One Fetch task. Args as :class:`chunkpolicy.sim.metaworld_env.MetaWorldEnv`."""

    has_expert = HAS_EXPERT

    def __init__(self, task: str = "push", cameras: Sequence[str] = DEFAULT_CAMERAS,
                 image_size: tuple[int, int] = (64, 64), max_steps: int | None = None, fast_render: bool = True,
                 terminate_on_success: bool = True) -> None:
        super().__init__()
        self.task = check_task(task)
        self.task_prompt = PROMPTS[self.task]
        self.spec = make_spec(cameras)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.max_steps = int(max_steps or MAX_STEPS[self.task])
        if self.max_steps < 1:
            raise ValueError(f"max_steps: expected a positive int, got {max_steps}")
        self.terminate_on_success = terminate_on_success

        setup_headless_gl()
        from chunkpolicy.sim.mujoco_render import CameraRenderer, free_camera

        self._env = _import_env_classes()[self.task]()
        self.control_hz = 1.0 / self._env.dt
        cams = {"front": "external_camera_0", "side": free_camera((1.3, 0.75, 0.45), 1.3, 145.0, -30.0)}
        self._renderer = CameraRenderer(self._env.model, *self.image_size, {c: cams[c] for c in self.spec.cameras},
                                        fast=fast_render)
        self._phase = "approach"
        self._close_steps = 0

    @property
    def raw_env(self) -> Any:
        return self._env

    # -- observation ----------------------------------------------------------------------------------------------
    def _sites(self) -> tuple[np.ndarray, np.ndarray | None]:
        from gymnasium_robotics.utils import mujoco_utils as mu

        env = self._env
        grip = mu.get_site_xpos(env.model, env.data, "robot0:grip").copy()
        obj = mu.get_site_xpos(env.model, env.data, "object0").copy() if env.has_object else None
        return grip, obj

    def _obs(self) -> Obs:
        env = self._env
        grip_pos, _, _, gripper_state, _, _, _, grip_velp, _ = env.generate_mujoco_observations()
        state = np.concatenate([grip_pos, gripper_state, grip_velp / env.dt]).astype(np.float32)
        return {"images": self._frames(), "state": state}

    def _render(self) -> dict[str, np.ndarray]:
        return self._renderer.render_all(self._env.data)

    def _reset(self, seed: int) -> Obs:
        self._env.reset(seed=seed)
        self._env._render_callback()  # moves the red target site to the sampled goal (it is drawn in the images)
        # Push starts with the gripper at block height: lift before moving sideways, or it sweeps the block away
        self._phase, self._close_steps = ("lift" if self.task == "push" else "approach"), 0
        return self._obs()

    def _step(self, action: np.ndarray) -> tuple[Obs, float, bool, dict[str, Any]]:
        _, reward, _, _, info = self._env.step(np.clip(action, -1.0, 1.0).astype(np.float64))
        return self._obs(), float(reward), bool(info["is_success"]), {}

    # -- scripted experts -----------------------------------------------------------------------------------------
    def _move(self, grip: np.ndarray, target: np.ndarray, gain: float = 1.0, max_norm: float = 1.0) -> np.ndarray:
        a = gain * (target - grip) / _POS_SCALE
        n = np.linalg.norm(a)
        return a * (max_norm / n) if n > max_norm else a

    def expert_action(self) -> np.ndarray:
        """Privileged scripted expert (reads goal and object positions from the simulator)."""
        grip, obj = self._sites()
        goal = np.asarray(self._env.goal, dtype=np.float64)
        if self.task == "reach":
            return np.append(self._move(grip, goal, gain=0.5, max_norm=0.3), 0.0).astype(np.float32)
        assert obj is not None
        if self.task == "push":
            return np.append(self._push(grip, obj, goal), 0.0).astype(np.float32)
        return self._pick_and_place(grip, obj, goal)

    def _push(self, grip: np.ndarray, obj: np.ndarray, goal: np.ndarray) -> np.ndarray:
        d = goal[:2] - obj[:2]
        d = d / max(np.linalg.norm(d), 1e-6)
        behind = obj[:2] - 0.06 * d  # gripper centre this far behind the block centre, on the goal line
        rel = grip[:2] - obj[:2]
        lateral = abs(rel[0] * d[1] - rel[1] * d[0])
        along = float(rel @ d)
        low, high = obj[2], obj[2] + 0.08
        if self._phase == "push" and (lateral > 0.025 or along > -0.02):
            self._phase = "lift"  # lost the block: lift, go around, come down behind it again
        if self._phase == "lift":
            if grip[2] > high - 0.02:
                self._phase = "approach"
            return self._move(grip, np.array([grip[0], grip[1], high]))
        if self._phase == "approach":
            if np.linalg.norm(grip[:2] - behind) < 0.01:
                self._phase = "descend"
            return self._move(grip, np.array([*behind, high]))
        if self._phase == "descend":
            if abs(grip[2] - low) < 0.01:
                self._phase = "push"
            return self._move(grip, np.array([*behind, low]))
        # push: aim a little past the block along the goal line, gently
        return self._move(grip, np.array([*(obj[:2] + 0.02 * d), low]), gain=0.6, max_norm=0.3)

    def _pick_and_place(self, grip: np.ndarray, obj: np.ndarray, goal: np.ndarray) -> np.ndarray:
        OPEN, CLOSE = 1.0, -1.0
        above = obj + np.array([0.0, 0.0, 0.08])
        if self._phase == "carry" and np.linalg.norm(grip - obj) > 0.04:
            self._phase, self._close_steps = "approach", 0  # dropped it: start over
        if self._phase == "approach":
            if np.linalg.norm(grip[:2] - obj[:2]) < 0.01:
                self._phase = "descend"
            return np.append(self._move(grip, above), OPEN).astype(np.float32)
        if self._phase == "descend":
            if np.linalg.norm(grip - obj) < 0.01:
                self._phase = "close"
            return np.append(self._move(grip, obj), OPEN).astype(np.float32)
        if self._phase == "close":
            self._close_steps += 1
            if self._close_steps >= 4:
                self._phase = "carry"
            return np.append(self._move(grip, obj), CLOSE).astype(np.float32)
        return np.append(self._move(grip, goal, gain=0.8), CLOSE).astype(np.float32)

    def close(self) -> None:
        if getattr(self, "_renderer", None) is not None:
            self._renderer.close()
            self._renderer = None
        if getattr(self, "_env", None) is not None:
            self._env.close()
            self._env = None


def make(task: str, **kwargs: Any) -> FetchEnv:
    return FetchEnv(task, **kwargs)
