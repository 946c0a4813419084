import numpy as np
import pytest
import torch

from chunkpolicy.spaces import EmbodimentSpec, UnifiedSpace, default_slots

ARM = EmbodimentSpec(
    name="arm7",
    action_names=tuple(f"right_arm_joint_{i}" for i in range(7)) + ("right_gripper",),
    state_names=tuple(f"right_arm_joint_{i}" for i in range(7)) + ("right_gripper", "right_eef_pos_x"),
    cameras=("top", "wrist"),
    control_hz=50.0,
    gripper_dims=("right_gripper",),
)
BASE = EmbodimentSpec(
    name="mobile",
    action_names=("base_vel_x", "base_vel_y", "base_vel_yaw"),
    state_names=("base_vel_x",),
    cameras=("front",),
    control_hz=10.0,
)


@pytest.mark.parametrize("layout", ["pad", "slots"])
def test_round_trip_numpy_and_torch(layout):
    space = UnifiedSpace(32, layout, embodiments=[ARM, BASE])
    rng = np.random.default_rng(0)
    for spec in (ARM, BASE):
        for kind in ("action", "state"):
            n = len(spec.names(kind))
            x = rng.normal(size=(4, 5, n)).astype(np.float32)
            u = space.pad(x, spec.name, kind)
            assert u.shape == (4, 5, 32)
            m = space.mask(spec.name, kind)
            assert m.sum() == n
            assert np.all(u[..., ~m] == 0)
            np.testing.assert_array_equal(space.unpad(u, spec.name, kind), x)
            t = torch.from_numpy(x)
            ut = space.pad(t, space.id_of(spec.name), kind)
            assert torch.equal(ut, torch.from_numpy(u))
            assert torch.equal(space.unpad(ut, spec.name, kind), t)


def test_pad_layout_is_left_aligned_and_slots_are_physical():
    pad = UnifiedSpace(32, "pad", embodiments=[ARM, BASE])
    assert pad.indices("mobile", "action").tolist() == [0, 1, 2]
    slots = UnifiedSpace(32, "slots", embodiments=[ARM, BASE])
    names = default_slots(32)
    assert [names[i] for i in slots.indices("mobile", "action")] == ["base_vel_x", "base_vel_y", "base_vel_yaw"]
    # the arm's gripper lands in the same slot whatever its position in the robot's own vector
    assert names[slots.indices("arm7", "action")[-1]] == "right_gripper"
    mt = slots.mask_table("action")
    assert mt.shape == (2, 32) and mt.dtype == torch.bool and int(mt[1].sum()) == 3


def test_default_slots_sizes():
    s32 = default_slots(32)
    assert len(s32) == 32 and len(set(s32)) == 32 and s32[-1].startswith("reserved_")
    assert "left_eef_pos_x" in default_slots(64) and "left_eef_pos_x" not in s32


def test_errors_are_clear():
    with pytest.raises(ValueError, match="duplicate dim names"):
        EmbodimentSpec("x", ("a", "a"), ("s",))
    with pytest.raises(ValueError, match="gripper_dims"):
        EmbodimentSpec("x", ("a",), ("s",), gripper_dims=("nope",))
    with pytest.raises(ValueError, match="control_hz"):
        EmbodimentSpec("x", ("a",), ("s",), control_hz=0)
    big = EmbodimentSpec("big", tuple(f"a{i}" for i in range(33)), ("s",))
    with pytest.raises(ValueError, match="do not fit"):
        UnifiedSpace(32, "pad", embodiments=[big])
    with pytest.raises(ValueError, match="not slots of this space"):
        UnifiedSpace(32, "slots", embodiments=[EmbodimentSpec("odd", ("elbow",), ())])
    with pytest.raises(ValueError, match="layout"):
        UnifiedSpace(32, "weird")
    space = UnifiedSpace(32, "pad", embodiments=[ARM])
    with pytest.raises(KeyError, match="unknown embodiment 'ghost'"):
        space.id_of("ghost")
    with pytest.raises(ValueError, match="expected last dim 8"):
        space.pad(np.zeros((2, 7)), "arm7", "action")
    with pytest.raises(ValueError, match="expected last dim 32"):
        space.unpad(np.zeros((2, 31)), "arm7", "action")
    with pytest.raises(ValueError, match="different spec"):
        space.register(EmbodimentSpec("arm7", ("a",), ("s",)))


def test_register_keeps_old_ids_and_serializes():
    space = UnifiedSpace(32, "slots", embodiments=[ARM])
    assert space.register(ARM) == 0
    assert space.register(BASE) == 1 and space.id_of("arm7") == 0
    again = UnifiedSpace.from_dict(space.to_dict())
    assert again.to_dict() == space.to_dict()
    assert again.spec("mobile") == BASE
    with pytest.raises(ValueError, match="unknown fields"):
        UnifiedSpace.from_dict({**space.to_dict(), "extra": 1})


def test_delta_action_mask_keeps_grippers_absolute():
    m = ARM.delta_action_mask()
    assert m.tolist() == [True] * 7 + [False]
    assert BASE.delta_action_mask().tolist() == [True, False, False]
