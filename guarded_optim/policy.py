"""Decisions the guard takes on a step (paper 001, sec. 5.2)."""

from __future__ import annotations

import enum

__all__ = ["Decision"]


class Decision(str, enum.Enum):
    """What happened to one call of ``step()``.

    * ``ACCEPT``   -- the proposal was applied (on an unmeasured step of ``probe_every=k``,
      provisionally: the next measurement may still roll it back).
    * ``ROLLBACK`` -- the proposal was measured, rejected, and the safe snapshot restored.
    * ``SKIP``     -- a pre-step signal fired; nothing was proposed, nothing is restored.
    """

    ACCEPT = "accept"
    ROLLBACK = "rollback"
    SKIP = "skip"

    def __str__(self) -> str:
        return self.value
