"""The added signals: each fires on its fault, stays silent on clean runs, round-trips its
state with ``weights_only=True`` and measures into a 0-d bool device tensor."""

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import test_signals
import tiny
from guarded_optim import GuardedOptimizer
from guarded_optim.faults import Fault, FaultSchedule, make_fault
from guarded_optim.signals import (EffectiveRank, GradientAgreement, GradientEntropy,
                                   LayerwiseCV, Sparsity, StepCounters, StepMeasurement,
                                   Verdict, WeightNorm, global_grad_norm)

pytestmark = pytest.mark.usefixtures("one_thread")


def extra_signals(rank_every=10):
    return [GradientAgreement(), LayerwiseCV(), GradientEntropy(), Sparsity(),
            EffectiveRank(every=rank_every), StepCounters()]


def guarded(seed=0, signals=None):
    return test_signals.guarded(seed, extra_signals() if signals is None else signals)


run = test_signals.run


def _grads(optimizer):
    return [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]


@dataclass
class ReverseLastGradient(Fault):
    """At ``start`` the gradient is minus the one of the step before (a reversed update)."""

    def before_step(self, t, optimizer):
        if t == self.start - 1:
            self._saved = [g.clone() for g in _grads(optimizer)]
        elif self.active(t):
            for g, s in zip(_grads(optimizer), self._saved):
                g.copy_(-s)


@dataclass
class ScaleOneGradient(Fault):
    """One parameter's gradient scaled x``factor`` (the global norm barely sees a small layer)."""

    index: int = 0
    factor: float = 1000.0

    def before_step(self, t, optimizer):
        if self.active(t):
            _grads(optimizer)[self.index].mul_(self.factor)


@dataclass
class DeadGradients(Fault):
    """Nine in ten gradient elements zeroed (dead units)."""

    def before_step(self, t, optimizer):
        if self.active(t):
            for g in _grads(optimizer):
                flat = g.view(-1)
                keep = torch.arange(flat.numel()) % 10 == 0
                flat[~keep] = 0


@dataclass
class ShiftStepCounters(Fault):
    """Every optimizer 'step' counter moved by ``by`` (a corrupted/mismatched state load)."""

    by: float = -5.0

    def before_step(self, t, optimizer):
        if self.active(t):
            inner = getattr(optimizer, "inner", optimizer)
            for st in inner.state.values():
                st["step"].add_(self.by)


@pytest.mark.parametrize("signal,fault,when", [
    (GradientAgreement(), ReverseLastGradient(30, 1), "skip"),
    (LayerwiseCV(), ScaleOneGradient(30, 1), "skip"),
    (LayerwiseCV(), ScaleOneGradient(30, 1, index=4), "skip"),
    (GradientEntropy(), DeadGradients(30, 1), "skip"),
    (Sparsity(), make_fault("sparsity_90", 30, 1), "rollback"),
    (EffectiveRank(every=1), make_fault("rank_collapse", 30, 1), "rollback"),
    (StepCounters(), ShiftStepCounters(30, 1, by=-5.0), "rollback"),
    (StepCounters(), ShiftStepCounters(30, 1, by=100.0), "rollback"),
], ids=lambda v: getattr(v, "name", None) or type(v).__name__ if not isinstance(v, str) else v)
def test_signal_fires_on_its_fault(signal, fault, when):
    assert (signal.phase, signal.verdict) == (("before", Verdict.SKIP) if when == "skip"
                                              else ("after", Verdict.FAILURE))
    m, opt = guarded(signals=[signal])
    _, batches = tiny.data(steps=32)
    d = run(m, opt, batches, FaultSchedule([fault]))
    assert d[:30] == [("accept", None)] * 30
    assert d[30][0] == when and signal.name in d[30][1]
    assert d[31] == ("accept", None)          # one-off fault: the next step is healthy again
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_effective_rank_only_computes_on_check_steps():
    m, opt = guarded(signals=[EffectiveRank(every=50)])
    _, batches = tiny.data(steps=32)
    d = run(m, opt, batches, FaultSchedule([make_fault("rank_collapse", 30, 1)]))
    assert d == [("accept", None)] * 32       # steps 30 and 31 are not checked: not seen
    sig = opt.signals[0]
    assert sig.baseline is not None and sig.due == 50   # first check: when the guard was built
    late = FaultSchedule([make_fault("rank_collapse", 50, 1)])
    d = run(m, opt, tiny.data(steps=60)[1][32:], late, start=32)
    assert d[:18] == [("accept", None)] * 18
    assert d[18][0] == "rollback" and "effective_rank" in d[18][1]   # step 50: checked
    # a failed check does not advance the schedule: the next post check (step 52, after the
    # rolled-back state's next proposal) runs again, finds it healthy, next due at 102
    assert d[19:] == [("accept", None)] * 9 and sig.due == 102


