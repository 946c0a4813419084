import math

import pytest

from chunkpolicy.success_rate import wilson_interval


@pytest.mark.parametrize(
    "s, n, lo, hi",
    [
        (8, 10, 0.490, 0.943),
        (0, 10, 0.0, 0.278),
        (10, 10, 0.722, 1.0),
        (1, 1, 0.2065, 1.0),
        (5, 10, 0.2366, 0.7634),
        (47, 50, 0.8378, 0.9794),
    ],
)
def test_known_values(s, n, lo, hi):
    a, b = wilson_interval(s, n)
    assert a == pytest.approx(lo, abs=1e-3) and b == pytest.approx(hi, abs=1e-3)


@pytest.mark.parametrize("s, n", [(3, 10), (8, 10), (0, 7), (7, 7), (12, 40)])
def test_endpoints_solve_the_score_equation(s, n):
    """Wilson's interval is {p : |s/n - p| <= z·sqrt(p(1-p)/n)}; interior endpoints satisfy it with equality."""
    z = 1.96
    for p in wilson_interval(s, n, z):
        if 0.0 < p < 1.0:
            assert abs(s / n - p) == pytest.approx(z * math.sqrt(p * (1 - p) / n), abs=1e-9)


def test_symmetry_and_width():
    lo, hi = wilson_interval(3, 10)
    lo2, hi2 = wilson_interval(7, 10)
    assert lo == pytest.approx(1 - hi2) and hi == pytest.approx(1 - lo2)
    assert wilson_interval(80, 100)[1] - wilson_interval(80, 100)[0] < wilson_interval(8, 10)[1] - wilson_interval(8, 10)[0]
    a90, b90 = wilson_interval(8, 10, z=1.645)
    a95, b95 = wilson_interval(8, 10)
    assert a95 < a90 < 0.8 < b90 < b95


@pytest.mark.parametrize("s, n", [(1, 0), (-1, 5), (6, 5)])
def test_errors(s, n):
    with pytest.raises(ValueError):
        wilson_interval(s, n)
