"""Dynamics (ARC sec. 3.4): the Lyapunov estimate and phase on synthetic trajectories, the
FFT oscillation ratio, the attractor radius, and the opt-in signal in a guard."""

import math
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings, strategies as st

import test_signals
import tiny
from guarded_optim import GuardedOptimizer
from guarded_optim.faults import Fault, FaultSchedule
from guarded_optim.signals import StepMeasurement, Verdict
from guarded_optim.signals.dynamics import (Lyapunov, attractor_radius, classify_phase,
                                            lyapunov_estimate, oscillation_ratio)

pytestmark = pytest.mark.usefixtures("one_thread")


def feed(sig, velocities):
    """Measure and observe a velocity series (as gradient norms); return the fired flags."""
    fired = []
    for t, v in enumerate(velocities):
        m = StepMeasurement(t, torch.tensor(float(v)))
        f = bool(sig.measure(m))
        sig.observe(m, True, f)
        fired.append(f)
    return fired


@settings(max_examples=40, deadline=None)
@given(rate=st.floats(-0.5, 0.5), v0=st.floats(1e-3, 1e3), n=st.integers(3, 40))
def test_lyapunov_estimate_of_a_geometric_series_is_its_log_rate(rate, v0, n):
    v = torch.tensor([v0 * math.exp(rate * t) for t in range(n)])
    assert float(lyapunov_estimate(v)) == pytest.approx(rate, abs=1e-4)


def test_lyapunov_estimate_skips_zero_velocities():
    assert float(lyapunov_estimate(torch.tensor([0.0, 1.0, 2.0, 4.0]))) == pytest.approx(math.log(2))
    assert float(lyapunov_estimate(torch.tensor([1.0]))) == 0.0


PHASE_SEEDS = 64                      # st.integers(0, PHASE_SEEDS - 1): fixed seeds


@settings(max_examples=20, deadline=None)
@given(noise=st.floats(0.0, 0.05), seed=st.integers(0, PHASE_SEEDS - 1))
def test_phase_of_synthetic_trajectories(noise, seed):
    """Margins of the phases under the jitter. The estimate learns only from steps that do
    not fire, so the divergent series ends on the EMA of its first 19 velocities (the
    alarm starts with the 20th): ``ln(1.3) (1 - 0.9^18) = 0.223`` against the 0.2
    threshold. The first velocity's jitter weighs most in it (coefficient 0.105, the
    others 0.028 in all), so at noise 0.05 its sd is 0.0054: 4.3 sd, P(fail) about 1.4e-6
    per seed, 0.09 failing seeds expected among 65537. That is no bound for every seed,
    so the seeds are fixed: PHASE_SEEDS of them, each run at noise 0, 0.005, ..., 0.05 by
    tests/test_determinism.py. The other phases have over 40 sd (measured over 300 seeds
    at noise 0.05): transient 0.140 +- 0.0009 between 0.1 and 0.2; oscillatory |lam| <
    0.005 (marginal: 0.05), oscillation ratio >= 9 (factor: 2); convergent -0.223."""
    g = torch.Generator().manual_seed(seed)
    jitter = lambda n: (1 + noise * torch.randn(n, generator=g)).tolist()  # noqa: E731
    cases = {
        "convergent": [0.8 ** t * j for t, j in enumerate(jitter(80))],
        "divergent": [1.3 ** t * j for t, j in enumerate(jitter(80))],
        "transient": [1.15 ** t * j for t, j in enumerate(jitter(80))],
        "oscillatory": [(1 + 0.5 * math.cos(math.pi * t / 2)) * j for t, j in enumerate(jitter(80))],
    }
    for phase, series in cases.items():
        sig = Lyapunov()
        fired = feed(sig, series)
        assert sig.training_phase() == phase, (phase, float(sig.lam), sig.oscillation())
        assert any(fired) == (phase == "divergent")


