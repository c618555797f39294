"""Bad batches (issue 23, the fast half): a batch whose loss spikes and whose update raises
the probe is not applied, its id quarantined, the loop told to skip ahead; a suspect batch
that lowers the probe is new data and is learnt."""

from __future__ import annotations

import copy
import io
import itertools
import logging

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from guarded_optim import (FixedThreshold, GuardedOptimizer, Ladder, RelativeThreshold,
                           skip_ahead)
from guarded_optim.badbatch import BadBatch
from guarded_optim.signals import LossSpike
from test_drift import BAD, digits, loader, same

pytestmark = pytest.mark.usefixtures("one_thread")


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 10))


def train(seed: int, guarded: bool = True, steps: int = 300, how: str = "loss", watch=None,
          **kw):
    """The ordinary loop over test_drift's stream (a mislabelled shard at ``BAD``), handing
    the guard its loss: ``opt.step(loss=loss)`` (``how="loss"``) or a closure."""
    model = mlp(seed)
    data, (xp, yp) = loader(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    if guarded:
        opt = GuardedOptimizer(opt, lambda: F.cross_entropy(model(xp), yp), module=model, **kw)
        if watch is not None:
            watch(opt, model)
    events = []
    batches = skip_ahead(data, opt) if guarded else enumerate(data)
    for _, (i, (x, y)) in zip(range(steps), batches):
        def closure(x=x, y=y):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss
        if not guarded:
            closure()
            opt.step()
            continue
        if how == "closure":
            opt.step(closure, batch_id=i)
        else:
            opt.step(batch_id=i, loss=closure())
        events.append(opt.last_event)
    with torch.no_grad():
        return F.cross_entropy(model(xp), yp).item(), opt, events


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_mislabelled_shard_is_skipped_quarantined_and_skipped_past(seed, caplog):
    bare, _, _ = train(seed, guarded=False)
    with caplog.at_level(logging.WARNING, logger="guarded_optim"):
        guarded, opt, events = train(seed)
    bad = [e for e in events if e.decision != "accept"]
    assert bad and all(e.decision == "skip" and e.reason == "bad_batch" for e in bad), bad
    assert bad[0].step == BAD.start                 # the first bad batch, not a step later
    assert [e.skip_batches for e in bad] == [2 ** k - 1 for k in range(len(bad))]
    assert 1 + sum(1 + e.skip_batches for e in bad) >= len(BAD)   # the loop is past the shard
    assert opt.stats["bad_batches"] == opt.stats["skipped"] == len(bad)
    assert opt.stats["rollbacks"] == 0 and opt.stats["rewinds"] == 0
    assert set(opt.ladder.quarantine.state_dict()["ids"]) == {e.batch_id for e in bad}
    assert all(e.batch_id in BAD for e in bad)
    assert any("a bad batch, not applied" in r.getMessage() for r in caplog.records)
    assert guarded < 0.7 * bare, (guarded, bare)


def test_a_skip_leaves_weights_optimizer_state_and_counters_as_before_the_step():
    seen = {}

    def watch(opt, model):
        def callback(event):
            if event.step == BAD.start - 1:
                seen["before"] = (copy.deepcopy(model.state_dict()),
                                  copy.deepcopy(opt.inner.state_dict()))
            if event.step == BAD.start:
                seen["after"] = (copy.deepcopy(model.state_dict()),
                                 copy.deepcopy(opt.inner.state_dict()), event)
        opt.callbacks.append(callback)
    train(0, steps=BAD.start + 1, watch=watch)
    (m0, o0), (m1, o1, event) = seen["before"], seen["after"]
    assert event.decision == "skip" and event.reason == "bad_batch"
    assert same(m0, m1) and same(o0, o1)


@pytest.mark.parametrize("threshold", [RelativeThreshold(), FixedThreshold(10.0)],
                         ids=["relative", "fixed"])
def test_under_another_threshold_any_fall_lets_a_suspect_batch_in(threshold):
    """Without the band's noise scale the veto is any fall of the probe: weaker (seed 0's
    first bad batch lowers the probe by 0.0017 and teaches the window its level), but it
    runs: the guard's own rejections and the drift rung remain."""
    _, opt, events = train(0, steps=130, threshold=threshold)
    assert len(events) == 130 and opt.ladder.bad_batch.spike.references
    assert events[BAD.start].decision == "accept" and opt.stats["bad_batches"] == 0


def test_while_the_ladder_heals_the_rung_stands_aside_and_learns():
    """A back-off in force (LR scale < 1): the optimizer is being treated, not the data."""
    def watch(opt, model):
        def callback(event):
            if event.step == BAD.start - 2:
                opt.ladder.backoff.scale = 0.5
        opt.callbacks.append(callback)
    _, opt, events = train(0, steps=BAD.start + 3, watch=watch)
    assert not any(e.reason == "bad_batch" for e in events)
    assert events[BAD.start].lr_scale == 0.5


def test_a_closure_and_loss_keyword_decide_alike():
    a, opt_a, ev_a = train(0, steps=160, how="loss")
    b, opt_b, ev_b = train(0, steps=160, how="closure")
    assert [(e.decision, e.reason, e.skip_batches) for e in ev_a] == \
        [(e.decision, e.reason, e.skip_batches) for e in ev_b]
    assert a == b


def test_without_the_loss_the_rung_is_blind_and_the_drift_rung_acts():
    """``opt.step()`` after ``loss.backward()`` tells the guard no loss: the slow half
    (a drift rewind) is what remains."""
    from test_drift import train as closure_less
    _, opt, _ = closure_less(0, True)
    assert opt.stats["bad_batches"] == 0 and opt.stats["rewinds"] >= 1


def test_the_rung_off_leaves_the_shard_to_the_drift_rung():
    _, opt, events = train(0, ladder=Ladder(bad_batch=None))
    assert opt.stats["bad_batches"] == 0 and opt.stats["rewinds"] >= 1
    assert not any(e.reason == "bad_batch" for e in events)


# -- honest change -----------------------------------------------------------------------------
def curriculum(seed: int, probe_classes, steps: int = 260, switch: int = 150):
    """Digits 0-4, then 5-9 from ``switch``: every batch of the second stage spikes."""
    x, y = digits()
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=g)
    xp, yp, xt, yt = x[order[:256]], y[order[:256]], x[order[256:]], y[order[256:]]
    keep = torch.isin(yp, torch.tensor(list(probe_classes)))
    xp, yp = xp[keep], yp[keep]
    pools = torch.nonzero(yt < 5).flatten(), torch.nonzero(yt >= 5).flatten()
    batches = [pools[i >= switch][torch.randint(len(pools[i >= switch]), (32,), generator=g)]
               for i in range(steps * 3)]
    model = mlp(seed)
    opt = GuardedOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-3),
                           lambda: F.cross_entropy(model(xp), yp), module=model)
    events = []
    for _, (i, idx) in zip(range(steps), skip_ahead(batches, opt)):
        opt.zero_grad()
        loss = F.cross_entropy(model(xt[idx]), yt[idx])
        loss.backward()
        opt.step(batch_id=i, loss=loss)
        events.append(opt.last_event)
    return opt, events


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_new_stage_the_probe_covers_is_learnt_not_skipped(seed):
    opt, events = curriculum(seed, range(10))
    assert opt.stats["bad_batches"] == 0
    assert all(e.decision == "accept" for e in events[150:160])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_after_patience_skips_in_a_row_the_level_is_taken_as_the_datas_own(seed, caplog):
    """``BadBatch(patience=2)``: two skips, then the next suspect batch is applied and its
    loss learnt, said at WARNING; what follows is the drift rung's."""
    with caplog.at_level(logging.WARNING, logger="guarded_optim"):
        _, opt, events = train(seed, steps=140, ladder=Ladder(bad_batch=BadBatch(patience=2)))
    at = {e.step: e for e in events}
    assert [(at[t].reason, at[t].skip_batches) for t in (120, 121)] == [("bad_batch", 0),
                                                                       ("bad_batch", 1)]
    assert at[122].batch_id in BAD and at[122].reason != "bad_batch"
    assert opt.stats["bad_batches"] == 2 and opt.stats["bad_batch_rebased"] == 1
    assert any("taken as the data's own" in r.getMessage() for r in caplog.records)


