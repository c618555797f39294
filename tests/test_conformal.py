"""Conformal tools (ARC sec. 3.5): the finite-sample quantile, the adaptive threshold's
false-alarm bound in closed loop, recalibration, forecast intervals, APS state sets."""

import math
import random

import pytest
import torch
from hypothesis import given, settings, strategies as st

import test_policy
import tiny
from guarded_optim import GuardedOptimizer, RelativeThreshold
from guarded_optim.conformal import (ConformalForecast, ConformalStateSets, ConformalThreshold,
                                     aps_score, conformal_quantile, conformal_rank,
                                     min_calibration, severity_probs, trend_forecast)

pytestmark = pytest.mark.usefixtures("one_thread")


def binomial_tolerance(p, n, sds=4.0):
    return sds * math.sqrt(p * (1 - p) / n)


def draw(kind, r):
    if kind == "normal":
        return r.gauss(0.0, 1.0)
    if kind == "exp":
        return r.expovariate(1.0) - 1.0
    if kind == "t3":
        return r.gauss(0.0, 1.0) / math.sqrt(sum(r.gauss(0.0, 1.0) ** 2 for _ in range(3)) / 3)
    return r.random() - 0.7


KINDS = ["normal", "exp", "t3", "uniform"]


# -- the finite-sample quantile ------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 400), alpha=st.floats(0.005, 0.5))
def test_rank_is_the_smallest_valid_one(n, alpha):
    k = conformal_rank(n, alpha)
    assert k / (n + 1) >= 1 - alpha - 1e-9 and (k - 1) / (n + 1) < 1 - alpha
    m = min_calibration(alpha)
    assert conformal_rank(m, alpha) <= m and conformal_rank(m - 1, alpha) > m - 1


@settings(max_examples=10, deadline=None)
@given(alpha=st.sampled_from([0.05, 0.1, 0.2]), n=st.integers(20, 60),
       kind=st.sampled_from(KINDS), seed=st.integers(0, 2**16))
def test_split_conformal_quantile_covers_a_new_exchangeable_score(alpha, n, kind, seed):
    r = random.Random(seed)
    trials, misses = 2000, 0
    for _ in range(trials):
        scores = [draw(kind, r) for _ in range(n)]
        misses += draw(kind, r) > conformal_quantile(scores, alpha)
    assert misses / trials <= alpha + binomial_tolerance(alpha, trials)


# -- the adaptive threshold in closed loop -------------------------------------------------
def closed_loop(thr, innovations, yhat=1.0):
    """The guard's use of a threshold: call once per measurement, update when accepted."""
    alarms = measured = 0
    for nu in innovations:
        eps = thr(yhat)
        calibrated = thr.calibrated
        if nu <= eps:
            thr.update(nu)
        elif calibrated:
            alarms += 1
        measured += calibrated
    return alarms, measured


@settings(max_examples=12, deadline=None)
@given(alpha=st.sampled_from([0.01, 0.05, 0.1]), kind=st.sampled_from(KINDS),
       scale=st.floats(1e-3, 10.0), seed=st.integers(0, 2**16))
def test_false_alarm_rate_on_exchangeable_innovations_is_within_the_bound(alpha, kind, scale, seed):
    r = random.Random(seed)
    thr = ConformalThreshold(alpha=alpha, window=400)
    alarms, measured = closed_loop(thr, [scale * draw(kind, r) for _ in range(4000)],
                                   yhat=10 * scale)
    assert measured > 3000
    assert alarms / measured <= alpha + binomial_tolerance(alpha, measured)


def test_without_censoring_rejections_the_quantile_would_ratchet_down():
    """The reason rejections enter the window: accepted values alone drift the rate up."""
    r = random.Random(0)
    values = [r.gauss(0, 1) for _ in range(20000)]
    window, alarms, measured = [], 0, 0
    for nu in values:
        eps = conformal_quantile(window[-500:], 0.01) if len(window) >= 99 else 4.0
        if nu <= eps:
            window.append(nu)
        elif len(window) >= 99:
            alarms += 1
        measured += len(window) >= 99
    censored_alarms, censored_measured = closed_loop(ConformalThreshold(alpha=0.01), values)
    assert alarms / measured > 2 * 0.01 > censored_alarms / censored_measured


def test_warm_up_uses_the_fallback_and_keeps_it_updated():
    fallback = RelativeThreshold()
    thr = ConformalThreshold(alpha=0.1, fallback=fallback)
    reference = RelativeThreshold()
    r = random.Random(1)
    for _ in range(min_calibration(0.1)):
        nu = 0.1 * r.gauss(0, 1)
        assert thr(2.0) == reference(2.0)
        thr.update(nu)
        reference.update(nu)
    assert thr.calibrated and thr(2.0) == conformal_quantile(list(thr.scores), 0.1)


