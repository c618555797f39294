"""GuardedOptimizer behaviours beyond Algorithm 1: skips, escalation, deadlock escape."""

import math

import pytest
import torch
import torch.nn.functional as F

import tiny
from guarded_optim.ladder import Ladder
from guarded_optim import Decision, GradientSpike, GuardedOptimizer, NonFinite
from guarded_optim.faults import FaultSchedule, NonFiniteGradients, ScaleGradients


def make(steps=40, seed=0, **kwargs):
    m = tiny.model(seed)
    probe_set, batches = tiny.data(seed, steps)
    opt = GuardedOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-2),
                           kwargs.pop("probe", tiny.probe_for(m, probe_set)), module=m, **kwargs)
    return m, opt, batches


def run(m, opt, batches, faults=None, start=0):
    decisions = []
    for t, (x, y) in enumerate(batches, start):
        opt.zero_grad()
        F.mse_loss(m(x), y).backward()
        if faults:
            faults.before_step(t, opt)
        opt.step()
        if faults:
            faults.after_step(t, opt)
        decisions.append(opt.last_decision)
    return decisions


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_gradient_is_skipped_without_touching_state(value):
    m, opt, batches = make()
    run(m, opt, batches[:12])
    before = tiny.full_state(m, opt)
    d = run(m, opt, batches[12:13], FaultSchedule([NonFiniteGradients(12, 1, value=value)]), start=12)
    assert d == ["skip"] and opt.last_event.reason == "nonfinite"
    after = tiny.full_state(m, opt)
    # params and optimizer state (Adam's step counter too) are untouched; buffers are the
    # forward pass's business, as with GradScaler
    tiny.assert_same(*({k: v for k, v in s.items() if not k.startswith("buffer.")}
                       for s in (before, after)))
    assert opt.stats["rollbacks"] == 0 and opt.stats["skipped_nonfinite"] == 1


def test_nan_batch_poisoning_batchnorm_is_undone_by_the_next_measurement():
    m, opt, batches = make()
    run(m, opt, batches[:10])
    safe = tiny.full_state(m, opt)
    x, y = batches[10]
    opt.step(tiny.closure_for(opt, m, torch.full_like(x, float("nan")), y))
    assert opt.last_decision == "skip" and torch.isnan(m[1].running_mean).all()
    x, y = batches[11]
    opt.step(tiny.closure_for(opt, m, x, y))
    # the poisoned statistics make the probe infinite: the proposal is rejected, and the
    # re-run of the same clean batch from the verified state (clean statistics) passes
    assert opt.last_decision == "accept" and opt.last_event.action == "rerun:transient"
    assert opt.stats["transient"] == 1 and opt.stats["rollbacks"] == 0
    assert torch.isfinite(m[1].running_mean).all()


def test_nan_batch_poisoning_batchnorm_is_rolled_back_without_a_rerun():
    m, opt, batches = make(ladder=Ladder(rerun=None))
    run(m, opt, batches[:10])
    safe = tiny.full_state(m, opt)
    x, y = batches[10]
    opt.step(tiny.closure_for(opt, m, torch.full_like(x, float("nan")), y))
    x, y = batches[11]
    opt.step(tiny.closure_for(opt, m, x, y))
    assert opt.last_decision == "rollback" and math.isinf(opt.last_event.innovation)
    tiny.assert_same(safe, tiny.full_state(m, opt))


def test_nonfinite_loss_from_closure_is_skipped():
    m, opt, batches = make()
    x, y = batches[0]

    def closure():
        opt.zero_grad()
        loss = F.mse_loss(m(x), y)
        loss.backward()
        return loss * float("nan")
    before = tiny.full_state(m, opt)
    loss = opt.step(closure)
    assert math.isnan(loss.item()) and opt.last_decision == "skip"
    params = lambda s: {k: v for k, v in s.items() if k.startswith(("param.", "state."))}  # noqa: E731
    tiny.assert_same(params(before), params(tiny.full_state(m, opt)))


