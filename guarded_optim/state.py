"""The guard's mutable step state: one record, one listing.

Every counter that decides a step lives in :class:`StepState`; :class:`Cadence` says when
the live state is verified, :class:`Pending` and :class:`Loaded` what a construction or a
load leaves for the first step. Its fields' metadata is the
one listing that ``state_dict`` (what is saved, :meth:`StepState.saved`),
``load_state_dict`` (how a saved value is checked, :func:`from_saved`), the transactional
undo (:meth:`StepState.copy`) and the reset (a new record) all read.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any, Iterable

from . import validation
from .outcome import Decision
from .signals import Verdict

__all__ = ["StepState", "from_saved", "stat_names", "Cadence", "Pending", "Loaded"]


def _saved(kind: str, required: bool = True) -> dict:
    return {"saved": kind, "required": required}


@dataclass
class StepState:
    """What one ``step()`` reads and writes besides the tensors (plain host values).

    ``consecutive`` and ``in_row`` both count rejections, with different ends: the
    escalation budget (:class:`~.ladder.Budget`) counts rejections since the last *measured*
    accept (or the last escalation), the recovery actions see rollbacks since the last
    healthy *applied* step (an unmeasured provisional accept included).
    """

    t: int = field(default=0, metadata=_saved("count"))                 #: completed step() calls
    unverified: int = field(default=0, metadata=_saved("count"))        #: applied since verified
    consecutive: int = field(default=0, metadata=_saved("count"))       #: the budget's count
    since_push: int = field(default=0, metadata=_saved("count"))        #: verified since a push
    in_row: int = field(default=0, metadata=_saved("count"))            #: rollbacks since healthy
    skips_in_row: int = field(default=0, metadata=_saved("count", required=False))  # (0.2+)
    yhat: float | None = field(default=None, metadata=_saved("real"))   #: EWMA of accepted y
    y0: float | None = field(default=None, metadata=_saved("real"))     #: first probe value
    last_decision: str | None = field(default=None, metadata=_saved("decision"))
    stats: dict[str, int] = field(default_factory=dict, metadata=_saved("stats"))
    last_event: Any = None          #: the last StepEvent (not saved)
    live_is_safe: bool = True       #: the live state equals the verified snapshot
    restores: int = 0               #: restores of the verified snapshot (a failed call's undo)
    #: the healing budget is spent: later steps are skipped (saved: a resumed run stays held)
    stopped: bool = field(default=False, metadata=_saved("flag", required=False))

    @classmethod
    def fresh(cls, stat_names: Iterable[str]) -> "StepState":
        return cls(stats={name: 0 for name in stat_names})

    def copy(self) -> "StepState":
        """An independent copy (the transactional undo of a failed ``step()``)."""
        return dataclasses.replace(self, stats=dict(self.stats))

    def saved(self) -> dict[str, Any]:
        """The fields a checkpoint holds, by their checkpoint keys (plain data)."""
        return {f.name: (dict(v) if isinstance(v := getattr(self, f.name), dict) else v)
                for f in dataclasses.fields(self) if "saved" in f.metadata}


def from_saved(saved: dict[str, Any], stats: dict[str, int], key: str) -> StepState:
    """A :class:`StepState` from a checkpoint's guard dict, each field checked by its kind;
    ``ValueError`` naming ``key[field]`` otherwise. ``stats`` are this guard's counters,
    updated with the saved ones (a counter this release added starts at 0)."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(StepState):
        kind = f.metadata.get("saved")
        if kind is None:
            continue
        name = f"{key}[{f.name!r}]"
        value = saved[f.name] if f.metadata["required"] else saved.get(f.name, f.default)
        values[f.name] = _check(kind, name, value, stats)
    return StepState(**values)


def _check(kind: str, name: str, value: Any, stats: dict[str, int]) -> Any:
    if kind == "count":
        return validation.integer(name, value, low=0)
    if kind == "flag":
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}.")
        return value
    if kind == "real":
        return None if value is None else validation.real(name, value)
    if kind == "decision":
        allowed = (None, *(d.value for d in sorted(Decision, key=lambda d: d.code)))
        if value not in allowed:
            raise ValueError(f"{name} is {value!r}; expected one of {allowed}.")
        return value
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a dict of counts.")
    return {**stats, **{str(k): validation.integer(f"{name}[{k!r}]", v, low=0)
                        for k, v in value.items()}}


def stat_names(signals: list) -> list[str]:
    """The ``stats`` counters of a guard with ``signals`` (each signal counts its own)."""
    return ["steps", "accepted", "rollbacks", "skipped", "measured", "escalations",
            "rebaselines", "escapes", "skipped_amp_overflow", "reruns", "transient",
            "persistent", "quarantined", "skipped_quarantined", "stops", "overruled",
            "batch_loss_spikes", "checkpoint_mismatches", "backoffs", "eps_raised",
            "skipped_stopped", "rewinds", "drift_rebased", "drift_unrewound", "bad_batches",
            "bad_batch_rebased",
            *(f"skipped_{s.name}" for s in signals if s.verdict is Verdict.SKIP),
            *(f"failures_{s.name}" for s in signals if s.verdict is Verdict.FAILURE)]


@dataclass(frozen=True)
class Cadence:
    """When the live state is verified: every ``every``-th applied step. With a probe the
    probe measures that step's proposal; without one (``live``) the post-step signals
    check the live state: right after the proposal when ``every > 1`` (its capture then
    overlaps the next forward and backward), at the next step's start when ``every == 1``
    (damage written between steps is then seen before anything is proposed on it)."""

    every: int
    probe: bool      # a probe measures proposals
    live: bool       # no probe, and some signal can reject: the signals verify the live state

    def measures(self, unverified: int) -> bool:
        """With ``unverified`` applied steps since the verified state, the probe measures."""
        return self.probe and unverified >= self.every

    def due_at_start(self, unverified: int) -> bool:
        return self.live and unverified >= self.every

    def due_after_proposal(self, unverified: int) -> bool:
        return self.every > 1 and self.due_at_start(unverified)


class Pending(enum.Enum):
    """What a construction left for the first step to settle."""

    REFERENCE = "reference"   #: the reference y(theta_0), re-taken if the weights were written


@dataclass(frozen=True)
class Loaded:
    """What a loaded checkpoint leaves for the first step: check that the live weights are
    the ones it was saved with (``fingerprint``, :func:`~.checkpoint.fingerprint`), then
    capture them as verified (``live``: the checkpoint's verified state was its live state,
    at ``step`` with ``meta``), or keep the loaded snapshot; ``reference``: no snapshot was
    saved, the reference is measured anew."""

    live: bool
    step: int = 0
    meta: dict = field(default_factory=dict)
    fingerprint: list | None = None
    reference: bool = False
