"""Slow damage: a sustained rise of the accepted probe measurements that no single step
shows, where it began, and the rewind to a verified state from before it.

A bad stretch of data (mislabelled examples, garbage bytes, one token repeated) raises the
held-out loss a little on every step, each step inside the innovation band (:mod:`.innovation`);
their sum is what hurts. PaLM's authors (Chowdhery et al. 2022, arXiv:2204.02311, sec. 5.1)
restarted by hand from a checkpoint about 100 steps before such a spike and skipped 200 to
500 batches; OPT's and BLOOM's logbooks describe the same. :class:`Rewind` does it inside
``step()``: the :class:`DriftDetector` sees the rise and estimates its onset, the guard goes
back to a verified state kept from before the onset (a small host-side history), the
batches seen since the onset are quarantined, and the loop is told to skip ahead
(``StepEvent.skip_batches``) before training resumes.

The detector (pure arithmetic, no tensor) is Page's one-sided CUSUM (Page 1954) on the
accepted innovations standardised by their own robust spread, with a level condition:

    z_t = (nu_t - m) / s,   S_t = max(0, S_{t-1} + z_t - kappa),
    alarm when S_t > h  and  yhat_t - min(yhat) > rho * |y_0|,

``m`` and ``s`` the median and the scaled MAD (:func:`.innovation.noise_band`) of the last
``window`` accepted innovations taken while no rise was accumulating (``S = 0``: a rise in
progress never widens its own yardstick). The onset estimate is the step at which ``S``
last left 0, the change-point estimate of the CUSUM. Why this test: a CUSUM is the
sequential test with the shortest worst-case delay for a given false-alarm rate (Lorden
1971); the allowance ``kappa`` ignores rises slower than ``kappa`` noise scales a step (a
model that overfits late, a schedule's slow swing); the level condition keeps a run whose
probe barely moves (a tiny MAD) from alarming on a rise nobody would call damage.

False alarms, measured rather than derived: innovations of a smooth training run are
autocorrelated, so the i.i.d. average run length of a CUSUM (about ``exp(2 * kappa * h)``
steps) is no guide. On the 23 clean workloads of ``tests/test_clean_workloads.py`` x 5
seeds (warm restarts, LR ramps, fine-tuning onto a new head, 200 epochs of overfitting, a
loss crossing zero, ...), the largest ``min(S / h, rise / (rho |y_0|))`` with the defaults
was 0.64 (fine-tuning): no alarm, a margin of 1.6 (an allowance of 2 or 3 alarmed on
fine-tuning and on a Gaussian NLL crossing zero; ``h = 20`` on fine-tuning). The bad-data
mechanisms of the natural suite alarm 8 to 20 steps after their onset (``bench --suite
natural``). Measured and not adopted: a second, faster tier (alarm when ``S > 20`` and the
reference is 25% above its best) took the mislabelled shard from 1.17x / 3.31x (final /
peak) to 1.13x / 2.92x at the same clean margin, 1.06x / 2.63x with ``S > 10`` at a margin of
1.3: too little gain for the margin it costs, within the final ratio's seed-to-seed noise.

Honest change: held-out loss also rises when the data deliberately shifts (fine-tuning, a
curriculum) or when a model overfits. Overfitting rises too slowly to pass ``kappa``; a
shift that is the data's own survives the rewinds, and after ``patience`` rewinds to the
same verified state the detector takes the new level as the run's own (it re-bases, says
so at WARNING and counts ``stats["drift_rebased"]``) instead of throwing training away.
"""

from __future__ import annotations

import copy
import functools
import itertools
import logging
import math
from dataclasses import dataclass
from typing import Any, Hashable, Iterable, Iterator

from . import validation
from .innovation import noise_band
from .outcome import Action
from .snapshot import Snapshot, SnapshotRing

__all__ = ["DriftAlarm", "DriftDetector", "Rewind", "cusum", "go_back", "skip_ahead"]


#: the noise scale's floor, a fraction of ``|y_0|``: a probe that did not move for a whole
#: window (a warm-up from LR 0) does not make every later rise infinitely many scales
SCALE_FLOOR = 1e-3


def cusum(score: float, z: float, kappa: float) -> float:
    """One step of Page's one-sided CUSUM: ``max(0, score + z - kappa)``."""
    return max(0.0, score + z - kappa)


@dataclass(frozen=True)
class DriftAlarm:
    """A sustained rise: the step it was seen on, its estimated onset (the first step of
    the rise), the level it rose by (in probe units), the CUSUM statistic, and the batch
    ids of the steps applied since the onset."""

    step: int
    onset: int
    rise: float
    score: float
    batches: tuple = ()


