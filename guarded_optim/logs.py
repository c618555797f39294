"""Loud, not silent: every intervention of the guard is a ``logging`` record.

Records go to the ``"guarded_optim"`` logger. A script that configures no logging still sees
WARNING records (Python's last-resort handler prints them to stderr), so these are
WARNING: the first intervention of a run (a skip or a rollback), every 10^k-th one after it
(10th, 100th, ...) with the counts so far, the first time the healing rung backs the LR
off, every escalation (reach back, re-baseline, stop) and a loaded checkpoint that does not
match the live weights. The other skips and rollbacks
are INFO, GradScaler's own overflow skips DEBUG (routine while the scale settles). Each
record says what happened in words: the step, what fired, the measured values, and which
verified state the model and optimizer hold now. A long run is not flooded: per kind of
intervention the first ``burst`` INFO records are emitted, then only the 2^k-th ones, each
saying how many were not logged since the last record (``stats`` and the events count
every one); WARNING records are never held back.
"""

from __future__ import annotations

import logging
import math

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
        if level < logging.WARNING and n > self.burst and n & (n - 1):
            self.suppressed[kind] = self.suppressed.get(kind, 0) + 1
            return
        skipped = self.suppressed.pop(kind, 0)
        tail = f" ({skipped} more {kind} events since the last record; see opt.stats)" if skipped else ""
        logger.log(level, msg + tail, *args)


_ESCALATIONS = {Action.ESCALATE: "reached back to an older verified state",
                Action.REBASELINE: "re-based the reference on the new level",
                Action.STOP: "stopped: the model and optimizer hold the last verified state "
                             "and every later step is skipped (opt.stopped) until the script "
                             "decides: save a checkpoint, lower the LR, then opt.resume()"}


def _nonzero(stats: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in stats.items() if v}


def _interventions(stats: dict[str, int]) -> int:
    return stats["rollbacks"] + stats["skipped"] - stats["skipped_amp_overflow"]


def _milestone(stats: dict[str, int]) -> str | None:
    """The note of a WARNING-level intervention (the 1st, 10th, 100th, ... of the run)."""
    n = _interventions(stats)
    if n == 1:
        return ("the guard's first intervention in this run; the next ones are INFO records of "
                "the 'guarded_optim' logger (rate-limited), every one is counted in opt.stats")
    if n >= 10 and 10 ** round(math.log10(n)) == n:
        return f"{n} interventions so far: {_nonzero(stats)}"
    return None


def _kept(guard, rec) -> str:
    """What a rollback undid and which state the model and optimizer hold now, in words."""
    safe, undone = guard.safe_snapshot.step, rec.undone
    held = f"the model and optimizer hold the state verified before step {safe}"
    if Action.REWIND in rec.actions:
        return (f"the {rec.t + 1 - safe} accepted updates since step {safe} undone (they "
                f"carried a slow rise); {held}")
    if undone == 0:
        return f"the live state was written since it was verified; {held}"
    if undone == 1 and rec.y is not None:
        return f"the proposed update was rejected; {held}"
    updates = "update" if undone == 1 else f"{undone} updates"
    return f"the unverified {updates} since step {safe} undone; {held}"


def log_step(guard, rec) -> None:
    """The log records of a committed step that was not accepted (see the module docstring)."""
    e, log = rec.event, guard._log
    measured = "" if e.y is None else (f", probe {e.y:.4g} vs reference {e.yhat:.4g}, at most "
                                       f"+{e.threshold:.3g} allowed")
    grad = "" if e.grad_norm is None else f", gradient norm {e.grad_norm:.3g}"
    note = _milestone(guard.stats) if e.reason != "amp_overflow" else None
    tail = f" [{note}]" if note else ""
    if e.decision == Decision.SKIP.value:
        level = logging.DEBUG if e.reason == "amp_overflow" else logging.INFO
        log("skip", max(level, logging.WARNING if note else 0), "step %d skipped (%s%s): nothing "
            "was applied%s", e.step, e.reason, grad, tail)
    else:
        log("rollback", logging.WARNING if note else logging.INFO, "step %d rolled back (%s%s%s): "
            "%s%s%s", e.step, e.reason, measured, grad, _kept(guard, rec),
            f"; action: {e.action}" if e.action else "", tail)
    if Action.BACKOFF in rec.actions and guard.stats["backoffs"] == 1:
        log("backoff", logging.WARNING, "step %d: the rejections persist, so the guard heals: it "
            "now proposes at %.3g x the LR the schedule sets (the schedule's own lr is left "
            "alone), and grows that back after healthy steps; each back-off is counted in "
            "opt.stats['backoffs']", e.step, e.lr_scale)
    if Action.RAISE_EPS in rec.actions:
        log("raise_eps", logging.WARNING, "step %d: every update of the float16 parameters was "
            "non-finite (Adam's eps is 0 in float16): the guard heals by raising eps to %g in "
            "their param groups (opt.param_groups[i]['eps'])", e.step, guard.ladder.raise_eps.eps)
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
