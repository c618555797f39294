"""The guard's arguments, checked: every check before anything is built.

:func:`configure` validates the arguments of :class:`~guarded_optim.GuardedOptimizer`
(each error names the argument and the fix), warns on valid but probably unintended
combinations, fills the defaults that depend on other arguments, and returns them as one
:class:`GuardConfig`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer

from . import validation
from .distributed import resolve_group
from .fisher import FisherDiagonal, default_fisher
from .innovation import FixedThreshold, NoiseBand, Threshold
from .ladder import Ladder
from .policy import RecoveryAction
from .signals import default_signals
from .snapshot import MODES

__all__ = ["VERIFY_EVERY", "GuardConfig", "configure"]

#: the default verification cadence of a guard without a probe (``probe_every=None``)
VERIFY_EVERY = 10


@dataclass(frozen=True)
class GuardConfig:
    """The checked arguments, defaults filled in."""

    threshold: Threshold
    alpha: float
    probe_every: int
    signals: list
    callbacks: list
    recovery: list
    ladder: Ladder
    snapshot: str


def _is_signal(x: Any) -> bool:
    return callable(getattr(x, "measure", None)) and getattr(x, "phase", None) in ("before", "after")


def _is_threshold(x: Any) -> bool:
    return callable(x) and callable(getattr(x, "update", None))


def _is_action(x: Any) -> bool:
    return isinstance(x, RecoveryAction) or callable(getattr(x, "on_rollback", None))


def configure(optimizer: Optimizer, probe: Callable | None, module: torch.nn.Module | None, *,
              epsilon: float | None, threshold: Threshold | None, alpha: float,
              probe_every: int | None, signals: Iterable[Any] | None,
              max_consecutive_rejections: int | None, history: int, checkpoint_every: int,
              save_history: bool, snapshot: str, callbacks: Iterable[Callable],
              recovery: Iterable[RecoveryAction], ladder: Ladder | None,
              process_group: Any) -> GuardConfig:
    """Check every argument (``TypeError``/``ValueError`` naming it), then build the config."""
    _check_parts(optimizer, probe, module)
    threshold = _threshold(epsilon, threshold)
    alpha = validation.real("alpha", alpha, low=0, high=1, low_open=True, high_open=True,
                            hint="The EWMA factor, e.g. 0.1.")
    probe_every = validation.integer("probe_every", probe_every, low=1, none=True,
                                     hint="1 verifies every step.")
    if probe_every is None:
        probe_every = 1 if probe is not None else VERIFY_EVERY
    max_consecutive_rejections = validation.integer(
        "max_consecutive_rejections", max_consecutive_rejections, low=1, none=True,
        hint="None never escalates.")
    history = validation.integer("history", history, low=0, hint="0 keeps no older snapshot.")
    checkpoint_every = validation.integer("checkpoint_every", checkpoint_every, low=1)
    if not isinstance(save_history, bool):
        raise ValueError(f"Invalid save_history: {save_history!r}; pass True or False.")
    if snapshot not in MODES:
        raise ValueError(f"Invalid snapshot: {snapshot!r}; choose one of {MODES}.")
    signals = _signals(signals, probe)
    callbacks = validation.items("callbacks", callbacks, callable, "callables",
                                 '[CSVSink("guard.csv")]')
    recovery = _recovery(recovery, optimizer)
    if ladder is not None:
        validation.instance("ladder", ladder, lambda x: isinstance(x, Ladder),
                            "a guarded_optim.Ladder, e.g. Ladder(on_exhausted='rebaseline')")
    resolve_group(process_group)  # validates; resolved again at every use ("auto")
    _warn_on_mismatch(optimizer, probe, module, epsilon, threshold)
    ladder = (ladder if ladder is not None else Ladder()).configure(
        max_consecutive_rejections, history, checkpoint_every, save_history)
    return GuardConfig(threshold if threshold is not None else NoiseBand(), alpha,
                       probe_every, signals, callbacks, recovery, ladder, snapshot)


def _check_parts(optimizer: Any, probe: Any, module: Any) -> None:
    validation.instance("optimizer", optimizer, lambda x: isinstance(x, Optimizer),
                        "a torch.optim.Optimizer, e.g. torch.optim.AdamW(model.parameters())")
    if probe is not None:
        validation.instance("probe", probe, callable, "a zero-argument callable returning "
                            "a scalar loss, e.g. probe=lambda: loss_fn(model(x_val), y_val)")
    if module is not None:
        validation.instance("module", module, lambda x: isinstance(x, torch.nn.Module),
                            "a torch.nn.Module (the model)")


def _threshold(epsilon: Any, threshold: Any) -> Threshold | None:
    """The threshold object (``None``: the default), from ``epsilon=`` or ``threshold=``."""
    if epsilon is not None and threshold is not None:
        raise ValueError("Pass either epsilon= (absolute) or threshold=, not both.")
    if epsilon is not None:
        return FixedThreshold(validation.real(
            "epsilon", epsilon, low=0, low_open=True,
            hint="e.g. epsilon=0.1, or None for the scale-aware default."))
    if threshold is not None:
        validation.instance("threshold", threshold, _is_threshold, "a threshold object "
                            "such as RelativeThreshold() or FixedThreshold(0.1); for a "
                            "number use epsilon=")
    return threshold


def _signals(signals: Any, probe: Any) -> list:
    signals = (default_signals(probe is not None) if signals is None else
               validation.items("signals", signals, _is_signal, "signal instances",
                                "[NonFinite(), GradientSpike()]"))
    names = [s.name for s in signals]
    if len(set(names)) != len(names):
        raise ValueError(f"signals must have distinct names, got {names}.")
    return signals


def _recovery(recovery: Any, optimizer: Optimizer) -> list:
    """The recovery actions, plus the default Fisher tracker where the inner optimizer keeps
    no second moment (design card: a Fisher diagonal is saved). It goes last: the checkpoint
    loader relies on it."""
    recovery = validation.items("recovery", recovery, _is_action, "RecoveryAction instances",
                                "[ReduceLR()]")
    if not any(isinstance(a, FisherDiagonal) for a in recovery):
        tracker = default_fisher(optimizer)   # None where the inner keeps exp_avg_sq
        if tracker is not None:
            recovery = [*recovery, tracker]
    return recovery


def _warn_on_mismatch(optimizer, probe, module, epsilon, threshold) -> None:
    """Arguments that are valid but probably not what the user meant."""
    if probe is None and (epsilon is not None or threshold is not None):
        warnings.warn("epsilon/threshold bound the probe's innovation, but no probe was "
                      "given, so they have no effect; pass probe=... or drop them.",
                      UserWarning, stacklevel=4)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if module is not None and params:
        owned = {id(p) for p in module.parameters()}
        if not any(id(p) in owned for p in params):
            warnings.warn("module= owns none of the optimizer's parameters: its buffers "
                          "are snapshotted and its mode switched for the probe, but it is "
                          "not the model being optimized; pass module=model.",
                          UserWarning, stacklevel=4)
    if probe is not None and any(g.get("maximize", False) for g in optimizer.param_groups):
        warnings.warn("a param group has maximize=True, but the probe is lower-is-better: "
                      "return the negated objective from probe (e.g. lambda: -reward()), "
                      "or every improvement reads as a rejection.", UserWarning, stacklevel=4)
