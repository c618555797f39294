"""Safe to leave on (issue 10): never worse than bare, never replays a bad batch, never
corrupts state. Each test is an ordinary training script, checked against bare."""

from __future__ import annotations

import copy
import logging
import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tiny
from guarded_optim.ladder import Ladder
from guarded_optim import (FixedThreshold, GuardedOptimizer, NonFinite, NonFiniteWeights,
                           RelativeThreshold, ReduceLR)

pytestmark = pytest.mark.usefixtures("one_thread")


def _classifier(seed=0, dropout=0.0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 3))


def _dataset(n=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0.5).long()
    return x, y


class Probe:
    """A picklable probe: the loss of ``model`` on a fixed held-out set."""

    def __init__(self, model, x, y):
        self.model, self.x, self.y = model, x, y

    def __call__(self):
        return F.cross_entropy(self.model(self.x), self.y)


def _randint_loop(opt, model, x, y, steps, batch=16, bad_index=None):
    """nanoGPT style: batches drawn with torch.randint on the default generator."""
    drawn = []
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch,))
        drawn.append(idx)
        yb = y[idx].clone()
        if bad_index is not None and bool((idx == bad_index).any()):
            yb[idx == bad_index] = 1000 % 3    # a mislabelled example (label in range)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), yb).backward()
        opt.step()
    return drawn


# -- 2. rollbacks never rewind the data stream; the guard's own work never draws from it ------
def test_a_rollback_does_not_replay_the_rejected_batch():
    x, y = _dataset()
    m = _classifier()
    opt = GuardedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1),
                           Probe(m, *_dataset(64, seed=1)), module=m, signals=[NonFinite()])
    torch.manual_seed(0)
    drawn = []
    for i in range(20):
        idx = torch.randint(0, len(x), (16,))
        drawn.append(idx)
        opt.zero_grad()
        F.cross_entropy(m(x[idx]), y[idx]).backward()
        if i == 10:
            for p in m.parameters():   # one catastrophic proposal
                p.grad.mul_(1e4)
        opt.step()
        if i == 10:
            assert opt.last_decision == "rollback"
    torch.manual_seed(0)
    expected = [torch.randint(0, len(x), (16,)) for _ in range(20)]
    # the batch stream is exactly the unguarded one: nothing was drawn twice
    assert all(torch.equal(a, b) for a, b in zip(drawn, expected))
    assert opt.stats["rollbacks"] == 1


def test_guarded_dropout_run_without_module_is_bit_identical_to_bare():
    """The probe runs in train mode (no module=) and draws dropout masks from a copy of the
    RNG: the training run's masks and batches are those of the bare run."""
    x, y = _dataset()
    runs = {}
    for guarded in (False, True):
        m = _classifier(dropout=0.3)
        inner = torch.optim.AdamW(m.parameters(), lr=1e-2)
        opt = GuardedOptimizer(inner, Probe(m, *_dataset(64, seed=1))) if guarded else inner
        torch.manual_seed(1)
        _randint_loop(opt, m, x, y, steps=40)
        runs[guarded] = [p.detach().clone() for p in m.parameters()]
        if guarded:
            assert opt.stats["rollbacks"] == opt.stats["skipped"] == 0
            assert opt.stats["measured"] == 40
    assert all(torch.equal(a, b) for a, b in zip(runs[False], runs[True]))


def test_probe_does_not_consume_the_rng():
    m = _classifier(dropout=0.5)
    probe = Probe(m, *_dataset(64, seed=1))
    opt = GuardedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), probe)
    before = torch.get_rng_state()
    opt.zero_grad()
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    assert opt.stats["measured"] == 1
    assert torch.equal(torch.get_rng_state(), before)


# -- 3. loading a checkpoint leaves the process RNG alone; restoring is explicit ------------
def test_load_state_dict_keeps_the_process_rng_and_restore_is_explicit():
    m = _classifier()
    x, y = _dataset()
    opt = GuardedOptimizer(torch.optim.AdamW(m.parameters()), Probe(m, *_dataset(64, seed=1)))
    torch.manual_seed(3)
    _randint_loop(opt, m, x, y, steps=5)
    sd = opt.state_dict()
    saved = sd["guard"]["rng"]["cpu"].clone()
    forks = []
    for seed in (10, 11):   # two forks of one checkpoint, seeded differently
        torch.manual_seed(seed)
        opt.load_state_dict(sd)
        forks.append(torch.randint(0, 1000, (8,)))
    assert not torch.equal(forks[0], forks[1])
    opt.restore_rng_state(sd)
    assert torch.equal(torch.get_rng_state(), saved)


