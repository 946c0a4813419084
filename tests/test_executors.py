import math

import numpy as np
import pytest
import torch

from chunkpolicy.runtime.executors import (
    ChunkExecutor,
    OpenLoop,
    TemporalEnsemble,
    available_executors,
    ensemble_weights,
    make_executor,
    register_executor,
)


class Recorder:
    """predict_fn whose chunk predicted at tick s proposes the value 10·s + j for tick s + j (every action dim)."""

    def __init__(self, H=3, A=2, B=None):
        self.H, self.A, self.B, self.calls = H, A, B, []

    def __call__(self, obs):
        s = obs  # the test passes the tick as the observation
        self.calls.append(s)
        chunk = np.repeat((10.0 * s + np.arange(self.H))[:, None], self.A, axis=1)  # [H, A]
        if self.B is not None:  # env b adds 1000·b so batch rows are distinguishable
            chunk = np.stack([chunk + 1000.0 * b for b in range(self.B)])
        return chunk


def run(ex, fn, ticks):
    ex.reset()
    return np.stack([ex.act(t, t, fn) for t in range(ticks)])


@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_open_loop_replans_every_k(k):
    fn = Recorder(H=5)
    out = run(OpenLoop(k), fn, 12)
    assert fn.calls == list(range(0, 12, k))  # policy called exactly at ticks 0, k, 2k, ...
    for t in range(12):
        s = (t // k) * k
        assert out[t, 0] == 10 * s + (t - s)  # action j of the chunk predicted at s
    assert out.dtype == np.float32 and out.shape == (12, 2)


def test_open_loop_whole_chunk_and_short_chunk():
    fn = Recorder(H=4)
    ex = OpenLoop()  # k = None: run whole chunks
    run(ex, fn, 9)
    assert fn.calls == [0, 4, 8] and ex.prediction_ticks == [0, 4, 8] and ex.num_predictions == 3
    with pytest.raises(ValueError, match="shorter than k=8"):
        run(OpenLoop(8), Recorder(H=4), 1)


def test_open_loop_batched_and_torch():
    fn = Recorder(H=4, A=3, B=2)
    ex = OpenLoop(2)
    ex.reset()
    a0 = ex.act(0, 0, lambda o: torch.from_numpy(fn(o)).float())
    assert a0.shape == (2, 3) and a0.dtype == np.float32
    np.testing.assert_array_equal(a0[:, 0], [0.0, 1000.0])
    a1 = ex.act(1, 1, fn)
    np.testing.assert_array_equal(a1[:, 0], [1.0, 1001.0])
    assert fn.calls == [0]


def te_expected(t, H, m):
    """Hand-written ACT ensembling for the Recorder policy: chunks s = max(0, t-H+1) .. t cover t, oldest first."""
    starts = list(range(max(0, t - H + 1), t + 1))
    values = [10 * s + (t - s) for s in starts]
    weights = [math.exp(-m * i) for i in range(len(starts))]  # i = 0 is the OLDEST chunk
    return sum(w * v for w, v in zip(weights, values)) / sum(weights)


def test_temporal_ensemble_hand_values_m001():
    out = run(TemporalEnsemble(0.01), Recorder(H=3, A=1), 5)[:, 0]
    # t=0: only chunk 0 → 0. t=1: chunk 0 says 1, chunk 1 says 10.
    assert out[0] == 0.0
    assert out[1] == pytest.approx((1 * 1 + 10 * math.exp(-0.01)) / (1 + math.exp(-0.01)), abs=1e-5)
    # t=2: chunks 0, 1, 2 say 2, 11, 20 with weights 1, e^-0.01, e^-0.02
    w0, w1, w2 = 1.0, math.exp(-0.01), math.exp(-0.02)
    assert out[2] == pytest.approx((2 * w0 + 11 * w1 + 20 * w2) / (w0 + w1 + w2), abs=1e-5)
    # t=3: chunk 0 no longer covers t (H=3); chunks 1, 2, 3 say 12, 21, 30
    assert out[3] == pytest.approx((12 * w0 + 21 * w1 + 30 * w2) / (w0 + w1 + w2), abs=1e-5)
    assert out[3] == pytest.approx(20.940001, abs=1e-5)  # = 62.19701 / 2.970249, worked by hand
    for t in range(5):
        assert out[t] == pytest.approx(te_expected(t, 3, 0.01), abs=1e-5)


def test_temporal_ensemble_hand_values_m01_older_weigh_more():
    fn = Recorder(H=4, A=2)
    ex = TemporalEnsemble(0.1)
    out = run(ex, fn, 7)[:, 0]
    assert fn.calls == list(range(7))  # predicts every tick
    w = [1.0, math.exp(-0.1), math.exp(-0.2), math.exp(-0.3)]
    # t=3: chunks 0..3 say 3, 12, 21, 30
    assert out[3] == pytest.approx((3 * w[0] + 12 * w[1] + 21 * w[2] + 30 * w[3]) / sum(w), abs=1e-4)
    assert out[3] == pytest.approx(15.378175, abs=1e-4)  # = 53.275938 / 3.464386, worked by hand
    for t in range(7):
        assert out[t] == pytest.approx(te_expected(t, 4, 0.1), abs=1e-4)
    # older predictions weigh more: the result sits below the plain mean (the older chunks propose smaller values)
    assert out[3] < np.mean([3, 12, 21, 30])
    np.testing.assert_allclose(ensemble_weights(3, 0.1), np.array(w[:3]) / sum(w[:3]))
    assert ensemble_weights(3, 0.1)[0] > ensemble_weights(3, 0.1)[-1]


def test_temporal_ensemble_batched():
    out = run(TemporalEnsemble(0.1), Recorder(H=3, A=1, B=3), 4)
    assert out.shape == (4, 3, 1)
    for b in range(3):
        for t in range(4):
            assert out[t, b, 0] == pytest.approx(te_expected(t, 3, 0.1) + 1000 * b, abs=1e-3)


def test_temporal_ensemble_with_changing_horizon():
    """A long old chunk outlives a short newer one: the expired short chunk must drop out, the old one stays."""
    horizons = {0: 4, 1: 1, 2: 2}

    def fn(s):
        return (10.0 * s + np.arange(horizons[s]))[:, None]

    out = run(TemporalEnsemble(0.0), fn, 3)[:, 0]  # m = 0: plain mean of the covering proposals
    assert out[1] == pytest.approx((1 + 10) / 2)
    assert out[2] == pytest.approx((2 + 20) / 2)  # chunk 1 (H=1) no longer covers t=2; chunk 0 still does


def test_tick_and_shape_errors():
    ex = OpenLoop(2)
    ex.reset()
    ex.act(0, 0, Recorder())
    with pytest.raises(ValueError, match="expected tick 1"):
        ex.act(3, 3, Recorder())
    ex = TemporalEnsemble(0.01)
    ex.reset()
    ex.act(0, 0, lambda o: np.zeros((3, 2)))
    with pytest.raises(ValueError, match="returned shape"):
        ex.act(1, 1, lambda o: np.zeros((3, 5)))
    ex.reset()
    with pytest.raises(ValueError, match=r"\[H, A\] or \[B, H, A\]"):
        ex.act(0, 0, lambda o: np.zeros(3))
    ex.reset()
    with pytest.raises(ValueError, match="NaN"):
        ex.act(0, 0, lambda o: np.full((3, 2), np.nan))
    ex.reset()  # reset clears the error state and the tick
    assert ex.tick == 0 and ex.num_predictions == 0


def test_make_executor_parsing():
    ex = make_executor("open_loop:8")
    assert isinstance(ex, OpenLoop) and ex.k == 8 and ex.spec() == "open_loop:8"
    assert make_executor("open_loop").k is None
    assert make_executor("open-loop:k=4").k == 4
    te = make_executor("temporal_ensemble:0.01")
    assert isinstance(te, TemporalEnsemble) and te.m == 0.01
    assert make_executor("temporal_ensemble:m=0.1").m == 0.1
    assert make_executor("temporal_ensemble").m == 0.01
    assert make_executor(te) is te
    assert make_executor(make_executor("temporal_ensemble:0.5").spec()).m == 0.5
    assert {"open_loop", "temporal_ensemble"} <= set(available_executors())


@pytest.mark.parametrize(
    "spec, msg",
    [
        ("rtx:3", "unknown executor 'rtx'"),
        ("open_loop:x", "k must be int"),
        ("open_loop:0", "positive int"),
        ("open_loop:1,2", "at most 1 arguments"),
        ("open_loop:q=3", "unknown argument 'q'"),
        ("temporal_ensemble:abc", "m must be float"),
        ("temporal_ensemble:nan", "finite"),
        ("", "non-empty"),
    ],
)
def test_make_executor_errors(spec, msg):
    with pytest.raises(ValueError, match=msg):
        make_executor(spec)


def test_register_custom_executor():
    class Hold(ChunkExecutor):
        """Predicts once and repeats the first action forever (an extension-point smoke test)."""

        name = "hold_first"

        def __init__(self, scale: float = 1.0, every: int | None = None) -> None:
            self.scale, self.every = scale, every
            super().__init__()

        def _reset(self):
            self._a = None

        def _act(self, t, obs, predict_fn):
            if self._a is None:
                self._a = self._predict(t, obs, predict_fn)[:, 0] * self.scale
            return self._a

    register_executor("hold_first", Hold)
    ex = make_executor("hold_first:scale=2,every=none")
    assert ex.scale == 2.0 and ex.every is None
    fn = Recorder(H=3, A=1)
    out = run(ex, fn, 4)
    assert fn.calls == [0] and (out == 0).all()
    with pytest.raises(TypeError):
        register_executor("bad", object)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="already registered"):
        register_executor("open_loop", Hold)


