"""ARC signals: each fires on its fault, stays silent on clean runs, and composes."""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings, strategies as st

import tiny
from guarded_optim import GuardedOptimizer
from guarded_optim.ladder import Ladder
from guarded_optim.faults import FaultSchedule, make_fault
from guarded_optim.signals import (GradientSpike, LossSpike, NonFinite, NonFiniteWeights,
                                   OptimizerStateHealth, Verdict, WeightNorm)

pytestmark = pytest.mark.usefixtures("one_thread")


def all_signals():
    return [NonFinite(), GradientSpike(), LossSpike(), NonFiniteWeights(), WeightNorm(),
            OptimizerStateHealth()]


def guarded(seed=0, signals=None, **kw):
    """A probe-less guard verifying every step (``probe_every=1``): each test below sees its
    signal act at the step the damage appears (the default cadence is tested on its own)."""
    m = tiny.model(seed)
    kw.setdefault("probe_every", 1)
    opt = GuardedOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-2),
                           signals=all_signals() if signals is None else signals, **kw)
    return m, opt


def run(m, opt, batches, faults=None, start=0):
    out = []
    for t, (x, y) in enumerate(batches, start):
        opt.zero_grad()
        loss = F.mse_loss(m(x), y)
        if faults is not None:
            loss = faults.loss(t, loss)
        loss.backward()
        if faults is not None:
            faults.before_step(t, opt)
        opt.step(lambda loss=loss: loss)
        if faults is not None:
            faults.after_step(t, opt)
        out.append((opt.last_decision, opt.last_event.reason))
    return out


def weights_and_state(m, opt):
    return {k: v for k, v in tiny.full_state(m, opt).items() if k.startswith(("param.", "state."))}


@pytest.mark.parametrize("fault,signal,when", [
    ("nan_grad", "nonfinite", "skip"),
    ("inf_grad", "nonfinite", "skip"),
    ("nan_loss", "nonfinite", "skip"),
    ("grad_x300", "grad_spike", "skip"),
    ("weights_nan", "nonfinite_weights", "now"),
    ("weights_x1e4", "weight_norm", "now"),
    ("weights_zero", "weight_norm", "now"),
    ("adam_state_x1e6", "optimizer_state", "now"),
    ("adam_state_nan", "optimizer_state", "now"),
    ("adam_state_zero", "optimizer_state", "now"),     # the second moment's norm collapses
    ("lr_x100000", "weight_norm", "next"),
])
def test_signal_fires_on_its_fault_and_rollback_is_exact(fault, signal, when):
    """skip: never applied. now: damage present when step() starts (written between steps)
    is seen before proposing. next: damage made by the proposal is seen when the next step
    starts. A rollback returns to the last *verified* state, bit for bit."""
    m, opt = guarded()
    _, batches = tiny.data(steps=40)
    run(m, opt, batches[:29])
    theta_29 = weights_and_state(m, opt)
    run(m, opt, batches[29:30], start=29)
    theta_30 = weights_and_state(m, opt)
    faults = FaultSchedule([make_fault(fault, 30, 1)])
    d = run(m, opt, batches[30:31], faults, start=30)
    if when == "skip":
        assert d[0] == ("skip", signal)
        assert opt.stats[f"skipped_{signal}"] == 1 and opt.stats["rollbacks"] == 0
    elif when == "now":
        assert d[0][0] == "rollback" and signal in d[0][1]
        tiny.assert_same(theta_29, weights_and_state(m, opt))
        assert opt.stats[f"failures_{signal}"] == 1
    else:
        d += run(m, opt, batches[31:32], faults, start=31)
        assert d[0][0] == "accept" and d[1][0] == "rollback" and signal in d[1][1]
        assert opt.stats[f"failures_{signal}"] == 1
        tiny.assert_same(theta_30, weights_and_state(m, opt))
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_damage_between_steps_rolls_back_to_the_last_verified_state():
    m, opt = guarded()
    _, batches = tiny.data(steps=40)
    run(m, opt, batches[:29])
    theta_29 = weights_and_state(m, opt)         # verified when step 29 starts
    run(m, opt, batches[29:30], start=29)
    with torch.no_grad():
        m[0].weight.mul_(1e4)
    x, y = batches[30]
    opt.step(tiny.closure_for(opt, m, x, y))
    assert opt.last_decision == "rollback" and "weight_norm" in opt.last_event.reason
    tiny.assert_same(theta_29, weights_and_state(m, opt))