def test_malformed_rng_state_is_rejected_before_anything_changes():
    m = _classifier()
    x, y = _dataset()
    opt = GuardedOptimizer(torch.optim.AdamW(m.parameters()), Probe(m, *_dataset(64, seed=1)))
    _randint_loop(opt, m, x, y, steps=5)
    good = opt.state_dict()
    _randint_loop(opt, m, x, y, steps=15)
    before = (opt.step_state.t, dict(opt.stats), opt.yhat)
    bad = copy.deepcopy(good)
    bad["guard"]["rng"] = {"cpu": torch.zeros(3, dtype=torch.uint8)}
    with pytest.raises(ValueError, match=r"\['rng'\]"):
        opt.load_state_dict(bad)
    assert (opt.step_state.t, dict(opt.stats), opt.yhat) == before == (20, before[1], before[2])
    with pytest.raises(ValueError, match="rng"):
        opt.restore_rng_state({"guard": {"rng": "nope"}})


def test_restore_rng_state_refuses_another_ranks_state():
    m = _classifier()
    opt = GuardedOptimizer(torch.optim.AdamW(m.parameters()))
    sd = opt.state_dict()
    sd["guard"]["rng"]["rank"] = 1
    with pytest.raises(ValueError, match="rank 1"):
        opt.restore_rng_state(sd)


# -- 4. checkpoint values are checked; a failing load changes nothing ------------------------
def _trained(probe_every=1, steps=7):
    m = tiny.model(0)
    probe_set, batches = tiny.data(0, steps=steps)
    opt = GuardedOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-2),
                           tiny.probe_for(m, probe_set), module=m, probe_every=probe_every)
    for x, yb in batches:
        opt.step(tiny.closure_for(opt, m, x, yb))
    return m, opt


def _corrupt(sd, what):
    sd = copy.deepcopy(sd)
    g = sd["guard"]
    if what == "nan-in-safe":
        g["safe"]["params"][0][0, 0] = float("nan")
    elif what == "exp_avg-shape":
        sd["state"][0]["exp_avg"] = torch.zeros(3, 3)
    elif what == "negative-exp_avg_sq":
        sd["state"][0]["exp_avg_sq"] = -sd["state"][0]["exp_avg_sq"] - 1
    elif what == "negative-step":
        sd["state"][0]["step"] = torch.tensor(-4.0)
    elif what in ("yhat-nan", "yhat-inf", "yhat-str"):
        g["yhat"] = {"yhat-nan": float("nan"), "yhat-inf": math.inf, "yhat-str": "0.1"}[what]
    elif what == "negative-t":
        g["t"] = -3
    elif what == "stats-negative":
        g["stats"]["rollbacks"] = -1
    elif what == "signal-nan":
        def poison(x):
            if isinstance(x, torch.Tensor) and x.is_floating_point():
                return torch.full_like(x, float("nan"))
            if isinstance(x, dict):
                return {k: poison(v) for k, v in x.items()}
            if isinstance(x, (list, tuple)):
                return type(x)(poison(v) for v in x)
            return x
        g["signals"]["grad_spike"] = poison(g["signals"]["grad_spike"])
    elif what == "last-decision":
        g["last_decision"] = "maybe"
    return sd


CORRUPTIONS = {"nan-in-safe": ["safe", "NaN"], "exp_avg-shape": ["exp_avg", "shape"],
               "negative-exp_avg_sq": ["exp_avg_sq", "negative"], "negative-step": ["step"],
               "yhat-nan": ["yhat"], "yhat-inf": ["yhat"], "yhat-str": ["yhat"],
               "negative-t": ["'t'"], "stats-negative": ["rollbacks"],
               "signal-nan": ["grad_spike", "NaN"], "last-decision": ["last_decision"]}


@pytest.mark.parametrize("what", sorted(CORRUPTIONS))
def test_corrupt_checkpoint_values_are_rejected_and_change_nothing(what):
    m, opt = _trained(probe_every=3)        # 7 steps, k=3: the snapshot is saved too
    sd = opt.state_dict()
    assert sd["guard"]["safe"] is not None
    bad = _corrupt(sd, what)
    before = (opt.step_state.t, dict(opt.stats), opt.yhat, [p.detach().clone() for p in m.parameters()],
              {k: v.clone() for k, v in opt.state[next(m.parameters())].items()})
    with pytest.raises(ValueError) as info:
        opt.load_state_dict(bad)
    for word in CORRUPTIONS[what]:
        assert word in str(info.value), (word, str(info.value))
    after = (opt.step_state.t, dict(opt.stats), opt.yhat, [p.detach().clone() for p in m.parameters()],
             {k: v.clone() for k, v in opt.state[next(m.parameters())].items()})
    assert before[:3] == after[:3]
    assert all(torch.equal(a, b) for a, b in zip(before[3], after[3]))
    assert all(torch.equal(before[4][k], after[4][k]) for k in before[4])


