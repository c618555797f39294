import math

import pytest
from hypothesis import given, strategies as st

from guarded_optim.innovation import (FixedThreshold, RelativeThreshold, accepts, ewma,
                                      innovation)

finite = st.floats(-1e6, 1e6, allow_nan=False)


@given(finite, finite)
def test_innovation_is_difference(y, yhat):
    assert innovation(y, yhat) == y - yhat


def test_nan_measurement_is_infinite_innovation_and_rejected():
    nu = innovation(float("nan"), 1.0)
    assert nu == math.inf
    assert not accepts(nu, 1e9)


@given(finite, finite, st.floats(0.001, 0.999))
def test_ewma_is_convex_combination(yhat, y, alpha):
    out = ewma(yhat, y, alpha)
    assert min(yhat, y) - 1e-6 * (abs(y) + abs(yhat)) <= out <= max(yhat, y) + 1e-6 * (abs(y) + abs(yhat))
    assert out == pytest.approx((1 - alpha) * yhat + alpha * y)


def test_accept_boundary_is_inclusive():
    assert accepts(0.5, 0.5) and not accepts(0.5000001, 0.5)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf"), True, "0.1"])
def test_fixed_threshold_rejects_bad_epsilon(bad):
    with pytest.raises(ValueError, match="epsilon"):
        FixedThreshold(bad)


def test_relative_threshold_scales_with_reference_and_spread():
    th = RelativeThreshold(rtol=1.0, k=4.0, beta=0.5)
    assert th(2.0) == 2.0 and th(-2.0) == 2.0
    th.update(-1.0)
    assert th.spread == 0.5 and th(2.0) == 2.0 + 4.0 * 0.5
    restored = RelativeThreshold()
    restored.load_state_dict(th.state_dict())
    assert restored.state_dict() == th.state_dict()


@pytest.mark.parametrize("kwargs", [dict(rtol=-1), dict(k=float("nan")), dict(rtol=0, k=0),
                                    dict(beta=0), dict(beta=1.5)])
def test_relative_threshold_validates(kwargs):
    with pytest.raises(ValueError):
        RelativeThreshold(**kwargs)
