"""The innovation test of paper 001 (sec. 5, Algorithm 1): pure functions and thresholds.

``innovation(y, yhat) = y - yhat`` compares a probe measurement of the proposed parameters
with ``yhat``, an EWMA of *accepted* measurements. A proposal is accepted iff its innovation
is at most the threshold ``epsilon_t``. Thresholds are small objects with plain-float state:

* :class:`FixedThreshold` -- the paper's absolute ``epsilon`` (Assumption 7.2). With it the
  guarantees of Theorem 7.3 and Proposition 7.5 hold as stated.
* :class:`RelativeThreshold` -- scale-aware: ``epsilon_t = rtol * |yhat_t| + k * s_t`` where
  ``s_t`` is an EWMA of ``|nu|`` over accepted steps. It needs no knowledge of the loss
  scale, and Theorem 7.3 holds with the ``epsilon_t`` in force at step ``t``.
* :class:`NoiseBand` -- the default: the band the run's own noise measures, a robust
  ``median + k * scale`` of the last accepted innovations, within the relative band.
"""

from __future__ import annotations

import math
import statistics
from typing import Any, Protocol

__all__ = [
    "innovation", "ewma", "accepts", "noise_band", "Threshold", "FixedThreshold",
    "RelativeThreshold", "NoiseBand",
]


def innovation(y: float, yhat: float) -> float:
    """``nu_t = y(theta_prop) - yhat_t`` (eq. 3). A NaN measurement gives ``+inf``."""
    nu = y - yhat
    return math.inf if math.isnan(nu) else nu


def ewma(yhat: float, y: float, alpha: float) -> float:
    """``(1 - alpha) * yhat + alpha * y`` (Algorithm 1, line 12)."""
    return (1.0 - alpha) * yhat + alpha * y


def noise_band(values: list[float]) -> tuple[float, float]:
    """``(median, scale)`` of ``values``: the median and the median absolute deviation,
    scaled by 1.4826 to a standard deviation for normal noise. Neither moves when a few
    values are outliers. The band and the drift detector ask for the same window once a
    step (the innovations accepted before it): the last answer is kept for that."""
    key = tuple(values)
    if key != _last_band[0]:
        ordered = sorted(key)
        med = statistics.median(ordered)
        _last_band[:] = [key, (med, 1.4826 * statistics.median(abs(v - med) for v in ordered))]
    return _last_band[1]


_last_band: list = [None, None]   # (the window, its band): one entry, shared per step


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
        epsilon = float(state["epsilon"])
        if not (math.isfinite(epsilon) and epsilon > 0):
            raise ValueError(f"threshold state epsilon={epsilon!r} must be a finite number > 0.")
        self.epsilon = epsilon

    def __repr__(self) -> str:
        return f"FixedThreshold(epsilon={self.epsilon})"


class RelativeThreshold:
    """``epsilon_t = max(rtol * |yhat_t| + k * s_t, floor * |yhat_0|)``, with ``s_t`` an EWMA
    (``beta``) of ``|nu|`` and ``yhat_0`` the first reference.

    The first term rejects a proposal that multiplies the smoothed probe loss by more than
    ``1 + rtol`` in one step; the second widens the band where accepted measurements are
    naturally noisy. The spread counts falls as well as rises (``|nu|``): in a fast-falling
    phase this widens the band (on the digits CNN an LR x50 window got a 3.9x probe jump
    accepted), but counting rises only rolled back a clean 3x uptick of a small SGD model,
    and a false alarm on clean training is the worse failure. Defaults were set from clean
    runs of the bundled models, where the largest accepted ``nu / yhat`` was below 0.5,
    while LR spikes of x50 and more gave 2.5 to 9000 (see the README's benchmark section).

    The ``floor`` keeps the band from shrinking with the loss itself: near convergence a
    small probe's loss is tiny and noisy relative to its level (on the ResNet-18 task, 16
    probe samples jumped from 0.025 to 0.14 between clean steps, 5-10x, against a band of
    0.093), so without a floor clean training is rolled back there. A rise below
    ``floor`` x the first reference (0.1 x 2.3 = 0.23 nats for a 10-class start) is
    never a rejection; damage moves the probe loss by orders of magnitude more.
    """

    def __init__(self, rtol: float = 1.0, k: float = 4.0, beta: float = 0.1, floor: float = 0.1):
        for name, value in (("rtol", rtol), ("k", k)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"Invalid {name}: {value!r}; it must be a finite number >= 0.")
        if rtol == 0 and k == 0:
            raise ValueError("Invalid rtol=0 and k=0: the threshold would be 0; set rtol > 0.")
        if not 0.0 < beta <= 1.0:
            raise ValueError(f"Invalid beta: {beta!r}; it must lie in (0, 1].")
        if not math.isfinite(floor) or floor < 0:
            raise ValueError(f"Invalid floor: {floor!r}; it must be a finite number >= 0.")
        self.rtol, self.k, self.beta, self.floor = float(rtol), float(k), float(beta), float(floor)
        self.spread = 0.0
        self.scale: float | None = None   # |yhat_0|, the first reference

    def __call__(self, yhat: float) -> float:
        if self.scale is None:
            self.scale = abs(yhat)
        return max(self.rtol * abs(yhat) + self.k * self.spread, self.floor * self.scale)

    def update(self, nu: float) -> None:
        self.spread = ewma(self.spread, abs(nu), self.beta)

    def state_dict(self) -> dict[str, Any]:
        return {"rtol": self.rtol, "k": self.k, "beta": self.beta, "spread": self.spread,
                "floor": self.floor, "scale": self.scale}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        rtol, k, beta, spread = (float(state[n]) for n in ("rtol", "k", "beta", "spread"))
        floor = float(state.get("floor", 0.0))      # 0.1.0 had no floor
        scale = state.get("scale")
        if not all(math.isfinite(v) for v in (rtol, k, beta, spread, floor)) or spread < 0 \
                or (scale is not None and not (math.isfinite(float(scale)) and float(scale) >= 0)):
            raise ValueError(f"threshold state {state} holds a non-finite or negative value.")
        self.rtol, self.k, self.beta, self.spread, self.floor = rtol, k, beta, spread, floor
        self.scale = None if scale is None else float(scale)

    def __repr__(self) -> str:
        return (f"RelativeThreshold(rtol={self.rtol}, k={self.k}, beta={self.beta}, "
                f"floor={self.floor})")


