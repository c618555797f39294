"""Slow damage (issue 23): a sustained rise that no single step shows is seen, rewound to
before its onset, its batches quarantined and skipped; clean runs never alarm."""

from __future__ import annotations

import copy
import functools
import itertools
import logging
import math
import random

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, strategies as st
from torch import nn

from guarded_optim import GuardedOptimizer, Ladder, StepEvent, skip_ahead
from guarded_optim.drift import DriftDetector, Rewind, cusum

pytestmark = pytest.mark.usefixtures("one_thread")


# -- the detector, pure -------------------------------------------------------------------------
def test_cusum_is_pages_recursion():
    assert cusum(0.0, 3.0, 4.0) == 0.0
    assert cusum(1.0, 6.0, 4.0) == 3.0
    assert cusum(3.0, -10.0, 4.0) == 0.0


def feed(det: DriftDetector, innovations, y0=1.0, start=0, yhat=1.0, alpha=0.1):
    """Feed accepted innovations as the guard does (``yhat`` its EWMA); the first alarm."""
    for i, nu in enumerate(innovations):
        y = yhat + nu
        yhat = yhat + alpha * (y - yhat)
        alarm = det.observe(start + i, nu, yhat, y0)
        if alarm is not None:
            return alarm, yhat
    return None, yhat


@pytest.mark.parametrize("seed", range(5))
def test_a_noisy_descent_never_alarms(seed):
    rnd = random.Random(seed)
    alarm, _ = feed(DriftDetector(), [-0.001 + rnd.gauss(0, 0.01) for _ in range(3000)])
    assert alarm is None


@pytest.mark.parametrize("seed", range(5))
def test_a_sustained_rise_alarms_soon_and_dates_its_onset(seed):
    rnd = random.Random(seed)
    det = DriftDetector()
    clean = [-0.001 + rnd.gauss(0, 0.01) for _ in range(100)]
    alarm, yhat = feed(det, clean)
    assert alarm is None
    # every step +6 noise scales: far inside a band of 20 scales, but it adds up
    alarm, _ = feed(det, [0.06 + rnd.gauss(0, 0.01) for _ in range(60)], start=100, yhat=yhat)
    assert alarm is not None and alarm.step - 100 <= 40, alarm
    assert 95 <= alarm.onset <= 105 and alarm.rise > 0.05


@pytest.mark.parametrize("seed", range(5))
def test_a_rise_slower_than_the_allowance_is_left_alone(seed):
    """+2 noise scales a step (a model overfitting late): under ``kappa``, never an alarm."""
    rnd = random.Random(seed)
    alarm, _ = feed(DriftDetector(), [-0.001 + rnd.gauss(0, 0.01) for _ in range(100)]
                    + [0.02 + rnd.gauss(0, 0.01) for _ in range(400)])
    assert alarm is None


@given(st.lists(st.floats(-0.05, 0.0), min_size=40, max_size=300))
def test_a_probe_that_never_rises_never_alarms(innovations):
    """Non-positive innovations keep ``yhat`` at its best: the level condition never holds."""
    assert feed(DriftDetector(), innovations)[0] is None


def test_detector_state_round_trips_mid_rise():
    rnd = random.Random(0)
    clean = [-0.001 + rnd.gauss(0, 0.01) for _ in range(80)]
    rise = [0.06 + rnd.gauss(0, 0.01) for _ in range(60)]
    a, b = DriftDetector(), DriftDetector()
    _, yhat = feed(a, clean + rise[:5])
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    ra, _ = feed(a, rise[5:], start=85, yhat=yhat)
    rb, _ = feed(b, rise[5:], start=85, yhat=yhat)
    assert ra == rb and ra is not None


def test_bad_detector_state_names_the_problem_and_changes_nothing():
    det = DriftDetector()
    feed(det, [-0.01] * 40)
    before = det.state_dict()
    with pytest.raises(ValueError, match="drift state"):
        det.load_state_dict({**before, "score": -1.0})
    with pytest.raises(ValueError, match="drift state"):
        det.load_state_dict({**before, "values": [math.nan]})
    assert det.state_dict() == before


@pytest.mark.parametrize("kw", [{"kappa": 0}, {"h": -1}, {"rho": math.nan}, {"warmup": 1},
                                {"window": 8, "warmup": 16}])
def test_bad_detector_settings_are_refused(kw):
    with pytest.raises(ValueError, match="Invalid kappa"):
        DriftDetector(**kw)


