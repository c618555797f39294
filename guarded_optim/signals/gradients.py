"""Gradient signals: the global norm, and a spike test against its running median."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from .base import StepMeasurement, Verdict

__all__ = ["global_norm", "global_grad_norm", "GradientSpike"]

_TINY = 1e-30


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all ``tensors`` together, as a 0-d tensor (``torch._foreach_norm``).

    Non-finite if any element is non-finite. No host sync.
    """
    grads = tensors
    if not grads:
        return torch.zeros(())
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if get_total_norm is not None:  # torch >= 2.6: groups by device and dtype
        return get_total_norm(grads, 2.0)
    device = grads[0].device
    norms = torch._foreach_norm(list(grads))
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))


global_grad_norm = global_norm


class GradientSpike:
    """SKIP a step whose gradient norm exceeds ``factor`` x the running median of applied ones.

    The reference is the median of the log-norms of the last ``window`` *applied* steps, so
    a skipped outlier never enters it. Non-finite norms are :class:`NonFinite`'s concern. The test starts after ``warmup`` applied steps. If
    ``patience`` steps in a row are skipped by this signal, the norm has moved to a new
    level for good: the reference is re-based on it (counted in ``rebaselines``) rather
    than skipping forever. ``patience=None`` never re-bases.

    Defaults: on clean runs of the bundled models the largest ratio of a gradient norm to
    the running median was below 2.5, while the paper's x300 fault gives about 300.
    """

    name = "grad_spike"
    phase, verdict = "before", Verdict.SKIP

    def __init__(self, factor: float = 10.0, window: int = 50, warmup: int = 10,
                 patience: int | None = 20):
        if not (math.isfinite(factor) and factor > 1):
            raise ValueError(f"Invalid factor: {factor!r}; it must be a finite number > 1.")
        if window < 1 or warmup < 1:
            raise ValueError(f"Invalid window={window!r} / warmup={warmup!r}; both must be >= 1.")
        if patience is not None and patience < 1:
            raise ValueError(f"Invalid patience: {patience!r}; use an int >= 1 or None.")
        self.factor, self.window, self.warmup, self.patience = factor, window, warmup, patience
        self._log_factor = math.log(factor)
        self.buffer: torch.Tensor | None = None   # log-norms of applied steps (ring)
        self.count = 0                            # applied steps observed
        self.consecutive = 0                      # consecutive steps this signal skipped
        self.rebaselines = 0
        self._log_norm: torch.Tensor | None = None

    def measure(self, m: StepMeasurement) -> torch.Tensor:
        log_norm = torch.log(m.grad_norm.detach().float().clamp_min(_TINY))
        self._log_norm = log_norm
        if self.buffer is None or self.buffer.device != log_norm.device:
            self.buffer = torch.zeros(self.window, device=log_norm.device)
        if self.count < self.warmup:
            return torch.zeros((), dtype=torch.bool, device=log_norm.device)
        reference = self.buffer[: min(self.count, self.window)].median()
        return torch.isfinite(log_norm) & (log_norm > reference + self._log_factor)

    def observe(self, m: StepMeasurement, applied: bool, fired: bool) -> None:
        log_norm = self._log_norm
        if applied:
            self.buffer[self.count % self.window] = torch.nan_to_num(log_norm, posinf=0.0)
            self.count += 1
            self.consecutive = 0
        elif fired:
            self.consecutive += 1
            if self.patience is not None and self.consecutive >= self.patience:
                self.buffer.fill_(0.0).add_(log_norm)
                self.count, self.consecutive = max(self.count, self.window), 0
                self.rebaselines += 1

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer, "count": self.count, "consecutive": self.consecutive,
                "rebaselines": self.rebaselines}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        buf = state["buffer"]
        self.buffer = None if buf is None else buf.detach().clone()
        self.count, self.consecutive = int(state["count"]), int(state["consecutive"])
        self.rebaselines = int(state["rebaselines"])

    def __repr__(self) -> str:
        return (f"GradientSpike(factor={self.factor}, window={self.window}, "
                f"warmup={self.warmup}, patience={self.patience})")
