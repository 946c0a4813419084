import numpy as np
import pytest
import torch

from chunkpolicy.normalize import Normalizer, compute_stats, stats_from_json, stats_to_json
from chunkpolicy.spaces import EmbodimentSpec, UnifiedSpace

A = EmbodimentSpec("a", ("x", "y", "const"), ("s0", "s1"))
B = EmbodimentSpec("b", ("u",), ("s0",))


def _data(seed=0):
    rng = np.random.default_rng(seed)
    act = np.concatenate([rng.normal(3.0, 2.0, (500, 2)), np.full((500, 1), 7.5)], axis=1)
    state = rng.uniform(-4, 9, (500, 2))
    return act, state


def test_stats_match_numpy():
    act, _ = _data()
    s = compute_stats(act)
    np.testing.assert_allclose(s["mean"], act.mean(0))
    np.testing.assert_allclose(s["std"], act.std(0))
    np.testing.assert_array_equal(s["min"], act.min(0))
    np.testing.assert_array_equal(s["max"], act.max(0))
    np.testing.assert_allclose(s["q01"], np.percentile(act, 1, axis=0))
    np.testing.assert_allclose(s["q99"], np.percentile(act, 99, axis=0))
    with pytest.raises(ValueError, match="actions: contains NaN"):
        compute_stats(np.array([[np.nan]]), field="actions")


@pytest.mark.parametrize("mode", ["mean_std", "min_max", "quantile"])
@pytest.mark.parametrize("layout", ["pad", "slots"])
def test_normalize_round_trip_padded_dims_zero(mode, layout):
    if layout == "slots":
        a = EmbodimentSpec("a", ("right_eef_pos_x", "right_eef_pos_y", "right_gripper"), ("base_vel_x", "base_vel_y"))
        b = EmbodimentSpec("b", ("base_vel_yaw",), ("base_vel_x",))
    else:
        a, b = A, B
    space = UnifiedSpace(32, layout, embodiments=[a, b])
    act, state = _data()
    stats = {"a": {"action": compute_stats(act), "state": compute_stats(state)}}
    stats = stats_from_json(stats_to_json(stats))  # goes through JSON like a checkpoint does
    norm = Normalizer(space, stats, {"action": mode, "state": mode})
    x = space.pad(torch.tensor(act[:8], dtype=torch.float32), "a", "action")[None].repeat(2, 1, 1)
    emb = torch.zeros(2, dtype=torch.long)
    y = norm.normalize("action", x, emb)
    valid = torch.from_numpy(space.mask("a", "action"))
    assert torch.all(y[..., ~valid] == 0)
    # the constant dim is degenerate: exactly 0 normalized, its constant back
    const = int(space.indices("a", "action")[2])
    assert torch.all(y[..., const] == 0)
    back = norm.unnormalize("action", y, emb)
    torch.testing.assert_close(back, x, atol=1e-5, rtol=1e-5)
    assert torch.all(back[..., ~valid] == 0)
    if mode in ("min_max",):
        full = norm.normalize("action", space.pad(torch.tensor(act, dtype=torch.float32), "a", "action")[None], emb[:1])
        assert full[..., valid].abs().max() <= 1 + 1e-6


def test_strict_errors():
    space = UnifiedSpace(32, "pad", embodiments=[A, B])
    act, state = _data()
    stats = {"a": {"action": compute_stats(act)}}
    norm = Normalizer(space, stats, {"action": "mean_std", "state": "mean_std"})
    x = torch.zeros(1, 32)
    with pytest.raises(KeyError, match="no 'state' stats for embodiment"):
        norm.normalize("state", x, torch.tensor([0]))
    with pytest.raises(KeyError, match=r"no 'action' stats for embodiment\(s\) \['b'\]"):
        norm.normalize("action", x, torch.tensor([1]))
    with pytest.raises(KeyError, match="no normalization mode for key 'images'"):
        norm.normalize("images", x, torch.tensor([0]))
    with pytest.raises(ValueError, match="expected last dim 32"):
        norm.normalize("action", torch.zeros(1, 8), torch.tensor([0]))
    bad = {"a": {"action": {k: v for k, v in compute_stats(act).items() if k != "q99"}}}
    with pytest.raises(KeyError, match="has no 'q99'"):
        Normalizer(space, bad, {"action": "quantile"})
    short = {"a": {"action": {k: v[:2] for k, v in compute_stats(act).items()}}}
    with pytest.raises(ValueError, match=r"expected shape \(3,\)"):
        Normalizer(space, short, {"action": "mean_std"})
    with pytest.raises(ValueError, match="mode"):
        Normalizer(space, stats, {"action": "zscore"})


