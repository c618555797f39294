"""Loud, not silent: every intervention of the guard is a ``logging`` record.

Records go to the ``"guarded_optim"`` logger: INFO for a skip or a rollback, WARNING for an
escalation (reach back, re-baseline, stop), DEBUG for GradScaler's own overflow skips (they
are routine while the scale settles). Each record names the step, the reason and the
measured values. A long run is not flooded: per kind of intervention the first
``burst`` records are emitted, then only the 2^k-th ones, each saying how many were not
logged since the last record (``stats`` and the events count every one).
"""

from __future__ import annotations

import logging

from .outcome import Action, Decision

__all__ = ["logger", "RateLimitedLog", "log_step", "stop_message"]

logger = logging.getLogger("guarded_optim")


class RateLimitedLog:
    """Per-kind counters that decide which interventions are logged (see the module doc)."""

    def __init__(self, burst: int = 10):
        self.burst = burst
        self.counts: dict[str, int] = {}
        self.suppressed: dict[str, int] = {}

    def __call__(self, kind: str, level: int, msg: str, *args) -> None:
        n = self.counts[kind] = self.counts.get(kind, 0) + 1
        if not logger.isEnabledFor(level):
            return
        if n > self.burst and n & (n - 1):
            self.suppressed[kind] = self.suppressed.get(kind, 0) + 1
            return
        skipped = self.suppressed.pop(kind, 0)
        tail = f" ({skipped} more {kind} events since the last record; see opt.stats)" if skipped else ""
        logger.log(level, msg + tail, *args)


_ESCALATIONS = {Action.ESCALATE: "reached back to an older verified state",
                Action.REBASELINE: "re-based the reference on the new level",
                Action.STOP: "stopped at the last verified state"}


def _nonzero(stats: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in stats.items() if v}


def log_step(guard, rec) -> None:
    """The log records of a committed step that was not accepted (see the module docstring)."""
    e, log = rec.event, guard._log
    measured = "" if e.y is None else (f", probe {e.y:.4g} vs reference {e.yhat:.4g} "
                                       f"(threshold +{e.threshold:.3g})")
    grad = "" if e.grad_norm is None else f", gradient norm {e.grad_norm:.3g}"
    if e.decision == Decision.SKIP.value:
        level = logging.DEBUG if e.reason == "amp_overflow" else logging.INFO
        log("skip", level, "step %d skipped (%s%s)", e.step, e.reason, grad)
    else:
        log("rollback", logging.INFO, "step %d rolled back to the state verified at "
            "step %d (%s%s%s)%s", e.step, guard.safe_snapshot.step, e.reason, measured, grad,
            f"; action: {e.action}" if e.action else "")
    for action, what in _ESCALATIONS.items():
        if action in rec.actions:
            log(action.value, logging.WARNING, "step %d: %d rejections in a row, %s (%s); "
                "stats: %s", e.step, guard.max_consecutive_rejections or 0, what, e.reason,
                _nonzero(guard.stats))


def stop_message(guard, e) -> str:
    """What :class:`~guarded_optim.ladder.GuardStopped` says: what happened, what is kept,
    what to do."""
    return (f"GuardedOptimizer stopped at step {e.step}: {guard.max_consecutive_rejections} "
            f"proposals in a row were rejected ({e.reason}), and no older verified state is "
            f"kept to reach back to. The model and optimizer hold the state verified at step "
            f"{guard.safe_snapshot.step}; nothing rejected was applied. The run is not converging "
            "from here as configured: save a checkpoint (opt.state_dict()), then resume with "
            "a lower LR, look at the data around this step, keep older states "
            "(history=N), or accept the new level with ladder=Ladder(on_exhausted="
            f"'rebaseline'). stats: {_nonzero(guard.stats)}")