@pytest.mark.parametrize("kw", [{"keep": 0}, {"every": 0}, {"margin": -1}, {"patience": 0},
                                {"skip": 0}])
def test_bad_rewind_settings_are_refused(kw):
    with pytest.raises(ValueError, match="Invalid keep"):
        Rewind(**kw)


# -- a practitioner's loop ---------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def digits():
    from sklearn.datasets import load_digits
    bunch = load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float32) / 16.0
    return x, torch.as_tensor(bunch.target, dtype=torch.int64)


BAD = range(120, 180)   # a shard whose labels are all wrong


def loader(seed: int, steps: int = 300, batch: int = 32):
    """A DataLoader over a fixed stream of batches; the ``BAD`` ones have permuted labels."""
    x, y = digits()
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    xp, yp, xt, yt = x[order[:256]], y[order[:256]], x[order[256:]], y[order[256:]]
    idx = torch.randint(len(xt), (steps * 2, batch), generator=g)
    perm = (torch.arange(10) + 3) % 10
    xs = xt[idx]
    ys = torch.stack([perm[yt[i]] if b in BAD else yt[i] for b, i in enumerate(idx)])
    data = torch.utils.data.TensorDataset(xs, ys)
    return torch.utils.data.DataLoader(data, batch_size=None), (xp, yp)


def train(seed: int, guarded: bool, steps: int = 300):
    """The ordinary loop, plus the two lines that honour a rewind's skip-ahead."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 10))
    data, (xp, yp) = loader(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    if guarded:
        opt = GuardedOptimizer(opt, lambda: F.cross_entropy(model(xp), yp), module=model)
    skip, step, events = 0, 0, []
    for i, (x, y) in enumerate(data):
        if skip:          # the guard asked to skip ahead past a bad stretch
            skip -= 1
            continue
        if step == steps:
            break
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step(batch_id=i) if guarded else opt.step()
        step += 1
        if guarded:
            events.append(opt.last_event)
            skip = opt.last_event.skip_batches
    with torch.no_grad():
        return F.cross_entropy(model(xp), yp).item(), opt, events


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_mislabelled_shard_is_rewound_quarantined_and_skipped(seed, caplog):
    bare, _, _ = train(seed, False)
    with caplog.at_level(logging.WARNING, logger="guarded_optim"):
        guarded, opt, events = train(seed, True)
    rewinds = [e for e in events if e.action and "rewind" in e.action]
    assert opt.stats["rewinds"] == len(rewinds) >= 1
    assert all(e.decision == "rollback" and e.reason == "drift" and e.skip_batches > 0
               for e in rewinds)
    first = rewinds[0]
    assert 120 < first.step < 150 and first.batch_id in BAD
    assert len(opt.ladder.quarantine) > 0
    assert all(b in BAD or b >= BAD.start - 10 for b in opt.ladder.quarantine.state_dict()["ids"])
    assert any("slow damage" in r.getMessage() and "rewound" in r.getMessage()
               for r in caplog.records)
    assert guarded < 0.8 * bare, (guarded, bare)


def test_no_snapshot_old_enough_says_so_and_carries_on(caplog):
    """A history that is pushed too rarely has nowhere to go: a WARNING, a counter, no rollback."""
    rewind = Rewind(every=10_000)
    torch.manual_seed(0)
    with caplog.at_level(logging.WARNING, logger="guarded_optim"):
        _, opt, events = train_with(0, Ladder(rewind=rewind))
    assert opt.stats["rewinds"] == 0 and opt.stats["drift_unrewound"] >= 1
    assert not any(e.reason == "drift" for e in events)
    assert any("no verified state from before it is kept" in r.getMessage() for r in caplog.records)


def train_with(seed, ladder=None, steps=300, watch=None, **extra):
    """``train`` with guard arguments of the test's choosing; ``watch(opt, event)`` sees
    every event with the guard that made it."""
    original = GuardedOptimizer.__init__

    def init(self, *a, **kw):
        original(self, *a, ladder=ladder, **extra, **kw)
        if watch is not None:
            self.callbacks.append(functools.partial(watch, self))
    GuardedOptimizer.__init__ = init
    try:
        return train(seed, True, steps)
    finally:
        GuardedOptimizer.__init__ = original


def test_state_dict_carries_the_detector_and_an_older_one_loads():
    _, opt, _ = train(0, True, steps=60)
    sd = opt.state_dict()
    assert "rewind" in sd["guard"]["ladder"]
    det = sd["guard"]["ladder"]["rewind"]["detector"]
    assert len(det["values"]) > 0
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 10))
    x, y = digits()
    fresh = GuardedOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-3),
                             lambda: F.cross_entropy(model(x[:64]), y[:64]), module=model)
    fresh.load_state_dict(sd)
    assert fresh.ladder.rewind.detector.state_dict() == opt.ladder.rewind.detector.state_dict()
    older = {**sd, "guard": {**sd["guard"], "ladder": {
        k: v for k, v in sd["guard"]["ladder"].items() if k != "rewind"}}}
    GuardedOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-3),
                     lambda: F.cross_entropy(model(x[:64]), y[:64]), module=model).load_state_dict(older)


def test_a_load_copies_the_ladder_without_the_history_and_bad_state_changes_nothing():
    _, opt, _ = train(0, True, steps=80)
    rewind = opt.ladder.rewind
    assert len(rewind.ring) == rewind.keep      # pushed every 25 measured steps
    twin = copy.deepcopy(opt.ladder)
    assert twin.rewind.ring is None and twin.rewind.detector.state_dict() == rewind.detector.state_dict()
    sd = opt.state_dict()
    bad = copy.deepcopy(sd)
    bad["guard"]["ladder"]["rewind"]["repeats"] = -1
    before = rewind.state_dict()
    with pytest.raises(ValueError, match=r"\['ladder'\]"):
        opt.load_state_dict(bad)
    assert rewind.state_dict() == before and len(rewind.ring) == rewind.keep


def same(a, b) -> bool:
    """Equal, tensors compared by value (state dicts hold both)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return a == b