def test_gradient_spike_skipped_before_it_reaches_adam_state():
    m, opt, batches = make()
    run(m, opt, batches[:20])
    d = run(m, opt, batches[20:30], FaultSchedule([ScaleGradients(20, 10, factor=300.0)]), start=20)
    assert d == ["skip"] * 10
    assert opt.stats["skipped_grad_spike"] == 10 and opt.stats["rollbacks"] == 0
    assert run(m, opt, batches[30:], start=30) == ["accept"] * 10


def test_overruled_x300_steps_are_rolled_back_here():
    """Opt-in overrule: every 4th flagged step is proposed; on this model the probe and
    OptimizerStateHealth find it damaging and roll it back, so no x300 step is kept."""
    from guarded_optim import Ladder
    m, opt, batches = make(ladder=Ladder(overrule=3))
    run(m, opt, batches[:20])
    before = tiny.full_state(m, opt)
    d = run(m, opt, batches[20:30], FaultSchedule([ScaleGradients(20, 10, factor=300.0)]), start=20)
    assert d == (["skip"] * 3 + ["rollback"]) * 2 + ["skip"] * 2
    assert opt.stats["skipped_grad_spike"] == 8 and opt.stats["overruled"] == 2
    params = lambda s: {k: v for k, v in s.items() if k.startswith(("param.", "state."))}  # noqa: E731
    tiny.assert_same(params(before), params(tiny.full_state(m, opt)))


def test_gradient_spike_rebaselines_after_patience():
    m, opt, batches = make(steps=60, signals=[NonFinite(), GradientSpike(patience=5)])
    run(m, opt, batches[:15])
    d = run(m, opt, batches[15:], FaultSchedule([ScaleGradients(15, 45, factor=300.0)]), start=15)
    assert d[:5] == ["skip"] * 5 and "skip" not in d[5:]
    spike = opt.signals[1]
    assert spike.rebaselines == 1 and opt.stats["skipped_grad_spike"] == 5


def test_skip_only_guard_never_snapshots():
    """With only SKIP signals and no probe nothing can be rolled back, so nothing is copied."""
    m = tiny.model()
    _, batches = tiny.data(steps=15)
    opt = GuardedOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-2),
                           signals=[NonFinite(), GradientSpike()])
    d = run(m, opt, batches, FaultSchedule([NonFiniteGradients(12, 1)]))
    assert d.count("skip") == 1 and opt.stats["rollbacks"] == 0
    assert not opt.safe_snapshot.captured
    default = GuardedOptimizer(torch.optim.AdamW(tiny.model().parameters(), lr=1e-2))
    assert default.safe_snapshot.captured        # the default FAILURE signals need a verified state


def test_lr_spike_is_rolled_back_with_default_threshold():
    m, opt, batches = make()
    run(m, opt, batches[:15])
    before = tiny.full_state(m, opt)
    for g in opt.param_groups:
        g["lr"] = 1e3
    assert run(m, opt, batches[15:16]) == ["rollback"]
    tiny.assert_same(before, tiny.full_state(m, opt))
    e = opt.last_event
    assert e.innovation > e.threshold and "probe" in e.reason.split(",")


def test_benign_upward_drift_does_not_stall_forever():
    """A probe whose level shifts up for good (distribution shift) must not reject forever."""
    m = tiny.model()
    probe_set, batches = tiny.data(steps=60)
    shift = {"on": False}
    base = tiny.probe_for(m, probe_set)
    probe = lambda: base() + (100.0 if shift["on"] else 0.0)  # noqa: E731
    stalled = GuardedOptimizer(torch.optim.SGD(m.parameters(), lr=1e-3), probe, module=m,
                               epsilon=0.05, max_consecutive_rejections=None)
    run(m, stalled, batches[:10])
    shift["on"] = True
    assert set(run(m, stalled, batches[10:30])) == {"rollback"}   # Algorithm 1 as published

    m = tiny.model()
    base = tiny.probe_for(m, probe_set)
    shift["on"] = False
    opt = GuardedOptimizer(torch.optim.SGD(m.parameters(), lr=1e-3), probe, module=m,
                           epsilon=0.05, max_consecutive_rejections=5, history=0,
                           ladder=Ladder(on_exhausted="rebaseline"))   # opted in
    run(m, opt, batches[:10])
    shift["on"] = True
    d = run(m, opt, batches[10:])
    assert d[:5] == ["rollback"] * 5 and d[5:] == ["accept"] * 45
    assert opt.stats["rebaselines"] == 1 and opt.last_event.yhat > 100