def test_checkpoint_is_no_bigger_than_bare_when_the_last_step_was_verified():
    m, opt = _trained(probe_every=1, steps=12)
    sd = opt.state_dict()
    assert sd["guard"]["safe"] is None and sd["guard"]["safe_is_live"]
    bare_bytes = sum(v.numel() * v.element_size() for st in sd["state"].values()
                     for v in st.values() if isinstance(v, torch.Tensor))

    def tensor_bytes(x):
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, dict):
            return sum(tensor_bytes(v) for v in x.values())
        if isinstance(x, (list, tuple)):
            return sum(tensor_bytes(v) for v in x)
        return 0

    assert tensor_bytes(sd) <= 1.1 * bare_bytes + 16_000   # + RNG state (5 kB) and signal windows


def test_guard_checkpoint_loads_into_the_bare_optimizer():
    m, opt = _trained()
    sd = opt.state_dict()
    bare = torch.optim.AdamW(m.parameters(), lr=1e-2)
    bare.load_state_dict(sd)
    assert bare.state_dict()["param_groups"] == opt.inner.state_dict()["param_groups"]


# -- 6. copies, pickling, dtypes ------------------------------------------------------------
def test_deepcopy_is_independent_of_the_original():
    m, opt = _trained()
    with pytest.warns(UserWarning, match="probe"):
        twin = copy.deepcopy(opt)
    original = [p.detach().clone() for p in m.parameters()]
    twin_params = [p for g in twin.param_groups for p in g["params"]]
    for p in twin_params:
        p.grad = torch.full_like(p, 1e6)
    twin._restore()                 # a rollback of the copy writes the copy only
    twin.inner.step()
    assert all(torch.equal(a, b) for a, b in zip(original, m.parameters()))
    assert twin.safe_snapshot.optimizer is twin.inner


def test_guard_pickles_when_its_probe_does(tmp_path):
    x, y = _dataset()
    m = _classifier()
    opt = GuardedOptimizer(torch.optim.AdamW(m.parameters()), Probe(m, *_dataset(64, seed=1)))
    _randint_loop(opt, m, x, y, steps=3)
    torch.save(opt, tmp_path / "guard.pt")
    back = torch.load(tmp_path / "guard.pt", weights_only=False)
    assert back.step_state.t == 3 and back.yhat == opt.yhat
    back2 = pickle.loads(pickle.dumps(opt))
    assert back2.safe_snapshot.optimizer is back2.inner


def test_rollback_is_exact_after_model_double():
    m = tiny.model(0)
    probe_set, batches = tiny.data(0, steps=12)
    xp, yp = probe_set
    opt = GuardedOptimizer(torch.optim.SGD(m.parameters(), lr=1e-2),
                           lambda: F.mse_loss(m(xp.to(m[0].weight.dtype)), yp.to(m[0].weight.dtype)),
                           module=m, epsilon=1e-3)
    for x, yb in batches[:3]:
        opt.step(tiny.closure_for(opt, m, x, yb))
    m.double()
    for x, yb in batches[3:6]:
        opt.step(tiny.closure_for(opt, m, x.double(), yb.double()))
    assert opt.safe_snapshot._saved_params[0].dtype == torch.float64
    safe = [t.clone() for t in opt.safe_snapshot._saved_params]
    x, yb = batches[6]
    lr = opt.param_groups[0]["lr"]
    opt.param_groups[0]["lr"] = 1e4
    opt.step(tiny.closure_for(opt, m, x.double(), yb.double()))
    opt.param_groups[0]["lr"] = lr
    assert opt.last_decision == "rollback"
    assert all(torch.equal(a, b) for a, b in zip(safe, m.parameters()))


