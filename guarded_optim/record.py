"""One step as it flows through the guard: :class:`StepRecord`, which becomes the
:class:`~guarded_optim.events.StepEvent` when the step is committed.

The step's phases write into it in order: the pre-proposal reading (flags, gradient norm,
GradScaler's overflow), the probe measurement, the reasons to reject, the ladder's actions.
The event the callbacks receive, the ``stats`` the guard counts and the log record are
all read from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .events import StepEvent
from .outcome import Action, Decision, joined
import torch

from .signals import StepMeasurement, Verdict
from .signals.base import host_judge

__all__ = ["Reading", "StepRecord", "fired_names", "pack_reading", "unpack_reading",
           "live_measurement"]


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


def live_measurement(optimizer, step: int) -> StepMeasurement:
    """A measurement of the live state between steps (no gradient, no loss): what the
    post-step signals read when they check it."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    device = params[0].device if params else torch.device("cpu")
    return StepMeasurement(step, torch.zeros((), device=device), None, optimizer)


def pack_reading(m: StepMeasurement, signals: list, overflow: torch.Tensor | None
                 ) -> tuple[list[torch.Tensor], list[Callable | None], int]:
    """The parts of a reading's transfer: the flags of ``signals`` not judged on the host,
    then the gradient norm, the mean loss and ``overflow`` (``k`` is the gradient norm's
    index). Returns ``(parts, judges, k)``; no host sync."""
    device, dtype = m.grad_norm.device, m.grad_norm.dtype   # float64 (float32 on MPS)
    judges = [host_judge(s) for s in signals]   # judged from the values read
    parts = [s.measure(m).to(device, dtype).reshape(1)
             for s, judge in zip(signals, judges) if judge is None]
    k = len(parts)
    loss = m.loss_mean()
    parts.append(m.grad_norm.detach().reshape(1))
    if loss is None and overflow is None:        # made on the device: no upload, no sync
        parts.append(m.grad_norm.new_zeros(2))
    else:
        parts += [(t.reshape(1).to(device, dtype) if t is not None else m.grad_norm.new_zeros(1))
                  for t in (loss, overflow)]
    return parts, judges, k


def unpack_reading(values: list[float], m: StepMeasurement, judges: list[Callable | None],
                   n_pre: int) -> Reading:
    """The :class:`Reading` of a transfer's ``values`` (``m`` learns the gradient norm and
    the loss read; the first ``n_pre`` signals are the pre-step ones)."""
    k = len(values) - 3
    m.grad_norm_value = values[k]
    m.loss_value = values[k + 1] if m.loss is not None and m.loss.numel() else None
    measured = iter(values[:k])
    fired = [judge(m) if judge is not None else bool(next(measured)) for judge in judges]
    return Reading(fired=fired[:n_pre], state_fired=fired[n_pre:], grad_norm=values[k],
                   overflow=bool(values[-1]))


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
    undone: int = 0                  # applied, unverified steps a rollback undid
    drift: Any = None                # a :class:`~guarded_optim.drift.DriftAlarm` seen this step
    bad_batch: Any = None            # the bad-batch rung's ruling (its proposal undone)

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
