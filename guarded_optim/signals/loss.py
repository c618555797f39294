"""Loss-side signals: non-finite loss or gradients (SKIP), training-loss spikes (FAILURE)."""

from __future__ import annotations

import math
from typing import Any

import torch

from .base import Stateless, StepMeasurement, Verdict

__all__ = ["NonFinite", "LossSpike"]


class NonFinite(Stateless):
    """SKIP when the training loss or any gradient is NaN or Inf.

    Any non-finite gradient element makes the global norm non-finite (and so does a norm
    that overflows), so one reduction covers every layer. Stateless.
    """

    name = "nonfinite"
    phase, verdict = "before", Verdict.SKIP

    def measure(self, m: StepMeasurement) -> torch.Tensor:
        bad = ~torch.isfinite(m.grad_norm)
        if isinstance(m.loss, torch.Tensor):
            bad = bad | ~torch.isfinite(m.loss.detach()).all().to(bad.device)
        return bad

    def __repr__(self) -> str:
        return "NonFinite()"


class LossSpike:
    """FAILURE when the training loss jumps far above its recent trajectory.

    The training loss of step ``t`` is measured at the current parameters before anything
    is proposed, so a spike means the state is *already* damaged (by an earlier accepted
    step, or between steps): the verdict is FAILURE, roll back. It fires when the loss
    exceeds ``factor`` x the largest finite loss of the last ``window`` applied steps
    (non-finite values never enter the window).

    Why the window maximum and not the median: near convergence the loss sits at its noise
    floor, where the median is tiny. On 20 clean seeded runs of a small regression model the
    loss reached 7.7x its running median, but never more than 1.53x the window maximum (the
    bundled CNN, MLP and transformer stay below 1.71x their median). Damage moves the loss by
    orders of magnitude.
    """

    name = "loss_spike"
    phase, verdict = "before", Verdict.FAILURE

    def __init__(self, factor: float = 3.0, window: int = 50, warmup: int = 20):
        if not (math.isfinite(factor) and factor > 1):
            raise ValueError(f"Invalid factor: {factor!r}; it must be a finite number > 1.")
        if window < 1 or warmup < 1:
            raise ValueError(f"Invalid window={window!r} / warmup={warmup!r}; both must be >= 1.")
        self.factor, self.window, self.warmup = factor, window, warmup
        self.buffer: torch.Tensor | None = None
        self.count = 0
        self._loss: torch.Tensor | None = None

    def measure(self, m: StepMeasurement) -> torch.Tensor:
        device = m.grad_norm.device
        if m.loss is None:
            self._loss = None
            return torch.zeros((), dtype=torch.bool, device=device)
        loss = self._loss = m.loss.detach().float().mean().to(device)
        if self.buffer is None or self.buffer.device != device:
            self.buffer = torch.zeros(self.window, device=device)
        if self.count < self.warmup:
            return torch.zeros((), dtype=torch.bool, device=device)
        peak = self.buffer[: min(self.count, self.window)].max()
        return torch.isfinite(loss) & (loss > self.factor * peak.abs())

    def observe(self, m: StepMeasurement, applied: bool, fired: bool) -> None:
        if applied and not fired and self._loss is not None:
            self.buffer[self.count % self.window] = torch.nan_to_num(
                self._loss, nan=0.0, posinf=0.0, neginf=0.0)
            self.count += 1

    def rebase(self) -> None:
        self.count = 0

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        buf = state["buffer"]
        self.buffer = None if buf is None else buf.detach().clone()
        self.count = int(state["count"])

    def __repr__(self) -> str:
        return f"LossSpike(factor={self.factor}, window={self.window}, warmup={self.warmup})"