# -- 7. a call that fails changes nothing; callbacks run after the commit -------------------
def test_a_raising_callback_does_not_undo_the_committed_step():
    m = tiny.model(0)
    probe_set, batches = tiny.data(0, steps=3)

    def boom(event):
        raise RuntimeError("sink broke")

    opt = GuardedOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-2),
                           tiny.probe_for(m, probe_set), module=m, callbacks=[boom])
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(RuntimeError, match="sink broke"):
        opt.step(tiny.closure_for(opt, m, *batches[0]))
    assert opt.step_state.t == 1 and opt.stats["steps"] == 1 and opt.last_decision == "accept"
    assert not all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_a_failed_signal_measurement_leaves_counters_as_they_were():
    m = tiny.model(0)

    class Broken(NonFinite):
        name = "broken"

        def measure(self, meas):
            raise RuntimeError("signal broke")

    opt = GuardedOptimizer(torch.optim.AdamW(m.parameters()), signals=[Broken()])
    _, batches = tiny.data(0, steps=2)
    before = [p.detach().clone() for p in m.parameters()]
    with pytest.raises(RuntimeError, match="signal broke"):
        opt.step(tiny.closure_for(opt, m, *batches[0]))
    assert opt.step_state.t == 0 and opt.stats["steps"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))


def test_a_failure_after_the_proposal_leaves_the_verified_state_live():
    """A post-step signal that raises while the proposal is measured: the proposal is not
    left live with the counters saying "verified"."""
    m = tiny.model(0)
    probe_set, batches = tiny.data(0, steps=3)

    class BrokenAfter(NonFiniteWeights):
        name = "broken_after"

        def measure(self, meas):
            if broken:
                raise RuntimeError("signal broke")
            return super().measure(meas)

    broken = False
    opt = GuardedOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-2),
                           tiny.probe_for(m, probe_set), module=m, signals=[BrokenAfter()])
    opt.step(tiny.closure_for(opt, m, *batches[0]))
    before = [p.detach().clone() for p in m.parameters()]
    broken = True
    with pytest.raises(RuntimeError, match="signal broke"):
        opt.step(tiny.closure_for(opt, m, *batches[1]))
    assert opt.step_state.t == 1 and opt.step_state.unverified == 0
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    broken = False
    opt.step(tiny.closure_for(opt, m, *batches[1]))
    assert opt.last_decision == "accept" and opt.step_state.t == 2


# -- 8. clear errors ------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,exc,words", [
    ({"threshold": 0.1}, TypeError, ["threshold", "epsilon"]),
    ({"threshold": RelativeThreshold}, TypeError, ["RelativeThreshold()"]),
    ({"signals": [NonFinite]}, TypeError, ["NonFinite()"]),
    ({"signals": NonFinite()}, TypeError, ["signals", "list"]),
    ({"signals": ["nonfinite"]}, TypeError, ["signals[0]", "string"]),
    ({"recovery": [ReduceLR]}, TypeError, ["ReduceLR()"]),
    ({"callbacks": print}, TypeError, ["callbacks", "list"]),
    ({"callbacks": ["guard.csv"]}, TypeError, ["CSVSink"]),
    ({"alpha": "0.1"}, ValueError, ["alpha"]),
    ({"max_consecutive_rejections": True}, ValueError, ["max_consecutive_rejections"]),
    ({"history": True}, ValueError, ["history"]),
    ({"checkpoint_every": 2.0}, ValueError, ["checkpoint_every"]),
    ({"snapshot": "gpu"}, ValueError, ["snapshot"]),
])
def test_constructor_errors_name_the_argument_and_the_fix(kwargs, exc, words):
    m = tiny.model(0)
    with pytest.raises(exc) as info:
        GuardedOptimizer(torch.optim.AdamW(m.parameters()), **kwargs)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_numpy_scalars_are_numbers():
    m = tiny.model(0)
    probe_set, _ = tiny.data(0, steps=1)
    opt = GuardedOptimizer(torch.optim.AdamW(m.parameters()), tiny.probe_for(m, probe_set),
                           alpha=np.float32(0.1), epsilon=np.float32(0.5), probe_every=np.int64(2))
    assert opt.alpha == pytest.approx(0.1) and opt.probe_every == 2
    assert isinstance(opt.threshold, FixedThreshold)


def test_warnings_for_arguments_that_do_nothing():
    m, other = tiny.model(0), tiny.model(1)
    with pytest.warns(UserWarning, match="no probe"):
        GuardedOptimizer(torch.optim.AdamW(m.parameters()), epsilon=0.1)
    with pytest.warns(UserWarning, match="owns none"):
        GuardedOptimizer(torch.optim.AdamW(m.parameters()), module=other)
    probe_set, _ = tiny.data(0, steps=1)
    with pytest.warns(UserWarning, match="maximize"):
        GuardedOptimizer(torch.optim.AdamW(m.parameters(), maximize=True),
                         tiny.probe_for(m, probe_set))