def test_step_counters_retake_reference_after_a_rollback():
    """A rollback may restore an older verified snapshot: counters lower, but not damage."""
    m, opt = guarded(signals=[StepCounters()])
    _, batches = tiny.data(steps=12)
    run(m, opt, batches)
    sig = opt.signals[0]
    meas = StepMeasurement(12, torch.zeros(()), None, opt.inner)
    assert not sig.measure(meas)
    sig.observe(meas, True, False)
    ShiftStepCounters(13, 1, by=-3.0).before_step(13, opt)
    meas = StepMeasurement(13, torch.zeros(()), None, opt.inner)
    assert sig.measure(meas)                  # fires; the guard rolls back, observes nothing
    assert not sig.measure(StepMeasurement(14, torch.zeros(()), None, opt.inner))


def test_step_counters_stay_silent_through_an_escalation():
    m = tiny.model(0)
    opt = GuardedOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-2),
                           signals=[WeightNorm(), StepCounters()], max_consecutive_rejections=2, history=3,
                           checkpoint_every=5, probe_every=1)
    _, batches = tiny.data(steps=45)
    run(m, opt, batches, FaultSchedule([make_fault("weights_x1e4", 30, 4)]))
    assert opt.stats["escalations"] >= 1 and opt.stats["failures_weight_norm"] >= 2
    assert opt.stats["failures_step_counters"] == 0


def test_clean_runs_raise_no_alarm_with_all_extra_signals():
    for seed in range(20):
        m, opt = guarded(seed)
        _, batches = tiny.data(seed, steps=80)
        decisions = run(m, opt, batches)
        assert decisions == [("accept", None)] * 80, seed
        assert opt.stats["rollbacks"] == opt.stats["skipped"] == 0


def test_state_round_trips_weights_only(tmp_path):
    m, opt = guarded(signals=extra_signals(rank_every=1))
    _, batches = tiny.data(steps=30)
    run(m, opt, batches)
    for s in opt.signals:
        torch.save(s.state_dict(), tmp_path / "s.pt")
        fresh = type(s)()
        fresh.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
        sa, sb = s.state_dict(), fresh.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            if isinstance(sa[k], torch.Tensor):
                assert torch.equal(sa[k], sb[k]), (s.name, k)
            else:
                assert sa[k] == sb[k], (s.name, k)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    m2, opt2 = guarded(signals=extra_signals(rank_every=1))
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    for a, b in zip(opt.signals, opt2.signals):
        assert repr(a) == repr(b)
        for k, v in a.state_dict().items():
            w = b.state_dict()[k]
            assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, (a.name, k)


def _measure_all(device):
    torch.manual_seed(0)
    m = tiny.model(0).to(device)
    inner = torch.optim.AdamW(m.parameters(), lr=1e-2)
    signals = extra_signals(rank_every=1)
    _, batches = tiny.data(steps=15)
    flags = []
    for t, (x, y) in enumerate(batches):
        inner.zero_grad()
        F.mse_loss(m(x.to(device)), y.to(device)).backward()
        meas = StepMeasurement(t, global_grad_norm(_grads(inner)), None, inner)
        flags = [(s, s.measure(meas)) for s in signals]
        inner.step()
        for s, _ in flags:
            s.observe(meas, True, False)
    return flags