def test_loss_spike_on_damaged_weights_rolls_back_before_proposing():
    m, opt = guarded(signals=[NonFinite(), LossSpike()])
    _, batches = tiny.data(steps=40)
    run(m, opt, batches[:29])
    verified = weights_and_state(m, opt)         # theta_29: verified when step 29 starts
    run(m, opt, batches[29:30], start=29)
    with torch.no_grad():
        m[4].weight.mul_(1e3)                    # damage done between steps
    d = run(m, opt, batches[30:31], start=30)
    assert d == [("rollback", "loss_spike")]
    tiny.assert_same(verified, weights_and_state(m, opt))


@pytest.mark.parametrize("seed", range(20))
def test_clean_runs_raise_no_alarm(seed):
    m, opt = guarded(seed)
    _, batches = tiny.data(seed, steps=80)
    decisions = run(m, opt, batches)
    assert decisions == [("accept", None)] * 80
    assert opt.stats["rollbacks"] == opt.stats["skipped"] == 0


def test_clean_guarded_run_with_all_signals_is_bit_identical_to_bare():
    _, batches = tiny.data(steps=40)
    m1, opt = guarded()
    run(m1, opt, batches)
    m2 = tiny.model(0)
    bare = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    for x, y in batches:
        bare.zero_grad()
        F.mse_loss(m2(x), y).backward()
        bare.step()
    tiny.assert_same(weights_and_state(m2, bare), weights_and_state(m1, opt))


def test_persistent_failure_rebases_instead_of_rolling_back_forever():
    """A bound that every proposal crosses (here: too tight for this LR) must not stall the run."""
    m, opt = guarded(signals=[WeightNorm(max_step_ratio=1.0001)], max_consecutive_rejections=3,
                     history=0, ladder=Ladder(on_exhausted="rebaseline"))   # opted in
    _, batches = tiny.data(steps=40)
    d = [x[0] for x in run(m, opt, batches)]
    assert d.count("accept") >= 10 and opt.stats["rebaselines"] >= 3
    assert max(len(r) for r in "".join("r" if x == "rollback" else " " for x in d).split()) <= 3

    stalled, stalled_opt = guarded(signals=[WeightNorm(max_step_ratio=1.00001)],   # (far
                                   max_consecutive_rejections=None,          # below any step)
                                   ladder=Ladder(backoff=None))   # no healing rung either
    d = [x[0] for x in run(stalled, stalled_opt, batches)]
    # without the escape every proposal is undone (the reference is taken at construction)
    assert d[1:] == ["rollback", "accept"] * 19 + ["rollback"]


def test_signal_state_round_trips_weights_only(tmp_path):
    m, opt = guarded()
    _, batches = tiny.data(steps=30)
    run(m, opt, batches)
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    m2, opt2 = guarded()
    opt2.load_state_dict(torch.load(tmp_path / "opt.pt", weights_only=True))
    for a, b in zip(opt.signals, opt2.signals):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        for k in sa:
            if isinstance(sa[k], torch.Tensor):
                assert torch.equal(sa[k], sb[k]), (a.name, k)
            else:
                assert sa[k] == sb[k], (a.name, k)


def test_verdicts_and_phases_are_declared():
    for s in all_signals():
        assert s.phase in ("before", "after") and isinstance(s.verdict, Verdict)
        assert s.phase == "before" or s.verdict is Verdict.FAILURE


PROPOSAL_FAULTS = ["nan_grad", "inf_grad", "grad_x300", "lr_x1000", "lr_x100000", "nan_loss"]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(PROPOSAL_FAULTS), st.integers(12, 38), st.integers(1, 3)),
                max_size=4), st.integers(0, 1000))
def test_random_faults_end_finite_and_equal_to_replaying_applied_steps(faults, seed):
    """The final weights are those of the accepted steps alone, applied in order (the
    healing rung, which changes the proposals it lets through, is off here)."""
    _, batches = tiny.data(seed, steps=40)
    schedule = FaultSchedule([make_fault(n, s, length, seed=seed) for n, s, length in faults])
    m, opt = guarded(seed, ladder=Ladder(backoff=None))
    decisions = [d for d, _ in run(m, opt, batches, schedule)]
    assert all(torch.isfinite(p).all() for p in m.parameters())
    # a rollback at step t+1 undoes the provisional step t (the state it checks)
    kept = [t for t, d in enumerate(decisions)
            if d == "accept" and not (t + 1 < len(decisions) and decisions[t + 1] == "rollback")]
    m2 = tiny.model(seed)
    bare = torch.optim.AdamW(m2.parameters(), lr=1e-2)
    for t, (x, y) in enumerate(batches):
        bare.zero_grad()
        loss = F.mse_loss(m2(x), y)
        if t in kept:
            schedule.loss(t, loss).backward()
            schedule.before_step(t, bare)
            bare.step()
            schedule.after_step(t, bare)
    tiny.assert_same(weights_and_state(m2, bare), weights_and_state(m, opt))


