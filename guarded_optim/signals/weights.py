"""Post-step signals on the proposed state: weights and optimizer state (ARC, sec. 3.1).

Each measures into device tensors (no host sync) and issues FAILURE when it fires: the
proposal is damage, roll back to the last verified state. References are updated only
from steps that were applied and did not fire, so a damaging step never becomes the norm.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .base import StepMeasurement, Verdict
from .gradients import global_norm

__all__ = ["NonFiniteWeights", "WeightNorm", "OptimizerStateHealth"]


def _false(device) -> torch.Tensor:
    return torch.zeros((), dtype=torch.bool, device=device)


class NonFiniteWeights:
    """FAILURE when any parameter holds NaN or Inf after the proposal. Stateless."""

    name = "nonfinite_weights"
    phase, verdict = "after", Verdict.FAILURE

    def measure(self, m: StepMeasurement) -> torch.Tensor:
        return ~torch.isfinite(m.param_norm)

    def observe(self, m, applied, fired) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def __repr__(self) -> str:
        return "NonFiniteWeights()"


class WeightNorm:
    """FAILURE when the global weight norm explodes or collapses.

    Fires when the norm leaves ``[low, high] x`` its initial value (the first healthy
    measurement), or when it changes by more than a factor ``max_step_ratio`` from the last
    healthy step (norm growth rate). Clean AdamW training moves it by far less than 1% per
    step; weights scaled x1e4 or zeroed move it by orders of magnitude.
    """

    name = "weight_norm"
    phase, verdict = "after", Verdict.FAILURE

    def __init__(self, low: float = 0.01, high: float = 100.0, max_step_ratio: float = 2.0):
        if not (0 <= low < 1 < high) or not max_step_ratio > 1:
            raise ValueError(f"Invalid bounds low={low!r}, high={high!r}, "
                             f"max_step_ratio={max_step_ratio!r}; need 0 <= low < 1 < high and "
                             "max_step_ratio > 1.")
        self.low, self.high, self.max_step_ratio = low, high, max_step_ratio
        self.initial: torch.Tensor | None = None
        self.last: torch.Tensor | None = None
        self._norm: torch.Tensor | None = None

    def measure(self, m: StepMeasurement) -> torch.Tensor:
        norm = self._norm = m.param_norm.float()
        if self.initial is None:
            return _false(norm.device)
        ratio = norm / self.initial.clamp_min(1e-30)
        step = norm / self.last.clamp_min(1e-30)
        bad = (ratio < self.low) | (ratio > self.high)
        bad = bad | (step > self.max_step_ratio) | (step < 1.0 / self.max_step_ratio)
        return torch.isfinite(norm) & bad

    def observe(self, m, applied, fired) -> None:
        if applied and not fired and self._norm is not None:
            if self.initial is None:
                self.initial = self._norm.clone()
            self.last = self._norm

    def rebase(self) -> None:
        """Forget the references: the next healthy measurement defines them anew."""
        self.initial = self.last = None

    def state_dict(self) -> dict[str, Any]:
        return {"initial": self.initial, "last": self.last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.initial, self.last = state["initial"], state["last"]

    def __repr__(self) -> str:
        return f"WeightNorm(low={self.low}, high={self.high}, max_step_ratio={self.max_step_ratio})"


class OptimizerStateHealth:
    """FAILURE when optimizer state is non-finite or its norm jumps by ``factor`` in one step.

    Covers every floating-point state tensor with at least one dimension (Adam's
    ``exp_avg``/``exp_avg_sq``, SGD's momentum). Moments grow from zero over the first
    steps, so the jump test starts after ``warmup`` healthy steps.
    """

    name = "optimizer_state"
    phase, verdict = "after", Verdict.FAILURE

    def __init__(self, factor: float = 100.0, warmup: int = 10):
        if not (math.isfinite(factor) and factor > 1) or warmup < 1:
            raise ValueError(f"Invalid factor={factor!r} / warmup={warmup!r}; need factor > 1 "
                             "and warmup >= 1.")
        self.factor, self.warmup = factor, warmup
        self.last: torch.Tensor | None = None
        self.count = 0
        self._norm: torch.Tensor | None = None

    @staticmethod
    def _state_tensors(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
        return [v for st in opt.state.values() for v in st.values()
                if isinstance(v, torch.Tensor) and v.dim() > 0 and v.is_floating_point()]

    def measure(self, m: StepMeasurement) -> torch.Tensor:
        tensors = self._state_tensors(m.optimizer)
        if not tensors:
            self._norm = None
            return _false(m.grad_norm.device)
        norm = self._norm = global_norm(tensors).float()
        bad = ~torch.isfinite(norm)
        if self.count >= self.warmup and self.last is not None:
            bad = bad | (norm > self.factor * self.last)
        return bad

    def observe(self, m, applied, fired) -> None:
        if applied and not fired and self._norm is not None:
            self.last, self.count = self._norm, self.count + 1

    def rebase(self) -> None:
        """Forget the reference and warm up again."""
        self.last, self.count = None, 0

    def state_dict(self) -> dict[str, Any]:
        return {"last": self.last, "count": self.count}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.last, self.count = state["last"], int(state["count"])

    def __repr__(self) -> str:
        return f"OptimizerStateHealth(factor={self.factor}, warmup={self.warmup})"
