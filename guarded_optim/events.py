"""Decision records and the callbacks that receive them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["StepEvent"]


@dataclass
class StepEvent:
    """One ``step()`` as the guard saw it. Measurements not taken on this step are ``None``.

    ``action`` names what the guard did beyond the decision itself, comma-separated:
    ``"escalate"`` (rolled back to an older verified snapshot), ``"rebaseline"`` (reset the
    references after ``max_consecutive_rejections``), and what recovery actions did
    (``"lr_scale=0.5"``, ``"escape"``); ``None`` when nothing else happened.
    """

    step: int
    decision: str
    reason: str | None = None
    grad_norm: float | None = None
    y: float | None = None
    yhat: float | None = None
    innovation: float | None = None
    threshold: float | None = None
    action: str | None = None
    signals: dict[str, bool] = field(default_factory=dict)
    skip_batches: int = 0   #: set by an escape: advance the data iterator by this many

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