def test_a_rewind_takes_the_reference_and_the_band_back_with_the_state():
    """yhat, the band's window and the signals' state go back to the rewound state's: the
    rise's innovations leave the windows that judge the next proposals."""
    seen = []

    def check(opt, e):
        if e.action and "rewind" in e.action:
            entry = next(s for s in opt.ladder.rewind.ring if s.step == opt.safe_snapshot.step)
            judges = entry.meta["judges"]
            seen.append((opt.threshold.state_dict() == judges["band"],
                         same([s.state_dict() for s in opt.signals], judges["signals"]),
                         opt.yhat == entry.meta["yhat"], "judges" not in opt.safe_snapshot.meta))
    train_with(0, watch=check)
    assert seen and all(all(s) for s in seen), seen


def test_skip_ahead_drops_what_the_rewind_asked_once_with_stable_indices():
    class Guard:
        last_event = StepEvent(0, "rollback", skip_batches=5)   # an earlier loop's: not ours
    guard, got = Guard(), []
    for i, item in skip_ahead(range(100, 130), guard):
        got.append(i)
        assert item == 100 + i
        if i == 3:
            guard.last_event = StepEvent(1, "rollback", skip_batches=4)   # a rewind at i = 3
        # i = 8, 9: accumulation, no new step(): the same event is not honoured again
    assert got[:5] == [0, 1, 2, 3, 8] and got[5:] == list(range(9, 30))


def test_the_user_loop_with_skip_ahead_matches_the_two_line_loop():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 10))
    data, (xp, yp) = loader(0)
    opt = GuardedOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-3),
                           lambda: F.cross_entropy(model(xp), yp), module=model)
    for i, (x, y) in skip_ahead(data, opt):
        if opt.stats["steps"] == 300:
            break
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step(batch_id=i)
    with torch.no_grad():
        mine = F.cross_entropy(model(xp), yp).item()
    assert mine == train(0, True)[0] and opt.stats["rewinds"] >= 1


@pytest.mark.parametrize("key, value", [("onset", "x"), ("onset", 2.7), ("best", math.nan),
                                        ("batches", "abc"), ("batches", [[1, 2]]),
                                        ("score", math.inf), ("values", [1.0, math.inf])])
def test_a_bad_detector_field_is_named_and_nothing_changes(key, value):
    det = DriftDetector()
    feed(det, [-0.01 + 0.001 * (i % 3) for i in range(50)])
    before = det.state_dict()
    with pytest.raises(ValueError, match="drift state"):
        det.load_state_dict({**before, key: value})
    assert det.state_dict() == before


@pytest.mark.parametrize("key, value", [("repeats", 1.9), ("target", True), ("since", -1)])
def test_a_bad_rewind_field_is_named_and_nothing_changes(key, value):
    rewind = Rewind()
    before = rewind.state_dict()
    with pytest.raises(ValueError, match=f"rewind state\\['{key}'\\]"):
        rewind.load_state_dict({**before, key: value})
    with pytest.raises(ValueError, match="lacks 'detector'"):
        rewind.load_state_dict({k: v for k, v in before.items() if k != "detector"})
    assert rewind.state_dict() == before


