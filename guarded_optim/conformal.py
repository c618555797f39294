"""Conformal tools (ARC, sec. 3.5): an adaptive innovation threshold with a false-alarm bound,
loss-forecast intervals, and prediction sets over stability states.

Pure functions: :func:`conformal_rank`, :func:`conformal_quantile` (the finite-sample
quantile of Algorithm 5), :func:`trend_forecast`, :func:`aps_score`, :func:`aps_set`,
:func:`severity_probs`. Small stateful shells:

* :class:`ConformalThreshold` -- a :class:`~guarded_optim.innovation.Threshold`:
  ``GuardedOptimizer(threshold=ConformalThreshold(alpha=0.01))``.
* :class:`ConformalForecast` -- a :class:`~guarded_optim.policy.RecoveryAction` that
  forecasts the probe loss and asks for a preventive verified snapshot when the forecast
  interval crosses an explosion bound: ``recovery=[ConformalForecast()]``.
* :class:`ConformalStateSets` -- APS prediction sets over HEALTHY / WARNING / FAILURE, a
  standalone decision tool (see its docstring for why it is not a guard mode).

All state is plain floats, ints and lists (``torch.load(weights_only=True)`` reads it).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Sequence

from .innovation import RelativeThreshold, Threshold
from .policy import RecoveryAction

__all__ = ["conformal_rank", "conformal_quantile", "min_calibration", "trend_forecast",
           "aps_score", "aps_set", "severity_probs", "ConformalThreshold", "ConformalForecast",
           "ConformalStateSets", "STATES"]

STATES = ("HEALTHY", "WARNING", "FAILURE")


# -- pure functions ------------------------------------------------------------------------
def conformal_rank(n: int, alpha: float) -> int:
    """``ceil((n + 1)(1 - alpha))``: the rank (1-based) of the calibrated quantile among ``n``
    scores (Algorithm 5, l. 8). Above ``n`` the quantile is ``+inf``."""
    return math.ceil((n + 1) * (1.0 - alpha) - 1e-9)


def min_calibration(alpha: float) -> int:
    """The fewest scores for which :func:`conformal_rank` stays within them (finite quantile)."""
    n = max(1, math.floor((1.0 - alpha) / alpha) - 1)
    while conformal_rank(n, alpha) > n:
        n += 1
    return n


def conformal_quantile(scores: Sequence[float], alpha: float) -> float:
    """The finite-sample conformal quantile: the ``conformal_rank(n, alpha)``-th smallest score.

    For a new score exchangeable with ``scores``: ``P(new > q) <= alpha`` (and ``>= alpha -
    1/(n+1)`` without ties). ``+inf`` when ``n`` is too small for ``alpha``.
    """
    n = len(scores)
    k = conformal_rank(n, alpha)
    if n == 0 or k > n:
        return math.inf
    return sorted(scores)[k - 1]


def trend_forecast(values: Sequence[float], horizon: int) -> float:
    """Least-squares line through ``values`` (at times 0..n-1), evaluated at ``n - 1 + horizon``."""
    n = len(values)
    if n == 1:
        return float(values[0])
    tm = (n - 1) / 2.0
    vm = sum(values) / n
    sxx = sum((t - tm) ** 2 for t in range(n))
    slope = sum((t - tm) * (v - vm) for t, v in enumerate(values)) / sxx
    return vm + slope * (n - 1 + horizon - tm)


def aps_score(probs: Sequence[float], label: int, u: float) -> float:
    """Randomised APS nonconformity score (sec. 3.5.2; Romano et al. 2020): the probability
    mass of the classes ranked above ``label`` plus ``u`` times its own (``u`` in [0, 1]).

    The paper writes the sum up to and including ``label`` plus ``u p_label``, which counts
    the label twice; this is the published APS score, whose sets have exact coverage.
    """
    order = sorted(range(len(probs)), key=lambda i: (-probs[i], i))
    above = 0.0
    for i in order:
        if i == label:
            return above + u * probs[i]
        above += probs[i]
    raise ValueError(f"Invalid label {label!r}; it must index probs (0..{len(probs) - 1}).")


def aps_set(probs: Sequence[float], qhat: float, u: float) -> list[int]:
    """``{y : aps_score(probs, y, u) <= qhat}`` (sec. 3.5.4), as class indices by rank."""
    return sorted(i for i in range(len(probs)) if aps_score(probs, i, u) <= qhat)


def severity_probs(severity: float, warn: float = 0.5, fail: float = 1.0,
                   temperature: float = 8.0) -> list[float]:
    """Probabilities over (HEALTHY, WARNING, FAILURE) from a signal severity (a cumulative-
    logit model): ``P(>= WARNING) = sigmoid(T (s - warn))``, ``P(FAILURE) = sigmoid(T (s - fail))``.

    ``severity`` is e.g. the largest signal score over its firing threshold (1: at the
    threshold). Needs ``warn < fail``; the three probabilities are >= 0 and sum to 1.
    """
    if not warn < fail or not temperature > 0:
        raise ValueError(f"Invalid warn={warn!r} / fail={fail!r} / temperature={temperature!r}; "
                         "need warn < fail and temperature > 0.")
    sig = lambda z: 1.0 / (1.0 + math.exp(-z)) if z > -700 else 0.0  # noqa: E731
    at_least_warn, failure = sig(temperature * (severity - warn)), sig(temperature * (severity - fail))
    return [1.0 - at_least_warn, at_least_warn - failure, failure]


# -- adaptive threshold --------------------------------------------------------------------
class ConformalThreshold:
    """``epsilon_t`` = the conformal quantile (level ``1 - alpha``) of the recent innovations
    (sec. 3.5.8: sliding ``window``), with ``fallback`` until enough are seen.

    Contract (Threshold protocol): the guard calls ``thr(yhat)`` once per measured step and
    ``thr.update(nu)`` only when it accepts. A call with no update since the previous one
    means that proposal was rejected; its innovation is not passed to thresholds, only that
    it exceeded the threshold then in force. It enters the window *censored* at
    ``max(epsilon_t, fallback(yhat_t))``. Leaving rejections out would make every window
    value at most a past threshold and the quantile could only ratchet down (measured: a
    false-alarm rate of 26% for ``alpha=0.01`` on Gaussian innovations); recording them at
    the (larger) fallback bound keeps the upper tail in the sample.

    Guarantee: if the nominal innovations are exchangeable, a nominal proposal is rejected
    with probability at most ``alpha``: censored values are never below the ones they stand
    for once the rank reaches them, which can only raise the quantile. In practice the rate
    lies between about ``alpha / 2`` and ``alpha`` (when the rank lands on a censored entry,
    ``epsilon`` is the fallback's); the tests check it within a binomial tolerance. Real
    faults are censored at the fallback bound too, so a burst of them makes ``epsilon`` at
    most about the fallback's: never looser than the default threshold, never disabled.
    ``min_epsilon`` (default 0) floors the threshold: a proposal that does not raise the
    probe loss above ``yhat`` is never rejected (this only lowers the false-alarm rate).

    Warm-up: ``fallback`` (default :class:`RelativeThreshold`) decides until the window
    holds ``max(min_points, min_calibration(alpha))`` values (99 for ``alpha=0.01``); it is
    updated on every accepted step throughout, so it is ready when needed again.

    Coverage monitoring (sec. 3.5.9): the share of accepted steps among the last ``monitor``
    measured ones is the empirical coverage. When it falls below ``1 - alpha - delta`` (default
    ``delta``: four binomial standard deviations, 0.028 for ``alpha=0.01``), the
    window is recalibrated: its older half is dropped so the quantile follows the new regime
    (possibly back to the fallback while it refills). An excess of coverage (``> 1 - alpha
    + delta``) means the threshold has grown too loose and triggers the same recalibration
    (it cannot happen once ``delta >= alpha``).
    """

    def __init__(self, alpha: float = 0.01, window: int = 500, fallback: Threshold | None = None,
                 min_points: int = 0, monitor: int = 200, delta: float | None = None,
                 min_epsilon: float = 0.0):
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"Invalid alpha: {alpha!r}; the false-alarm rate must lie in (0, 1), "
                             "e.g. 0.01.")
        need = min_calibration(alpha)
        if window < need:
            raise ValueError(f"Invalid window: {window!r}; alpha={alpha} needs at least {need} "
                             "innovations for a finite quantile; raise window or alpha.")
        if delta is None:                    # four binomial standard deviations
            delta = 4.0 * math.sqrt(alpha * (1.0 - alpha) / max(monitor, 1))
        if monitor < 1 or not 0.0 < delta < 1.0 or not (math.isfinite(min_epsilon) and min_epsilon >= 0):
            raise ValueError(f"Invalid monitor={monitor!r} / delta={delta!r} / "
                             f"min_epsilon={min_epsilon!r}; need monitor >= 1, 0 < delta < 1, "
                             "min_epsilon >= 0.")
        self.alpha, self.window, self.monitor, self.delta = float(alpha), int(window), int(monitor), float(delta)
        self.min_epsilon = float(min_epsilon)
        self.min_points = max(int(min_points), need)
        self.fallback: Threshold = fallback if fallback is not None else RelativeThreshold()
        self.scores: deque[float] = deque(maxlen=self.window)
        self.covered: deque[bool] = deque(maxlen=self.monitor)
        self.pending = False          # a measurement awaits its decision
        self.censor = math.inf        # what it enters the window as if it is rejected
        self.calls = self.rejections = self.recalibrations = 0

    @property
    def calibrated(self) -> bool:
        return len(self.scores) >= self.min_points

    def quantile(self) -> float:
        """The window's conformal quantile (``+inf`` before calibration)."""
        return conformal_quantile(self.scores, self.alpha)

    def __call__(self, yhat: float) -> float:
        if self.pending:              # the previous measurement was not accepted
            self._record(self.censor, False)
            self.rejections += 1
        fallback = self.fallback(yhat)
        eps = max(self.quantile(), self.min_epsilon) if self.calibrated else fallback
        self.pending, self.censor = True, max(eps, fallback)
        self.calls += 1
        return eps

    def update(self, nu: float) -> None:
        self.pending = False
        self.fallback.update(nu)
        self._record(float(nu), True)

    def _record(self, score: float, accepted: bool) -> None:
        self.scores.append(score)
        self.covered.append(accepted)
        if len(self.covered) == self.monitor and self.calibrated:
            coverage = sum(self.covered) / self.monitor
            if abs(coverage - (1.0 - self.alpha)) > self.delta:
                self.recalibrate()

    def recalibrate(self) -> None:
        """Drop the older half of the window and restart the coverage record."""
        keep = list(self.scores)[len(self.scores) // 2:]
        self.scores = deque(keep, maxlen=self.window)
        self.covered.clear()
        self.recalibrations += 1

    def state_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "scores": list(self.scores), "covered": list(self.covered),
                "pending": self.pending, "censor": self.censor, "calls": self.calls, "rejections": self.rejections,
                "recalibrations": self.recalibrations, "fallback": self.fallback.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        fallback = state["fallback"]
        self.fallback.load_state_dict(fallback)
        self.alpha = float(state["alpha"])
        self.scores = deque((float(s) for s in state["scores"]), maxlen=self.window)
        self.covered = deque((bool(c) for c in state["covered"]), maxlen=self.monitor)
        self.pending, self.censor = bool(state["pending"]), float(state["censor"])
        self.calls, self.rejections = int(state["calls"]), int(state["rejections"])
        self.recalibrations = int(state["recalibrations"])

    def __repr__(self) -> str:
        return (f"ConformalThreshold(alpha={self.alpha}, window={self.window}, "
                f"fallback={self.fallback!r}, monitor={self.monitor}, delta={self.delta})")


# -- loss forecast -------------------------------------------------------------------------
class ConformalForecast(RecoveryAction):
    """Forecast the probe loss ``horizon`` measurements ahead with a conformal interval, and
    ask for a preventive verified snapshot when the interval crosses the explosion bound
    (sec. 3.5.7, "Loss Forecast Intervals").

    * Forecaster: the least-squares trend of the last ``fit`` values (:func:`trend_forecast`).
    * Conformalisation: every forecast is scored, once its target arrives, by the absolute
      residual ``|y - yhat_forecast|``; the interval is ``forecast +- q`` with ``q`` the
      conformal quantile (level ``1 - alpha``) of the last ``window`` residuals. The paper
      names CQR (quantile regression with two fitted quantiles); absolute residuals around a
      point forecast are the simpler split-conformal variant with the same coverage
      guarantee for exchangeable residuals.
    * Bound: ``factor`` times the median of the last ``max(4 fit, 100)`` values (a slow
      reference that a climb does not drag along at once), but never below the first value
      seen (near a loss of 0, tenfold swings are noise; a loss back at its starting level has
      exploded whatever the recent median); or ``bound=`` (absolute).
    * Action: when the guard verifies a state (``wants_checkpoint``) and the upper end of the
      interval is above the bound, that verified state is pushed into the guard's history
      ring (at most once per ``cooldown`` measurements): escalation then has a state from
      before the forecast climb. It never rejects or skips a step by itself.

    The series is the guard's accepted probe measurements, read from ``guard.last_event``
    when the next step begins (``before_propose``), so it runs one step behind and needs a
    probe. :meth:`observe` and :meth:`interval` also work standalone on any series.
    """

    name = "conformal_forecast"

    def __init__(self, alpha: float = 0.1, horizon: int = 5, fit: int = 5, window: int = 200,
                 factor: float = 10.0, bound: float | None = None, cooldown: int = 50):
        if not 0.0 < alpha < 1.0 or horizon < 1 or fit < 2 or window < min_calibration(alpha):
            raise ValueError(f"Invalid alpha={alpha!r} / horizon={horizon!r} / fit={fit!r} / "
                             f"window={window!r}; need 0 < alpha < 1, horizon >= 1, fit >= 2 and "
                             f"window >= {min_calibration(alpha) if 0 < alpha < 1 else '?'}.")
        if not factor > 1 or (bound is not None and not math.isfinite(bound)) or cooldown < 0:
            raise ValueError(f"Invalid factor={factor!r} / bound={bound!r} / cooldown={cooldown!r}; "
                             "need factor > 1, a finite bound (or None) and cooldown >= 0.")
        self.alpha, self.horizon, self.fit, self.window = float(alpha), horizon, fit, window
        self.factor, self.bound, self.cooldown = float(factor), bound, cooldown
        self.values: deque[float] = deque(maxlen=max(4 * fit, 100))
        self.residuals: deque[float] = deque(maxlen=window)
        self.pending: deque[float] = deque()   # forecasts awaiting their target, oldest first
        self.seen = 0                          # values observed
        self.first = -math.inf                 # the first value observed
        self.last_step = -1                    # the guard step last read
        self.since = cooldown                  # measurements since the last trigger
        self.triggered = 0

    def observe(self, y: float) -> None:
        """Add one measurement: score the forecast made ``horizon`` values ago, forecast anew."""
        if not math.isfinite(y):
            return
        if len(self.pending) == self.horizon:
            self.residuals.append(abs(y - self.pending.popleft()))
        self.values.append(float(y))
        self.first = float(y) if self.seen == 0 else self.first
        self.seen += 1
        self.since += 1
        if len(self.values) >= 2:
            self.pending.append(trend_forecast(list(self.values)[-self.fit:], self.horizon))

    def interval(self) -> tuple[float, float]:
        """``(lower, upper)`` for the value ``horizon`` steps after the last; infinite until
        half the residual window is scored (early residuals, from the fast first descent of
        the loss, would make the interval wide for a whole window)."""
        if not self.pending or len(self.residuals) < self.window // 2:
            return (-math.inf, math.inf)
        q = conformal_quantile(self.residuals, self.alpha)
        return (self.pending[-1] - q, self.pending[-1] + q)

    def explosion_bound(self) -> float:
        if self.bound is not None:
            return self.bound
        history = sorted(self.values)
        if not history:
            return math.inf
        return max(self.factor * history[len(history) // 2], self.first)

    def crosses(self) -> bool:
        """Whether the forecast interval reaches above the explosion bound."""
        upper = self.interval()[1]
        return math.isfinite(upper) and upper > self.explosion_bound()

    def before_propose(self, guard, grad_norm) -> None:
        event = guard.last_event
        if event is not None and event.step != self.last_step:
            self.last_step = event.step
            if event.decision == "accept" and event.y is not None:
                self.observe(event.y)

    def wants_checkpoint(self, guard) -> bool:
        if self.since >= self.cooldown and self.crosses():
            self.since = 0
            self.triggered += 1
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"values": list(self.values), "residuals": list(self.residuals),
                "pending": list(self.pending), "seen": self.seen, "first": self.first, "last_step": self.last_step,
                "since": self.since, "triggered": self.triggered}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values = deque((float(v) for v in state["values"]), maxlen=self.values.maxlen)
        self.residuals = deque((float(v) for v in state["residuals"]), maxlen=self.window)
        self.pending = deque(float(v) for v in state["pending"])
        self.seen, self.last_step = int(state["seen"]), int(state["last_step"])
        self.first = float(state["first"])
        self.since, self.triggered = int(state["since"]), int(state["triggered"])

    def __repr__(self) -> str:
        return (f"ConformalForecast(alpha={self.alpha}, horizon={self.horizon}, fit={self.fit}, "
                f"factor={self.factor}, bound={self.bound})")


# -- prediction sets over stability states -------------------------------------------------
class ConformalStateSets:
    """APS prediction sets over (HEALTHY, WARNING, FAILURE) (sec. 3.5.7, Table 3).

    ``calibrate(probs, labels)`` on labelled steps (probability vectors, e.g. from
    :func:`severity_probs`, and the true state index) sets ``qhat`` = the conformal
    quantile of their APS scores; ``predict(probs)`` returns the set of state names whose
    score is within ``qhat``. For a step exchangeable with the calibration steps the true
    state is in the set with probability at least ``1 - alpha``. ``update(probs, label)``
    slides the calibration window (Algorithm 6). ``u`` comes from a ``random.Random(seed)``
    of its own, so the global RNG is untouched.

    A standalone tool, not a guard decision mode: the guard decides from fired flags read
    in one host transfer per step; a set-valued decision would need a new decision path and
    flags on the guard, and it needs labelled calibration steps (a benchmark's fault
    schedule gives them), which a live run does not have.
    """

    def __init__(self, alpha: float = 0.1, window: int = 1000, seed: int = 0):
        import random
        if not 0.0 < alpha < 1.0 or window < min_calibration(alpha):
            raise ValueError(f"Invalid alpha={alpha!r} / window={window!r}; need 0 < alpha < 1 "
                             "and a window large enough for a finite quantile.")
        self.alpha, self.window = float(alpha), window
        self.scores: deque[float] = deque(maxlen=window)
        self._random = random.Random(seed)

    @property
    def qhat(self) -> float:
        return conformal_quantile(self.scores, self.alpha)

    def calibrate(self, probs: Sequence[Sequence[float]], labels: Sequence[int]) -> float:
        self.scores.clear()
        for p, y in zip(probs, labels):
            self.update(p, y)
        return self.qhat

    def update(self, probs: Sequence[float], label: int) -> None:
        self.scores.append(aps_score(probs, label, self._random.random()))

    def predict(self, probs: Sequence[float]) -> list[str]:
        return [STATES[i] for i in aps_set(probs, self.qhat, self._random.random())]

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = self._random.getstate()
        return {"scores": list(self.scores), "random": [version, list(internal), gauss]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scores = deque((float(s) for s in state["scores"]), maxlen=self.window)
        version, internal, gauss = state["random"]
        self._random.setstate((version, tuple(internal), gauss))
