"""What a signal sees and what it must provide.

A *pre-step* signal measures the step before the inner optimizer proposes anything: it
returns a 0-d bool tensor on the gradients' device (``True``: SKIP this step, do not apply
it). Flags stay on the device; the guard reads all of them together with one host transfer
per step, as ``GradScaler`` reads ``found_inf``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

__all__ = ["StepMeasurement", "PreStepSignal"]


@dataclass
class StepMeasurement:
    """The step as measured before proposing: training loss (if known) and gradient norm."""

    step: int
    grad_norm: torch.Tensor
    loss: torch.Tensor | None = None


class PreStepSignal(Protocol):
    """A check run on the gradients before ``inner.step()``; it can only SKIP a step."""

    name: str

    def measure(self, m: StepMeasurement) -> torch.Tensor:
        """0-d bool tensor, ``True`` when this step must not be applied. No host sync."""
        ...

    def observe(self, m: StepMeasurement, applied: bool, fired: bool) -> None:
        """Update the signal's own state once the decision is known (host side)."""
        ...

    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...
