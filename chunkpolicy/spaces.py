"""Embodiment specs and the unified action/state space shared by every robot.

A robot declares an :class:`EmbodimentSpec` (named action dims, named state dims, cameras, control rate). A
:class:`UnifiedSpace` of fixed size ``D`` (default 32) maps each registered embodiment's vectors into ``[..., D]``:

* ``pad`` layout (π0): the robot's dims are left-aligned, the rest are zeros.
* ``slots`` layout (RDT): every dim name is a named physical slot (``right_arm_joint_0``, ``right_gripper``,
  ``right_eef_pos_x``, ``right_eef_rot6d_0``, ``base_vel_x`` ...); single-arm robots use the right-arm slots.

Both layouts give a per-dim validity mask and invert exactly (``unpad(pad(x)) == x`` bit for bit).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Sequence, TypeVar

import numpy as np
import torch

Kind = Literal["action", "state"]
ArrayT = TypeVar("ArrayT", np.ndarray, torch.Tensor)
LAYOUTS = ("pad", "slots")

# Physical slot groups in priority order; the `slots` layout of size D takes whole groups while they fit and fills
# the remainder with `reserved_i` slots. D=32 gets the right arm, its gripper and EEF pose, the left arm and gripper
# and the base velocity (28 slots) + 4 reserved; D>=64 adds the left EEF pose and joint velocities.
SLOT_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("right_arm_joint", tuple(f"right_arm_joint_{i}" for i in range(7))),
    ("right_gripper", ("right_gripper",)),
    ("right_eef_pose", ("right_eef_pos_x", "right_eef_pos_y", "right_eef_pos_z")
     + tuple(f"right_eef_rot6d_{i}" for i in range(6))),
    ("left_arm_joint", tuple(f"left_arm_joint_{i}" for i in range(7))),
    ("left_gripper", ("left_gripper",)),
    ("base_vel", ("base_vel_x", "base_vel_y", "base_vel_yaw")),
    ("left_eef_pose", ("left_eef_pos_x", "left_eef_pos_y", "left_eef_pos_z")
     + tuple(f"left_eef_rot6d_{i}" for i in range(6))),
    ("right_arm_joint_vel", tuple(f"right_arm_joint_vel_{i}" for i in range(7))),
    ("left_arm_joint_vel", tuple(f"left_arm_joint_vel_{i}" for i in range(7))),
)


def default_slots(dim: int) -> tuple[str, ...]:
    """Slot names for a ``slots`` space of size ``dim``: whole groups of :data:`SLOT_GROUPS`, then reserved."""
    names: list[str] = []
    for _, group in SLOT_GROUPS:
        if len(names) + len(group) > dim:
            break
        names.extend(group)
    names.extend(f"reserved_{i}" for i in range(dim - len(names)))
    return tuple(names)


def _check_names(field_name: str, names: Sequence[str]) -> tuple[str, ...]:
    names = tuple(names)
    for n in names:
        if not isinstance(n, str) or not n:
            raise ValueError(f"{field_name}: dim names must be non-empty strings, got {n!r}")
    seen: set[str] = set()
    dups = sorted({n for n in names if n in seen or seen.add(n)})  # type: ignore[func-returns-value]
    if dups:
        raise ValueError(f"{field_name}: duplicate dim names {dups}")
    return names


@dataclass(frozen=True)
class EmbodimentSpec:
    """What one robot looks like to the policy.

    Args:
        name: unique embodiment name (e.g. ``"metaworld_sawyer"``).
        action_names: one name per action dim, in the robot's own order.
        state_names: one name per proprioceptive state dim.
        cameras: camera keys, in the order the policy sees them.
        control_hz: control rate in Hz.
        gripper_dims: action/state dim names that are grippers (never converted to deltas).
        absolute_dims: further action dim names that must stay absolute when delta actions are used.
    """

    name: str
    action_names: tuple[str, ...]
    state_names: tuple[str, ...]
    cameras: tuple[str, ...] = ()
    control_hz: float = 10.0
    gripper_dims: tuple[str, ...] = ()
    absolute_dims: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"EmbodimentSpec.name must be a non-empty string, got {self.name!r}")
        object.__setattr__(self, "action_names", _check_names(f"{self.name}.action_names", self.action_names))
        object.__setattr__(self, "state_names", _check_names(f"{self.name}.state_names", self.state_names))
        object.__setattr__(self, "cameras", _check_names(f"{self.name}.cameras", self.cameras))
        object.__setattr__(self, "gripper_dims", tuple(self.gripper_dims))
        object.__setattr__(self, "absolute_dims", tuple(self.absolute_dims))
        if not self.action_names:
            raise ValueError(f"{self.name}.action_names: an embodiment needs at least one action dim")
        if not (np.isfinite(self.control_hz) and self.control_hz > 0):
            raise ValueError(f"{self.name}.control_hz must be a positive number of Hz, got {self.control_hz!r}")
        known = set(self.action_names) | set(self.state_names)
        for fname in ("gripper_dims", "absolute_dims"):
            unknown = [n for n in getattr(self, fname) if n not in known]
            if unknown:
                raise ValueError(f"{self.name}.{fname}: names {unknown} are not action or state dims")

    @property
    def action_dim(self) -> int:
        return len(self.action_names)

    @property
    def state_dim(self) -> int:
        return len(self.state_names)

    def names(self, kind: Kind) -> tuple[str, ...]:
        if kind == "action":
            return self.action_names
        if kind == "state":
            return self.state_names
        raise ValueError(f"kind must be 'action' or 'state', got {kind!r}")

    def delta_action_mask(self) -> np.ndarray:
        """bool ``[action_dim]``: dims that become deltas relative to the chunk-start state.

        An action dim is delta-able when a state dim has the same name and it is neither a gripper nor absolute.
        """
        fixed = set(self.gripper_dims) | set(self.absolute_dims)
        states = set(self.state_names)
        return np.array([n in states and n not in fixed for n in self.action_names], dtype=bool)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EmbodimentSpec":
        allowed = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(d) - allowed)
        if unknown:
            raise ValueError(f"EmbodimentSpec: unknown fields {unknown}")
        missing = sorted({"name", "action_names", "state_names"} - set(d))
        if missing:
            raise ValueError(f"EmbodimentSpec: missing fields {missing}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


@dataclass
class UnifiedSpace:
    """Fixed-size vector space shared by all registered embodiments.

    Args:
        dim: unified size D.
        layout: ``"pad"`` (left-aligned zero padding) or ``"slots"`` (named physical slots).
        slots: slot names for the ``slots`` layout (default :func:`default_slots`); ignored for ``pad``.
        embodiments: specs to register, in id order.
    """

    dim: int = 32
    layout: str = "pad"
    slots: tuple[str, ...] | None = None
    embodiments: list[EmbodimentSpec] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"UnifiedSpace.layout must be one of {LAYOUTS}, got {self.layout!r}")
        if not (isinstance(self.dim, int) and self.dim > 0):
            raise ValueError(f"UnifiedSpace.dim must be a positive int, got {self.dim!r}")
        if self.layout == "slots":
            self.slots = _check_names("UnifiedSpace.slots", self.slots or default_slots(self.dim))
            if len(self.slots) != self.dim:
                raise ValueError(f"UnifiedSpace.slots: {len(self.slots)} slot names for dim {self.dim}")
        else:
            self.slots = None
        specs, self.embodiments = list(self.embodiments), []
        self._index: dict[tuple[str, str], np.ndarray] = {}
        for spec in specs:
            self.register(spec)

    # -- registry -------------------------------------------------------------------------------------------------
    def register(self, spec: EmbodimentSpec) -> int:
        """Add ``spec`` (ids of earlier embodiments never change) and return its id.

        Registering an identical spec again returns its id; a different spec under a taken name is an error.
        """
        for i, old in enumerate(self.embodiments):
            if old.name == spec.name:
                if old != spec:
                    raise ValueError(f"embodiment {spec.name!r} is already registered with a different spec")
                return i
        for kind in ("action", "state"):
            self._index[(spec.name, kind)] = self._compute_indices(spec, kind)  # validates before mutating
        self.embodiments.append(spec)
        return len(self.embodiments) - 1

    def id_of(self, name: str) -> int:
        for i, spec in enumerate(self.embodiments):
            if spec.name == name:
                return i
        raise KeyError(f"unknown embodiment {name!r}; registered: {[s.name for s in self.embodiments]}")

    def spec(self, key: str | int) -> EmbodimentSpec:
        if isinstance(key, (int, np.integer)):
            if not 0 <= int(key) < len(self.embodiments):
                raise KeyError(f"unknown embodiment id {int(key)}; {len(self.embodiments)} registered")
            return self.embodiments[int(key)]
        return self.embodiments[self.id_of(key)]

    # -- index maps -----------------------------------------------------------------------------------------------
    def _compute_indices(self, spec: EmbodimentSpec, kind: Kind) -> np.ndarray:
        names = spec.names(kind)
        if len(names) > self.dim:
            raise ValueError(f"{spec.name}.{kind}_names: {len(names)} dims do not fit a unified space of {self.dim}")
        if self.layout == "pad":
            return np.arange(len(names), dtype=np.int64)
        assert self.slots is not None
        where = {s: i for i, s in enumerate(self.slots)}
        unknown = [n for n in names if n not in where or n.startswith("reserved_")]
        if unknown:
            raise ValueError(
                f"{spec.name}.{kind}_names: {unknown} are not slots of this space "
                f"(slot names look like {list(self.slots[:3])} ...; see chunkpolicy.spaces.SLOT_GROUPS)"
            )
        return np.array([where[n] for n in names], dtype=np.int64)

    def indices(self, embodiment: str | int, kind: Kind) -> np.ndarray:
        """int64 ``[n]``: unified position of each of the robot's ``kind`` dims."""
        return self._index[(self.spec(embodiment).name, kind)]

    def mask(self, embodiment: str | int, kind: Kind) -> np.ndarray:
        """bool ``[D]``: which unified dims this embodiment fills."""
        m = np.zeros(self.dim, dtype=bool)
        m[self.indices(embodiment, kind)] = True
        return m

    def mask_table(self, kind: Kind) -> torch.Tensor:
        """bool ``[E, D]``: validity mask of every registered embodiment, row = embodiment id."""
        return torch.from_numpy(np.stack([self.mask(i, kind) for i in range(len(self.embodiments))]))

    # -- mapping --------------------------------------------------------------------------------------------------
    def pad(self, x: ArrayT, embodiment: str | int, kind: Kind) -> ArrayT:
        """Map robot vectors ``[..., n]`` into the unified space ``[..., D]`` (zeros in dims the robot lacks)."""
        idx = self.indices(embodiment, kind)
        if x.shape[-1] != len(idx):
            raise ValueError(
                f"{kind}: expected last dim {len(idx)} for embodiment {self.spec(embodiment).name!r}, "
                f"got shape {tuple(x.shape)}"
            )
        if isinstance(x, torch.Tensor):
            out = x.new_zeros((*x.shape[:-1], self.dim))
            out[..., torch.from_numpy(idx).to(x.device)] = x
            return out
        out = np.zeros((*x.shape[:-1], self.dim), dtype=x.dtype)
        out[..., idx] = x
        return out

    def unpad(self, x: ArrayT, embodiment: str | int, kind: Kind) -> ArrayT:
        """Map unified vectors ``[..., D]`` back to the robot's ``[..., n]`` dims (exact inverse of :meth:`pad`)."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"{kind}: expected last dim {self.dim} (unified), got shape {tuple(x.shape)}")
        idx = self.indices(embodiment, kind)
        if isinstance(x, torch.Tensor):
            return x[..., torch.from_numpy(idx).to(x.device)]
        return x[..., idx]

    # -- serialization --------------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "dim": self.dim,
            "layout": self.layout,
            "slots": list(self.slots) if self.slots else None,
            "embodiments": [s.to_dict() for s in self.embodiments],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "UnifiedSpace":
        unknown = sorted(set(d) - {"dim", "layout", "slots", "embodiments"})
        if unknown:
            raise ValueError(f"UnifiedSpace: unknown fields {unknown}")
        return cls(
            dim=int(d.get("dim", 32)),
            layout=d.get("layout", "pad"),
            slots=tuple(d["slots"]) if d.get("slots") else None,
            embodiments=[EmbodimentSpec.from_dict(s) for s in d.get("embodiments", [])],
        )
