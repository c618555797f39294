"""Loss-side signals: a non-finite training loss or gradient is never applied."""

from __future__ import annotations

from typing import Any

import torch

from .base import StepMeasurement, Verdict

__all__ = ["NonFinite"]


class NonFinite:
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

    def observe(self, m: StepMeasurement, applied: bool, fired: bool) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        return "NonFinite()"