def test_repeated_rejections_escalate_to_older_verified_snapshot():
    m, opt, batches = make(steps=40, max_consecutive_rejections=3, history=2, checkpoint_every=4,
                           ladder=Ladder(rerun=None))
    states = {}
    for t, (x, y) in enumerate(batches[:13]):
        opt.step(tiny.closure_for(opt, m, x, y))
        states[t + 1] = tiny.full_state(m, opt)
    assert [s.step for s in opt.snapshot_history] == [8, 12]
    for g in opt.param_groups:
        g["lr"] = 1e4                      # every proposal from here is catastrophic
    decisions, actions = [], []
    for x, y in batches[13:19]:
        opt.step(tiny.closure_for(opt, m, x, y))
        decisions.append(opt.last_decision)
        actions.append(opt.last_event.action)
    assert decisions == ["rollback"] * 6
    # (the healing rung backs the LR off from the second rejection in a row on)
    assert actions == [None, "backoff", "escalate,backoff", "backoff", "backoff", "escalate,backoff"]
    assert opt.stats["escalations"] == 2
    # after two escalations the state is the oldest verified snapshot (step 8), bit for bit
    assert opt.safe_snapshot.step == 8
    tiny.assert_same(states[8], tiny.full_state(m, opt))


def test_probe_raising_mid_run_leaves_last_accepted_state():
    m = tiny.model()
    probe_set, batches = tiny.data(steps=10)
    base, calls = tiny.probe_for(m, probe_set), {"n": 0}

    def probe():
        calls["n"] += 1
        if calls["n"] == 6:
            raise RuntimeError("probe data loader died")
        return base()
    opt = GuardedOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-2), probe, module=m)
    run(m, opt, batches[:4])               # 1 initial + 4 measurements
    before = tiny.full_state(m, opt)
    with pytest.raises(Exception, match="probe raised RuntimeError") as info:
        run(m, opt, batches[4:5])
    assert isinstance(info.value.__cause__, RuntimeError)
    tiny.assert_same(before, tiny.full_state(m, opt))
    assert m.training


def test_stats_are_plain_ints_and_decisions_are_strings():
    m, opt, batches = make(steps=5)
    run(m, opt, batches)
    assert all(type(v) is int for v in opt.stats.values())
    assert opt.last_decision == "accept" == Decision.ACCEPT


def test_eval_mode_during_probe_and_modes_restored():
    m = tiny.model()
    probe_set, batches = tiny.data(steps=3)
    m[1].eval()                            # a frozen BatchNorm stays frozen
    seen = []

    def probe():
        seen.append([mod.training for mod in m.modules()])
        return tiny.probe_for(m, probe_set)()
    opt = GuardedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), probe, module=m)
    run(m, opt, batches)
    assert all(not any(modes) for modes in seen)
    assert m.training and not m[1].training


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-sync counting needs CUDA")
def test_cuda_unmeasured_step_syncs_once():
    m = tiny.model().cuda()
    opt = GuardedOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True))
    x, y = torch.randn(32, 4, device="cuda"), torch.randn(32, 1, device="cuda")
    for _ in range(12):
        opt.step(tiny.closure_for(opt, m, x, y))
    torch.cuda.synchronize()
    import warnings
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            opt.step(tiny.closure_for(opt, m, x, y))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
