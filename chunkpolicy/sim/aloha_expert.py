"""Scripted ALOHA experts: end-effector waypoints run in gym-aloha's mocap scene, replayed as joint commands.

The method is the one of the ACT paper (Zhao et al., 2023, simulated tasks): a scripted policy moves two mocap bodies
welded to the grippers (``bimanual_viperx_end_effector_*.xml``) along piecewise-linear waypoints computed from the
object poses; the arm joint positions this produces are recorded and replayed as joint-position commands in the
joint-space scene (``bimanual_viperx_*.xml``, the env the policy sees). The end-effector scene serves as the
inverse kinematics.

* Waypoints: per arm ``(t, grip point xyz [m, world], gripper-link orientation quat [w, x, y, z, world],
  gripper [0 closed … 1 open])``; the grip point lies between the finger pads. Between two waypoints position,
  orientation (normalized linear blend) and gripper command are interpolated linearly in time; after the last
  waypoint an arm holds it.
* Recorded command for control step ``t`` (``[14]``, the joint env's action order): the 6 arm joint positions (rad)
  each arm reached at the end of end-effector step ``t`` (the target the joint controllers should reach one step
  later), and the gripper command (normalized, as gym-aloha's joint env reads it) of step ``t``. Recording the
  commanded rather than the reached gripper opening keeps a closing gripper squeezing once the fingers stop on an
  object, as ACT does.
* Unlike ACT, which records one open-loop trajectory from the initial poses, the plan is split into segments at
  :data:`SWITCH_T`: at each switch the end-effector scene is set to the joint env's current state (arms, objects)
  and the next segment is planned from where the objects really are (a grasp never holds an object exactly at the
  grip point, and the joint-space replay drifts from the end-effector run by millimetres). Within a segment the
  commands are replayed open loop.
* Changes to gym-aloha's end-effector scene (only the planner sees it; the policy's joint scene is untouched): the
  mocap welds hold the gripper-link origin on the mocap body (MuJoCo 3 otherwise keeps the qpos0 offset of 13.5 cm),
  and they are stiff (``solimp`` 0.9) so the grippers follow the plan instead of trailing it by centimetres; the
  forearm roll is limited to ±1 rad so every demonstration uses the same joint branch (no π roll + π wrist turn).
* Grasps approach from above with the gripper pitched 60° down and turned to point at the object from its arm's base;
  carrying and the hand-over / insertion happen with the grippers pointing along x.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import numpy as np

__all__ = ["Waypoint", "EndEffectorScene", "ScriptedExpert", "quat_axis_angle", "quat_mul", "interpolate",
           "transfer_cube_waypoints", "insertion_waypoints", "SWITCH_T"]

OPEN, CLOSED = 1.0, 0.0


class Waypoint(NamedTuple):
    t: int  # control step
    xyz: np.ndarray  # [3] metres, world frame
    quat: np.ndarray  # [4] (w, x, y, z)
    gripper: float  # normalized opening command: 0 closed … 1 open


def quat_axis_angle(axis: Sequence[float], degrees: float) -> np.ndarray:
    """Unit quaternion ``[4]`` (w, x, y, z) of a rotation by ``degrees`` about ``axis``."""
    a = np.asarray(axis, dtype=np.float64)
    a = a / np.linalg.norm(a)
    half = np.deg2rad(degrees) / 2
    return np.concatenate([[np.cos(half)], np.sin(half) * a])


def quat_mul(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Hamilton product ``p ⊗ q`` (apply ``q`` first, in ``p``'s frame) of (w, x, y, z) quaternions."""
    w1, x1, y1, z1 = p
    w2, x2, y2, z2 = q
    return np.array([w1 * w2 - x1 * x2 - y1 * y2 - z1 * z2,
                     w1 * x2 + x1 * w2 + y1 * z2 - z1 * y2,
                     w1 * y2 - x1 * z2 + y1 * w2 + z1 * x2,
                     w1 * z2 + x1 * y2 - y1 * x2 + z1 * w2])


def interpolate(waypoints: Sequence[Waypoint], t: float) -> tuple[np.ndarray, np.ndarray, float]:
    """``(xyz [3], quat [4], gripper)`` at control step ``t``; holds the first / last waypoint outside their span."""
    if t <= waypoints[0].t:
        w = waypoints[0]
        return w.xyz.copy(), w.quat / np.linalg.norm(w.quat), float(w.gripper)
    for a, b in zip(waypoints[:-1], waypoints[1:]):
        if a.t <= t <= b.t:
            f = (t - a.t) / max(b.t - a.t, 1e-9)
            q = a.quat + f * (b.quat - a.quat)
            return a.xyz + f * (b.xyz - a.xyz), q / np.linalg.norm(q), float(a.gripper + f * (b.gripper - a.gripper))
    w = waypoints[-1]
    return w.xyz.copy(), w.quat / np.linalg.norm(w.quat), float(w.gripper)


