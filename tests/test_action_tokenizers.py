import numpy as np
import pytest

from chunkpolicy.models.action_tokenizers import (BinTokenizer, FASTTokenizer, MuLawTokenizer, make_action_tokenizer,
                                                  tokenizer_from_dict)

H, D = 10, 3


def _random(n, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (n, H, D))


def _smooth(n, seed=0):
    rng = np.random.default_rng(seed)
    t = np.linspace(0, 1, H)[:, None]
    return np.sin(2 * np.pi * (rng.uniform(0.2, 1, (n, 1, D)) * t + rng.uniform(0, 1, (n, 1, D)))) * rng.uniform(0.2, 1, (n, 1, D))


@pytest.mark.parametrize("tok, bound", [(BinTokenizer(), 1 / 256), (MuLawTokenizer(), 0.00455)])  # module docstring
def test_bin_tokenizers_round_trip_within_bound(tok, bound):
    for chunk in np.concatenate([_random(200), _smooth(200)]):
        ids = tok.encode(chunk)
        assert len(ids) == H * D and min(ids) >= 0 and max(ids) < tok.vocab_size
        back, ok = tok.decode(ids, H, D)
        assert ok and np.abs(back - chunk).max() <= bound + 1e-12
    # out-of-range inputs clip to the edges
    back, _ = tok.decode(tok.encode(np.full((H, D), 3.0)), H, D)
    assert np.all(back > 1 - 2 * bound)


def test_mulaw_is_finer_near_zero():
    tok = MuLawTokenizer()
    small = np.full((H, D), 0.003)
    assert abs(tok.decode(tok.encode(small), H, D)[0][0, 0] - 0.003) < 1e-4


def test_mulaw_uses_every_bin_on_normalized_inputs():
    """Regression: Gato's log(1 + Mμ) denominator left normalized inputs in |y| <= 0.455 (466 of 1024 bins)."""
    tok = MuLawTokenizer()
    x = np.linspace(-1, 1, 200_001)
    ids = np.asarray(tok.encode(x[:, None]))
    assert len(np.unique(ids)) >= 0.9 * tok.n_bins  # all 1024 in fact
    assert ids.min() == 0 and ids.max() == tok.n_bins - 1  # ±1 reach the edge bins
    back, ok = tok.decode(ids.tolist(), len(x), 1)
    err = np.abs(back[:, 0] - x)
    bound = np.log(101) * 101 / 100 / 1024  # (1/1024)·max|dx/dy| at |x| = 1, the documented 0.00455
    assert ok and err.max() <= bound + 1e-12 and err.max() > 0.9 * bound
    plain = BinTokenizer(256)
    perr = np.abs(plain.decode(plain.encode(x[:, None]), len(x), 1)[0][:, 0] - x)
    assert err.mean() < 0.65 * perr.mean()  # 0.00115 vs 0.00195 on uniform inputs
    small = np.abs(x) < 0.1
    assert err[small].max() < 0.15 * perr[small].max()  # much finer near 0, where most actions are
    assert err.max() < 1.2 * perr.max()  # and at most ~1.17x coarser at the extremes


def test_mulaw_old_dict_loads_with_its_old_meaning():
    """A dict saved before the fix (with Gato's ``m``) decodes exactly as its checkpoint was trained."""
    old = {"name": "mulaw", "mu": 100.0, "m": 256.0, "n_bins": 1024}
    tok = tokenizer_from_dict(old)
    assert tok.to_dict() == old
    x = np.linspace(-1, 1, 20_001)[:, None]
    log = np.log(256 * 100 + 1.0)
    ref = np.clip(np.floor((np.sign(x) * np.log(np.abs(x) * 100 + 1.0) / log + 1) / 2 * 1024), 0, 1023).astype(int)
    ids = tok.encode(x)
    assert ids == ref.reshape(-1).tolist() and len(set(ids)) == 466  # the old, narrow reach
    y = -1 + (ref + 0.5) * 2 / 1024
    np.testing.assert_array_equal(tok.decode(ids, len(x), 1)[0], np.sign(y) * (np.exp(np.abs(y) * log) - 1) / 100)
    new = tokenizer_from_dict(MuLawTokenizer().to_dict())
    assert "m" not in new.to_dict() and len(set(new.encode(np.linspace(-1, 1, 200_001)[:, None]))) == 1024


def test_fast_round_trip_compresses_and_serializes():
    train = _smooth(400, seed=1)
    tok = FASTTokenizer(scale=10, vocab_size=1024).fit(list(train))
    bound = 0.5 * np.sqrt(H) / 10
    lens = []
    for chunk in _smooth(100, seed=2):
        ids = tok.encode(chunk)
        lens.append(len(ids))
        back, ok = tok.decode(ids, H, D)
        assert ok and np.abs(back - chunk).max() <= bound
        # the per-dim L2 error bound
        assert np.sqrt(((back - chunk) ** 2).sum(0)).max() <= bound
    assert np.mean(lens) < 0.6 * H * D  # BPE compresses smooth chunks
    again = tokenizer_from_dict(tok.to_dict())
    chunk = _smooth(1, seed=3)[0]
    assert again.encode(chunk) == tok.encode(chunk)


def test_invalid_sequences_are_flagged():
    for tok in (BinTokenizer(), MuLawTokenizer()):
        assert tok.decode([1, 2, 3], H, D)[1] is False
        assert tok.decode([tok.vocab_size] * (H * D), H, D)[1] is False
    fast = FASTTokenizer().fit(list(_smooth(50)))
    assert fast.decode([0, 1], H, D)[1] is False
    assert fast.decode([10**6], H, D)[1] is False
    with pytest.raises(RuntimeError, match="not fitted"):
        FASTTokenizer().encode(_smooth(1)[0])
    with pytest.raises(ValueError, match="unknown action tokenizer"):
        make_action_tokenizer("vq")
