"""Meta-World (v3 tasks, Sawyer arm) adapter with the ``metaworld.policies`` scripted experts.

* Tasks: the 50 ``-v3`` names (:data:`TASKS`; :data:`MT10` is the MT10 subset, MT50 = all of them). Each has a
  natural-language prompt (:data:`PROMPTS`).
* Action (4, robot units = Meta-World's own, in [-1, 1]): ``eef_dx, eef_dy, eef_dz`` (end-effector displacement,
  ×1 cm per step) and ``gripper`` (-1 open … +1 close). Actions outside [-1, 1] are clipped, as Meta-World does.
* State (4): ``eef_x, eef_y, eef_z`` (metres) and ``gripper_opening`` (0 closed … 1 open) = the first 4 entries of
  Meta-World's observation. Object and goal positions are *not* in the state (they are in the images).
* Cameras (default ``corner`` and ``gripperPOV``, 64×64): the ``corner*`` cameras render upside down in Meta-World
  and are rotated 180° here so the table is at the bottom. Shadows and multisampling are off.
* Control rate: ``frame_skip (5) × timestep (2.5 ms) = 12.5 ms`` → 80 Hz. Episodes end on success or after
  ``max_steps`` (default 500 = Meta-World's ``max_path_length``).
* Seeds: ``reset(seed)`` draws the object/goal positions from ``seed`` (Meta-World's seeded random reset), so one seed
  is one reproducible initial scene.
"""

from __future__ import annotations

import warnings
from typing import Any, Sequence

import numpy as np

from chunkpolicy.sim.base import Obs, SimEnv, camera_spec, setup_headless_gl
from chunkpolicy.spaces import EmbodimentSpec

EMBODIMENT = "metaworld_sawyer"
ACTION_NAMES = ("eef_dx", "eef_dy", "eef_dz", "gripper")
STATE_NAMES = ("eef_x", "eef_y", "eef_z", "gripper_opening")
CAMERAS = ("topview", "corner", "corner2", "corner3", "behindGripper", "gripperPOV")
FLIPPED = ("corner", "corner2", "corner3")
DEFAULT_CAMERAS = ("corner", "gripperPOV")
CONTROL_HZ = 80.0  # 1 / (frame_skip 5 × timestep 0.0025 s); checked against the env in tests
MAX_PATH_LENGTH = 500

PROMPTS: dict[str, str] = {
    "assembly-v3": "pick up the nut and place it onto the peg",
    "basketball-v3": "pick up the basketball and dunk it into the hoop",
    "bin-picking-v3": "pick up the cube from one bin and place it into the other bin",
    "box-close-v3": "pick up the lid and put it on the box to close it",
    "button-press-topdown-v3": "press the button from the top",
    "button-press-topdown-wall-v3": "press the button from the top, reaching over the wall",
    "button-press-v3": "press the button from the front",
    "button-press-wall-v3": "press the button from the front, reaching past the wall",
    "coffee-button-v3": "push the button on the coffee machine",
    "coffee-pull-v3": "pull the coffee mug out from under the machine to the target",
    "coffee-push-v3": "push the coffee mug under the coffee machine",
    "dial-turn-v3": "rotate the dial a full turn",
    "disassemble-v3": "pick the nut up and off the peg",
    "door-close-v3": "push the open door closed",
    "door-lock-v3": "turn the door lock down to lock it",
    "door-open-v3": "pull the door open by its handle",
    "door-unlock-v3": "turn the door lock to unlock it",
    "hand-insert-v3": "move the hand into the hole in the table",
    "drawer-close-v3": "push the drawer closed",
    "drawer-open-v3": "pull the drawer open by its handle",
    "faucet-open-v3": "rotate the faucet handle to open it",
    "faucet-close-v3": "rotate the faucet handle to close it",
    "hammer-v3": "pick up the hammer and hammer the nail into the wall",
    "handle-press-side-v3": "press the handle down from the side",
    "handle-press-v3": "press the handle down",
    "handle-pull-side-v3": "pull the handle up from the side",
    "handle-pull-v3": "pull the handle up",
    "lever-pull-v3": "pull the lever up",
    "pick-place-wall-v3": "pick up the puck and place it at the goal behind the wall",
    "pick-out-of-hole-v3": "pick the peg out of the hole and lift it to the goal",
    "pick-place-v3": "pick up the puck and place it at the goal",
    "plate-slide-v3": "slide the plate into the cabinet",
    "plate-slide-side-v3": "slide the plate sideways into the cabinet",
    "plate-slide-back-v3": "slide the plate back out of the cabinet",
    "plate-slide-back-side-v3": "slide the plate sideways back out of the cabinet",
    "peg-insert-side-v3": "pick up the peg and insert it sideways into the hole",
    "peg-unplug-side-v3": "unplug the peg sideways from the socket",
    "soccer-v3": "push the soccer ball into the goal",
    "stick-push-v3": "grasp the stick and use it to push the thermos to the goal",
    "stick-pull-v3": "grasp the stick and use it to pull the thermos to the goal",
    "push-v3": "push the puck to the goal",
    "push-wall-v3": "push the puck around the wall to the goal",
    "push-back-v3": "push the puck back to the goal",
    "reach-v3": "reach the goal position with the gripper",
    "reach-wall-v3": "reach over the wall to the goal position",
    "shelf-place-v3": "pick up the puck and place it onto the shelf",
    "sweep-into-v3": "sweep the puck into the hole",
    "sweep-v3": "sweep the puck off the edge of the table",
    "window-open-v3": "slide the window open",
    "window-close-v3": "slide the window closed",
}
TASKS: tuple[str, ...] = tuple(PROMPTS)
HAS_EXPERT = True
MT10: tuple[str, ...] = (
    "reach-v3", "push-v3", "pick-place-v3", "door-open-v3", "drawer-open-v3", "drawer-close-v3",
    "button-press-topdown-v3", "peg-insert-side-v3", "window-open-v3", "window-close-v3",
)
MT50 = TASKS
# Meta-learning split (metaworld.env_dict.ML45_V3): 45 training tasks, 5 held-out test tasks
ML45_TEST: tuple[str, ...] = ("bin-picking-v3", "box-close-v3", "door-lock-v3", "door-unlock-v3", "hand-insert-v3")
ML45_TRAIN: tuple[str, ...] = tuple(t for t in TASKS if t not in ML45_TEST)


