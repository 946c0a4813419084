"""ALOHA bimanual adapter (gym-aloha 0.1.5 scenes: two ViperX 300s arms), with scripted experts written here.

A third embodiment, with a joint-space action space unlike the Cartesian ones of Meta-World and Fetch:

* Tasks: ``transfer-cube`` (the right arm picks up the red cube and hands it to the left arm) and ``insertion`` (the
  right arm picks up the peg, the left arm the socket, and the peg goes into the socket in mid-air).
* Action (14, gym-aloha's order and units): per arm (``left_arm_*`` then ``right_arm_*``) six absolute joint
  position targets in radians (``waist, shoulder, elbow, forearm_roll, wrist_angle, wrist_rotate``) and ``gripper``,
  the finger opening target normalized as gym-aloha does (0 closed … 1 open, linear in finger position between
  18.4 mm and 58 mm). Targets beyond a joint's range are clamped by MuJoCo's actuator ``ctrlrange`` (the gripper's
  range is about [0.06, 0.98] normalized).
* State (14): the joint positions (qpos) under the same names and units (gripper = normalized finger opening).
  Action and state share names, so joint dims may be trained as deltas; grippers stay absolute.
* Cameras: ``top`` (default), ``angle``, ``front_close``, ``left_pillar``, ``right_pillar``, ``left_wrist``,
  ``right_wrist`` (the scene's cameras; gym-aloha's observation is ``top``; the wrist cameras ride on the grippers).
  Default 64×64 like the other adapters; the scene cameras are 4:3 (ACT and gym-aloha render 480×640), so a square
  frame crops the arm bases at the sides while the table between the arms stays in view; pass e.g.
  ``image_size=(96, 128)`` for the full 4:3 view. Shadows and multisampling are off.
* Control rate 50 Hz (10 substeps × 2 ms). Episodes end on success or after ``max_steps`` (default 400 for both
  tasks, ACT's episode length for its scripted sim tasks).
* Success = the task's maximum reward (4): transfer — the left gripper holds the cube off the table; insertion — the
  peg touches the pin inside the socket. Reward and dynamics are gym-aloha's own task classes, stepped without
  gym-aloha's per-step 3×480×640 render.
* Seeds: ``reset(seed)`` places the objects with gym-aloha's ``sample_box_pose(seed)`` /
  ``sample_insertion_pose(seed)``, so a seed gives the same scene as ``gym_aloha``'s ``env.reset(seed=seed)``.
* Expert (:meth:`AlohaEnv.expert_action`): scripted end-effector waypoints (:mod:`.aloha_expert`) are run in
  gym-aloha's end-effector (mocap) scene and the joint positions they produce are replayed as joint commands (ACT's
  recording method), planned in a few segments, each from the joint env's state at its start.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from chunkpolicy.sim.base import Obs, SimEnv, camera_spec, setup_headless_gl
from chunkpolicy.spaces import EmbodimentSpec

EMBODIMENT = "aloha"
_ARM_JOINTS = ("waist", "shoulder", "elbow", "forearm_roll", "wrist_angle", "wrist_rotate", "gripper")
ACTION_NAMES: tuple[str, ...] = tuple(f"{side}_arm_{j}" for side in ("left", "right") for j in _ARM_JOINTS)
STATE_NAMES = ACTION_NAMES
GRIPPER_DIMS = ("left_arm_gripper", "right_arm_gripper")
CAMERAS = ("top", "angle", "front_close", "left_pillar", "right_pillar", "left_wrist", "right_wrist")
DEFAULT_CAMERAS = ("top",)
CONTROL_HZ = 50.0  # gym-aloha's DT = 0.02 s (10 substeps × 2 ms); checked against the scene in tests
MAX_STEPS = {"transfer-cube": 400, "insertion": 400}
SUCCESS_REWARD = 4.0
PROMPTS = {
    "transfer-cube": "pick up the red cube with the right arm and hand it over to the left arm",
    "insertion": "pick up the red peg with the right arm and the blue socket with the left arm, "
                 "then insert the peg into the socket",
}
TASKS: tuple[str, ...] = tuple(PROMPTS)
HAS_EXPERT = True
_ALIASES = {"transfer_cube": "transfer-cube", "transfercube": "transfer-cube", "AlohaTransferCube": "transfer-cube",
            "sim_transfer_cube": "transfer-cube", "sim_transfer_cube_scripted": "transfer-cube",
            "AlohaInsertion": "insertion", "sim_insertion": "insertion", "sim_insertion_scripted": "insertion"}
_SCENES = {"transfer-cube": "bimanual_viperx_transfer_cube.xml", "insertion": "bimanual_viperx_insertion.xml"}


def make_spec(cameras: Sequence[str] = DEFAULT_CAMERAS, **_: Any) -> EmbodimentSpec:
    """The ``aloha`` embodiment with these cameras (other adapter options do not change the spec)."""
    return camera_spec(EMBODIMENT, "ALOHA", cameras, CAMERAS, action_names=ACTION_NAMES, state_names=STATE_NAMES,
                       control_hz=CONTROL_HZ, gripper_dims=GRIPPER_DIMS)


def check_task(task: str) -> str:
    t = _ALIASES.get(task.split("-v")[0] if task.startswith("Aloha") else task, task)
    if t not in PROMPTS:
        raise ValueError(f"unknown ALOHA task {task!r}; tasks: {list(TASKS)} (or gym-aloha's AlohaTransferCube-v0 / "
                         "AlohaInsertion-v0)")
    return t


def initial_object_qpos(task: str, seed: int) -> np.ndarray:
    """Object poses ``[7]`` (cube) or ``[14]`` (peg, socket), each xyz (m) + quat (w, x, y, z), that gym-aloha
    draws for ``seed``."""
    from gym_aloha.utils import sample_box_pose, sample_insertion_pose

    if check_task(task) == "transfer-cube":
        return np.asarray(sample_box_pose(seed), dtype=np.float64)
    return np.concatenate(sample_insertion_pose(seed)).astype(np.float64)


class AlohaEnv(SimEnv):
    """One ALOHA task in gym-aloha's joint-space scene.

    Args:
        task: ``"transfer-cube"`` or ``"insertion"``.
        cameras: camera names (see :data:`CAMERAS`).
        image_size: ``(h, w)`` of every camera frame.
        max_steps: episode length limit (default :data:`MAX_STEPS`).
        fast_render: turn off shadows and multisampling (several times faster CPU frames).
        terminate_on_success: end the episode at the first step with reward 4 (gym-aloha's ``terminated``).
    """

    has_expert = HAS_EXPERT

    def __init__(self, task: str = "transfer-cube", cameras: Sequence[str] = DEFAULT_CAMERAS,
                 image_size: tuple[int, int] = (64, 64), max_steps: int | None = None, fast_render: bool = True,
                 terminate_on_success: bool = True) -> None:
        super().__init__()
        self.task = check_task(task)
        self.task_prompt = PROMPTS[self.task]
        self.spec = make_spec(cameras)
        self.image_size = (int(image_size[0]), int(image_size[1]))
        if min(self.image_size) < 1:
            raise ValueError(f"image_size: expected positive (h, w), got {image_size}")
        self.max_steps = int(max_steps or MAX_STEPS[self.task])
        if self.max_steps < 1:
            raise ValueError(f"max_steps: expected a positive int, got {max_steps}")
        self.terminate_on_success = terminate_on_success

        setup_headless_gl()
        from dm_control import mujoco as dm_mujoco
        from gym_aloha.constants import ASSETS_DIR, DT
        from gym_aloha.tasks.sim import InsertionTask, TransferCubeTask

        from chunkpolicy.sim.mujoco_render import CameraRenderer

        self.physics = dm_mujoco.Physics.from_xml_path(str(ASSETS_DIR / _SCENES[self.task]))
        self._task = TransferCubeTask() if self.task == "transfer-cube" else InsertionTask()
        self.n_sub_steps = int(round(DT / self.physics.timestep()))
        self.control_hz = 1.0 / (self.n_sub_steps * self.physics.timestep())
        self._renderer = CameraRenderer(self.physics.model.ptr, *self.image_size, {c: c for c in self.spec.cameras},
                                        fast=fast_render)
        self._object_qpos: np.ndarray | None = None
        self.expert: Any = None  # aloha_expert.ScriptedExpert, built on the first expert_action()
        self._expert_ready = False  # expert reset for the current episode

    @property
    def raw_env(self) -> Any:
        """The dm_control ``Physics`` (for debugging; stepping it directly bypasses the episode bookkeeping)."""
        return self.physics

    def _render(self) -> dict[str, np.ndarray]:
        return self._renderer.render_all(self.physics.data.ptr)

    def _obs(self) -> Obs:
        state = self._task.get_qpos(self.physics).astype(np.float32)
        return {"images": self._frames(), "state": state}

    def _reset(self, seed: int) -> Obs:
        from gym_aloha.tasks import sim as aloha_sim

        self._object_qpos = initial_object_qpos(self.task, seed)
        self._expert_ready = False
        # gym-aloha's joint-space tasks read the object poses from this module global in initialize_episode
        aloha_sim.BOX_POSE[0] = self._object_qpos.copy()
        with self.physics.reset_context():
            self._task.initialize_episode(self.physics)
        return self._obs()

    def _step(self, action: np.ndarray) -> tuple[Obs, float, bool, dict[str, Any]]:
        # what gym-aloha's dm_control Environment.step does, minus its 3-camera 480x640 observation render
        self._task.before_step(action, self.physics)
        self.physics.step(self.n_sub_steps)
        self._task.after_step(self.physics)
        reward = float(self._task.get_reward(self.physics))
        return self._obs(), reward, reward >= SUCCESS_REWARD, {"reward_stage": reward}

    def expert_action(self) -> np.ndarray:
        """Scripted expert's joint command ``[14]`` for the current step (privileged: it reads the object poses).

        Planned segment by segment in the end-effector scene (:class:`~chunkpolicy.sim.aloha_expert.ScriptedExpert`);
        a step that starts a segment costs that segment's planning (a few hundred end-effector steps)."""
        if self._object_qpos is None:
            raise RuntimeError("expert_action: call reset() first")
        if self.expert is None:
            from chunkpolicy.sim.aloha_expert import ScriptedExpert

            self.expert = ScriptedExpert(self.task, self.max_steps)
        if not self._expert_ready:
            self.expert.reset(self._object_qpos)
            self._expert_ready = True
        return self.expert.action(self.t, self.physics)

    def close(self) -> None:
        if getattr(self, "_renderer", None) is not None:
            self._renderer.close()
            self._renderer = None
        self.expert = None


def make(task: str, **kwargs: Any) -> AlohaEnv:
    return AlohaEnv(task, **kwargs)