def test_classify_phase_follows_the_papers_thresholds():
    assert classify_phase(0.25, 0.0) == "divergent"
    assert classify_phase(0.15, 10.0) == "transient"
    assert classify_phase(0.0, 10.0) == "oscillatory"
    assert classify_phase(0.0, 1.0) == "convergent"
    assert classify_phase(-0.3, 10.0) == "convergent"
    assert classify_phase(0.07, 10.0) == "convergent"     # neither marginal nor rising fast


def test_oscillation_ratio_sees_a_period_and_not_a_trend():
    t = torch.arange(32, dtype=torch.float32)
    assert float(oscillation_ratio(torch.sin(2 * math.pi * t / 8))) > 10
    assert float(oscillation_ratio(3.0 + 0.5 * t)) < 1e-3        # a line is removed entirely


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 2**16), scale=st.floats(0.1, 10.0))
def test_attractor_radius(seed, scale):
    g = torch.Generator().manual_seed(seed)
    states = torch.randn(10, 6, generator=g, dtype=torch.float64)
    r = attractor_radius(states)
    expected = max(float((s - states.mean(0)).norm()) for s in states)
    assert float(r) == pytest.approx(expected, rel=1e-5)
    assert float(attractor_radius(scale * states)) == pytest.approx(scale * expected, rel=1e-5)
    assert float(attractor_radius(states + 7.0)) == pytest.approx(expected, rel=1e-4)


def test_bad_arguments_raise():
    for kw in (dict(window=2), dict(beta=0.0), dict(divergent=0.05), dict(source="velocity")):
        with pytest.raises(ValueError, match="Invalid"):
            Lyapunov(**kw)


# -- in a guard ----------------------------------------------------------------------------
@dataclass
class GrowingGradients(Fault):
    """From ``start``, gradients multiplied by ``rate ** (t - start)`` (a run that diverges)."""

    rate: float = 1.4

    def before_step(self, t, optimizer):
        if self.active(t):
            grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch._foreach_mul_(grads, self.rate ** (t - self.start))


@pytest.mark.parametrize("seed", range(5))
def test_clean_runs_raise_no_alarm(seed):
    m, opt = test_signals.guarded(seed, [Lyapunov()])
    _, batches = tiny.data(seed, steps=80)
    assert test_signals.run(m, opt, batches) == [("accept", None)] * 80


def test_sustained_divergence_rolls_back_to_a_verified_state():
    m, opt = test_signals.guarded(0, [Lyapunov()])
    _, batches = tiny.data(steps=70)
    faults = FaultSchedule([GrowingGradients(start=40, length=30)])
    decisions = test_signals.run(m, opt, batches, faults)
    assert decisions[:40] == [("accept", None)] * 40
    rollbacks = [t for t, (d, r) in enumerate(decisions) if d == "rollback"]
    assert rollbacks and all(decisions[t][1] == "lyapunov" for t in rollbacks)
    assert opt.stats["failures_lyapunov"] == len(rollbacks)
    assert opt.signals[0].verdict is Verdict.FAILURE


def test_state_round_trips_weights_only(tmp_path):
    m, opt = test_signals.guarded(0, [Lyapunov(source="param_norm", divergent=50.0,
                                                transient=40.0, marginal=30.0)])
    _, batches = tiny.data(steps=30)
    test_signals.run(m, opt, batches)
    sig = opt.signals[0]
    assert sig.count > 20 and math.isfinite(sig.radius())
    torch.save(opt.state_dict(), tmp_path / "o.pt")
    m2, opt2 = test_signals.guarded(0, [Lyapunov(source="param_norm", divergent=50.0,
                                                  transient=40.0, marginal=30.0)])
    opt2.load_state_dict(torch.load(tmp_path / "o.pt", weights_only=True))
    loaded = opt2.signals[0]
    for k, v in sig.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]) if isinstance(v, torch.Tensor) else v == loaded.state_dict()[k]
    assert loaded.training_phase() == sig.training_phase() and loaded.radius() == sig.radius()