def make_spec(cameras: Sequence[str] = DEFAULT_CAMERAS, **_: Any) -> EmbodimentSpec:
    """The ``metaworld_sawyer`` embodiment with these cameras (other adapter options do not change the spec)."""
    return camera_spec(EMBODIMENT, "Meta-World", cameras, CAMERAS, action_names=ACTION_NAMES, state_names=STATE_NAMES,
                       control_hz=CONTROL_HZ, gripper_dims=("gripper", "gripper_opening"))


def check_task(task: str) -> str:
    if task not in PROMPTS:
        near = [t for t in TASKS if task.split("-v")[0] in t][:5]
        raise ValueError(f"unknown Meta-World task {task!r}" + (f"; did you mean {near}?" if near else "")
                         + " (names look like 'push-v3'; see chunkpolicy.sim.metaworld_env.TASKS)")
    return task


class MetaWorldEnv(SimEnv):
    """One Meta-World v3 task (goal-observable MT variant: the expert sees the goal, the policy sees images).

    Args:
        task: e.g. ``"push-v3"``.
        cameras: camera names (see :data:`CAMERAS`).
        image_size: ``(h, w)`` of every camera frame.
        max_steps: episode length limit (at most 500, Meta-World's own limit).
        fast_render: turn off shadows and multisampling (5-8x faster CPU frames).
        terminate_on_success: end the episode at the first successful step.
    """

    has_expert = HAS_EXPERT

    def __init__(self, task: str = "push-v3", cameras: Sequence[str] = DEFAULT_CAMERAS,
                 image_size: tuple[int, int] = (64, 64), max_steps: int | None = None, fast_render: bool = True,
                 terminate_on_success: bool = True) -> None:
        super().__init__()
        self.task = check_task(task)
        self.task_prompt = PROMPTS[task]
        self.spec = make_spec(cameras)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        self.max_steps = int(max_steps or MAX_PATH_LENGTH)
        if not 0 < self.max_steps <= MAX_PATH_LENGTH:
            raise ValueError(f"max_steps: expected 1..{MAX_PATH_LENGTH} (Meta-World's limit), got {max_steps}")
        self.terminate_on_success = terminate_on_success

        setup_headless_gl()
        from metaworld.env_dict import ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE
        from metaworld.policies import ENV_POLICY_MAP

        from chunkpolicy.sim.mujoco_render import CameraRenderer

        self._env = ALL_V3_ENVIRONMENTS_GOAL_OBSERVABLE[f"{task}-goal-observable"]()
        self._env.max_path_length = MAX_PATH_LENGTH
        self._expert = ENV_POLICY_MAP[task]()
        self._raw: np.ndarray | None = None
        self.control_hz = 1.0 / self._env.dt
        self._renderer = CameraRenderer(self._env.model, *self.image_size, {c: c for c in self.spec.cameras},
                                        flip=FLIPPED, fast=fast_render)

    @property
    def raw_env(self) -> Any:
        """The underlying Meta-World env (for debugging; stepping it directly bypasses the episode bookkeeping)."""
        return self._env

    def _render(self) -> dict[str, np.ndarray]:
        return self._renderer.render_all(self._env.data)

    def _obs(self, raw: np.ndarray) -> Obs:
        self._raw = raw
        return {"images": self._frames(), "state": raw[:4].astype(np.float32)}

    def _reset(self, seed: int) -> Obs:
        env = self._env
        env._freeze_rand_vec = False  # draw a new scene ...
        env.seeded_rand_vec = True  # ... from env.np_random, which seed() sets
        env.seed(seed)
        raw, _ = env.reset()
        # Meta-World puts its goal markers where they belong only after a step (reset leaves the site where the
        # model's kinematics put it, which depends on the env's previous episode): place them now, so that the first
        # frame of an episode is the same whatever this env ran before
        for site in env._target_site_config:
            env._set_pos_site(*site)
        return self._obs(raw)

    def _step(self, action: np.ndarray) -> tuple[Obs, float, bool, dict[str, Any]]:
        a = np.clip(action, -1.0, 1.0).astype(np.float32)
        raw, reward, _, _, info = self._env.step(a)
        return self._obs(raw), float(reward), bool(info.get("success", 0.0)), {"raw_info": info}

    def expert_action(self) -> np.ndarray:
        if self._raw is None:
            raise RuntimeError("expert_action: call reset() first")
        with warnings.catch_warnings():  # "Constant(s) may be too high": the env clips, and so do we
            warnings.simplefilter("ignore", UserWarning)
            a = self._expert.get_action(self._raw)
        return np.clip(np.asarray(a, dtype=np.float32), -1.0, 1.0)

    def close(self) -> None:
        if getattr(self, "_renderer", None) is not None:
            self._renderer.close()
            self._renderer = None
        if getattr(self, "_env", None) is not None:
            self._env.close()
            self._env = None


def make(task: str, **kwargs: Any) -> MetaWorldEnv:
    return MetaWorldEnv(task, **kwargs)