def test_regime_change_recalibrates_and_the_rate_recovers():
    r = random.Random(2)
    thr = ConformalThreshold(alpha=0.05, window=400)
    closed_loop(thr, [r.gauss(0, 0.1) for _ in range(1000)])
    assert thr.recalibrations == 0
    closed_loop(thr, [r.gauss(0, 1.0) for _ in range(1500)])    # innovations 10x wider
    assert thr.recalibrations >= 1
    alarms, measured = closed_loop(thr, [r.gauss(0, 1.0) for _ in range(3000)])
    assert alarms / measured <= 0.05 + binomial_tolerance(0.05, measured)


def test_a_burst_of_faults_never_disables_the_threshold():
    r = random.Random(3)
    thr = ConformalThreshold(alpha=0.01, window=200)
    closed_loop(thr, [r.gauss(0, 0.01) for _ in range(300)])
    before = thr(1.0)
    thr.update(0.0)
    closed_loop(thr, [1e6] * 60)                                  # all rejected
    eps = thr(1.0)
    assert math.isfinite(eps) and eps <= max(before, thr.fallback(1.0)) < 1e6


def test_bad_arguments_raise():
    for kw in (dict(alpha=0.0), dict(alpha=0.01, window=50), dict(monitor=0), dict(delta=2.0),
               dict(min_epsilon=-1.0)):
        with pytest.raises(ValueError, match="Invalid"):
            ConformalThreshold(**kw)
    with pytest.raises(ValueError, match="Invalid"):
        ConformalForecast(factor=1.0)


# -- forecast intervals --------------------------------------------------------------------
def test_trend_forecast_extrapolates_a_line_exactly():
    assert trend_forecast([3.0 + 2.0 * t for t in range(7)], 4) == pytest.approx(3.0 + 2.0 * 10)


@settings(max_examples=8, deadline=None)
@given(slope=st.floats(-0.01, 0.01), kind=st.sampled_from(KINDS), seed=st.integers(0, 2**16))
def test_forecast_interval_coverage(slope, kind, seed):
    r = random.Random(seed)
    fc = ConformalForecast(alpha=0.1, horizon=3, fit=20, window=200)
    series = [5.0 + slope * t + 0.1 * draw(kind, r) for t in range(1500)]
    hits = total = 0
    for t, y in enumerate(series):
        if t >= 3 and len(fc.residuals) >= 150 and t + 3 < len(series):
            lo, hi = fc.interval()
            hits += lo <= series[t + 2] <= hi                  # the value forecast above
            total += 1
        fc.observe(y)
    assert total > 1000 and hits / total >= 0.9 - binomial_tolerance(0.1, total, sds=6)


def test_forecast_crosses_the_bound_on_a_climb_and_not_on_noise():
    r = random.Random(4)
    fc = ConformalForecast(alpha=0.1, horizon=5, window=100)
    flat = [1.0 + 0.05 * r.gauss(0, 1) for _ in range(300)]
    crossings = 0
    for y in flat:
        fc.observe(y)
        crossings += fc.crosses()
    assert crossings == 0
    for t in range(60):
        fc.observe(1.0 * 1.1 ** t)
        if fc.crosses():
            break
    assert fc.crosses() and fc.values[-1] < fc.explosion_bound()   # before the bound itself


def forecast_guard(probe_values, recovery):
    m = tiny.model()
    _, batches = tiny.data(steps=len(probe_values))
    it = iter(probe_values)
    opt = GuardedOptimizer(torch.optim.SGD(m.parameters(), lr=0.01), lambda: next(it), module=m,
                           recovery=recovery, history=5, checkpoint_every=10_000)
    return m, opt, batches


def test_forecast_in_a_guard_pushes_a_verified_snapshot_before_the_climb():
    climb = [1.0] * 150 + [1.0 * 1.05 ** t for t in range(60)]
    m, opt, batches = forecast_guard([1.0] + climb, [ConformalForecast(window=100, cooldown=20)])
    pushed_at = []
    for t, b in enumerate(batches[:len(climb)]):
        n = len(opt._ring)
        test_policy.step(m, opt, b)
        assert opt.last_decision == "accept"
        if len(opt._ring) > n:
            pushed_at.append(t)
    assert pushed_at and all(t >= 150 for t in pushed_at)
    assert climb[pushed_at[0]] < 10.0 and opt.recovery[0].triggered == len(pushed_at)


