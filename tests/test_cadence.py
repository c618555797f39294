"""The verification cadence of a guard without a probe (``probe_every``, default
``VERIFY_EVERY``): what is checked and captured when, and what a rollback returns to."""

from __future__ import annotations

import pytest
import torch

import tiny
from guarded_optim import GuardedOptimizer
from guarded_optim.guard import VERIFY_EVERY


def _guard(m, **kw):
    return GuardedOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-2), module=m, **kw)


def _run(opt, m, batches, start=0, between=None):
    out = []
    for t, (x, y) in enumerate(batches, start):
        if between is not None:
            between(t)
        opt.step(tiny.closure_for(opt, m, x, y))
        out.append((opt.last_decision, opt.last_event.reason))
    return out


def _weights_and_state(m, opt) -> dict:
    """Parameters and optimizer state (buffers are captured after the step's forward pass)."""
    return {k: v for k, v in tiny.full_state(m, opt).items() if k.startswith(("param.", "state."))}


def _captures(opt) -> list[int]:
    """Record the step of every capture of the safe snapshot."""
    seen, capture = [], opt.safe_snapshot.capture

    def spy(step, **meta):
        seen.append(step)
        return capture(step, **meta)
    opt.safe_snapshot.capture = spy
    return seen


def test_defaults_resolve_the_cadence_from_the_probe():
    m = tiny.model(0)
    assert _guard(m).probe_every == VERIFY_EVERY == 10
    probe_set, _ = tiny.data(0)
    assert _guard(m, probe=tiny.probe_for(m, probe_set)).probe_every == 1
    assert _guard(m, probe_every=3).probe_every == 3
    with pytest.raises(ValueError, match="probe_every"):
        _guard(m, probe_every=0)


def test_probe_less_guard_checks_and_captures_every_k_steps():
    m = tiny.model(0)
    opt = _guard(m)
    seen = _captures(opt)
    _, batches = tiny.data(0, steps=35)
    assert _run(opt, m, batches) == [("accept", None)] * 35
    # the k-th applied step (steps 9, 19, 29) is checked right after its proposal and its
    # result captured as the state step 10 (20, 30) starts from
    assert seen == [10, 20, 30]
    assert opt.step_state.unverified == 5


def test_state_damage_is_rolled_back_at_the_next_verification():
    """Damage no pre-step signal sees (Adam's second moment x1e6 before step 24: tiny
    updates) is found by the check right after step 29's proposal; steps 24-29 are applied
    meanwhile (then undone). (OptimizerStateHealth's warm-up, 10 steps, ends at the check of
    step 19.)"""
    m = tiny.model(0)
    opt = _guard(m)
    _, batches = tiny.data(0, steps=35)

    def between(t):
        if t == 24:
            with torch.no_grad():
                for st in opt.state.values():
                    st["exp_avg_sq"].mul_(1e6)
    d = _run(opt, m, batches[:30], between=between)
    assert d[:29] == [("accept", None)] * 29          # steps 24-28: not yet checked
    assert d[29][0] == "rollback" and "optimizer_state" in d[29][1]   # step 29's check
    assert opt.stats["failures_optimizer_state"] == 1


def test_rollback_returns_exactly_to_the_state_the_last_verification_captured():
    m = tiny.model(0)
    opt = _guard(m)
    _, batches = tiny.data(0, steps=35)
    states = {}

    def between(t):
        states[t] = _weights_and_state(m, opt)   # the live state when step t starts
        if t == 25:
            with torch.no_grad():
                for st in opt.state.values():
                    st["exp_avg_sq"].mul_(1e6)
    d = _run(opt, m, batches[:30], between=between)
    assert d[29][0] == "rollback"
    tiny.assert_same(_weights_and_state(m, opt), states[20])   # verified after step 19


def test_a_pre_step_alarm_checks_the_unverified_state_at_once():
    """NaN written into the weights after step 12: step 13's gradients are NaN (a skip by
    NonFinite), and that alarm has the post-step signals check the live state in the same
    step: the rollback comes at once, not at step 20."""
    m = tiny.model(0)
    opt = _guard(m)
    _, batches = tiny.data(0, steps=20)
    states = {}

    def between(t):
        states[t] = _weights_and_state(m, opt)
        if t == 13:
            with torch.no_grad():
                m[0].weight[0, 0] = float("nan")
    d = _run(opt, m, batches[:14], between=between)
    assert d[:13] == [("accept", None)] * 13
    assert d[13][0] == "rollback" and "nonfinite_weights" in d[13][1]
    tiny.assert_same(_weights_and_state(m, opt), states[10])
    assert all(bool(torch.isfinite(p).all()) for p in m.parameters())


def test_state_dict_verifies_every_unverified_step():
    """A checkpoint never carries a second copy: saving checks and captures the live state."""
    m = tiny.model(0)
    opt = _guard(m)
    _, batches = tiny.data(0, steps=13)
    _run(opt, m, batches)
    assert opt.step_state.unverified == 3
    sd = opt.state_dict()
    assert opt.step_state.unverified == 0
    assert sd["guard"]["safe"] is None and sd["guard"]["safe_is_live"]


def test_cadence_run_is_bit_identical_to_bare():
    m, m_bare = tiny.model(0), tiny.model(0)
    opt = _guard(m)
    bare = torch.optim.AdamW(m_bare.parameters(), lr=1e-2)
    _, batches = tiny.data(0, steps=30)
    _run(opt, m, batches)
    for x, y in batches:
        bare.step(tiny.closure_for(bare, m_bare, x, y))
    for p, q in zip(m.parameters(), m_bare.parameters()):
        assert torch.equal(p, q)
