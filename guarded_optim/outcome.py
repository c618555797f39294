"""What one ``step()`` decided and did, as values (paper 001, sec. 5.2; :mod:`.ladder`).

One vocabulary for the whole package: :class:`Decision` is what happened to the step,
:class:`Action` what the escalation ladder did beyond it, :class:`RerunOutcome` what a
re-run in place found. They are strings only at the edge (:class:`~.events.StepEvent`,
CSV, logs), through their ``value``; nothing in the package parses them back.
"""

from __future__ import annotations

import enum
from typing import Iterable

__all__ = ["Decision", "Action", "RerunOutcome", "DECISION_CODES", "joined"]


class Decision(str, enum.Enum):
    """What happened to one call of ``step()``; ``code`` orders them, larger is worse (as a
    signal's :class:`~guarded_optim.signals.Verdict`: HEALTHY 0, SKIP 1, FAILURE 2).

    * ``ACCEPT``   -- the proposal was applied (on an unmeasured step of ``probe_every=k``,
      provisionally: the next verification may still roll it back).
    * ``ROLLBACK`` -- the proposal (or the live state) was rejected, and the verified
      snapshot restored.
    * ``SKIP``     -- nothing was proposed, nothing is restored.
    """

    ACCEPT = "accept"
    ROLLBACK = "rollback"
    SKIP = "skip"

    @property
    def code(self) -> int:
        return _CODES[self]

    def __str__(self) -> str:
        return self.value


_CODES = {Decision.ACCEPT: 0, Decision.SKIP: 1, Decision.ROLLBACK: 2}

#: the decision as an int, by its text (the CSV's ``decision_code``)
DECISION_CODES = {d.value: d.code for d in Decision}


class Action(str, enum.Enum):
    """What the ladder did beyond the decision, in the order it is reported (:mod:`.ladder`)."""

    OVERRULE = "overrule"                   #: rung 1: the probe decided a flagged step
    RERUN_TRANSIENT = "rerun:transient"     #: rung 2: the re-run passed and was applied
    RERUN_PERSISTENT = "rerun:persistent"   #: rung 2: the re-run was rejected too
    QUARANTINE = "quarantine"               #: rung 4: the batch was quarantined
    ESCALATE = "escalate"                   #: rung 5: rolled back to an older verified state
    REBASELINE = "rebaseline"               #: rung 6 (opt-in): the references re-based
    STOP = "stop"                           #: rung 6: the budget is spent, GuardStopped
    BACKOFF = "backoff"                     #: the healing rung lowered the LR scale
    RAISE_EPS = "raise_eps"                 #: the float16 healing rung raised Adam's eps
    ESCAPE = "escape"                       #: the Escape recovery action perturbed the weights
    REWIND = "rewind"                       #: a drift alarm: back to a state before its onset

    def __str__(self) -> str:
        return self.value


class RerunOutcome(enum.Enum):
    """Rung 2's finding: the re-run's proposal passed (the fault was not the batch), or not."""

    TRANSIENT = Action.RERUN_TRANSIENT
    PERSISTENT = Action.RERUN_PERSISTENT

    @property
    def action(self) -> Action:
        return self.value


def joined(actions: Iterable[Action | str]) -> str | None:
    """The event's ``action`` text: the actions in order, comma-separated; ``None`` if none."""
    return ",".join(str(a) for a in actions) or None
