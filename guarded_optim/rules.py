"""The checks that run before anything is proposed, in order: small rule objects.

Each rule reads the step's :class:`~guarded_optim.record.StepRecord` and returns a
:class:`Ruling` (the step is decided here: nothing is proposed) or ``None`` (the next
rule asks). The order is policy: the live state's damage first (it would be the base of
any proposal), then a guard that holds after its healing budget was spent, then GradScaler's overflow (its own routine skip; the signals learn
nothing from it), then a quarantined batch, then the pre-step signals (or the ladder's
overrule of them). :data:`PRE_PROPOSAL` lists them; the guard runs them top to bottom.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .outcome import Action, Decision
from .record import StepRecord
from .signals import Verdict

__all__ = ["Ruling", "Held", "AmpOverflow", "QuarantinedBatch", "SignalSkip", "PRE_PROPOSAL", "batch_explains",
           "live_written"]


@dataclass(frozen=True)
class Ruling:
    """A step decided before its proposal: the decision, why, and the ``stats`` it counts
    besides ``skipped``."""

    decision: Decision
    reasons: tuple[str, ...]
    counters: tuple[str, ...] = ()


class Held:
    """The healing budget was spent (:class:`~.ladder.Budget`, ``on_exhausted="hold"``): the
    guard keeps the verified state and skips every step until the script decides
    (``opt.stopped``; ``opt.resume()`` proposes again)."""

    def __call__(self, guard, rec: StepRecord) -> Ruling | None:
        if not guard.step_state.stopped:
            return None
        return Ruling(Decision.SKIP, ("stopped",), ("skipped_stopped",))


class AmpOverflow:
    """GradScaler found inf/NaN in the gradients: skip (``scaler.update()`` backs off)."""

    def __call__(self, guard, rec: StepRecord) -> Ruling | None:
        if not rec.reading.overflow:
            return None
        return Ruling(Decision.SKIP, ("amp_overflow",), ("skipped_amp_overflow",))


class QuarantinedBatch:
    """The batch was quarantined after a persistent rejection (:mod:`.ladder`, rung 4)."""

    def __call__(self, guard, rec: StepRecord) -> Ruling | None:
        if rec.batch_id is None or rec.batch_id not in guard.ladder.quarantine:
            return None
        return Ruling(Decision.SKIP, ("quarantined",), ("skipped_quarantined",))


class SignalSkip:
    """A pre-step signal fired: skip, unless the ladder's overrule lets the probe decide
    (then the step goes on, marked ``flagged``, and the rule records the overrule)."""

    def __call__(self, guard, rec: StepRecord) -> Ruling | None:
        flagged = rec.flagged
        if not flagged:
            return None
        st, overrule = guard.step_state, guard.ladder.overrule
        if overrule is not None and overrule.applies(guard, flagged):
            st.stats["overruled"] += 1
            st.skips_in_row = 0
            rec.overruled = rec.m.flagged = True
            rec.actions.append(Action.OVERRULE)
            return None
        guard._learn(rec.pre, rec.m, False, rec.reading.fired)
        st.skips_in_row += 1
        names = tuple(s.name for s in flagged)
        return Ruling(Decision.SKIP, names, tuple(f"skipped_{n}" for n in names))


#: the pre-proposal rules, in the order the guard asks them
PRE_PROPOSAL = (Held(), AmpOverflow(), QuarantinedBatch(), SignalSkip())


def batch_explains(guard, pre: list, fired: list[bool]) -> bool:
    """Whether a pre-step FAILURE (a training-loss spike) fired on a live state that is
    the verified one, nothing written since: no unverified change to blame, so the
    batch is what differs (fresh data after a memorised shard) and the step goes on as
    an ordinary one. Rolling it back would only skip the batch, and every batch after
    it (the natural suite's ``adam_v_decay``: 20 rollbacks, then a re-base). Counted in
    ``stats["batch_loss_spikes"]``. Checked by the version counters, then value for value
    against the snapshot (a write through ``p.data`` bumps no counter): one pass over
    the parameters, only when such a spike fires."""
    if not any(f and s.verdict is Verdict.FAILURE for s, f in zip(pre, fired)):
        return False
    st = guard.step_state
    if not (st.live_is_safe and guard._uses_snapshots) or live_written(guard):
        return False          # no verified live state, or it was written since
    st.stats["batch_loss_spikes"] += 1
    guard._log("batch", logging.DEBUG, "step %d: training-loss spike on the verified state: "
               "the batch differs, nothing to roll back", st.t)
    return True


def live_written(guard) -> bool:
    """Whether the live state, verified when the last step ended, was written since (the
    write counters, then value for value: a write through ``p.data`` or a bit flip bumps no
    counter). A pass over the parameters, agreed over the ranks: asked only when a
    pre-step signal fires."""
    safe = guard.safe_snapshot
    return (guard.step_state.live_is_safe and guard._uses_snapshots and safe.captured
            and guard._agreed(safe.written_since_capture() or not safe.matches_live_params()))
