"""Bad arguments and bad probes: a clear error naming the culprit, and no training state harmed."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import tiny
from guarded_optim import FixedThreshold, GuardedOptimizer, ProbeError

PROBE_SET, BATCHES = tiny.data(seed=0, steps=12)


pytestmark = pytest.mark.usefixtures("one_thread")


# -- helpers -------------------------------------------------------------------------------
def setup(steps=2):
    """A model and an AdamW that already has state (so 'unchanged' is a real check)."""
    m = tiny.model(seed=0)
    inner = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.01)
    for x, y in BATCHES[:steps]:
        inner.step(tiny.closure_for(inner, m, x, y))
    return m, inner


def inner_snapshot(m, inner):
    return {
        "state": tiny.full_state(m, inner),
        "groups": [{k: (tuple(id(p) for p in v) if k == "params" else v) for k, v in g.items()}
                   for g in inner.param_groups],
        "modes": [mod.training for mod in m.modules()],
    }


def assert_unchanged(before, after):
    tiny.assert_same(before["state"], after["state"])
    assert before["groups"] == after["groups"]
    assert before["modes"] == after["modes"]


def good_probe(m):
    return tiny.probe_for(m, PROBE_SET)


def step_without_closure(m, opt, x, y):
    """The usual loop: forward/backward outside, then ``opt.step()``."""
    opt.zero_grad()
    F.mse_loss(m(x), y).backward()
    opt.step()


# -- constructor validation -----------------------------------------------------------------
@pytest.mark.parametrize("make_bad", [
    lambda m, inner: list(m.parameters()),
    lambda m, inner: m,
    lambda m, inner: inner.param_groups,
    lambda m, inner: None,
], ids=["param-list", "module", "param-groups", "none"])
def test_inner_that_is_not_an_optimizer_is_a_type_error(make_bad):
    m, inner = setup()
    before = inner_snapshot(m, inner)
    with pytest.raises(TypeError, match="optimizer"):
        GuardedOptimizer(make_bad(m, inner), good_probe(m), module=m)
    assert_unchanged(before, inner_snapshot(m, inner))


def test_wrapping_a_guarded_optimizer_twice_is_a_type_error():
    m, inner = setup()
    guard = GuardedOptimizer(inner, good_probe(m), module=m)
    before = inner_snapshot(m, inner)
    with pytest.raises(TypeError, match="GuardedOptimizer"):
        GuardedOptimizer(guard, good_probe(m), module=m)
    assert_unchanged(before, inner_snapshot(m, inner))
    assert guard.inner is inner


@pytest.mark.parametrize("kwargs,exc,word", [
    ({"epsilon": 0.0}, ValueError, "epsilon"),
    ({"epsilon": -1.0}, ValueError, "epsilon"),
    ({"epsilon": -0.0}, ValueError, "epsilon"),
    ({"epsilon": float("nan")}, ValueError, "epsilon"),
    ({"epsilon": float("inf")}, ValueError, "epsilon"),
    ({"epsilon": float("-inf")}, ValueError, "epsilon"),
    ({"epsilon": "0.1"}, ValueError, "epsilon"),
    ({"alpha": 0}, ValueError, "alpha"),
    ({"alpha": 0.0}, ValueError, "alpha"),
    ({"alpha": 1}, ValueError, "alpha"),
    ({"alpha": 1.0}, ValueError, "alpha"),
    ({"alpha": -0.1}, ValueError, "alpha"),
    ({"alpha": 1.5}, ValueError, "alpha"),
    ({"alpha": float("nan")}, ValueError, "alpha"),
    ({"probe_every": 0}, ValueError, "probe_every"),
    ({"probe_every": -1}, ValueError, "probe_every"),
    ({"probe_every": 1.5}, ValueError, "probe_every"),
    ({"probe_every": True}, ValueError, "probe_every"),
    ({"epsilon": 0.1, "threshold": FixedThreshold(0.2)}, ValueError, "threshold"),
    ({"probe": 3.0}, TypeError, "probe"),
    ({"probe": "loss"}, TypeError, "probe"),
    ({"module": [nn.Linear(2, 2)]}, TypeError, "module"),
    ({"module": "model"}, TypeError, "module"),
], ids=lambda v: (",".join(f"{k}={v[k]!r}" for k in v) if isinstance(v, dict)
                 else v.__name__ if isinstance(v, type) else str(v)))
def test_invalid_argument_is_a_clear_error_and_touches_nothing(kwargs, exc, word):
    m, inner = setup()
    before = inner_snapshot(m, inner)
    kwargs = {"probe": good_probe(m), "module": m, **kwargs}
    probe = kwargs.pop("probe")
    with pytest.raises(exc) as info:
        GuardedOptimizer(inner, probe, **kwargs)
    assert word in str(info.value), str(info.value)
    if "epsilon" in kwargs and "threshold" in kwargs:
        assert "epsilon" in str(info.value)
    assert_unchanged(before, inner_snapshot(m, inner))
    # the same inner optimizer is still usable afterwards
    guard = GuardedOptimizer(inner, good_probe(m), module=m)
    step_without_closure(m, guard, *BATCHES[2])
    assert guard.last_decision == "accept"


# -- hypothesis: numeric validation -----------------------------------------------------------
_M = tiny.model(seed=0)
_INNER = torch.optim.AdamW(_M.parameters(), lr=1e-2)
_PROBE = tiny.probe_for(_M, PROBE_SET)

_invalid_epsilon = st.one_of(st.floats(max_value=0.0), st.just(math.nan), st.just(math.inf),
                             st.integers(max_value=0))
_valid_epsilon = st.one_of(st.floats(min_value=0.0, exclude_min=True, allow_infinity=False),
                           st.integers(min_value=1, max_value=10**9))
_invalid_alpha = st.one_of(st.floats(max_value=0.0), st.floats(min_value=1.0), st.just(math.nan),
                           st.integers())
_valid_alpha = st.floats(min_value=0.0, max_value=1.0, exclude_min=True, exclude_max=True)
_invalid_probe_every = st.one_of(st.integers(max_value=0), st.floats(allow_nan=True))
_valid_probe_every = st.integers(min_value=1, max_value=10**9)


@settings(max_examples=30, deadline=None)
@given(eps=_invalid_epsilon)
def test_any_invalid_epsilon_raises(eps):
    with pytest.raises(ValueError, match="epsilon"):
        GuardedOptimizer(_INNER, _PROBE, module=_M, epsilon=eps)


@settings(max_examples=30, deadline=None)
@given(eps=_valid_epsilon)
def test_any_valid_epsilon_constructs(eps):
    opt = GuardedOptimizer(_INNER, _PROBE, module=_M, epsilon=eps)
    assert opt.threshold(1.0) == float(eps)


@settings(max_examples=30, deadline=None)
@given(alpha=_invalid_alpha)
def test_any_invalid_alpha_raises(alpha):
    with pytest.raises(ValueError, match="alpha"):
        GuardedOptimizer(_INNER, _PROBE, module=_M, alpha=alpha)


@settings(max_examples=30, deadline=None)
@given(alpha=_valid_alpha)
def test_any_valid_alpha_constructs(alpha):
    assert GuardedOptimizer(_INNER, _PROBE, module=_M, alpha=alpha).alpha == alpha


@settings(max_examples=30, deadline=None)
@given(k=_invalid_probe_every)
def test_any_invalid_probe_every_raises(k):
    with pytest.raises(ValueError, match="probe_every"):
        GuardedOptimizer(_INNER, _PROBE, module=_M, probe_every=k)


@settings(max_examples=30, deadline=None)
@given(k=_valid_probe_every)
def test_any_valid_probe_every_constructs(k):
    assert GuardedOptimizer(_INNER, _PROBE, module=_M, probe_every=k).probe_every == k


# -- a bad probe on the first step ------------------------------------------------------------
class Boom(RuntimeError):
    pass


def _raising_probe(m):
    def probe():
        m(PROBE_SET[0])  # the model really runs (in eval mode) before the failure
        raise Boom("disk on fire")
    return probe


BAD_PROBES = {
    "raises": (_raising_probe, ["probe", "Boom", "disk on fire"]),
    "non-scalar": (lambda m: (lambda: F.mse_loss(m(PROBE_SET[0]), PROBE_SET[1],
                                                 reduction="none").view(-1)), ["probe", "(16,)"]),
    "string": (lambda m: (lambda: "0.5"), ["probe", "str"]),
    "none": (lambda m: (lambda: None), ["probe", "None"]),
    "nan": (lambda m: (lambda: torch.tensor(float("nan"))), ["probe", "nan"]),
    "inf": (lambda m: (lambda: float("inf")), ["probe", "inf"]),
    "bool-tensor": (lambda m: (lambda: torch.tensor(True)), ["probe", "bool"]),
}


@pytest.mark.parametrize("kind", list(BAD_PROBES))
@pytest.mark.parametrize("mixed_modes", [False, True], ids=["train", "mixed-modes"])
def test_bad_probe_raises_probe_error_at_construction_and_changes_nothing(kind, mixed_modes):
    """y(theta_0) is measured when the guard is built, so a broken probe fails there."""
    make_probe, words = BAD_PROBES[kind]
    m, inner = setup()
    if mixed_modes:
        m[1].eval()  # a frozen BatchNorm inside a training model: modes must come back per module
    x, y = BATCHES[2]
    inner.zero_grad()
    F.mse_loss(m(x), y).backward()
    before = inner_snapshot(m, inner)
    with pytest.raises(ProbeError) as info:
        GuardedOptimizer(inner, make_probe(m), module=m)
    msg = str(info.value)
    for w in words:
        assert w in msg, (w, msg)
    assert isinstance(info.value, ValueError)  # ProbeError is a ValueError
    if kind == "raises":
        assert isinstance(info.value.__cause__, Boom)
        assert str(info.value.__cause__) == "disk on fire"
    assert_unchanged(before, inner_snapshot(m, inner))


def test_probe_that_breaks_between_construction_and_first_step_changes_nothing():
    """Weights loaded after construction make the first step measure again; if that fails,
    it fails before the closure runs, so params, buffers and state are as before."""
    m, inner = setup()
    probe = SwitchableProbe(m)
    opt = GuardedOptimizer(inner, probe, module=m)
    with torch.no_grad():
        m[0].weight.add_(0.5)            # "a checkpoint loaded after the optimizer was built"
    probe.mode = "raise"
    before = inner_snapshot(m, inner)
    with pytest.raises(ProbeError):
        opt.step(tiny.closure_for(opt, m, *BATCHES[2]))
    assert_unchanged(before, inner_snapshot(m, inner))
    probe.mode = "ok"
    assert _step(m, opt, 2) == "accept"
    # the failed call is not a step (the guard numbers its steps from the inner optimizer's 2)
    assert opt.safe_snapshot.step == 2 + 1 and opt.stats["steps"] == 1


# -- a probe that breaks later -----------------------------------------------------------------
class SwitchableProbe:
    """A good probe that can be told to raise or to return NaN."""

    def __init__(self, m):
        self.good = good_probe(m)
        self.mode = "ok"
        self.calls = 0

    def __call__(self):
        self.calls += 1
        if self.mode == "raise":
            raise Boom("probe data vanished")
        if self.mode == "nan":
            return float("nan")
        return self.good()


def _guarded(probe_every=1, dropout=0.0, **kw):
    m = tiny.model(seed=0, dropout=dropout)
    inner = torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.01)
    probe = SwitchableProbe(m)
    return m, GuardedOptimizer(inner, probe, module=m, probe_every=probe_every, **kw), probe


def _step(m, opt, i):
    opt.step(tiny.closure_for(opt, m, *BATCHES[i]))
    return opt.last_decision


@pytest.mark.parametrize("probe_every,dropout", [(1, 0.0), (1, 0.3), (3, 0.0)],
                         ids=["k1", "k1-dropout", "k3"])
def test_probe_error_later_restores_last_verified_state_and_guard_recovers(probe_every, dropout):
    """Probe raises on step 5 (k=1) / on the measurement of step 6 (k=3, verified at step 3).

    The step raises ProbeError, the training state is the last verified one bit for bit,
    and once the probe works again the run is exactly the clean run (with dropout, the
    failed call's forward pass drew its masks, as it would unguarded: the RNG moves on, so
    the redone steps draw new masks and are only checked to be accepted).
    """
    fail_at = 4 if probe_every == 1 else 5   # 0-based index of the failing step
    verified = 4 if probe_every == 1 else 3  # steps in the last verified state

    clean_m, clean_opt, _ = _guarded(probe_every, dropout)
    clean_states = {}
    for i in range(8):
        _step(clean_m, clean_opt, i)
        clean_states[i + 1] = tiny.full_state(clean_m, clean_opt)

    m, opt, probe = _guarded(probe_every, dropout)
    for i in range(fail_at):
        assert _step(m, opt, i) == "accept"
    yhat, accepted, last = opt.yhat, opt.stats["accepted"], opt.last_decision
    modes = [mod.training for mod in m.modules()]
    probe.mode = "raise"
    with pytest.raises(ProbeError, match="probe") as info:
        _step(m, opt, fail_at)
    assert isinstance(info.value.__cause__, Boom)
    tiny.assert_same(tiny.full_state(m, opt), clean_states[verified])
    assert [mod.training for mod in m.modules()] == modes
    assert opt.yhat == yhat and opt.stats["accepted"] == accepted and opt.last_decision == last
    assert opt.stats["rollbacks"] == 0 and opt.step_state.unverified == 0

    # the probe recovers: redo the lost steps with the same batches -> the clean run, exactly
    probe.mode = "ok"
    for i in range(verified, 8):
        assert _step(m, opt, i) == "accept"
        if not dropout:
            tiny.assert_same(tiny.full_state(m, opt), clean_states[i + 1])
    assert dropout or opt.yhat == clean_opt.yhat


def test_probe_error_later_leaves_signal_state_as_before():
    m, opt, probe = _guarded()
    for i in range(4):
        _step(m, opt, i)
    before = {s.name: {k: (v.clone() if isinstance(v, torch.Tensor) else v)
                       for k, v in s.state_dict().items()} for s in opt.signals}
    probe.mode = "raise"
    with pytest.raises(ProbeError):
        _step(m, opt, 4)
    after = {s.name: s.state_dict() for s in opt.signals}
    assert before.keys() == after.keys()
    for name in before:
        for k, v in before[name].items():
            w = after[name][k]
            assert (torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w), (name, k)


def test_probe_nan_later_is_a_rollback_not_an_exception():
    """NaN at step 6 only: that step is rolled back to the state after step 5, bit for bit."""
    m, opt, probe = _guarded(dropout=0.3)
    for i in range(5):
        assert _step(m, opt, i) == "accept"
    after5 = tiny.full_state(m, opt)
    yhat, spread = opt.yhat, opt.threshold.state_dict()
    probe.mode = "nan"
    assert _step(m, opt, 5) == "rollback"  # no exception
    tiny.assert_same(tiny.full_state(m, opt), after5)
    assert opt.yhat == yhat and opt.threshold.state_dict() == spread
    assert opt.stats["rollbacks"] == 1 and opt.last_event.reason == "probe"
    assert opt.last_event.innovation == math.inf
    probe.mode = "ok"
    assert _step(m, opt, 5) == "accept"
    assert all(torch.isfinite(p).all() for p in m.parameters())


def test_probe_returning_a_one_element_tensor_or_python_number_is_fine():
    """The contract's positive side: 0-d tensor, shape-(1,) tensor, float and int all work."""
    for out in (lambda l: l, lambda l: l.reshape(1), lambda l: float(l), lambda l: int(l * 100) + 1):
        m = tiny.model(seed=0)
        inner = torch.optim.AdamW(m.parameters(), lr=1e-2)
        probe = good_probe(m)
        opt = GuardedOptimizer(inner, lambda: out(probe()), module=m)
        step_without_closure(m, opt, *BATCHES[0])
        assert opt.last_decision == "accept" and isinstance(opt.yhat, float)
        assert math.isfinite(opt.yhat)