# -- state, settings, input --------------------------------------------------------------------
def test_state_dict_round_trips_through_weights_only_and_an_older_checkpoint_loads():
    _, opt, _ = train(0, steps=123)                  # mid-streak: three skips so far
    sd = opt.state_dict()
    assert sd["guard"]["ladder"]["bad_batch"]["streak"] == 3
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    _, fresh, _ = train(0, steps=1)
    fresh.load_state_dict(loaded)
    assert same(fresh.ladder.bad_batch.state_dict(), opt.ladder.bad_batch.state_dict())
    assert fresh.ladder.bad_batch.streak == 3
    old = opt.ladder.state_dict()
    del old["bad_batch"]
    fresh.ladder.load_state_dict(old)
    assert fresh.ladder.bad_batch.streak == 0 and not fresh.ladder.bad_batch.spike.references


@pytest.mark.parametrize("key, value, match", [
    ("streak", -1, r"bad_batch state\['streak'\]"),
    ("base", [1], r"bad_batch state\['base'\]"),
    ("base", [1, float("nan")], r"bad_batch state\['base'\]\[1\]"),
    ("spike", {"keys": ["a"], "buffers": torch.zeros(2, 50), "counts": [1], "used": [1]},
     "LossSpike state"),
])
def test_a_bad_field_is_named_and_nothing_changes(key, value, match):
    _, opt, _ = train(0, steps=122)
    rung = opt.ladder.bad_batch
    before = rung.state_dict()
    with pytest.raises(ValueError, match=match):
        rung.load_state_dict({**before, key: value})
    assert same(rung.state_dict(), before)