@pytest.mark.parametrize("seed", range(3))
def test_forecast_on_a_clean_tiny_run_triggers_nothing(seed):
    m = tiny.model(seed)
    probe_set, batches = tiny.data(seed, steps=300)
    opt = GuardedOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-2),
                           tiny.probe_for(m, probe_set), module=m,
                           recovery=[ConformalForecast(window=50)])
    for b in batches:
        test_policy.step(m, opt, b)
    assert opt.recovery[0].seen == 299 and opt.recovery[0].triggered == 0


# -- the threshold in a guard --------------------------------------------------------------
def test_conformal_threshold_in_a_guard_clean_then_fault(tmp_path):
    m = tiny.model()
    probe_set, batches = tiny.data(steps=300)
    opt = GuardedOptimizer(torch.optim.SGD(m.parameters(), lr=0.05), tiny.probe_for(m, probe_set),
                           module=m, threshold=ConformalThreshold(alpha=0.01, window=200))
    for b in batches[:250]:
        test_policy.step(m, opt, b)
    thr = opt.threshold
    calibrated = thr.calls - thr.min_points
    assert thr.calibrated and calibrated > 100
    assert opt.stats["rollbacks"] <= 0.01 * calibrated + 4 * math.sqrt(0.01 * calibrated)
    before = opt.stats["rollbacks"]
    assert test_policy.step(m, opt, batches[250], spike=1e4) == "rollback"
    assert opt.stats["rollbacks"] == before + 1 and "probe" in opt.last_event.reason.split(",")
    torch.save(opt.state_dict(), tmp_path / "o.pt")
    m2 = tiny.model()
    opt2 = GuardedOptimizer(torch.optim.SGD(m2.parameters(), lr=0.05), tiny.probe_for(m2, probe_set),
                            module=m2, threshold=ConformalThreshold(alpha=0.01, window=200))
    opt2.load_state_dict(torch.load(tmp_path / "o.pt", weights_only=True))
    assert opt2.threshold.state_dict() == thr.state_dict()
    assert opt2.threshold(opt2.yhat) == thr(opt.yhat)


def test_forecast_state_round_trips_weights_only(tmp_path):
    m, opt, batches = test_policy.guard([ConformalForecast(window=50)])
    for b in batches[:70]:
        test_policy.step(m, opt, b)
    torch.save(opt.state_dict(), tmp_path / "o.pt")
    m2, opt2, _ = test_policy.guard([ConformalForecast(window=50)])
    opt2.load_state_dict(torch.load(tmp_path / "o.pt", weights_only=True))
    assert opt2.recovery[0].state_dict() == opt.recovery[0].state_dict()
    assert opt2.recovery[0].interval() == opt.recovery[0].interval()


# -- APS state sets ------------------------------------------------------------------------
def labelled(n, r):
    """Severity -> probabilities, and a true state drawn from them (a calibrated model)."""
    out = []
    for _ in range(n):
        probs = severity_probs(r.uniform(0.0, 1.5))
        out.append((probs, r.choices(range(3), weights=probs)[0]))
    return out


@settings(max_examples=6, deadline=None)
@given(alpha=st.sampled_from([0.05, 0.1, 0.2]), seed=st.integers(0, 2**16))
def test_state_sets_cover_the_true_state(alpha, seed):
    r = random.Random(seed)
    sets = ConformalStateSets(alpha=alpha, seed=seed)
    cal = labelled(500, r)
    sets.calibrate([p for p, _ in cal], [y for _, y in cal])
    test = labelled(2000, r)
    hits = sum(("HEALTHY", "WARNING", "FAILURE")[y] in sets.predict(p) for p, y in test)
    assert hits / len(test) >= 1 - alpha - binomial_tolerance(alpha, len(test))


def test_severity_probs_and_aps_score():
    for s in (0.0, 0.7, 1.2, 10.0):
        p = severity_probs(s)
        assert min(p) >= 0 and sum(p) == pytest.approx(1.0)
    assert severity_probs(0.0)[0] > 0.9 and severity_probs(3.0)[2] > 0.9
    probs = [0.2, 0.5, 0.3]
    assert aps_score(probs, 1, 0.0) == 0.0 and aps_score(probs, 2, 1.0) == pytest.approx(0.8)
    assert aps_score(probs, 0, 0.5) == pytest.approx(0.9)


def test_state_sets_round_trip_weights_only(tmp_path):
    r = random.Random(0)
    sets = ConformalStateSets(alpha=0.1)
    cal = labelled(100, r)
    sets.calibrate([p for p, _ in cal], [y for _, y in cal])
    torch.save(sets.state_dict(), tmp_path / "s.pt")
    fresh = ConformalStateSets(alpha=0.1)
    fresh.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert fresh.qhat == sets.qhat and fresh.predict([0.3, 0.4, 0.3]) == sets.predict([0.3, 0.4, 0.3])