# -- 9. loud, not silent -----------------------------------------------------------------------
def test_interventions_are_logged_and_rate_limited(caplog):
    m = tiny.model(0)
    _, batches = tiny.data(0, steps=40)
    opt = GuardedOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-2))
    caplog.set_level(logging.INFO, logger="guarded_optim")
    for i, (x, yb) in enumerate(batches):
        nan = i >= 5
        opt.step(tiny.closure_for(opt, m, torch.full_like(x, float("nan")) if nan else x, yb))
    assert opt.stats["skipped"] == 35
    records = [r for r in caplog.records if r.name == "guarded_optim"]
    # the first intervention and the 10th are WARNING (seen with no logging configured)
    assert [r.levelno for r in records] == [logging.WARNING] + [logging.INFO] * 8 + [
        logging.WARNING] + [logging.INFO] * 2
    assert "step 5 skipped (nonfinite" in records[0].getMessage()
    assert "first intervention" in records[0].getMessage()
    assert "10 interventions so far" in records[9].getMessage()
    # 10 in a burst, then the 16th and 32nd: a long run is not flooded
    assert len(records) == 12 and "more skip events" in records[-1].getMessage()


def test_rebaseline_is_a_warning(caplog):
    m = tiny.model(0)
    probe_set, batches = tiny.data(0, steps=8)
    opt = GuardedOptimizer(torch.optim.SGD(m.parameters(), lr=1e3), tiny.probe_for(m, probe_set),
                           module=m, epsilon=1e-3, max_consecutive_rejections=2,
                           signals=[NonFinite()], ladder=Ladder(on_exhausted="rebaseline"))
    caplog.set_level(logging.INFO, logger="guarded_optim")
    for x, yb in batches:
        opt.step(tiny.closure_for(opt, m, x, yb))
    assert opt.stats["rebaselines"] >= 1
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any("re-based" in w.getMessage() for w in warnings)


# -- conformance bits that live in the guard --------------------------------------------------
def test_meta_parameters_step_like_the_bare_optimizer():
    with torch.device("meta"):
        m = nn.Linear(4, 4)
    opt = GuardedOptimizer(torch.optim.AdamW(m.parameters()))
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()   # the bare optimizer steps on meta tensors without values; so does the guard
    assert opt.stats["steps"] == 0


def test_state_dict_without_a_probe_does_not_change_the_run():
    """Saving verifies the live state as the next step would: the run is the same with or
    without a state_dict() in the middle, and the checkpoint records rather than copies."""
    probe_set, batches = tiny.data(0, steps=16)
    finals = []
    for save in (False, True):
        m = tiny.model(0)
        opt = GuardedOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-2), module=m)
        for i, (x, yb) in enumerate(batches):
            opt.step(tiny.closure_for(opt, m, x, yb))
            if save and i == 7:
                sd = opt.state_dict()
                assert sd["guard"]["safe"] is None and sd["guard"]["safe_is_live"]
        finals.append((tiny.full_state(m, opt), dict(opt.stats)))
    tiny.assert_same(finals[0][0], finals[1][0])
    assert finals[0][1] == finals[1][1]


def test_probe_less_resume_rolls_back_onto_the_recorded_state(tmp_path):
    probe_set, batches = tiny.data(0, steps=12)
    m = tiny.model(0)
    opt = GuardedOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-2), module=m, probe_every=1)
    for x, yb in batches[:8]:
        opt.step(tiny.closure_for(opt, m, x, yb))
    torch.save({"m": m.state_dict(), "o": opt.state_dict()}, tmp_path / "ck.pt")
    at_save = tiny.full_state(m, opt)
    ck = torch.load(tmp_path / "ck.pt", weights_only=True)
    m2 = tiny.model(3)
    opt2 = GuardedOptimizer(torch.optim.AdamW(m2.parameters(), lr=1e-2), module=m2, probe_every=1)
    m2.load_state_dict(ck["m"])
    opt2.load_state_dict(ck["o"])
    x, yb = batches[8]
    opt2.step(tiny.closure_for(opt2, m2, x, yb))
    with torch.no_grad():           # damage between steps: the next step's check sees it
        next(m2.parameters()).mul_(1e4)
    x, yb = batches[9]
    opt2.step(tiny.closure_for(opt2, m2, x, yb))
    assert opt2.last_decision == "rollback"
    # batch 8's proposal was never verified (the check that would verify it found the
    # damage), so the rollback lands exactly on the state recorded in the checkpoint
    tiny.assert_same(tiny.full_state(m2, opt2), at_save)
