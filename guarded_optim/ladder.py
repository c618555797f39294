"""The escalation ladder: what the guard does when rejections keep coming.

Rungs, in order (each an event, a ``stats`` counter and a log record):

1. **skip** -- a pre-step signal fires: the step is not applied (``stats["skipped"]``).
   **Overrule** (opt-in, ``Ladder(overrule=3)``): with a probe, after ``overrule`` skips in a row by
   signals that judge scale rather than validity (``overrulable``: :class:`GradientSpike`;
   never :class:`NonFinite`), the next flagged step is proposed and the probe decides
   (``stats["overruled"]``, ``action="overrule"``). Accepted, the signals learn it as an
   ordinary step (the gradients moved to a new level; with a closure the training loss
   tells most such moves apart already, see :class:`GradientSpike`, and without one this
   rung is what lets a new level in before the signal's patience runs out); rejected, it
   is rolled back and the streak starts again. The price: an x300 gradient window can be
   let through (see :class:`Ladder`).
2. **re-run in place** (:class:`ReRun`) -- a measured proposal is rejected, the user passed
   a closure, and the proposal is the only unverified step (a probe with ``probe_every=1``,
   or the measured step of ``probe_every=k`` right after a verification): the state goes
   back to the last verified one, and the closure is
   evaluated once more on the same batch, with the RNG streams it drew from the first time
   (Megatron-LM's rerun state machine, inside one ``step()``), and its proposal is measured.
   One that passes is *transient*: what went wrong was not the batch (a hardware fault or
   silent data corruption, whose re-run differs; or state written between steps, such as
   BatchNorm statistics poisoned by a skipped NaN batch, which the verified state does not
   hold). It is applied (``stats["transient"]``). One that is rejected again is
   *persistent*: the batch is bad (``stats["persistent"]``). A re-run that reproduces the
   first bit for bit is proposed too: only the proposal tells the batch from the state it
   started on. The RNG streams then continue from where the first run left them:
   re-running never rewinds the data stream.
3. **roll back** to the last verified state (``stats["rollbacks"]``).
4. **quarantine** (:class:`Quarantine`) -- a persistent rejection (or a bad batch, or a
   drift rewind's stretch) records the batch's identity (``step(closure, batch_id=...)``; without one nothing is recorded) in the
   guard's state; a step whose ``batch_id`` is quarantined is skipped before anything is
   proposed (``stats["skipped_quarantined"]``), and
   :class:`QuarantineSampler` leaves quarantined batches out of later epochs and resumed
   runs without their forward pass (``stats["quarantined"]``). Batch ids must be stable
   across epochs (a fixed batch partition, e.g. ``tuple(indices)`` of a sequential batch
   sampler, or a shard/offset name); shuffled batches rarely recur.
5. **reach back** to an older verified state when ``history`` keeps one
   (``stats["escalations"]``); opt-in recovery actions act here too (``ReduceLR``,
   :class:`ResetMoments`).
**bad batch** (:class:`~guarded_optim.badbatch.BadBatch`, with a probe and the step's loss) -- a
   measured one-step proposal the band accepted, on a batch whose training loss spiked, that
   did not lower the probe beyond its noise: undone and skipped, the batch quarantined, the
   loop told to skip ahead (:mod:`.badbatch`).
**rewind** (:class:`~guarded_optim.drift.Rewind`, with a probe) -- a slow rise of accepted
   probe measurements that no single step showed: back to a verified state from before its
   onset, its batches quarantined, the loop told to skip ahead (:mod:`.drift`).
6. **stop** -- after ``max_consecutive_rejections`` *probe* rejections in a row with nowhere
   older to go, ``step()`` raises :class:`GuardStopped` (the state is the last verified one;
   the message says what happened and how to resume), unless the ladder was built with
   ``on_exhausted="rebaseline"``: then the reference is re-based on the new level
   (``stats["rebaselines"]``), the 0.1.0 behaviour. Rejections by the step's own signals
   alone (no probe measurement: a training-loss spike, a weight-norm jump) re-base those
   signals instead of stopping: without a probe nothing but the signals' own heuristics
   tells damage from a change of the data, and halting on them measured worse than bare
   (0.1.0 on the natural suite: Adam's second-moment decay 5.5x against bare's 1.07x, a
   mislabelled shard 1.90x against 1.84x). A training-loss spike on the verified state
   itself is not even a rejection: the batch is what differs (``batch_loss_spikes``).
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Hashable, Iterator

import torch

from . import rng
from .badbatch import BadBatch
from .drift import Rewind, go_back
from .validation import plain_id as _plain_id
from .outcome import Action, RerunOutcome
from .policy import ResetMoments
from .signals.probe import ProbeError
from .signals.weights import NonFiniteWeights

__all__ = ["GuardStopped", "ReRun", "Overrule", "Quarantine", "QuarantineSampler", "ReachBack",
           "BackOff", "RaiseEps", "Budget", "ResetMoments", "Rewind", "Ladder"]

_EXHAUSTED = ("hold", "raise", "rebaseline")


class GuardStopped(RuntimeError):
    """The escalation budget is spent: the guard will not accept what it kept rejecting."""


class ReRun:
    """Rung 2: tell a transient rejection from a persistent one by evaluating the closure
    once more on the same batch from the verified state, and measuring its proposal (see
    the module docstring)."""

    name = "rerun"

    @staticmethod
    def applies(guard, rec, rng_before: dict | None) -> bool:
        """A measured proposal was rejected, the closure can be re-run with the draws it
        made (``rng_before``), and the rejected proposal is the only unverified step."""
        return bool(rec.reasons) and rng_before is not None and guard.step_state.unverified == 1

    def run(self, guard, rec, closure: Callable, rng_before: dict) -> RerunOutcome:
        """Restore, re-run the closure on the same batch and draws, measure its proposal
        (``rec`` then holds the re-run's measurement). TRANSIENT: it passed and is live;
        PERSISTENT: it was rejected and the verified state is live (the batch is
        quarantined when it has a ``batch_id``)."""
        stats = guard.step_state.stats
        stats["reruns"] += 1
        guard._restore()
        rng_after = rng.capture()
        rng.restore(rng_before)
        try:
            with torch.enable_grad():
                loss = closure()
        finally:
            rng.restore(rng_after)   # the data stream goes on from the first run
        first = rec.y, rec.reasons
        guard._propose(rec, loss, closure)
        guard._measure_proposal(rec)
        outcome = RerunOutcome.PERSISTENT if rec.reasons else RerunOutcome.TRANSIENT
        stats[outcome.name.lower()] += 1
        rec.actions = [outcome.action]   # reported in place of what came before (an overrule)
        if outcome is RerunOutcome.PERSISTENT:
            rec.y, rec.reasons = first   # the rejection the ladder goes on with is the first
            guard._restore()
            if rec.batch_id is not None:
                if guard.ladder.quarantine.add(rec.batch_id):
                    stats["quarantined"] += 1
                rec.actions.append(Action.QUARANTINE)
        return outcome

    def __repr__(self) -> str:
        return "ReRun()"


class Overrule:
    """Rung 1, opt-in: after ``after`` skips in a row, a probe decides the next flagged step
    (see the module docstring and :class:`Ladder`)."""

    name = "overrule"

    def __init__(self, after: int):
        if isinstance(after, bool) or not isinstance(after, int) or after < 1:
            raise ValueError(f"Invalid overrule: {after!r}; use an int >= 1, or None.")
        self.after = after

    def applies(self, guard, fired_signals: list) -> bool:
        """A probe measures the flagged step, the skip streak is long enough, and every
        signal that fired judges scale (``overrulable``), not validity."""
        st = guard.step_state
        return (guard.probe is not None and guard._cadence.measures(st.unverified + 1)
                and st.skips_in_row >= self.after
                and all(getattr(s, "overrulable", False) for s in fired_signals))

    def __repr__(self) -> str:
        return f"Overrule(after={self.after})"


class ReachBack:
    """Rung 5's settings: keep ``history`` older verified snapshots, one pushed every
    ``checkpoint_every`` verifications (or when a recovery action asks for one), saved in
    ``state_dict`` only with ``save_history=True``."""

    name = "reach_back"

    def __init__(self, history: int = 0, checkpoint_every: int = 50, save_history: bool = False):
        self.history, self.checkpoint_every = history, checkpoint_every
        self.save_history = save_history

    def __repr__(self) -> str:
        return (f"ReachBack(history={self.history}, checkpoint_every={self.checkpoint_every}, "
                f"save_history={self.save_history})")


class BackOff:
    """The healing rung: change what is proposed instead of proposing the same thing again.

    As GradScaler backs off its scale on an overflow and grows it back after clean steps:
    after ``after`` rejections in a row (the cause is not one batch), every later proposal
    is made at ``scale`` x the learning rate, the scale multiplied by ``factor`` at each
    further rejection (down to ``min_scale``). Every ``growth_interval`` healthy applied
    steps in a row it looks at the probe's reference ``yhat``: lower than when the scale
    last changed, training makes progress at this scale and it grows back by ``1 / factor``
    (up to 1); higher, the reduced step still does damage slowly (a run past its edge of
    stability) and it backs off once more. Without a probe it grows back. A growth is on
    trial until the next change (the last one, back to 1, for one interval): the first
    healthy step whose ``yhat`` is above its value at the growth undoes it at once (back to
    the scale and the reference from before it; the interval stays, the try cost a step or
    two). A growth the probe had to reject doubles the interval before the next try (up to
    1000 steps): a cause that persists is not probed every 10 steps. Measured on the natural suite's ``edge_of_stability``
    (``--quick``, 5 seeds, final probe loss / the reference's): 1.36x with the trial
    (per seed 1.48, 0.91, 0.93, 1.49, 2.00), 1.99x without it (3.01, 1.20, 1.91, 1.69,
    2.14; the grown scale's slow damage was let run to the interval's end, peak 3.1x, now
    2.2x); a ceiling at the failed scale on top of the trial measured no better (1.35x).
    Seed 4's 2.0x is damage accepted in the first 10 steps, before the probe's band has
    narrowed, not the back-off. ``adam_v_decay`` 1.37x, was 1.65x. The
    scale is the guard's own multiplier around ``inner.step()`` (the groups' ``lr`` that
    schedulers write is never changed), reported as ``StepEvent.lr_scale`` and counted in
    ``stats["backoffs"]``.
    """

    name = "backoff"

    def __init__(self, factor: float = 0.5, after: int = 2, growth_interval: int = 10,
                 min_scale: float = 2.0 ** -10):
        if not (0 < factor < 1 and 0 < min_scale <= 1) or after < 1 or growth_interval < 1:
            raise ValueError(f"Invalid factor={factor!r} / after={after!r} / growth_interval="
                             f"{growth_interval!r} / min_scale={min_scale!r}; need 0 < factor < 1, "
                             "0 < min_scale <= 1, after >= 1, growth_interval >= 1.")
        self.factor, self.after, self.growth_interval = factor, after, growth_interval
        self.min_scale = min_scale
        self.scale, self.healthy = 1.0, 0
        self.reference: float | None = None   # yhat when the scale last changed
        self.interval, self.grown = growth_interval, False   # the next try's wait; last: growth
        self.previous: float | None = None   # the reference before the last growth

    def on_rejection(self, in_row: int, yhat: float | None) -> bool:
        """The ``in_row``-th rejection in a row; ``True`` if the scale backed off."""
        self.healthy = 0
        if in_row < self.after:
            return False
        return self._back_off(yhat)

    def on_healthy(self, yhat: float | None) -> bool:
        """A healthy applied step; ``True`` if the scale backed off (no progress at it, or a
        growth on trial made ``yhat`` worse)."""
        if self.scale >= 1.0 and not self.grown:   # nothing to heal (every clean step)
            return False
        self.healthy += 1
        worse = yhat is not None and self.reference is not None and yhat > self.reference
        if worse and self.grown:   # the growth on trial made the loss worse: undo it
            return self._undo_growth()
        if self.healthy < self.interval:
            return False
        self.healthy = 0
        if self.scale >= 1.0:   # the growth back to 1 held for a whole interval: healed
            self.grown = False
            return False
        if worse:
            return self._back_off(yhat)
        self.previous, self.grown = self.reference, True
        self.scale, self.reference = min(1.0, self.scale / self.factor), yhat
        return False

    def _undo_growth(self) -> bool:
        """Back to the scale and reference from before the growth, at once; the interval
        stays (the try cost a step or two, not the slow damage that doubles it)."""
        self.healthy, self.grown = 0, False
        self.scale, self.reference = self.scale * self.factor, self.previous
        return True

    def _back_off(self, yhat: float | None) -> bool:
        self.healthy = 0
        if self.grown:   # the probe rejected the grown scale: wait longer before the next try
            self.interval, self.grown = min(2 * self.interval, 1000), False
        if self.scale <= self.min_scale:
            return False
        self.scale, self.reference = max(self.scale * self.factor, self.min_scale), yhat
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "healthy": self.healthy, "reference": self.reference,
                "interval": self.interval, "grown": self.grown, "previous": self.previous}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        scale, healthy = float(state["scale"]), int(state["healthy"])
        reference, previous = state.get("reference"), state.get("previous")
        if not (math.isfinite(scale) and 0 < scale <= 1) or healthy < 0 or any(
                r is not None and not math.isfinite(float(r)) for r in (reference, previous)):
            raise ValueError(f"backoff state {state} is out of range.")
        self.scale, self.healthy = scale, healthy
        self.reference = None if reference is None else float(reference)
        self.interval = max(1, int(state.get("interval", self.growth_interval)))
        self.grown = bool(state.get("grown", False))
        # (absent before the trial: a growth in flight is undone to its own reference)
        self.previous = self.reference if previous is None else float(previous)

    def __repr__(self) -> str:
        return (f"BackOff(factor={self.factor}, after={self.after}, "
                f"growth_interval={self.growth_interval}, min_scale={self.min_scale})")


class RaiseEps:
    """The healing rung for float16 parameters: Adam's ``eps`` (1e-8) is 0 in float16, so
    where a second moment underflows every update is ``m / 0``, non-finite whatever the LR.
    After ``after`` rejections in a row that found non-finite weights, every param group
    that holds float16 parameters and an ``eps`` float16 cannot hold gets ``eps`` (default
    1e-4, the usual float16 choice); counted in ``stats["eps_raised"]``. It writes the
    group's ``eps`` (schedulers do not), so it stays in the optimizer's ``state_dict``."""

    name = "raise_eps"

    def __init__(self, after: int = 2, eps: float = 1e-4):
        if after < 1 or not (math.isfinite(eps) and eps >= torch.finfo(torch.float16).tiny):
            raise ValueError(f"Invalid after={after!r} / eps={eps!r}; need after >= 1 and an eps "
                             f"float16 holds (>= {torch.finfo(torch.float16).tiny:.3g}).")
        self.after, self.eps = after, eps

    def on_rejection(self, guard, reasons: list[str], in_row: int) -> bool:
        """``True`` if some group's ``eps`` was raised."""
        if in_row < self.after or NonFiniteWeights.name not in reasons:
            return False
        tiny, raised = torch.finfo(torch.float16).tiny, False
        for g in guard.param_groups:
            eps = g.get("eps")
            if isinstance(eps, float) and eps < tiny and any(p.dtype == torch.float16
                                                             for p in g["params"]):
                g["eps"], raised = self.eps, True
        return raised

    def __repr__(self) -> str:
        return f"RaiseEps(after={self.after}, eps={self.eps})"


class Budget:
    """Rungs 3, 5 and 6: roll back; after ``limit`` rejections in a row reach back to an
    older verified snapshot (if the history keeps one), else stop: ``on_exhausted="hold"``
    (the default: the guard keeps the verified state, says so at WARNING, sets
    ``opt.stopped`` and skips every later step until the script decides),
    ``"raise"`` (:class:`GuardStopped` from ``step()``), or ``"rebaseline"`` (re-base the
    references). A stop needs a probe rejection; without one the signals are re-based.
    ``limit=None`` never escalates."""

    name = "budget"

    def __init__(self, limit: int | None = 20, on_exhausted: str = "hold"):
        if on_exhausted not in _EXHAUSTED:
            raise ValueError(f"Invalid on_exhausted: {on_exhausted!r}; choose one of {_EXHAUSTED}.")
        self.limit, self.on_exhausted = limit, on_exhausted

    def on_rejection(self, guard, rec) -> Action | None:
        """Restore the verified state, escalating when rejections keep coming; returns what
        was done beyond the rollback. ``rec.y``: the rejected probe value (``None``: no probe
        measured the rejection). A drift rewind is its own reach-back: restored and counted
        (``stats["rewinds"]``), not charged to the budget."""
        st, y = guard.step_state, rec.y
        if Action.REWIND in rec.actions:
            st.stats["rewinds"] += 1
            guard._restore()
            return None
        st.consecutive += 1
        if self.limit is None or st.consecutive < self.limit:
            guard._restore()
            return None
        st.consecutive = 0
        older = guard._ring.newest_before(guard._safe.step)
        if older is not None:      # reach back past damage accepted earlier
            go_back(guard, older)
            st.stats["escalations"] += 1
            guard._restore()
            return Action.ESCALATE
        guard._restore()
        if self.on_exhausted != "rebaseline" and y is not None:
            st.stats["stops"] += 1   # the probe kept rejecting: stop, accept nothing
            st.stopped = self.on_exhausted == "hold"   # "raise": the script catches and decides
            return Action.STOP
        self._rebaseline(guard, y)
        st.stats["rebaselines"] += 1
        return Action.REBASELINE

    @staticmethod
    def _rebaseline(guard, y: float | None) -> None:
        """Nowhere older to go: the signals (no probe) or ``yhat`` learn the new level."""
        if y is None:
            for sig in guard.signals:
                getattr(sig, "rebase", lambda: None)()
            return
        if not math.isfinite(y):
            y = guard._measure_probe()
            if not math.isfinite(y):
                raise ProbeError(
                    f"probe returned {y} even at the last accepted state, where it was "
                    "finite before: the probe itself is broken (state was rolled back).")
        guard.step_state.yhat = y

    def __repr__(self) -> str:
        return f"Budget(limit={self.limit}, on_exhausted={self.on_exhausted!r})"


class Quarantine:
    """Rung 4: the identities of batches whose rejection was persistent (plain data, saved
    in the guard's ``state_dict``). ``batch_id in quarantine`` asks."""

    name = "quarantine"

    def __init__(self) -> None:
        self.ids: list[Hashable] = []
        self._set: set = set()

    def add(self, batch_id: Hashable) -> bool:
        """Record ``batch_id``; ``False`` if it was already quarantined."""
        if isinstance(batch_id, list):
            batch_id = tuple(batch_id)
        if not _plain_id(batch_id):
            raise TypeError(f"batch_id must be an int, a str or a tuple of them (so checkpoints "
                            f"can hold it), got {type(batch_id).__name__}.")
        if batch_id in self._set:
            return False
        self.ids.append(batch_id)
        self._set.add(batch_id)
        return True

    def __contains__(self, batch_id: Hashable) -> bool:
        return batch_id in self._set

    def __len__(self) -> int:
        return len(self.ids)

    def state_dict(self) -> dict[str, Any]:
        return {"ids": list(self.ids)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ids = state["ids"]
        if not isinstance(ids, list) or not all(_plain_id(i) for i in ids):
            raise ValueError("the quarantine's 'ids' must be a list of ints, strings or tuples "
                             "of them.")
        self.ids, self._set = list(ids), set(ids)

    def __repr__(self) -> str:
        return f"Quarantine({len(self.ids)} batches)"


class QuarantineSampler(torch.utils.data.Sampler):
    """Wrap a sampler or batch sampler: yield only what the guard has not quarantined.

    ``key(item)`` is the batch identity the loop passes as ``step(closure, batch_id=...)``
    (default: the item itself for a sampler of ints; ``tuple(batch)`` for a batch sampler
    is a good key). The guard's quarantine is read at every ``__iter__``, so batches
    quarantined during an epoch are skipped from the next epoch on, and after a resume.
    """

    def __init__(self, sampler, guard, key=None):
        self.sampler, self.guard = sampler, guard
        self.key = key if key is not None else (lambda item: item)

    def __iter__(self) -> Iterator:
        quarantine = self.guard.ladder.quarantine
        for item in self.sampler:
            if quarantine is None or self.key(item) not in quarantine:
                yield item

    def __len__(self) -> int:
        return len(self.sampler)


class Ladder:
    """The rungs the guard climbs (see the module docstring), each an object it owns with
    its settings; each part is optional.

    Args:
        rerun: a :class:`ReRun` (default), or ``None`` to roll back without re-running.
        quarantine: the :class:`Quarantine` to fill (default: a new one).
        on_exhausted: ``"hold"`` (default: keep the verified state, skip later steps,
            ``opt.stopped``), ``"raise"`` (:class:`GuardStopped`) or ``"rebaseline"``.
        backoff: the healing rung, a :class:`BackOff` (default), or ``None``.
        raise_eps: the float16 healing rung, a :class:`RaiseEps` (default), or ``None``.
        bad_batch: the bad-batch rung, a :class:`~guarded_optim.badbatch.BadBatch` (default,
            with a probe and the step's loss: a closure or ``step(loss=...)``), or ``None``.
        rewind: the slow-damage rung, a :class:`~guarded_optim.drift.Rewind` (default,
            with a probe: a drift alarm goes back to a verified state from before the
            rise's onset, quarantines and skips ahead), or ``None``.
        overrule: skips in a row after which a probe decides the next flagged step
            (opt-in, e.g. 3; default ``None``: never, the signal skips until its own
            patience re-bases). Off by default: on the digits CNN the probe accepted the
            4th step of a x300 gradient window (Adam's normalised update looks harmless to
            a probe while it poisons the second moment), the signal learnt the x300 level
            and the run ended 1.23x clean instead of 1.05x.

    The guard's own arguments ``max_consecutive_rejections``, ``history``,
    ``checkpoint_every`` and ``save_history`` set the :class:`Budget` and
    :class:`ReachBack` rungs (:meth:`configure`).
    """

    def __init__(self, rerun: ReRun | None = ReRun(), quarantine: Quarantine | None = None,
                 on_exhausted: str = "hold", overrule: int | None = None,
                 backoff: BackOff | None = BackOff(), raise_eps: RaiseEps | None = RaiseEps(),
                 rewind: Rewind | None = Rewind(), bad_batch: BadBatch | None = BadBatch()):
        self.overrule = Overrule(overrule) if overrule is not None else None
        if rerun is not None and not isinstance(rerun, ReRun):
            raise TypeError(f"rerun must be a ReRun() or None, got {rerun!r}.")
        self.rerun = ReRun() if rerun is not None else None
        self.quarantine = quarantine if quarantine is not None else Quarantine()
        self.budget = Budget(20, on_exhausted)
        self.reach_back = ReachBack()
        if backoff is not None and not isinstance(backoff, BackOff):
            raise TypeError(f"backoff must be a BackOff() or None, got {backoff!r}.")
        self.backoff = copy.deepcopy(backoff)   # the default instance is shared: own a copy
        if raise_eps is not None and not isinstance(raise_eps, RaiseEps):
            raise TypeError(f"raise_eps must be a RaiseEps() or None, got {raise_eps!r}.")
        self.raise_eps = raise_eps
        if rewind is not None and not isinstance(rewind, Rewind):
            raise TypeError(f"rewind must be a Rewind() or None, got {rewind!r}.")
        self.rewind = copy.deepcopy(rewind)
        if bad_batch is not None and not isinstance(bad_batch, BadBatch):
            raise TypeError(f"bad_batch must be a BadBatch() or None, got {bad_batch!r}.")
        self.bad_batch = copy.deepcopy(bad_batch)

    def heal(self, guard, reasons: list[str]) -> list[Action]:
        """The healing rungs after a rollback: what they changed in what is proposed next.
        They count rejections in a row from the same verified state (without a probe the
        provisional accepts between two verifications do not end the row)."""
        st, done = guard.step_state, []
        in_row = max(st.in_row, st.consecutive)
        if self.backoff is not None and self.backoff.on_rejection(in_row, st.yhat):
            st.stats["backoffs"] += 1   # later proposals at a lower LR
            done.append(Action.BACKOFF)
        if self.raise_eps is not None and self.raise_eps.on_rejection(guard, reasons, in_row):
            st.stats["eps_raised"] += 1
            done.append(Action.RAISE_EPS)
        return done

    def judge_batch(self, guard, rec):
        """The bad-batch rung on a measured proposal the band accepted (``rec``): a
        :class:`~guarded_optim.rules.Ruling` when the batch is bad (its proposal undone)."""
        if self.bad_batch is None or rec.reasons:
            return None
        return self.bad_batch.judge(guard, rec)

    def lr_scale(self) -> float:
        """The healing rung's LR multiplier (1.0 without one)."""
        return self.backoff.scale if self.backoff is not None else 1.0

    @property
    def on_exhausted(self) -> str:
        return self.budget.on_exhausted

    def configure(self, max_consecutive_rejections: int | None, history: int,
                  checkpoint_every: int, save_history: bool) -> "Ladder":
        """Set the budget and reach-back rungs from the guard's arguments; returns ``self``."""
        self.budget.limit = max_consecutive_rejections
        self.reach_back = ReachBack(history, checkpoint_every, save_history)
        return self

    def state_dict(self) -> dict[str, Any]:
        sd: dict[str, Any] = {"quarantine": self.quarantine.state_dict()}
        if self.backoff is not None:
            sd["backoff"] = self.backoff.state_dict()
        if self.rewind is not None:
            sd["rewind"] = self.rewind.state_dict()
        if self.bad_batch is not None:
            sd["bad_batch"] = self.bad_batch.state_dict()
        return sd

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.quarantine.load_state_dict(state["quarantine"])
        if self.backoff is not None:   # absent before the healing rung: start at 1
            self.backoff.load_state_dict(state.get("backoff", {"scale": 1.0, "healthy": 0,
                                                               "reference": None}))
        if self.rewind is not None and "rewind" in state:
            self.rewind.load_state_dict(state["rewind"])
        elif self.rewind is not None:   # a checkpoint from before the drift rung: afresh
            self.rewind.reset()
        if self.bad_batch is not None and "bad_batch" in state:
            self.bad_batch.load_state_dict(state["bad_batch"])
        elif self.bad_batch is not None:   # a checkpoint from before the bad-batch rung
            self.bad_batch.reset()

    def __repr__(self) -> str:
        return (f"Ladder(rerun={self.rerun!r}, quarantine={self.quarantine!r}, "
                f"on_exhausted={self.on_exhausted!r}, overrule={self.overrule!r}, "
                f"backoff={self.backoff!r}, rewind={self.rewind!r}, bad_batch={self.bad_batch!r}, "
                f"budget={self.budget!r}, "
                f"reach_back={self.reach_back!r})")