class DriftDetector:
    """The sequential change detector of the module docstring; its state is plain data.

    Args:
        kappa: the allowance, in noise scales per step (default 4).
        h: the alarm level of the CUSUM statistic (default 50).
        rho: the level condition, a fraction of ``|y_0|`` (default 0.05).
        window: accepted innovations kept for the noise scale (default 64).
        warmup: innovations needed before the detector looks (default 32, as the band's).
    """

    def __init__(self, kappa: float = 4.0, h: float = 50.0, rho: float = 0.05,
                 window: int = 64, warmup: int = 32):
        if not all(math.isfinite(v) and v > 0 for v in (kappa, h, rho)) \
                or not 2 <= warmup <= window:
            raise ValueError(f"Invalid kappa={kappa!r} / h={h!r} / rho={rho!r} / window="
                             f"{window!r} / warmup={warmup!r}; need kappa, h, rho > 0 and "
                             "2 <= warmup <= window.")
        self.kappa, self.h, self.rho = float(kappa), float(h), float(rho)
        self.window, self.warmup = window, warmup
        self.score, self.onset, self.best = 0.0, None, math.inf
        self.values: list[float] = []
        self.batches: list = []

    def observe(self, step: int, nu: float, yhat: float, y0: float,
                batch_id: Hashable = None) -> DriftAlarm | None:
        """An accepted measured step: its innovation ``nu``, the reference ``yhat`` after
        it, the first probe value ``y0``. Returns an alarm, or ``None``."""
        if not (math.isfinite(nu) and math.isfinite(yhat)):
            return None
        self.best = min(self.best, yhat)
        if len(self.values) >= self.warmup:
            med, scale = noise_band(self.values)
            if self.score == 0.0:
                self.onset, self.batches = step, []
            floor = max(SCALE_FLOOR * abs(y0), math.ulp(1.0))   # a flat probe: z stays finite
            self.score = cusum(self.score, (nu - med) / max(scale, floor), self.kappa)
            if self.score > 0.0 and batch_id is not None and len(self.batches) < 1024:
                self.batches.append(batch_id)
        if self.score == 0.0:
            self.values = (self.values + [float(nu)])[-self.window:]
            return None
        rise = yhat - self.best
        if self.score > self.h and rise > self.rho * abs(y0):
            return DriftAlarm(step, self.onset, rise, self.score, tuple(self.batches))
        return None

    def rebase(self, yhat: float) -> None:
        """Start over at ``yhat``: no rise accumulating, the noise window kept."""
        self.score, self.onset, self.best, self.batches = 0.0, None, yhat, []

    def state_dict(self) -> dict[str, Any]:
        return {"score": self.score, "onset": self.onset,
                "best": None if math.isinf(self.best) else self.best,
                "values": list(self.values), "batches": list(self.batches)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """This layout, every value checked before anything changes."""
        missing = {"score", "onset", "best", "values"} - set(state)
        if missing:
            raise ValueError(f"drift state lacks {sorted(missing)}; save it with state_dict().")
        score = validation.real("drift state['score']", state["score"], low=0)
        onset = validation.integer("drift state['onset']", state["onset"], low=-2**62, none=True)
        best = (math.inf if state["best"] is None
                else validation.real("drift state['best']", state["best"]))
        if isinstance(state["values"], (str, bytes)) or not isinstance(state["values"], list):
            raise ValueError("drift state['values'] must be a list of floats.")
        values = [validation.real(f"drift state['values'][{i}]", v)
                  for i, v in enumerate(state["values"])]
        batches = state.get("batches", [])
        if not isinstance(batches, list) or not all(validation.plain_id(b) for b in batches):
            raise ValueError("drift state['batches'] must be a list of batch ids (ints, strings "
                             "or tuples of them).")
        self.score, self.onset, self.best = score, onset, best
        self.values, self.batches = values[-self.window:], list(batches)

    def reset(self) -> None:
        """A fresh detector (its settings kept)."""
        self.score, self.onset, self.best, self.values, self.batches = 0.0, None, math.inf, [], []

    def __repr__(self) -> str:
        return (f"DriftDetector(kappa={self.kappa}, h={self.h}, rho={self.rho}, "
                f"window={self.window}, warmup={self.warmup})")


class Rewind:
    """The slow-damage rung: on a drift alarm go back to a verified state from before the
    onset, quarantine what was seen since, skip ahead.

    It keeps ``keep`` verified snapshots in host memory, one copied every ``every``
    measured, accepted steps while no rise is accumulating (each costs one copy of the
    parameters, the optimizer state and the buffers: 12 B/param for fp32 AdamW, in host
    memory, never on the accelerator; ``bench --suite memory`` prices it), each with the
    reference ``yhat``, the threshold's state and the signals' state it was judged by.

    On an alarm it goes back to the newest one captured at least ``margin`` steps before
    the estimated onset (the CUSUM's onset is late by a few steps), with that reference
    and those states (the rise's innovations leave the windows that judge what comes
    next), quarantines the batch ids seen since the onset, and sets
    ``StepEvent.skip_batches`` to ``skip`` x the number of steps since the onset, doubled
    at each further alarm that goes back to the same state (the bad stretch outlasted the
    skip; PaLM skipped 200-500 batches, a few times the stretch it had seen). Measured on
    the natural suite's mislabelled shard (5 seeds, full length), ``skip`` 1 / 4 / 8 ended
    at 1.17 / 1.20 / 1.17x the reference with 2.4 / 1.4 / 1.0 rewinds a run: a larger skip
    spares the second and third rewinds. After ``patience`` such alarms the rise is taken
    as the data's own (see the module docstring). With no snapshot old enough it says so
    at WARNING and carries on (``stats["drift_unrewound"]``). The history is not saved in
    ``state_dict`` (the detector's state is): a resumed run starts it again. A push is a
    host memory copy on the calling thread (18.6 ms for a 10M-parameter AdamW on this
    project's CPU, once every ``every`` steps); on CUDA it copies the pinned safe snapshot
    the same way, not yet off the critical path (capturing it from the device on the side
    stream would need the guard to wait on it before the next proposal).
    """

    name = "rewind"

    def __init__(self, detector: DriftDetector | None = None, keep: int = 2, every: int = 25,
                 margin: int = 5, patience: int = 3, skip: int = 8):
        if min(keep, every, patience, skip) < 1 or margin < 0:
            raise ValueError(f"Invalid keep={keep!r} / every={every!r} / margin={margin!r} / "
                             f"patience={patience!r} / skip={skip!r}; need keep, every, "
                             "patience, skip >= 1 and margin >= 0.")
        self.detector = detector if detector is not None else DriftDetector()
        self.keep, self.every, self.margin, self.patience = keep, every, margin, patience
        self.skip = skip
        self.ring: SnapshotRing | None = None   # host snapshots, made at the first step
        self.repeats, self.target = 0, None   # alarms in a row that went back to ``target``
        self.since = 0              # measured steps since the last push

    def after_accept(self, guard, rec) -> bool:
        """An accepted measured step (``rec``, already verified). ``True``: drift, the safe
        snapshot now holds the state from before the onset; the guard rolls back to it."""
        st = guard.step_state
        if self.ring is None:
            self.ring = SnapshotRing(self.keep, functools.partial(   # picklable, unlike a lambda
                Snapshot, guard.inner, guard.module, "host"))
        alarm = self.detector.observe(rec.t, rec.nu, st.yhat, st.y0, rec.batch_id)
        if alarm is None:
            self.since += 1
            if self.detector.score == 0.0 and self.since >= self.every:
                self._push(guard)   # a state no rise had begun in
            return False
        rec.drift = alarm
        older = self.ring.newest_before(alarm.onset - self.margin + 1)
        self.repeats = self.repeats + 1 if older is not None and older.step == self.target else 0
        self.target = None if older is None else older.step
        if older is None or self.repeats >= self.patience:
            self._carry_on(guard, alarm, older is None)
            return False
        self._rewind(guard, rec, alarm, older)
        return True

    def _push(self, guard) -> None:
        """Copy the verified state into the history, with the band's, the signals' and the
        bad-batch rung's state it was judged by."""
        self.ring.push(guard.safe_snapshot)
        bad = guard.ladder.bad_batch
        judges = {"band": guard.threshold.state_dict(),
                  "signals": [s.state_dict() for s in guard.signals],
                  "bad_batch": None if bad is None else bad.state_dict()}
        list(self.ring)[-1].meta["judges"] = copy.deepcopy(judges)
        self.repeats = self.since = 0

    def _rewind(self, guard, rec, alarm: DriftAlarm, older: Snapshot) -> None:
        """The safe snapshot, the reference ``yhat``, the band and the signals go back to
        ``older``; the batches since the onset are quarantined, the loop told to skip ahead.
        (The judges are copied again on the way in: a second rewind may return to ``older``.)"""
        st = guard.step_state
        for b in alarm.batches:   # later epochs skip them (QuarantineSampler, batch_id)
            st.stats["quarantined"] += guard.ladder.quarantine.add(b)
        go_back(guard, older)
        judges = guard.safe_snapshot.meta.pop("judges", None)
        if judges is not None:   # the rise's innovations leave the band's and signals' windows
            guard.threshold.load_state_dict(copy.deepcopy(judges["band"]))
            for s, state in zip(guard.signals, copy.deepcopy(judges["signals"])):
                s.load_state_dict(state)
            if guard.ladder.bad_batch is not None and judges.get("bad_batch") is not None:
                guard.ladder.bad_batch.load_state_dict(copy.deepcopy(judges["bad_batch"]))
        self.since = 0
        self.detector.rebase(st.yhat)
        rec.event.skip_batches = max(rec.event.skip_batches,
                                     self.skip * (rec.t + 1 - alarm.onset) * 2 ** self.repeats)
        rec.actions.append(Action.REWIND)
        guard._log("rewind", logging.WARNING, "step %d: the probe loss rose by %.3g since step %d, "
                   "every step inside the band (slow damage): rewound to the state verified "
                   "before step %d, %d batch ids quarantined, the loop skips %d batches "
                   "(StepEvent.skip_batches); opt.stats['rewinds'] counts it", rec.t, alarm.rise,
                   alarm.onset, older.step, len(alarm.batches), rec.event.skip_batches)

    def _carry_on(self, guard, alarm: DriftAlarm, nowhere: bool) -> None:
        """An alarm that does not rewind: no state old enough is kept, or the rise outlasted
        ``patience`` rewinds (the data's own level). Said at WARNING; the level is learnt."""
        st = guard.step_state
        st.stats["drift_unrewound" if nowhere else "drift_rebased"] += 1
        self.detector.rebase(st.yhat)
        why = ("no verified state from before it is kept (Rewind(keep=...), or the run is "
               "younger than its first snapshot)" if nowhere else
               f"it persisted through {self.patience} rewinds and skips: taken as a change in "
               "the data (a shift, a new task), not damage")
        guard._log("drift", logging.WARNING, "step %d: the probe loss rose by %.3g since step "
                   "%d (slow damage), but %s; training goes on at the new level",
                   alarm.step, alarm.rise, alarm.onset, why)

    def state_dict(self) -> dict[str, Any]:
        return {"detector": self.detector.state_dict(), "repeats": self.repeats,
                "target": self.target, "since": self.since}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The detector's state; the history is dropped (it belongs to another trajectory).
        Checked first, then committed: a bad state changes nothing."""
        if "detector" not in state:
            raise ValueError("rewind state lacks 'detector'; save it with state_dict().")
        repeats = validation.integer("rewind state['repeats']", state.get("repeats", 0))
        since = validation.integer("rewind state['since']", state.get("since", 0))
        target = validation.integer("rewind state['target']", state.get("target"), low=-1,
                                    none=True)
        self.detector.load_state_dict(state["detector"])   # checks all, then commits
        self.repeats, self.since, self.target, self.ring = repeats, since, target, None

    def reset(self) -> None:
        """Fresh: no rise, no history (a checkpoint from before this rung)."""
        self.detector.reset()
        self.repeats, self.since, self.target, self.ring = 0, 0, None, None

    def __deepcopy__(self, memo: dict) -> "Rewind":
        """A copy of a whole guard (its optimizer already in ``memo``) keeps the history; a
        copy of the ladder alone (a checkpoint load) leaves it: its snapshots hold this
        trajectory's optimizer and model."""
        new = copy.copy(self)
        new.detector = copy.deepcopy(self.detector, memo)
        slots = list(self.ring) if self.ring is not None else []
        whole = bool(slots) and id(slots[0].optimizer) in memo
        new.ring = copy.deepcopy(self.ring, memo) if whole else None
        return new

    def __repr__(self) -> str:
        return (f"Rewind({self.detector!r}, keep={self.keep}, every={self.every}, "
                f"margin={self.margin}, patience={self.patience}, skip={self.skip})")


def go_back(guard, older: Snapshot) -> None:
    """The safe snapshot becomes ``older`` (an entry of a history) with its reference
    ``yhat``; every history forgets the entries after it (they descend from the damage
    being escaped). Shared by the budget's reach-back and the drift rewind."""
    for ring in (guard.snapshot_history, getattr(guard.ladder.rewind, "ring", None)):
        if ring is not None:
            ring.drop_from(older.step + 1)
    guard.safe_snapshot.copy_from(older)
    guard.step_state.yhat = older.meta["yhat"]


def skip_ahead(batches: Iterable, guard) -> Iterator[tuple[int, Any]]:
    """``enumerate(batches)``, dropping the batches a rewind asked to skip (PaLM's recipe):
    after each ``step()`` whose event carries ``skip_batches = n``, the next ``n`` items are
    drawn and dropped (no forward, no backward). The index counts every item drawn, skipped
    ones included, so it is a stable ``batch_id`` for a fixed order. An event is honoured
    once (and one from before the loop began, never), so gradient accumulation (several
    batches per ``step()``) is fine::

        for i, (x, y) in skip_ahead(loader, opt):
            ...
            opt.step(batch_id=i)
    """
    it, honoured, i = iter(batches), guard.last_event, 0   # an earlier loop's event is not ours
    for item in it:
        yield i, item
        i += 1
        event = guard.last_event
        if event is not None and event is not honoured:
            honoured = event
            i += sum(1 for _ in itertools.islice(it, event.skip_batches))