def test_a_probe_that_stood_still_keeps_the_statistic_finite_and_the_checkpoint_loadable():
    """40 steps at LR 0 (a flat probe: its spread is 0), then training: the CUSUM stays
    finite and the guard loads its own state_dict."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    data, (xp, yp) = loader(0)
    opt = GuardedOptimizer(torch.optim.SGD(model.parameters(), lr=0.0),
                           lambda: F.cross_entropy(model(xp), yp), module=model)
    for i, (x, y) in enumerate(data):
        if i == 40:
            opt.param_groups[0]["lr"] = 0.05
        if i == 80:
            break
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert math.isfinite(opt.ladder.rewind.detector.score)
    opt.load_state_dict(opt.state_dict())


def test_a_rewind_and_a_reach_back_never_return_into_each_others_damage():
    """With the budget's history on too, a rewind drops that history's entries from the
    rise (a later reach-back would land in it)."""
    checked = []

    def check(opt, e):
        if e.action and "rewind" in e.action:
            checked.append([s.step for s in opt.snapshot_history if s.step > opt.safe_snapshot.step])

    _, opt, _ = train_with(0, history=4, checkpoint_every=5, watch=check)
    assert checked and all(later == [] for later in checked), checked
    assert len(opt.snapshot_history) > 0   # the history was in use


def test_a_deep_copied_guard_keeps_its_history_and_an_old_checkpoint_starts_the_rung_afresh():
    _, opt, _ = train(0, True, steps=80)
    twin = copy.deepcopy(opt)
    assert [s.step for s in twin.ladder.rewind.ring] == [s.step for s in opt.ladder.rewind.ring]
    assert all(s.optimizer is twin.inner for s in twin.ladder.rewind.ring)
    sd = opt.state_dict()
    older = {**sd, "guard": {**sd["guard"], "ladder": {
        k: v for k, v in sd["guard"]["ladder"].items() if k != "rewind"}}}
    opt.ladder.rewind.detector.score = 7.0
    opt.load_state_dict(older)
    assert opt.ladder.rewind.detector.score == 0.0 and opt.ladder.rewind.detector.values == []


def _model():
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 10))


def _loop(model, opt, data, start, stop, events):
    """The user's loop from batch ``start`` on, honouring the skip, until ``stop`` steps."""
    for i, (x, y) in skip_ahead(itertools.islice(data, start, None), opt):
        if opt.stats["steps"] == stop:
            return start + i
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step(batch_id=start + i)
        events.append(opt.last_event)


def test_a_run_resumed_before_the_bad_shard_rewinds_exactly_as_the_uninterrupted_one(tmp_path):
    """Checkpoint at step 60 (torch.save, weights_only load), resume in fresh objects: the
    detector's window and push schedule are in the state_dict, so the rise at step 120 is
    rewound the same way and the run ends bit-identical to the uninterrupted one."""
    data, (xp, yp) = loader(0)
    torch.manual_seed(0)
    whole = _model()
    opt = GuardedOptimizer(torch.optim.AdamW(whole.parameters(), lr=3e-3),
                           lambda: F.cross_entropy(whole(xp), yp), module=whole)
    events: list = []
    _loop(whole, opt, data, 0, 300, events)
    assert opt.stats["rewinds"] >= 1

    torch.manual_seed(0)
    first = _model()
    opt1 = GuardedOptimizer(torch.optim.AdamW(first.parameters(), lr=3e-3),
                            lambda: F.cross_entropy(first(xp), yp), module=first)
    at = _loop(first, opt1, data, 0, 60, [])
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict(), "batch": at},
               tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed = _model()
    resumed.load_state_dict(ckpt["model"])
    opt2 = GuardedOptimizer(torch.optim.AdamW(resumed.parameters(), lr=3e-3),
                            lambda: F.cross_entropy(resumed(xp), yp), module=resumed)
    opt2.load_state_dict(ckpt["opt"])
    later: list = []
    _loop(resumed, opt2, data, ckpt["batch"], 300, later)
    assert [(e.decision, e.action, e.skip_batches) for e in later] == \
        [(e.decision, e.action, e.skip_batches) for e in events[60:]]
    assert all(torch.equal(a, b) for a, b in zip(whole.parameters(), resumed.parameters()))
