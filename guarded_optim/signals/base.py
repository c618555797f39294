"""What a signal sees and what it must provide (ARC, sec. 3.1).

A signal measures one step into a 0-d bool tensor on the device (``True``: it fires) and
states which :class:`Verdict` it issues when it fires:

* ``phase = "before"``: measured on the gradients and loss *before* the inner optimizer
  proposes. ``SKIP``: this step must not be applied. ``FAILURE``: the current parameters
  are already damaged (a training-loss spike): roll back.
* ``phase = "after"``: measured on a *proposed* state (weights, optimizer state). It can
  only issue ``FAILURE``: roll back to the last verified state. On a measured step it runs
  right after the proposal, read with the probe value; otherwise it runs at the start of
  the next step on the live state (so the state it checks is exactly the one then captured
  as verified, and damage done between steps is seen too), read with the pre-step flags.

Flags stay on the device: one host transfer per step reads them all. Decisions combine
as ``max``: any FAILURE wins, then SKIP, else HEALTHY.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import dataclass
from typing import Any, Protocol

import torch

__all__ = ["Verdict", "StepMeasurement", "Signal", "PreStepSignal", "Stateless", "host_judge"]


class Verdict(enum.IntEnum):
    """A signal's (or the combined) verdict on a step. Larger is worse."""

    HEALTHY = 0
    SKIP = 1
    FAILURE = 2


@dataclass
class StepMeasurement:
    """What signals read: the step, the gradient norm, the loss, and the optimizer itself."""

    step: int
    grad_norm: torch.Tensor
    loss: torch.Tensor | None = None
    optimizer: torch.optim.Optimizer | None = None
    #: ``grad_norm`` on the host, once the step's flags were read (what ``observe`` reads;
    #: ``None`` before, or outside a guard: a signal then reads ``grad_norm`` itself)
    grad_norm_value: float | None = None
    #: the training loss (mean over its elements and the ranks) on the host, read in the
    #: same transfer; ``None`` without a loss, before the read, or outside a guard
    loss_value: float | None = None
    #: a pre-step signal fired on this gradient and the step was proposed anyway (the
    #: ladder's overrule): its size then explains nothing (see ``OptimizerStateHealth``)
    flagged: bool = False

    _param_norm: torch.Tensor | None = None

    @property
    def params(self) -> list[torch.Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    @property
    def param_norm(self) -> torch.Tensor:
        """Global L2 norm of the parameters, computed once per measurement and shared."""
        if self._param_norm is None:
            from .gradients import global_norm
            self._param_norm = global_norm([p.detach() for p in self.params])
        return self._param_norm

    def loss_mean(self) -> torch.Tensor | None:
        """The training loss as one number on its device (the mean of its elements, in
        ``grad_norm``'s dtype when there are several); ``None`` without a loss. No sync."""
        if self.loss is None or not self.loss.numel():
            return None
        loss = self.loss.detach()
        return loss.to(self.grad_norm.dtype).mean() if loss.numel() > 1 else loss

    def read_values(self) -> None:
        """Fill ``grad_norm_value`` and ``loss_value`` where no guard has read them (a signal
        measured on its own): a sync each on an accelerator."""
        if self.grad_norm_value is None:
            self.grad_norm_value = float(self.grad_norm)
        loss = self.loss_mean() if self.loss_value is None else None
        if loss is not None:
            self.loss_value = float(loss)

    def after_proposal(self) -> "StepMeasurement":
        """The same step, measured again on the proposed parameters."""
        return StepMeasurement(self.step, self.grad_norm, self.loss, self.optimizer,
                               self.grad_norm_value, self.loss_value, self.flagged)


class Signal(Protocol):
    """A check the guard composes; see the module docstring for phases and verdicts."""

    name: str
    phase: str          # "before" or "after"
    verdict: Verdict    # what it issues when it fires
    # optional: ``overrulable = True`` lets a probe overrule a streak of this SKIP signal's
    # firings (a judgement of scale, not of validity; see :class:`~guarded_optim.ladder.Ladder`)

    def measure(self, m: StepMeasurement) -> torch.Tensor:
        """0-d bool tensor, ``True`` when this step must not be applied. No host sync."""
        ...

    def observe(self, m: StepMeasurement, applied: bool, fired: bool) -> None:
        """Update the signal's own state once the decision is known (host side)."""
        ...

    # optional, pre-step signals: ``judge(m) -> bool``, the same test on the host from the
    # values the step's one transfer reads (``m.grad_norm_value``, ``m.loss_value``); the
    # guard calls it instead of ``measure`` once they are read (no device work at all)

    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


PreStepSignal = Signal  # the name used before post-step signals existed


def host_judge(signal: Any):
    """``signal.judge`` if the guard may call it instead of ``measure``: defined, and at
    least as derived as ``measure`` (a subclass that overrides ``measure`` alone is
    measured, not judged by its parent's rule). ``None`` otherwise."""
    return signal.judge if _judged(type(signal)) else None


@functools.lru_cache(maxsize=None)
def _judged(cls: type) -> bool:
    for c in cls.__mro__:
        if "judge" in c.__dict__:
            return True
        if "measure" in c.__dict__:
            return False
    return False


class Stateless:
    """For signals with no state of their own: nothing to observe, save or load."""

    def observe(self, m: StepMeasurement, applied: bool, fired: bool) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