def test_rtc_executor_needs_no_torch():
    """make_executor knows "rtc" from the numpy-only executors module: a robot computer runs real-time chunking without
    torch (the guided sampling is the policy side's job)."""
    import subprocess
    import sys

    code = ("import sys, numpy as np; from chunkpolicy.runtime.executors import make_executor, RealTimeChunking\n"
            "ex = make_executor('rtc:4,2'); assert isinstance(ex, RealTimeChunking) and ex.spec() == 'rtc:4,2'\n"
            "calls = []\n"
            "def predict(obs, prefix=None, prefix_len=0):\n"
            "    calls.append(prefix_len); return np.arange(10.0)[:, None] + 100.0 * (len(calls) - 1)\n"
            "acts = [float(ex.act(t, None, predict)[0]) for t in range(8)]\n"
            "assert acts == [0, 1, 2, 3, 4, 5, 102, 103] and calls == [0, 2], (acts, calls)\n"
            "assert 'torch' not in sys.modules, 'torch imported'; print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr


# -- will_predict: the ticks at which an executor will call the policy, known ahead ------------------------------------
WILL_PREDICT_SPECS = sorted({*available_executors(), "open_loop:3", "open_loop:1", "rtc:4,1", "rtc:3,0"})


@pytest.mark.parametrize("spec", WILL_PREDICT_SPECS)
def test_will_predict_never_misses_a_prediction(spec):
    """Every registered executor (and a few settings): asked at each tick about the next 6 ticks, it never answers
    False for a tick at which it then calls the policy (a simulator that skipped those frames would feed the policy
    an unrendered observation); open_loop with k and rtc answer exactly."""
    ex = make_executor(spec)
    ex.reset()
    forecasts: dict[int, list[bool]] = {}
    for t in range(40):
        for j in range(6):
            forecasts.setdefault(t + j, []).append(ex.will_predict(t + j))
        ex.act(t, None, lambda obs, **kw: np.zeros((2, 12, 3)))  # B=2, H=12
        with pytest.raises(ValueError, match="already acted on"):
            ex.will_predict(t)
    predicted = set(ex.prediction_ticks)
    assert predicted and all(all(forecasts[p]) for p in predicted)
    if spec in ("open_loop:3", "open_loop:1", "rtc:4,1", "rtc:3,0"):  # exact: no frames rendered for nothing
        assert {t for t in range(40) if any(forecasts[t])} == predicted
    if spec == "open_loop":  # k = H: after the first chunk, the horizon is known
        assert {t for t in range(12, 40) if forecasts[t][-1]} == {t for t in predicted if t >= 12}
