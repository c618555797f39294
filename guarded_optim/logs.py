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

__all__ = ["logger", "RateLimitedLog"]

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