def _wp(t: int, xyz: Any, quat: Any, gripper: float) -> Waypoint:
    return Waypoint(int(t), np.asarray(xyz, dtype=np.float64), np.asarray(quat, dtype=np.float64), float(gripper))


# orientations of the gripper links in the world frame, (w, x, y, z): pointing along the arm, fingers closing along y
LEFT_LEVEL = np.array([1.0, 0.0, 0.0, 0.0])  # left gripper points +x (towards the right arm)
RIGHT_LEVEL = np.array([0.0, 0.0, 0.0, 1.0])  # right gripper points -x (its base is turned 180° about z)
LEFT_BASE, RIGHT_BASE = np.array([-0.469, 0.5]), np.array([0.469, 0.5])  # arm bases (xy, m) in the scenes
CUBE_Z, PEG_Z, SOCKET_Z = 0.02, 0.01, 0.022  # centre heights (m) of the objects resting on the table (top at z = 0)
GRIP_DEPTH = 0.03  # grip point this far beyond the finger-geom centres along the gripper (m): objects are held there
MIN_GRIP_Z = 0.025  # lowest grip point when grasping (m): the fingertips of a gripper pitched 60° clear the table
WELD_SOLIMP = (0.9, 0.95, 0.001, 0.5, 2.0)
FOREARM_ROLL_LIMIT = 1.0  # rad; the planner's arms may not roll the forearm further (see EndEffectorScene)
LIFTED_Z = 0.06  # an object centre above this height (m) at a switch is held in a gripper
PEG_HALF, PIN_HALF = 0.06, 0.04  # half-lengths along their x axes (m): the peg touches the pin once it is 2 cm in


def _grasp_point(obj: np.ndarray) -> np.ndarray:
    return np.array([obj[0], obj[1], max(obj[2], MIN_GRIP_Z)])


def pitch_down(level: np.ndarray, degrees: float, toward: np.ndarray | None = None) -> np.ndarray:
    """``level`` tilted so the gripper points ``degrees`` below the horizon (about world y; sign by pointing side),
    and, with ``toward`` (an xy point ``[2+]``), turned about z to point at it from its arm's base (how a person
    reaches for an object off the arm's centre line)."""
    left = level is LEFT_LEVEL
    q = quat_mul(quat_axis_angle((0, 1, 0), (1.0 if left else -1.0) * degrees), level)
    if toward is None:
        return q
    base = LEFT_BASE if left else RIGHT_BASE
    d = np.asarray(toward[:2], dtype=np.float64) - base
    yaw = np.degrees(np.arctan2(d[1], d[0]) if left else np.arctan2(-d[1], -d[0]))
    return quat_mul(quat_axis_angle((0, 0, 1), yaw), q)


# The experts run in phases. Phase 1 (from the initial object poses): grasp and lift. At each step of
# ``SWITCH_T[task]`` the planner reads where the lifted objects really are (a grasp never holds an object exactly at the
# grip point, and it slips) and plans the next segment from there: the hand-over; or, for the insertion, levelling the
# socket and lining the peg up with it, then pushing the peg in a little further at each switch.
_PUSH = ((265, 0.03), (280, 0.02), (290, 0.01), (300, 0.005), (310, 0.0), (320, -0.005), (330, -0.01), (340, -0.015),
         (350, -0.02), (360, -0.025))
SWITCH_T = {"transfer-cube": (230,), "insertion": (230,) + tuple(t for t, _ in _PUSH)}
INSERTION_TIP_GAP = dict(_PUSH)  # switch step -> how far short of the pin's end the peg tip is taken (m; < 0: past)


