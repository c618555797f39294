"""One step as it flows through the guard: :class:`StepRecord`, which becomes the
:class:`~guarded_optim.events.StepEvent` when the step is committed.

The step's phases write into it in order: the pre-proposal reading (flags, gradient norm,
GradScaler's overflow), the probe measurement, the reasons to reject, the ladder's actions.
The event the callbacks receive, the ``stats`` the guard counts and the log record are
all read from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .events import StepEvent
from .outcome import Action, Decision, joined
from .signals import StepMeasurement, Verdict

__all__ = ["Reading", "StepRecord", "fired_names"]


def fired_names(signals: list, fired: list[bool]) -> list[str]:
    """The names of the signals that fired, in order."""
    return [s.name for s, f in zip(signals, fired) if f]


@dataclass
class Reading:
    """One transfer's pre-proposal flags, agreed over the ranks: the pre-step signals'
    and, when the live state is checked, the post-step signals' (``checked``)."""

    fired: list[bool]          # pre-step signals, in order
    state_fired: list[bool]    # post-step signals on the live, unverified state, in order
    grad_norm: float           # mean over the ranks
    overflow: bool             # GradScaler found inf/NaN on some rank


@dataclass
class StepRecord:
    """One ``step()``: what was read, measured and done (see the module docstring)."""

    m: StepMeasurement
    group: Any                       # the process group the step's transfers agree over
    pre: list                        # the pre-step signals
    checked: list                    # post-step signals read on the live state (or [])
    reading: Reading
    event: StepEvent
    batch_id: Any = None
    overruled: bool = False          # rung 1: a probe decides this flagged step
    reasons: list[str] = field(default_factory=list)    # why the proposal is rejected
    actions: list[Action | str] = field(default_factory=list)
    y: float | None = None           # the probe value of the proposal
    nu: float | None = None          # its innovation
    after: StepMeasurement | None = None   # the measurement of the proposal
    post_fired: list[bool] = field(default_factory=list)

    @property
    def t(self) -> int:
        return self.m.step

    @property
    def device(self):
        return self.m.grad_norm.device

    @property
    def damaged(self) -> list[str]:
        """Signals that found the live state damaged: a post-step signal on it, or a
        pre-step FAILURE (a training-loss spike)."""
        return fired_names(self.checked, self.reading.state_fired) + [
            s.name for s, f in zip(self.pre, self.reading.fired)
            if f and s.verdict is Verdict.FAILURE]

    @property
    def flagged(self) -> list:
        """The pre-step signals that fired."""
        return [s for s, f in zip(self.pre, self.reading.fired) if f]

    def close(self, decision: Decision) -> StepEvent:
        """The committed step as its event (strings from here on)."""
        self.event.decision = decision.value
        self.event.reason = ",".join(self.reasons) or None
        self.event.action = joined(self.actions)
        return self.event