def test_to_from_dict():
    space = UnifiedSpace(32, "pad", embodiments=[A])
    act, state = _data()
    norm = Normalizer(space, {"a": {"action": compute_stats(act), "state": compute_stats(state)}}, {"action": "quantile", "state": "mean_std"})
    again = Normalizer.from_dict(space, norm.to_dict())
    x = space.pad(torch.tensor(state[:4], dtype=torch.float32), "a", "state")
    assert torch.equal(again.normalize("state", x, torch.zeros(4, dtype=torch.long)), norm.normalize("state", x, torch.zeros(4, dtype=torch.long)))


def _rare_gripper_data(n=2000, seed=0):
    """A gripper closed (+1) in 0.5% of the frames: q01 == q99 == -1 but min < max; plus a truly constant dim."""
    rng = np.random.default_rng(seed)
    grip = np.full(n, -1.0)
    grip[rng.choice(n, n // 200, replace=False)] = 1.0
    return np.stack([rng.normal(0.0, 1.0, n), np.full(n, 7.5), grip], axis=1)


def test_quantile_rare_gripper_falls_back_to_min_max():
    spec = EmbodimentSpec("arm", ("x", "fixed", "gripper"), ("s0",))
    space = UnifiedSpace(32, "pad", embodiments=[spec])
    act = _rare_gripper_data()
    s = compute_stats(act)
    assert s["q01"][2] == s["q99"][2] == -1.0 and s["max"][2] == 1.0  # the case the review found
    with pytest.warns(UserWarning, match=r"embodiment 'arm', key 'action'.*\['gripper'\]") as rec:
        norm = Normalizer(space, {"arm": {"action": s}}, {"action": "quantile"})
    assert len([w for w in rec if "normalizer" in str(w.message)]) == 1  # said once, constant dim not named
    assert "fixed" not in str(rec[0].message)
    x = space.pad(torch.tensor(act, dtype=torch.float32), "arm", "action")[None]
    emb = torch.zeros(1, dtype=torch.long)
    y = norm.normalize("action", x, emb)
    grip, fixed = (int(space.indices("arm", "action")[i]) for i in (2, 1))
    # closed / open map to +1 / -1 (centre 0, half-range 1), not to 0
    assert set(y[0, :, grip].unique().tolist()) == {-1.0, 1.0}
    assert torch.all(y[..., fixed] == 0)  # truly constant: today's behaviour
    back = norm.unnormalize("action", y, emb)
    assert torch.equal(back[..., grip], x[..., grip])  # exact round trip of the fallback dim
    torch.testing.assert_close(back, x, atol=1e-5, rtol=1e-5)


def test_mean_std_tiny_std_not_erased_and_missing_min_max_refused():
    spec = EmbodimentSpec("arm", ("x", "fixed", "tiny"), ("s0",))
    space = UnifiedSpace(32, "pad", embodiments=[spec])
    act = _rare_gripper_data()
    act[:, 2] = np.where(act[:, 2] > 0, 1e-3, 0.0)  # std ~7e-5 < eps=1e-4 but max - min = 1e-3 > eps
    s = compute_stats(act)
    assert s["std"][2] < 1e-4 < s["max"][2] - s["min"][2]
    with pytest.warns(UserWarning, match=r"mode 'mean_std'.*\['tiny'\]"):
        norm = Normalizer(space, {"arm": {"action": s}}, {"action": "mean_std"}, eps=1e-4)
    x = space.pad(torch.tensor(act, dtype=torch.float64), "arm", "action")[None]
    emb = torch.zeros(1, dtype=torch.long)
    y = norm.normalize("action", x, emb)
    tiny = int(space.indices("arm", "action")[2])
    assert y[..., tiny].abs().max() > 0.99
    torch.testing.assert_close(norm.unnormalize("action", y, emb)[..., tiny], x[..., tiny])
    # without min/max a degenerate dim cannot be told apart from a rare-valued one: an error, not a guess
    no_range = {k: v for k, v in s.items() if k not in ("min", "max")}
    with pytest.raises(KeyError, match=r"has no 'min'.*\['fixed', 'tiny'\]"):
        Normalizer(space, {"arm": {"action": no_range}}, {"action": "mean_std"}, eps=1e-4)