def transfer_cube_waypoints(left0: Waypoint, right0: Waypoint,
                            box_xyz: np.ndarray) -> tuple[list[Waypoint], list[Waypoint]]:
    """Phase 1 of the cube transfer: the right arm grasps the cube from above (gripper pitched 60° down) and lifts it
    to a hand-over point in the middle; the left arm, rolled 90° so its fingers close vertically across the right
    ones, waits beside it.

    Waypoints give the grip point (between the finger pads, m) and the gripper-link orientation; ``left0`` /
    ``right0`` are the arms' start waypoints; ``box_xyz``: cube centre ``[3]`` (m; taken as resting on the table)."""
    cube = np.array([box_xyz[0], box_xyz[1], CUBE_Z])
    handover = np.array([0.0, 0.5, 0.25])
    pick, carry = pitch_down(RIGHT_LEVEL, 60, toward=cube), pitch_down(RIGHT_LEVEL, 60)
    roll = quat_mul(LEFT_LEVEL, quat_axis_angle((1, 0, 0), 90))
    right = [
        right0,
        _wp(90, cube + [0, 0, 0.08], pick, OPEN),  # over the cube
        _wp(130, _grasp_point(cube), pick, OPEN),  # down around it
        _wp(160, _grasp_point(cube), pick, CLOSED),  # grasp
        _wp(200, handover + [0.05, 0, 0], carry, CLOSED),  # lift towards the middle
        _wp(220, handover, carry, CLOSED),
    ]
    left = [left0, _wp(100, handover + [-0.12, 0, 0], roll, OPEN)]  # wait beside the hand-over point
    return left, right


def transfer_cube_handover(left: list[Waypoint], right: list[Waypoint], cube: np.ndarray,
                           t0: int) -> tuple[list[Waypoint], list[Waypoint]]:
    """Phase 2 of the cube transfer, from step ``t0`` with the cube held at ``cube`` ``[3]``: the left gripper comes
    level with the cube, moves in around it and closes; the right gripper opens and backs off; the left arm carries
    the cube away to the left."""
    lq, rq, rp = left[-1].quat, right[-1].quat, right[-1].xyz
    left = left + [
        _wp(t0, left[-1].xyz, lq, OPEN),
        _wp(t0 + 20, cube + [-0.12, 0, 0], lq, OPEN),  # level with the cube
        _wp(t0 + 50, cube + [-0.005, 0, 0], lq, OPEN),  # fingers around it
        _wp(t0 + 70, cube + [-0.005, 0, 0], lq, CLOSED),  # take it
        _wp(t0 + 100, cube + [-0.005, 0, 0], lq, CLOSED),
        _wp(t0 + 140, cube + [-0.12, 0, 0.02], lq, CLOSED),  # carry it to the left
    ]
    right = right + [
        _wp(t0 + 70, rp, rq, CLOSED),  # hold until the left gripper has closed
        _wp(t0 + 90, rp, rq, OPEN),  # let go
        _wp(t0 + 130, rp + [0.1, 0, 0.05], rq, OPEN),  # back off to the right
    ]
    return left, right


def insertion_waypoints(left0: Waypoint, right0: Waypoint, peg_xyz: np.ndarray,
                        socket_xyz: np.ndarray) -> tuple[list[Waypoint], list[Waypoint]]:
    """Phase 1 of the insertion: the right arm grasps the peg, the left arm the socket (both pitched 60° down, each
    from its own side), and they lift them to the meeting height, 24 cm apart.

    ``left0`` / ``right0``: the arms' start waypoints; ``peg_xyz`` / ``socket_xyz``: object centres ``[3]`` (m)."""
    meet = np.array([0.0, 0.5, 0.15])
    peg = np.array([peg_xyz[0], peg_xyz[1], PEG_Z])
    socket = np.array([socket_xyz[0], socket_xyz[1], SOCKET_Z])

    def arm(w0: Waypoint, obj: np.ndarray, level: np.ndarray, side: float) -> list[Waypoint]:
        q, carry = pitch_down(level, 60, toward=obj), pitch_down(level, 60)
        return [
            w0,
            _wp(90, obj + [0, 0, 0.08], q, OPEN),  # over the object
            _wp(120, _grasp_point(obj), q, OPEN),  # down around it
            _wp(150, _grasp_point(obj), q, CLOSED),  # grasp
            _wp(210, meet + [side * 0.12, 0, 0], carry, CLOSED),  # lift to the meeting height, pointing along x
        ]

    return arm(left0, socket, LEFT_LEVEL, -1.0), arm(right0, peg, RIGHT_LEVEL, 1.0)