def test_measure_returns_a_0d_bool_device_tensor():
    for s, f in _measure_all("cpu"):
        assert isinstance(f, torch.Tensor) and f.dim() == 0 and f.dtype == torch.bool, s.name
        assert not f


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA for sync debug mode")
def test_measure_does_not_sync_on_cuda():
    torch.cuda.set_sync_debug_mode("error")
    try:
        # EffectiveRank's svdvals synchronises on CUDA (documented): checked off its steps
        m = tiny.model(0).cuda()
        inner = torch.optim.AdamW(m.parameters(), lr=1e-2)
        x, y = (v.cuda() for v in tiny.data(steps=1)[1][0])
        F.mse_loss(m(x), y).backward()
        inner.step()
        meas = StepMeasurement(1, global_grad_norm(_grads(inner)), None, inner)
        for s in extra_signals(rank_every=50):
            f = s.measure(meas)
            assert f.device.type == "cuda" and f.dim() == 0 and f.dtype == torch.bool
    finally:
        torch.cuda.set_sync_debug_mode("default")


# -- gradient vanishing and the aggregate weight-health score -------------------------------
def test_gradient_vanishing_is_opt_in_and_fires_on_a_collapsed_gradient():
    from guarded_optim.faults import FaultSchedule, ScaleGradients
    from guarded_optim.signals import GradientSpike, NonFinite
    import test_signals as ts
    _, batches = tiny.data(steps=40)
    for low, expected in ((None, "accept"), (1e3, "skip")):
        m, opt = ts.guarded(signals=[NonFinite(), GradientSpike(low_factor=low)])
        ts.run(m, opt, batches[:20])
        d = ts.run(m, opt, batches[20:21], FaultSchedule([ScaleGradients(20, 1, factor=1e-6)]), start=20)
        assert d[0][0] == expected


def test_gradient_vanishing_is_silent_on_clean_runs():
    from guarded_optim.signals import GradientSpike, NonFinite
    import test_signals as ts
    for seed in range(20):
        m, opt = ts.guarded(seed, signals=[NonFinite(), GradientSpike(low_factor=1e3)])
        _, batches = tiny.data(seed, steps=80)
        assert all(d == "accept" for d, _ in ts.run(m, opt, batches)), seed


def test_weight_health_scores_and_fires_with_its_parts():
    from guarded_optim.faults import FaultSchedule, make_fault
    from guarded_optim.signals import WeightHealth
    import test_signals as ts
    _, batches = tiny.data(steps=40)
    m, opt = ts.guarded(signals=[WeightHealth()])
    ts.run(m, opt, batches[:30])
    health = opt.signals[0]
    assert float(health.score) == 1.0
    d = ts.run(m, opt, batches[30:31], FaultSchedule([make_fault("sparsity_90", 30, 1)]), start=30)
    assert d == [("rollback", "weight_health")]
    assert float(health.score) == 0.75                  # one of four parts (sparsity) fired
    sd = opt.state_dict()
    assert set(sd["guard"]["signals"]["weight_health"]) == {
        "nonfinite_weights", "weight_norm", "sparsity", "effective_rank"}


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1e38])
def test_effective_rank_of_damaged_weights_is_measured_not_raised(bad):
    """Non-finite weights count as rank 0 (the check fires, never raises); huge but finite
    weights keep their rank (the rank is scale-invariant)."""
    w = torch.randn(8, 6, generator=torch.Generator().manual_seed(0))
    before = EffectiveRank.relative_rank([w])
    damaged = w.clone()
    damaged[2, 3] = bad
    rank = EffectiveRank.relative_rank([damaged])
    if bad == 1e38:
        assert 0 < rank < before          # one huge entry: close to rank 1, finite
        assert torch.allclose(EffectiveRank.relative_rank([w * 1e30]), before, rtol=1e-4)
    else:
        assert rank == 0