class NoiseBand:
    """``epsilon_t = min(relative(yhat_t), max(m_t + k * s_t, floor * |yhat_0|))``: the
    band the run's own noise measures (the default threshold).

    ``m_t`` and ``s_t`` are the median and the scaled median absolute deviation
    (:func:`noise_band`) of the last ``window`` *accepted* innovations: a fixed probe set
    moves by small, measurable amounts per accepted step, and a proposal far outside that
    spread is rejected whatever level the loss sits at. Rejected values never enter the
    window; outliers that were accepted do not move a median. ``floor`` keeps a flat probe
    (a converged model, innovations near 0) from narrowing the band to nothing. Until
    ``warmup`` innovations were accepted the band is the ``relative`` threshold alone
    (:class:`RelativeThreshold`, which also caps it: a probe loss may never double). The
    window is saved in ``state_dict``, so a resumed run is guarded from its first step.

    Defaults, measured (probe innovations of the 23 clean workloads of
    ``tests/test_clean_workloads.py``, 5 seeds each, robust z = ``(nu - m) / s`` from the
    window before each step): the largest clean z was 11.0 (a regression whose loss
    crosses zero; every other workload stayed below 7.6), so ``k = 20`` leaves a margin of
    1.8. A 16-step warm-up let a slow early drift of a fine-tuning probe reach z = 23; at
    32 it stays at 6.0. An x30 LR window in a nanoGPT-like run moves the probe by 35 to 110
    scales (``bench --suite lr_window``), where today's relative band let it double.
    """

    def __init__(self, k: float = 20.0, window: int = 64, warmup: int = 32,
                 floor: float = 0.02, relative: RelativeThreshold | None = None):
        if not (math.isfinite(k) and k > 0) or not (math.isfinite(floor) and floor >= 0):
            raise ValueError(f"Invalid k={k!r} / floor={floor!r}; need k > 0 and floor >= 0.")
        if isinstance(window, bool) or not isinstance(window, int) or window < 2 \
                or isinstance(warmup, bool) or not isinstance(warmup, int) or not 2 <= warmup <= window:
            raise ValueError(f"Invalid window={window!r} / warmup={warmup!r}; need ints with "
                             "2 <= warmup <= window.")
        self.k, self.window, self.warmup, self.floor = float(k), window, warmup, float(floor)
        self.relative = relative if relative is not None else RelativeThreshold()
        self.values: list[float] = []

    def __call__(self, yhat: float) -> float:
        cap = self.relative(yhat)
        if len(self.values) < self.warmup:
            return cap
        med, scale = noise_band(self.values)
        return min(cap, max(med + self.k * scale, self.floor * (self.relative.scale or 0.0)))

    def noise(self) -> float:
        """``s_t``, the scale of the accepted innovations (0 until ``warmup`` were accepted):
        how much the probe moves per accepted step for no reason anyone would act on."""
        return noise_band(self.values)[1] if len(self.values) >= self.warmup else 0.0

    def update(self, nu: float) -> None:
        self.relative.update(nu)
        if math.isfinite(nu):
            self.values = (self.values + [float(nu)])[-self.window:]

    def state_dict(self) -> dict[str, Any]:
        return {"k": self.k, "window": self.window, "warmup": self.warmup, "floor": self.floor,
                "values": list(self.values), "relative": self.relative.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """This layout, or a :class:`RelativeThreshold`'s (a checkpoint from before the
        noise band: the window fills again)."""
        if "values" not in state:
            self.relative.load_state_dict(state)
            self.values = []
            return
        values = [float(v) for v in state["values"]]
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"threshold state values {values} hold a non-finite value.")
        self.relative.load_state_dict(state["relative"])
        self.values = values[-self.window:]

    def __repr__(self) -> str:
        return (f"NoiseBand(k={self.k}, window={self.window}, warmup={self.warmup}, "
                f"floor={self.floor}, relative={self.relative!r})")
