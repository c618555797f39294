"""The escalation ladder: each rung driven by an ordinary training loop."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import BatchSampler, DataLoader, SequentialSampler, TensorDataset

import tiny
from guarded_optim import GuardedOptimizer, NonFinite
from guarded_optim.ladder import (BackOff, GuardStopped, Ladder, QuarantineSampler, ResetMoments)

pytestmark = pytest.mark.usefixtures("one_thread")


def _guard(**kw):
    m = tiny.model(0)
    probe_set, batches = tiny.data(0, steps=40)
    kw.setdefault("signals", [NonFinite()])   # let damage reach the probe
    opt = GuardedOptimizer(torch.optim.SGD(m.parameters(), lr=0.05), tiny.probe_for(m, probe_set),
                           module=m, epsilon=0.5, **kw)
    return m, opt, batches


def _closure(opt, m, x, y, scale=None):
    calls = {"n": 0}

    def closure():
        calls["n"] += 1
        opt.zero_grad()
        loss = F.mse_loss(m(x), y)
        if scale is not None:
            loss = loss * scale(calls["n"])
        loss.backward()
        return loss
    return closure, calls


def test_rung2_a_transient_fault_is_rerun_and_applied():
    m, opt, batches = _guard()
    for x, y in batches[:5]:
        opt.step(_closure(opt, m, x, y)[0])
    x, y = batches[5]
    # the first evaluation is corrupted (as by a flaky device), the re-run is not
    closure, calls = _closure(opt, m, x, y, scale=lambda n: 1e4 if n == 1 else 1.0)
    opt.step(closure)
    assert calls["n"] == 2
    assert opt.last_decision == "accept" and opt.last_event.action == "rerun:transient"
    assert opt.stats["reruns"] == opt.stats["transient"] == 1 and opt.stats["rollbacks"] == 0
    # the applied step is exactly the clean step from the verified state
    m2, ref, _ = _guard()
    for x2, y2 in batches[:6]:
        ref.step(_closure(ref, m2, x2, y2)[0])
    tiny.assert_same(tiny.full_state(m, opt), tiny.full_state(m2, ref))


def test_rung2_4_a_persistent_bad_batch_is_rolled_back_and_quarantined(caplog):
    m, opt, batches = _guard()
    for x, y in batches[:5]:
        opt.step(_closure(opt, m, x, y)[0])
    verified = tiny.full_state(m, opt)
    x, y = batches[5]
    caplog.set_level(logging.INFO, logger="guarded_optim")
    opt.step(_closure(opt, m, x, y * 1e3)[0], batch_id="shard3/batch17")   # bad labels
    assert opt.last_decision == "rollback"
    assert opt.last_event.action.startswith("rerun:persistent,quarantine")
    assert opt.stats["persistent"] == opt.stats["quarantined"] == 1
    assert "shard3/batch17" in opt.ladder.quarantine
    tiny.assert_same(tiny.full_state(m, opt), verified)
    assert any("rolled back" in r.getMessage() and "quarantine" in r.getMessage()
               for r in caplog.records)
    # the same batch again: skipped before anything is proposed
    opt.step(_closure(opt, m, x, y * 1e3)[0], batch_id="shard3/batch17")
    assert opt.last_decision == "skip" and opt.last_event.reason == "quarantined"
    assert opt.stats["skipped_quarantined"] == 1


def test_rung2_a_rerun_draws_the_same_masks_and_the_data_stream_goes_on():
    m = tiny.model(0, dropout=0.3)
    probe_set, batches = tiny.data(0, steps=8)
    opt = GuardedOptimizer(torch.optim.SGD(m.parameters(), lr=0.05), tiny.probe_for(m, probe_set),
                           module=m, epsilon=1e-9, signals=[NonFinite()])
    x, y = batches[0]
    torch.manual_seed(5)
    with torch.no_grad():
        m(x)                                      # what one forward pass draws, unguarded
    expected = torch.get_rng_state()
    torch.manual_seed(5)
    opt.step(_closure(opt, m, x, y * 1e3)[0])   # rejected: re-run on the same masks reproduces
    assert opt.last_event.action.startswith("rerun:persistent")
    assert torch.equal(torch.get_rng_state(), expected)   # drawn once, as if never re-run


def test_quarantine_sampler_skips_quarantined_batches_next_epoch_and_after_resume():
    m, opt, batches = _guard()
    xs = torch.cat([x for x, _ in batches[:8]])
    ys = torch.cat([y for _, y in batches[:8]])
    ys[64:96] *= 1e3                                # one shard of mislabelled examples
    data = TensorDataset(xs, ys)
    sampler = QuarantineSampler(BatchSampler(SequentialSampler(data), 32, False), opt, key=tuple)
    loader = DataLoader(data, batch_sampler=sampler)
    seen = []
    for epoch in range(2):
        for batch, (x, y) in zip(list(sampler), loader):   # the loader draws from the sampler
            seen.append((epoch, batch[0]))
            opt.step(_closure(opt, m, x, y)[0], batch_id=tuple(batch))
    assert (0, 64) in seen and (1, 64) not in seen and len(seen) == 15
    assert opt.stats["quarantined"] == 1 and tuple(range(64, 96)) in opt.ladder.quarantine
    sd = opt.state_dict()
    m2, opt2, _ = _guard()
    opt2.load_state_dict(sd)
    assert [b[0] for b in QuarantineSampler(BatchSampler(SequentialSampler(data), 32, False),
                                            opt2, key=tuple)] == [0, 32, 96, 128, 160, 192, 224]


def test_rung5_reset_moments_is_opt_in_and_reported():
    m = tiny.model(0)
    probe_set, batches = tiny.data(0, steps=12)
    opt = GuardedOptimizer(torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9),
                           tiny.probe_for(m, probe_set), module=m, epsilon=0.5,
                           signals=[NonFinite()], recovery=[ResetMoments(after=1)],
                           ladder=Ladder(rerun=None))
    for x, y in batches[:4]:
        opt.step(_closure(opt, m, x, y)[0])
    x, y = batches[4]
    opt.step(_closure(opt, m, x, y * 1e3)[0])
    assert opt.last_decision == "rollback" and "reset_moments" in opt.last_event.action
    assert all(float(st["momentum_buffer"].abs().sum()) == 0 for st in opt.state.values())


def test_rung6_the_budget_spent_holds_the_verified_state_without_raising(caplog):
    """The default: no exception (a script with no try/except goes on, ``scaler.step``
    completes); the guard keeps the verified state, says so at WARNING, skips every later
    step until ``opt.resume()``."""
    m, opt, batches = _guard(max_consecutive_rejections=3)
    for x, y in batches[:4]:
        opt.step(_closure(opt, m, x, y)[0])
    verified = tiny.full_state(m, opt)
    caplog.set_level(logging.INFO, logger="guarded_optim")
    for x, y in batches[4:7]:
        opt.step(_closure(opt, m, x, y * 1e3)[0])
    assert opt.stopped and opt.stats["stops"] == 1 and opt.last_event.action.startswith("rerun")
    assert "stop" in opt.last_event.action.split(",")
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("stopped" in w and "opt.resume()" in w for w in warnings)
    for x, y in batches[7:10]:                       # held: skipped, nothing proposed
        opt.step(_closure(opt, m, x, y)[0])
        assert opt.last_decision == "skip" and opt.last_event.reason == "stopped"
    # parameters and optimizer state as verified (a skip's forward pass moves BatchNorm's
    # running statistics, as every skip's does)
    held = {k: v for k, v in tiny.full_state(m, opt).items() if not k.startswith("buffer.")}
    tiny.assert_same(held, {k: v for k, v in verified.items() if not k.startswith("buffer.")})
    assert opt.stats["skipped_stopped"] == 3
    opt.resume()
    opt.step(_closure(opt, m, *batches[10])[0])
    assert not opt.stopped and opt.last_decision == "accept"


def test_rung6_the_budget_spent_stops_with_a_clear_error_at_the_verified_state(caplog):
    m, opt, batches = _guard(max_consecutive_rejections=3, ladder=Ladder(on_exhausted="raise"))
    for x, y in batches[:4]:
        opt.step(_closure(opt, m, x, y)[0])
    verified = tiny.full_state(m, opt)
    caplog.set_level(logging.INFO, logger="guarded_optim")
    with pytest.raises(GuardStopped, match="3 proposals in a row were rejected") as info:
        for x, y in batches[4:10]:
            opt.step(_closure(opt, m, x, y * 1e3)[0])
    assert "Ladder(on_exhausted='rebaseline')" in str(info.value) and "state_dict" in str(info.value)
    assert opt.stats["stops"] == 1 and opt.stats["rollbacks"] == 3 and opt.step_state.t == 7
    tiny.assert_same(tiny.full_state(m, opt), verified)
    assert any(r.levelno == logging.WARNING and "stopped" in r.getMessage() for r in caplog.records)


def test_rung6_rebaseline_is_an_opt_in():
    m, opt, batches = _guard(max_consecutive_rejections=3, ladder=Ladder(on_exhausted="rebaseline"))
    for x, y in batches[:4]:
        opt.step(_closure(opt, m, x, y)[0])
    for x, y in batches[4:10]:
        opt.step(_closure(opt, m, x, y * 1e3)[0])
    assert opt.stats["rebaselines"] >= 1 and opt.stats["stops"] == 0


def test_rung1_the_probe_overrules_a_skip_streak_on_a_new_gradient_level():
    """Opt-in overrule. The gradients move to a new level for good (x30, which Adam's
    normalised step absorbs): GradientSpike skips 3 steps, then the probe decides the 4th,
    accepts it, and the signal learns the new level: no further skip (20 by default)."""
    from guarded_optim import GradientSpike
    from guarded_optim.faults import FaultSchedule, ScaleGradients
    m = tiny.model(0)
    probe_set, batches = tiny.data(0, steps=50)
    opt = GuardedOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-2),
                           tiny.probe_for(m, probe_set), module=m,
                           signals=[NonFinite(), GradientSpike()], ladder=Ladder(overrule=3))
    faults = FaultSchedule([ScaleGradients(20, 30, factor=30.0)])
    decisions = []
    for t, (x, y) in enumerate(batches):
        opt.zero_grad()
        F.mse_loss(m(x), y).backward()
        faults.before_step(t, opt)
        opt.step()
        decisions.append((opt.last_decision, opt.last_event.action))
    assert decisions[:20] == [("accept", None)] * 20
    assert decisions[20:23] == [("skip", None)] * 3
    assert decisions[23] == ("accept", "overrule")
    assert decisions[24:] == [("accept", None)] * 26
    assert opt.stats["overruled"] == 1 and opt.stats["skipped_grad_spike"] == 3
    # by default (Ladder(overrule=None)) the signal's own patience re-bases after 20 skips
    m2 = tiny.model(0)
    bare_ladder = GuardedOptimizer(torch.optim.AdamW(m2.parameters(), lr=1e-2),
                                   tiny.probe_for(m2, probe_set), module=m2,
                                   signals=[NonFinite(), GradientSpike()],
                                   ladder=Ladder(overrule=None))
    skips = 0
    for t, (x, y) in enumerate(batches):
        bare_ladder.zero_grad()
        F.mse_loss(m2(x), y).backward()
        faults.before_step(t, bare_ladder)
        bare_ladder.step()
        skips += bare_ladder.last_decision == "skip"
    assert skips == 20 and bare_ladder.stats["overruled"] == 0


def test_ladder_arguments_are_checked():
    with pytest.raises(ValueError, match="overrule"):
        Ladder(overrule=0)
    with pytest.raises(ValueError, match="overrule"):
        Ladder(overrule=True)
    with pytest.raises(ValueError, match="on_exhausted"):
        Ladder(on_exhausted="ignore")
    with pytest.raises(TypeError, match="rerun"):
        Ladder(rerun=True)
    m = tiny.model(0)
    with pytest.raises(TypeError, match="Ladder"):
        GuardedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), ladder=Ladder)


def test_a_caught_guard_stopped_does_not_hold_the_guard():
    """``on_exhausted="raise"``: the script caught the error and decides; the guard proposes
    again (only the default "hold" sets ``opt.stopped``)."""
    m, opt, batches = _guard(max_consecutive_rejections=3, ladder=Ladder(on_exhausted="raise"))
    for x, y in batches[:4]:
        opt.step(_closure(opt, m, x, y)[0])
    with pytest.raises(GuardStopped):
        for x, y in batches[4:10]:
            opt.step(_closure(opt, m, x, y * 1e3)[0])
    assert not opt.stopped
    opt.step(_closure(opt, m, *batches[10])[0])
    assert opt.last_decision == "accept"


def test_a_held_guard_stays_held_across_a_checkpoint():
    m, opt, batches = _guard(max_consecutive_rejections=3)
    for x, y in batches[:4]:
        opt.step(_closure(opt, m, x, y)[0])
    for x, y in batches[4:7]:
        opt.step(_closure(opt, m, x, y * 1e3)[0])
    assert opt.stopped
    m2, opt2, _ = _guard(max_consecutive_rejections=3)
    m2.load_state_dict(m.state_dict())
    opt2.load_state_dict(opt.state_dict())
    assert opt2.stopped
    opt2.step(_closure(opt2, m2, *batches[8])[0])
    assert opt2.last_decision == "skip" and opt2.last_event.reason == "stopped"


def _backed_off(yhat: float = 1.0) -> BackOff:
    b = BackOff(growth_interval=3)
    assert not b.on_rejection(1, yhat) and b.on_rejection(2, yhat) and b.scale == 0.5
    return b


def test_backoff_a_growth_that_makes_yhat_worse_is_undone_at_once():
    b = _backed_off(1.0)
    for yhat in (0.9, 0.8, 0.7):            # progress at 0.5: grows back at the interval's end
        assert not b.on_healthy(yhat)
    assert b.scale == 1.0 and b.reference == 0.7
    b = _backed_off(1.0)
    b.scale = 0.25                          # (a deeper back-off, so that the growth is below 1)
    for yhat in (0.9, 0.8, 0.7):
        b.on_healthy(yhat)
    assert b.scale == 0.5 and b.grown
    assert not b.on_healthy(0.69)           # still better than at the growth: kept
    assert b.on_healthy(0.75)               # worse: undone at the next step, not 3 later
    assert b.scale == 0.25 and b.reference == 1.0 and not b.grown
    assert b.interval == 3                  # a cheap try: the interval does not double


def test_backoff_a_grown_scale_the_probe_rejects_doubles_the_interval_and_state_round_trips():
    b = _backed_off(1.0)
    b.scale = 0.25
    for yhat in (0.9, 0.8, 0.7):
        b.on_healthy(yhat)
    assert b.on_rejection(2, 0.7) and b.scale == 0.25 and b.interval == 6
    c = BackOff(growth_interval=3)
    c.load_state_dict(b.state_dict())
    assert c.state_dict() == b.state_dict()
    old = {k: v for k, v in b.state_dict().items() if k != "previous"}   # before the trial
    c.load_state_dict(old)
    assert c.previous == c.reference == 0.7
    for bad in ({**old, "previous": float("nan")}, {**old, "scale": 2.0}):
        with pytest.raises(ValueError):
            c.load_state_dict(bad)


def test_backoff_the_growth_back_to_1_is_on_trial_for_one_interval_then_healed():
    b = _backed_off(1.0)
    for yhat in (0.9, 0.8, 0.7):
        b.on_healthy(yhat)
    assert b.scale == 1.0 and b.grown          # grown back to 1: on trial
    assert b.on_healthy(0.75) and b.scale == 0.5 and b.reference == 1.0   # worse: undone
    for yhat in (0.9, 0.8, 0.7):
        b.on_healthy(yhat)
    for yhat in (0.69, 0.68, 0.67):             # a whole interval at 1 without getting worse
        assert not b.on_healthy(yhat)
    assert b.scale == 1.0 and not b.grown       # healed: later steps touch nothing
    state = b.state_dict()
    assert not b.on_healthy(5.0) and b.state_dict() == state