def rotation_between(u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Shortest-arc unit quaternion ``[4]`` turning direction ``u`` ``[3]`` onto ``v`` ``[3]``."""
    u, v = u / np.linalg.norm(u), v / np.linalg.norm(v)
    q = np.concatenate([[1.0 + float(u @ v)], np.cross(u, v)])
    return q / np.linalg.norm(q)


def insertion_align(right: list[Waypoint], peg: np.ndarray, peg_axis: np.ndarray, socket: np.ndarray,
                    socket_axis: np.ndarray, tip_gap: float, t0: int, duration: int) -> list[Waypoint]:
    """Phase 2 of the insertion (run at every switch: line up, then push in steps): from step ``t0``, over
    ``duration`` steps, turn and move the right gripper so the peg (centre ``peg``, long axis ``peg_axis``) lies on
    the socket's axis (centre ``socket``, axis ``socket_axis`` pointing at the opening the peg enters) with its tip
    ``tip_gap`` metres short of the pin's end (negative: past it). Poses are ``[3]`` (m) as measured at ``t0``."""
    axis = socket_axis / np.linalg.norm(socket_axis)
    rq, rp = right[-1].quat, right[-1].xyz
    turn = rotation_between(peg_axis if peg_axis @ axis > 0 else -peg_axis, axis)
    centre_from_grip = _rotmat(turn) @ (peg - rp)  # where the peg centre will be, seen from the grip point
    target = socket + axis * (PEG_HALF + PIN_HALF + tip_gap) - centre_from_grip
    return right + [_wp(t0, rp, rq, CLOSED), _wp(t0 + duration, target, quat_mul(turn, rq), CLOSED)]


class EndEffectorScene:
    """gym-aloha's end-effector (mocap) scene for one task, stepped at the joint env's control rate.

    Commands are grip points (midway between the finger pads, m) and gripper-link orientations in the world frame;
    the scene converts them to mocap poses through each arm's weld.

    Args:
        task: ``"transfer-cube"`` or ``"insertion"``.
    """

    def __init__(self, task: str) -> None:
        from dm_control import mujoco as dm_mujoco
        from gym_aloha.constants import ASSETS_DIR, DT
        from gym_aloha.tasks.sim_end_effector import InsertionEndEffectorTask, TransferCubeEndEffectorTask

        xml, cls = {"transfer-cube": ("bimanual_viperx_end_effector_transfer_cube.xml", TransferCubeEndEffectorTask),
                    "insertion": ("bimanual_viperx_end_effector_insertion.xml", InsertionEndEffectorTask)}[task]
        self.task = task
        self.physics = dm_mujoco.Physics.from_xml_path(str(ASSETS_DIR / xml))
        model = self.physics.model
        # The scenes' mocap welds give no `relpose`, so MuJoCo takes the relative pose at qpos0, which holds each
        # gripper link 13.5 cm away from its mocap body. Put the link origin on the mocap body instead (zero position
        # offset) and keep the orientation offset (right arm: 180° about z, its base faces the other way), so a
        # commanded pose is the link's pose. eq_data (weld) = anchor[0:3], relpose pos[3:6], quat[6:10], torquescale.
        weld = np.flatnonzero(model.eq_type == 1)  # mjEQ_WELD, in XML order: left, right
        if len(weld) != 2:
            raise ValueError(f"{xml}: expected 2 mocap welds, found {len(weld)}")
        model.eq_data[weld, 3:6] = 0.0
        # The welds' soft impedance (solimp 0.25) lets the grippers trail their targets by several cm against the
        # joints' friction; a stiff weld makes the recorded joint path the planned one.
        model.eq_solimp[weld] = WELD_SOLIMP
        # Without it, some reaches end with the forearm rolled by π and the wrist rotated back by π (same gripper pose,
        # other joint branch): valid, but it would make the demonstrations bimodal in joint space.
        for side in ("left", "right"):
            j = model.name2id(f"vx300s_{side}/forearm_roll", "joint")
            model.jnt_range[j] = [-FOREARM_ROLL_LIMIT, FOREARM_ROLL_LIMIT]
        self._rel_conj = [model.eq_data[i, 6:10] * np.array([1.0, -1.0, -1.0, -1.0]) for i in weld]
        self._task = cls()
        self.n_sub_steps = int(round(DT / self.physics.timestep()))
        # grip point in the gripper-link frame: midway between the two finger pads (fingers slide along link y)
        self._task.initialize_robots(self.physics)
        self.physics.forward()
        d = self.physics.named.data
        self._grip_offset = []
        for side in ("left", "right"):
            link = f"vx300s_{side}/gripper_link"
            mid = (d.geom_xpos[f"vx300s_{side}/10_left_gripper_finger"]
                   + d.geom_xpos[f"vx300s_{side}/10_right_gripper_finger"]) / 2
            self._grip_offset.append(d.xmat[link].reshape(3, 3).T @ (mid - d.xpos[link]) + [GRIP_DEPTH, 0.0, 0.0])

    def reset(self, object_qpos: np.ndarray) -> tuple[Waypoint, Waypoint]:
        """Arms at gym-aloha's start pose, objects at ``object_qpos`` (``[7]`` cube, or ``[14]`` peg + socket: xyz and
        quat each); returns the arms' start waypoints ``(left, right)`` at ``t = 0`` (gripper closed)."""
        ph = self.physics
        with ph.reset_context():
            self._task.initialize_robots(ph)
            ph.data.qpos[16:16 + len(object_qpos)] = object_qpos
        out = []
        for arm in (0, 1):
            link_q = quat_mul(ph.data.mocap_quat[arm], _conj(self._rel_conj[arm]))
            grip = ph.data.mocap_pos[arm] + _rotmat(link_q) @ self._grip_offset[arm]
            out.append(_wp(0, grip, link_q, CLOSED))
        return out[0], out[1]

    def _mocap(self, arm: int, grip: np.ndarray, link_q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return grip - _rotmat(link_q) @ self._grip_offset[arm], quat_mul(link_q, self._rel_conj[arm])

    def step(self, left: tuple[np.ndarray, np.ndarray, float], right: tuple[np.ndarray, np.ndarray, float]) -> float:
        """Move each arm's grip point and link orientation to ``(xyz, quat, gripper)`` and simulate one control step;
        returns the reward."""
        (lp, lq), (rp, rq) = self._mocap(0, left[0], left[1]), self._mocap(1, right[0], right[1])
        action = np.concatenate([lp, lq, [left[2]], rp, rq, [right[2]]])
        self._task.before_step(action, self.physics)
        self.physics.step(self.n_sub_steps)
        return float(self._task.get_reward(self.physics))

    def sync_from(self, joint_physics: Any) -> None:
        """Copy the joint-space scene's state (arm joints, objects, gripper commands) into this scene and put each
        mocap target on its gripper link, so planning continues from where the joint env really is."""
        src, dst = joint_physics.data, self.physics.data
        if src.qpos.shape != dst.qpos.shape:
            raise ValueError(f"sync_from: joint scene has {src.qpos.shape[0]} qpos, end-effector scene "
                             f"{dst.qpos.shape[0]} (different tasks?)")
        dst.qpos[:], dst.qvel[:] = src.qpos, src.qvel
        dst.qacc_warmstart[:] = src.qacc_warmstart
        dst.ctrl[:] = src.ctrl[[6, 7, 14, 15]]  # the joint scene's finger actuators
        d = joint_physics.named.data
        for arm, side in enumerate(("left", "right")):
            link = f"vx300s_{side}/gripper_link"
            dst.mocap_pos[arm] = d.xpos[link]
            dst.mocap_quat[arm] = quat_mul(d.xquat[link], self._rel_conj[arm])
        self.physics.forward()

    def joint_command(self) -> np.ndarray:
        """``[14]``: arm joint positions (rad) now and the gripper commands now (normalized 0 closed … 1 open)."""
        from gym_aloha.constants import normalize_puppet_gripper_position

        qpos, ctrl = self.physics.data.qpos, self.physics.data.ctrl
        return np.concatenate([qpos[0:6], [normalize_puppet_gripper_position(ctrl[0])],
                               qpos[8:14], [normalize_puppet_gripper_position(ctrl[2])]])


def _conj(q: np.ndarray) -> np.ndarray:
    return q * np.array([1.0, -1.0, -1.0, -1.0])


def _rotmat(q: np.ndarray) -> np.ndarray:
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                     [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                     [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


def _replan(scene: EndEffectorScene, left: list[Waypoint], right: list[Waypoint],
            t: int) -> tuple[list[Waypoint], list[Waypoint]]:
    """Next-segment waypoints from the object poses measured in the end-effector scene at switch step ``t``."""
    pos = scene.physics.data.qpos
    if scene.task == "transfer-cube":
        if pos[18] < LIFTED_Z:  # the grasp failed: keep still, the episode fails
            return _hold(left, t), _hold(right, t)
        return transfer_cube_handover(left, right, pos[16:19].copy(), t)
    peg, peg_axis = pos[16:19].copy(), _rotmat(pos[19:23])[:, 0]
    socket, socket_axis = pos[23:26].copy(), _rotmat(pos[26:30])[:, 0]
    socket_axis = socket_axis if socket_axis[0] > 0 else -socket_axis  # the opening that faces the peg (+x side)
    held = min(peg[2], socket[2]) > LIFTED_Z and abs(socket_axis[2]) < 0.7 and abs(peg_axis[2]) < 0.7
    if not held:  # a grasp failed (an object is on the table or hangs steeply): keep still, the episode fails
        return _hold(left, t), _hold(right, t)
    if t == SWITCH_T["insertion"][0]:
        left, socket, socket_axis = level_socket(left, socket, socket_axis, t, 30)
        return left, insertion_align(right, peg, peg_axis, socket, socket_axis, 0.04, t, 30)
    return left, insertion_align(right, peg, peg_axis, socket, socket_axis, INSERTION_TIP_GAP[t], t, 10)


def _hold(arm: list[Waypoint], t: int) -> list[Waypoint]:
    return arm + [_wp(t, arm[-1].xyz, arm[-1].quat, arm[-1].gripper)]


def level_socket(left: list[Waypoint], socket: np.ndarray, socket_axis: np.ndarray, t0: int,
                 duration: int) -> tuple[list[Waypoint], np.ndarray, np.ndarray]:
    """Turn the left gripper (about its grip point) so the socket's axis becomes horizontal, over ``duration`` steps
    from ``t0``; returns the waypoints and the socket's predicted centre ``[3]`` and axis ``[3]`` afterwards."""
    lq, lp = left[-1].quat, left[-1].xyz
    flat = np.array([socket_axis[0], socket_axis[1], 0.0])
    turn = rotation_between(socket_axis, flat)
    centre = lp + _rotmat(turn) @ (socket - lp)
    return (left + [_wp(t0, lp, lq, CLOSED), _wp(t0 + duration, lp, quat_mul(turn, lq), CLOSED)], centre,
            flat / np.linalg.norm(flat))


class ScriptedExpert:
    """Joint commands of the scripted expert for one task, planned segment by segment in the end-effector scene.

    Args:
        task: ``"transfer-cube"`` or ``"insertion"``.
        num_steps: episode length (control steps) to plan for.
    """

    def __init__(self, task: str, num_steps: int) -> None:
        self.scene = EndEffectorScene(task)
        self.task, self.num_steps = task, int(num_steps)
        self._left: list[Waypoint] = []
        self._right: list[Waypoint] = []
        self._cmds = np.zeros((0, 14), dtype=np.float32)
        self._start = 0
        self._synced_at_start = False
        self.ee_max_reward = 0.0  # best reward the end-effector runs reached (diagnostic: 4 = the plan solves it)

    def reset(self, object_qpos: np.ndarray) -> None:
        """New episode with the objects at ``object_qpos`` (``[7]`` cube or ``[14]`` peg + socket, xyz + quat each)."""
        object_qpos = np.asarray(object_qpos, dtype=np.float64)
        left0, right0 = self.scene.reset(object_qpos)
        if self.task == "transfer-cube":
            self._left, self._right = transfer_cube_waypoints(left0, right0, object_qpos[:3])
        else:
            self._left, self._right = insertion_waypoints(left0, right0, object_qpos[:3], object_qpos[7:10])
        self._cmds, self._start, self.ee_max_reward = np.zeros((0, 14), dtype=np.float32), 0, 0.0
        self._synced_at_start = True  # the scene already holds the episode's initial state

    def action(self, t: int, joint_physics: Any) -> np.ndarray:
        """Command ``[14]`` for step ``t`` of the joint env whose dm_control ``Physics`` is ``joint_physics``."""
        if not self._left:
            raise RuntimeError("ScriptedExpert.action: call reset() first")
        if not self._start <= t < self._start + len(self._cmds):
            self._plan_segment(t, joint_physics)
        return self._cmds[t - self._start].copy()

    def _plan_segment(self, t: int, joint_physics: Any) -> None:
        if not (t == 0 and self._synced_at_start):
            self.scene.sync_from(joint_physics)
        self._synced_at_start = False
        if t in SWITCH_T[self.task]:
            self._left, self._right = _replan(self.scene, self._left, self._right, t)
        end = min([s for s in SWITCH_T[self.task] if s > t] + [max(self.num_steps, t + 1)])
        cmds = np.empty((end - t, 14), dtype=np.float32)
        for k in range(t, end):
            reward = self.scene.step(interpolate(self._left, k), interpolate(self._right, k))
            self.ee_max_reward = max(self.ee_max_reward, reward)
            cmds[k - t] = self.scene.joint_command()
        self._cmds, self._start = cmds, t