def test_optimizer_state_collapse_bound_holds_on_clean_adam():
    """Adam's ``v_t >= beta2 * v_{t-1}``: the per-key norms never fall 100x on clean steps,
    and each key is measured on its own (a zeroed exp_avg_sq is not hidden by exp_avg)."""
    sig = OptimizerStateHealth()
    m, opt = guarded(signals=[sig])
    _, batches = tiny.data(steps=60)
    d = run(m, opt, batches)
    assert d == [("accept", None)] * 60
    assert sig.keys == ("exp_avg", "exp_avg_sq") and sig.last.shape == (2,)


def test_default_signals_leave_loss_spike_to_the_probe():
    """A probed guard lets the probe judge the kept state; without a probe the training-loss
    spike is the only check of damage the weight signals cannot see."""
    m = tiny.model()
    probe_set, _ = tiny.data(steps=1)
    probed = GuardedOptimizer(torch.optim.AdamW(m.parameters()), tiny.probe_for(m, probe_set), module=m)
    bare = GuardedOptimizer(torch.optim.AdamW(m.parameters()), module=m)
    assert "loss_spike" not in {s.name for s in probed.signals}
    assert {s.name for s in bare.signals} == {s.name for s in probed.signals} | {"loss_spike"}


# -- a change of the data is not a fault (the natural suite's adam_v_decay) -----------------

class _ScaleLoss:
    """A batch whose loss, and so its gradient, is ``factor`` x the usual: what fresh data
    after a memorised shard looks like to the signals (not a fault: both move together)."""

    def __init__(self, start, length, factor):
        self.start, self.length, self.factor = start, length, factor

    def loss(self, t, loss):
        return loss * self.factor if self.start <= t < self.start + self.length else loss

    def before_step(self, t, opt):
        pass

    def after_step(self, t, opt):
        pass


@pytest.mark.parametrize("loss_explains", [True, False])
def test_gradient_spike_that_the_loss_explains_is_not_skipped(loss_explains):
    """A x300 gradient with the loss unchanged is a fault (skipped); the same x300 gradient
    with a x300 training loss is a harder batch, judged as an ordinary step."""
    m, opt = guarded(signals=[NonFinite(), GradientSpike(loss_explains=loss_explains)])
    _, batches = tiny.data(steps=40)
    run(m, opt, batches[:30])
    assert run(m, opt, batches[30:31], FaultSchedule([make_fault("grad_x300", 30, 1)]),
               start=30) == [("skip", "grad_spike")]
    d = run(m, opt, batches[31:32], FaultSchedule([_ScaleLoss(31, 1, 300.0)]), start=31)
    assert d == ([("accept", None)] if loss_explains else [("skip", "grad_spike")])


def test_gradient_spike_keeps_the_losses_it_learnt_across_a_checkpoint(tmp_path):
    sig = GradientSpike()
    m, opt = guarded(signals=[sig])
    _, batches = tiny.data(steps=25)
    run(m, opt, batches)
    state = sig.state_dict()
    assert len(state["losses"]) == 1 and len(state["losses"][0]) == sig.window
    torch.save(state, tmp_path / "s.pt")
    back = GradientSpike()
    back.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    assert back.state_dict()["losses"] == state["losses"]
    old = {k: v for k, v in state.items() if k != "losses"}     # an earlier release's layout
    back.load_state_dict(old)
    assert back.state_dict()["losses"] == [[]]                   # no losses known: no relief
    with pytest.raises(ValueError, match="'losses'"):
        back.load_state_dict({**state, "losses": [[float("nan")]]})


def _adam_after_quiet_stretch():
    """Adam after 300 steps of 1e-6 gradients: its moments have decayed toward zero."""
    p = torch.nn.Parameter(torch.zeros(100))
    opt = torch.optim.Adam([p], lr=1e-2)
    for _ in range(300):
        p.grad = torch.full_like(p, 1e-6)
        opt.step()
    return p, opt


