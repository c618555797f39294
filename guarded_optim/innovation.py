"""The innovation test of paper 001 (sec. 5, Algorithm 1): pure functions and thresholds.

``innovation(y, yhat) = y - yhat`` compares a probe measurement of the proposed parameters
with ``yhat``, an EWMA of *accepted* measurements. A proposal is accepted iff its innovation
is at most the threshold ``epsilon_t``. Thresholds are small objects with plain-float state:

* :class:`FixedThreshold` -- the paper's absolute ``epsilon`` (Assumption 7.2). With it the
  guarantees of Theorem 7.3 and Proposition 7.5 hold as stated.
* :class:`RelativeThreshold` -- the scale-aware default: ``epsilon_t = rtol * |yhat_t| +
  k * s_t`` where ``s_t`` is an EWMA of ``|nu|`` over accepted steps. It needs no knowledge of
  the loss scale, and Theorem 7.3 holds with the ``epsilon_t`` in force at step ``t``.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

__all__ = [
    "innovation", "ewma", "accepts", "Threshold", "FixedThreshold", "RelativeThreshold",
]


def innovation(y: float, yhat: float) -> float:
    """``nu_t = y(theta_prop) - yhat_t`` (eq. 3). A NaN measurement gives ``+inf``."""
    nu = y - yhat
    return math.inf if math.isnan(nu) else nu


def ewma(yhat: float, y: float, alpha: float) -> float:
    """``(1 - alpha) * yhat + alpha * y`` (Algorithm 1, line 12)."""
    return (1.0 - alpha) * yhat + alpha * y


def accepts(nu: float, epsilon: float) -> bool:
    """The decision rule of Assumption 7.2: accept iff ``nu <= epsilon`` (NaN never passes)."""
    return nu <= epsilon


class Threshold(Protocol):
    """What the guard needs of a threshold: its value now, and an update on accepted steps."""

    def __call__(self, yhat: float) -> float: ...
    def update(self, nu: float) -> None: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class FixedThreshold:
    """The absolute tolerance ``epsilon > 0`` of Assumption 7.2."""

    def __init__(self, epsilon: float):
        if not isinstance(epsilon, (int, float)) or isinstance(epsilon, bool) \
                or not math.isfinite(epsilon) or epsilon <= 0:
            raise ValueError(
                f"Invalid epsilon: {epsilon!r}. epsilon is the largest accepted innovation "
                "(probe-loss rise) and must be a finite number > 0, e.g. epsilon=0.1; "
                "pass epsilon=None for the scale-aware default."
            )
        self.epsilon = float(epsilon)

    def __call__(self, yhat: float) -> float:
        return self.epsilon

    def update(self, nu: float) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"epsilon": self.epsilon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epsilon = float(state["epsilon"])

    def __repr__(self) -> str:
        return f"FixedThreshold(epsilon={self.epsilon})"


class RelativeThreshold:
    """``epsilon_t = rtol * |yhat_t| + k * s_t``, with ``s_t`` an EWMA (``beta``) of ``|nu|``.

    The first term rejects a proposal that multiplies the smoothed probe loss by more than
    ``1 + rtol`` in one step; the second widens the band where accepted measurements are
    naturally noisy. The spread counts falls as well as rises (``|nu|``): in a fast-falling
    phase this widens the band (on the digits CNN an LR x50 window got a 3.9x probe jump
    accepted), but counting rises only rolled back a clean 3x uptick of a small SGD model,
    and a false alarm on clean training is the worse failure. Defaults were set from clean
    runs of the bundled models, where the largest accepted ``nu / yhat`` was below 0.5,
    while LR spikes of x50 and more gave 2.5 to 9000 (see the README's benchmark section).
    """

    def __init__(self, rtol: float = 1.0, k: float = 4.0, beta: float = 0.1):
        for name, value in (("rtol", rtol), ("k", k)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"Invalid {name}: {value!r}; it must be a finite number >= 0.")
        if rtol == 0 and k == 0:
            raise ValueError("Invalid rtol=0 and k=0: the threshold would be 0; set rtol > 0.")
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"Invalid beta: {beta!r}; it must lie in (0, 1].")
        self.rtol, self.k, self.beta = float(rtol), float(k), float(beta)
        self.spread = 0.0

    def __call__(self, yhat: float) -> float:
        return self.rtol * abs(yhat) + self.k * self.spread

    def update(self, nu: float) -> None:
        self.spread = ewma(self.spread, abs(nu), self.beta)

    def state_dict(self) -> dict[str, Any]:
        return {"rtol": self.rtol, "k": self.k, "beta": self.beta, "spread": self.spread}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.rtol, self.k = float(state["rtol"]), float(state["k"])
        self.beta, self.spread = float(state["beta"]), float(state["spread"])

    def __repr__(self) -> str:
        return f"RelativeThreshold(rtol={self.rtol}, k={self.k}, beta={self.beta})"
