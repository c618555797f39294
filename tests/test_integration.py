"""Paper 001's catastrophic protocol on real models and bundled data (sec. 3.3).

250 AdamW steps; gradients x300 for 10 steps from step 120; identical init and batch order
across arms. The bare optimizer is damaged; the guarded one (defaults only) ends within 10%
of the clean run's probe loss, with no rollback outside the fault window and none at all on
the clean run.
"""

import statistics

import pytest
import torch

from guarded_optim import GuardedOptimizer
from guarded_optim.bench.tasks import make_task, train
from guarded_optim.faults import FaultSchedule, ScaleGradients

pytestmark = pytest.mark.slow
STEPS, START, LENGTH, ZETA = 250, 120, 10, 300.0


def arm(task_name, guarded, fault, seed=0):
    task = make_task(task_name, seed)
    opt = torch.optim.AdamW(task.model.parameters(), lr=task.lr)
    events = []
    if guarded:
        opt = GuardedOptimizer(opt, probe=task.probe, module=task.model, callbacks=[events.append])
    faults = FaultSchedule([ScaleGradients(START, LENGTH, factor=ZETA)]) if fault else None
    curve = train(task, opt, STEPS, faults)
    params = [p.detach().clone() for p in task.model.parameters()]
    return {"curve": curve, "events": events, "params": params,
            "stats": opt.stats if guarded else None}


@pytest.fixture(scope="module", params=["cnn", "transformer"])
def runs(request):
    name = request.param
    return name, {k: arm(name, *flags) for k, flags in {
        "clean": (False, False), "bare": (False, True),
        "guarded": (True, True), "guarded_clean": (True, False)}.items()}


def test_bare_adamw_is_damaged(runs):
    name, r = runs
    clean, bare = r["clean"]["curve"], r["bare"]["curve"]
    after = slice(START + LENGTH, STEPS)
    excess = statistics.mean(b / c for b, c in zip(bare[after], clean[after]))
    print(f"{name}: bare/clean final {bare[-1] / clean[-1]:.3f}, mean after window {excess:.3f}")
    assert bare[-1] > 1.02 * clean[-1] and excess > 1.02


def test_guarded_ends_within_ten_percent_of_clean(runs):
    name, r = runs
    final, clean = r["guarded"]["curve"][-1], r["clean"]["curve"][-1]
    print(f"{name}: guarded/clean final {final / clean:.3f}")
    assert final <= 1.10 * clean


def test_no_intervention_outside_the_fault_window(runs):
    _, r = runs
    outside = [e for e in r["guarded"]["events"]
               if e.decision != "accept" and not START <= e.step < START + LENGTH]
    assert outside == []
    inside = [e.decision for e in r["guarded"]["events"] if START <= e.step < START + LENGTH]
    assert inside == ["skip"] * LENGTH            # the amplified steps never reach Adam's state


def test_clean_guarded_run_equals_bare_run_bit_for_bit(runs):
    _, r = runs
    stats = r["guarded_clean"]["stats"]
    assert stats["rollbacks"] == stats["skipped"] == 0 and stats["accepted"] == STEPS
    assert all(torch.equal(a, b) for a, b in zip(r["clean"]["params"], r["guarded_clean"]["params"]))
    assert r["clean"]["curve"] == r["guarded_clean"]["curve"]