@pytest.mark.parametrize("flagged", [False, True])
def test_optimizer_state_jump_that_the_gradient_explains_is_not_a_fault(flagged):
    """A normal gradient after a quiet stretch lifts Adam's moments 1e4x in one step by
    Adam's own rule: not a fault, unless a pre-step signal flagged that gradient and it
    was proposed anyway (an overrule), which then explains nothing."""
    from guarded_optim.signals import StepMeasurement
    from guarded_optim.signals.gradients import global_norm
    p, opt = _adam_after_quiet_stretch()
    sig = OptimizerStateHealth()

    def check(t, flagged=False):
        m = StepMeasurement(t, global_norm([p.grad]), None, opt, flagged=flagged)
        fired = bool(sig.measure(m))
        sig.observe(m, True, fired)
        return fired, float(sig._norm.square().sum().sqrt())

    for t in range(20):
        p.grad = torch.full_like(p, 1e-6)
        opt.step()
        assert not check(t)[0]
    _, quiet = check(20)
    p.grad = torch.ones_like(p)
    opt.step()
    fired, loud = check(21, flagged)
    assert loud > 1e3 * quiet            # measured: the state norm rises about 1e5x
    assert fired == flagged


def test_loss_spike_on_the_verified_state_is_the_batch_not_damage():
    """Probe-less: a training-loss spike blames the proposals made since the last
    verification. On the verified state itself there is nothing to blame: the batch differs,
    the step goes on (counted in ``batch_loss_spikes``). On unverified proposals it rolls back."""
    m, opt = guarded(signals=[NonFinite(), GradientSpike(), LossSpike()], probe_every=10)
    _, batches = tiny.data(steps=45)
    run(m, opt, batches[:30])                 # verified right after step 29's proposal
    assert opt.step_state.live_is_safe
    d = run(m, opt, batches[30:31], FaultSchedule([_ScaleLoss(30, 1, 300.0)]), start=30)
    assert d == [("accept", None)] and opt.stats["batch_loss_spikes"] == 1
    assert opt.stats["rollbacks"] == 0
    run(m, opt, batches[31:35], start=31)     # four unverified proposals
    assert not opt.step_state.live_is_safe
    with torch.no_grad():
        m[4].weight.mul_(1e3)                 # damage: the loss spikes on every batch
    d = run(m, opt, batches[35:36], start=35)
    assert d == [("rollback", "loss_spike")] and opt.stats["batch_loss_spikes"] == 1


def test_the_guard_judges_the_default_pre_step_signals_on_the_host():
    """NonFinite, GradientSpike and LossSpike decide from the gradient norm and loss the
    step's one transfer reads (no device work); a subclass that overrides ``measure`` alone
    is measured, not judged by its parent's rule."""
    from guarded_optim.signals.base import host_judge

    class Custom(NonFinite):
        def measure(self, m):
            return torch.tensor(True)

    for sig in (NonFinite(), GradientSpike(), LossSpike()):
        assert host_judge(sig) is not None and host_judge(sig).__func__ is type(sig).judge
    assert host_judge(Custom()) is None and host_judge(WeightNorm()) is None
    m, opt = guarded(signals=[Custom()])
    _, batches = tiny.data(steps=1)
    assert run(m, opt, batches) == [("skip", "nonfinite")]     # its own measure decided


def test_a_finite_float64_loss_beyond_float32_range_is_finite():
    """The loss rides in the step's transfer in float64: 7e56 is a number, not an overflow."""
    m, opt = guarded(signals=[NonFinite(), GradientSpike()])
    _, batches = tiny.data(steps=1)
    x, y = batches[0]
    opt.zero_grad()
    loss = F.mse_loss(m(x), y)
    loss.backward()
    opt.step(lambda: loss.detach().double() * 7e56)
    assert opt.last_decision == "accept"


def test_loss_spike_on_weights_written_through_data_is_still_damage():
    """``p.data.mul_()`` bumps no version counter: the verified-state check also compares
    the weights with the snapshot, value for value, before blaming the batch."""
    m, opt = guarded(signals=[NonFinite(), LossSpike()], probe_every=10)
    _, batches = tiny.data(steps=32)
    run(m, opt, batches[:30])
    assert opt.step_state.live_is_safe
    verified = weights_and_state(m, opt)
    m[4].weight.data.mul_(1e3)                # damage no counter sees
    assert not opt.safe_snapshot.written_since_capture()
    d = run(m, opt, batches[30:31], start=30)
    assert d == [("rollback", "loss_spike")] and opt.stats["batch_loss_spikes"] == 0
    tiny.assert_same(verified, weights_and_state(m, opt))