def test_bad_settings_and_input_are_refused():
    with pytest.raises(ValueError, match="patience"):
        BadBatch(patience=0)
    with pytest.raises(TypeError, match="spike must be a LossSpike"):
        BadBatch(spike="x")
    with pytest.raises(TypeError, match="bad_batch must be a BadBatch"):
        Ladder(bad_batch=3)
    model = mlp(0)
    opt = GuardedOptimizer(torch.optim.AdamW(model.parameters()), lambda: torch.tensor(1.0))
    loss = model(torch.ones(1, 64)).sum()
    with pytest.raises(TypeError, match="both a closure and loss="):
        opt.step(lambda: loss, loss=loss)
    with pytest.raises(TypeError, match=r"step\(loss=...\) must be the loss tensor"):
        opt.step(loss="x")
    assert opt.stats["steps"] == 0
    assert repr(BadBatch(LossSpike(factor=4.0), patience=5)).startswith("BadBatch(LossSpike(")


def test_the_rewind_history_keeps_the_rungs_state_with_the_state_it_judged():
    _, opt, _ = train(0, steps=110)
    entries = list(opt.ladder.rewind.ring)
    assert entries and all("bad_batch" in e.meta["judges"] for e in entries)
    assert entries[-1].meta["judges"]["bad_batch"]["base"][0] == entries[-1].step


def test_probe_every_two_leaves_multi_step_proposals_to_the_band_and_drift():
    """The rung judges one batch's own update; a measured proposal that carries two steps
    is not one batch's."""
    _, opt, _ = train(0, probe_every=2)
    assert opt.stats["bad_batches"] == 0


def _loop(model, opt, data, start, stop, events):
    """The user's loop from batch ``start`` on, handing the guard its loss and honouring
    the skip, until ``stop`` steps; returns where a resumed loop starts."""
    for i, (x, y) in skip_ahead(itertools.islice(data, start, None), opt):
        if opt.stats["steps"] == stop:
            return start + i
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step(batch_id=start + i, loss=loss)
        events.append(opt.last_event)


def test_a_run_resumed_in_the_middle_of_the_shard_skips_exactly_as_the_uninterrupted_one(tmp_path):
    """Checkpoint after the shard's second skip (torch.save, weights_only load), resume in
    fresh objects: the streak is in the state_dict, so the skips ahead double on as before
    and the run ends bit-identical to the uninterrupted one."""
    data, (xp, yp) = loader(0)

    def build():
        model = mlp(0)
        return model, GuardedOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-3),
                                       lambda: F.cross_entropy(model(xp), yp), module=model)
    whole, opt = build()
    events: list = []
    _loop(whole, opt, data, 0, 200, events)
    assert opt.stats["bad_batches"] == 6

    first, opt1 = build()
    at = _loop(first, opt1, data, 0, BAD.start + 2, [])
    assert opt1.ladder.bad_batch.streak == 2
    torch.save({"model": first.state_dict(), "opt": opt1.state_dict(), "batch": at},
               tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    resumed, opt2 = build()
    resumed.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    later: list = []
    _loop(resumed, opt2, data, ckpt["batch"], 200, later)
    assert [(e.decision, e.reason, e.skip_batches, e.batch_id) for e in later] == \
        [(e.decision, e.reason, e.skip_batches, e.batch_id) for e in events[BAD.start + 2:]]
    assert all(torch.equal(a, b) for a, b in zip(whole.parameters(), resumed.parameters()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fresh_data_after_a_memorised_batch_is_not_called_bad(seed):
    """One clean batch repeated 40 times (its loss falls to ~0.01), then fresh clean data:
    every fresh batch spikes against the window, but not against the probe loss of the
    same weights, so nothing is skipped."""
    model = mlp(seed)
    data, (xp, yp) = loader(seed)
    batches = [b for i, b in enumerate(data) if i < 100 or i >= len(BAD) + BAD.start]
    stream = batches[:100] + [batches[99]] * 40 + batches[100:]
    opt = GuardedOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-3),
                           lambda: F.cross_entropy(model(xp), yp), module=model)
    losses = []
    for _, (i, (x, y)) in zip(range(200), skip_ahead(stream, opt)):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step(batch_id=i, loss=loss)
        losses.append(loss.item())
    assert max(losses[130:140]) < 0.05 < min(losses[140:145])   # memorised, then fresh
    assert opt.stats["bad_batches"] == 0, opt.stats
