"""Decision records and the callbacks that receive them."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["StepEvent"]


@dataclass
class StepEvent:
    """One ``step()`` as the guard saw it. Measurements not taken on this step are ``None``.

    ``action`` names what the guard did beyond the decision itself: ``"escalate"`` (rolled
    back to an older verified snapshot), ``"rebaseline"`` (reset ``yhat`` after
    ``max_consecutive_rejections``), or ``None``.
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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
