"""The escalation ladder: what the guard does when rejections keep coming.

Rungs, in order (each an event, a ``stats`` counter and a log record):

1. **skip** -- a pre-step signal fires: the step is not applied (``stats["skipped"]``).
   **Overrule** (opt-in, ``Ladder(overrule=3)``): with a probe, after ``overrule`` skips in a row by
   signals that judge scale rather than validity (``overrulable``: :class:`GradientSpike`;
   never :class:`NonFinite`), the next flagged step is proposed and the probe decides
   (``stats["overruled"]``, ``action="overrule"``). Accepted, the signals learn it as an
   ordinary step (the gradients moved to a new level; with a closure the training loss
   tells most such moves apart already, see :class:`GradientSpike`, and without one this
   rung is what lets a new level in before the signal's patience runs out); rejected, it
   is rolled back and the streak starts again. The price: an x300 gradient window can be
   let through (see :class:`Ladder`).
2. **re-run in place** (:class:`ReRun`) -- a measured proposal is rejected, the user passed
   a closure, and the proposal is the only unverified step (a probe with ``probe_every=1``,
   or the measured step of ``probe_every=k`` right after a verification): the state goes
   back to the last verified one, and the closure is
   evaluated once more on the same batch, with the RNG streams it drew from the first time
   (Megatron-LM's rerun state machine, inside one ``step()``), and its proposal is measured.
   One that passes is *transient*: what went wrong was not the batch (a hardware fault or
   silent data corruption, whose re-run differs; or state written between steps, such as
   BatchNorm statistics poisoned by a skipped NaN batch, which the verified state does not
   hold). It is applied (``stats["transient"]``). One that is rejected again is
   *persistent*: the batch is bad (``stats["persistent"]``). A re-run that reproduces the
   first bit for bit is proposed too: only the proposal tells the batch from the state it
   started on. The RNG streams then continue from where the first run left them:
   re-running never rewinds the data stream.
3. **roll back** to the last verified state (``stats["rollbacks"]``).
4. **quarantine** (:class:`Quarantine`) -- a persistent rejection records the batch's
   identity (``step(closure, batch_id=...)``; without one nothing is recorded) in the
   guard's state; a step whose ``batch_id`` is quarantined is skipped before anything is
   proposed (``stats["skipped_quarantined"]``), and
   :class:`QuarantineSampler` leaves quarantined batches out of later epochs and resumed
   runs without their forward pass (``stats["quarantined"]``). Batch ids must be stable
   across epochs (a fixed batch partition, e.g. ``tuple(indices)`` of a sequential batch
   sampler, or a shard/offset name); shuffled batches rarely recur.
5. **reach back** to an older verified state when ``history`` keeps one
   (``stats["escalations"]``); opt-in recovery actions act here too (``ReduceLR``,
   :class:`ResetMoments`).
6. **stop** -- after ``max_consecutive_rejections`` *probe* rejections in a row with nowhere
   older to go, ``step()`` raises :class:`GuardStopped` (the state is the last verified one;
   the message says what happened and how to resume), unless the ladder was built with
   ``on_exhausted="rebaseline"``: then the reference is re-based on the new level
   (``stats["rebaselines"]``), the 0.1.0 behaviour. Rejections by the step's own signals
   alone (no probe measurement: a training-loss spike, a weight-norm jump) re-base those
   signals instead of stopping: without a probe nothing but the signals' own heuristics
   tells damage from a change of the data, and halting on them measured worse than bare
   (0.1.0 on the natural suite: Adam's second-moment decay 5.5x against bare's 1.07x, a
   mislabelled shard 1.90x against 1.84x). A training-loss spike on the verified state
   itself is not even a rejection: the batch is what differs (``batch_loss_spikes``).
"""

from __future__ import annotations

from typing import Any, Hashable, Iterator

import torch

from .policy import RecoveryAction

__all__ = ["GuardStopped", "ReRun", "Quarantine", "QuarantineSampler", "ResetMoments", "Ladder"]

_EXHAUSTED = ("raise", "rebaseline")


class GuardStopped(RuntimeError):
    """The escalation budget is spent: the guard will not accept what it kept rejecting."""


class ReRun:
    """Rung 2: tell a transient rejection from a persistent one by evaluating the closure
    once more on the same batch from the verified state, and measuring its proposal (see
    the module docstring)."""

    name = "rerun"

    def __repr__(self) -> str:
        return "ReRun()"


def _plain_id(x: Any) -> bool:
    """A batch id that a ``weights_only`` checkpoint holds: an int, a str, or a tuple of them."""
    if isinstance(x, tuple):
        return all(isinstance(i, (int, str)) and not isinstance(i, bool) for i in x)
    return isinstance(x, (int, str)) and not isinstance(x, bool)


class Quarantine:
    """Rung 4: the identities of batches whose rejection was persistent (plain data, saved
    in the guard's ``state_dict``). ``batch_id in quarantine`` asks."""

    name = "quarantine"

    def __init__(self) -> None:
        self.ids: list[Hashable] = []
        self._set: set = set()

    def add(self, batch_id: Hashable) -> bool:
        """Record ``batch_id``; ``False`` if it was already quarantined."""
        if isinstance(batch_id, list):
            batch_id = tuple(batch_id)
        if not _plain_id(batch_id):
            raise TypeError(f"batch_id must be an int, a str or a tuple of them (so checkpoints "
                            f"can hold it), got {type(batch_id).__name__}.")
        if batch_id in self._set:
            return False
        self.ids.append(batch_id)
        self._set.add(batch_id)
        return True

    def __contains__(self, batch_id: Hashable) -> bool:
        return batch_id in self._set

    def __len__(self) -> int:
        return len(self.ids)

    def state_dict(self) -> dict[str, Any]:
        return {"ids": list(self.ids)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ids = state["ids"]
        if not isinstance(ids, list) or not all(_plain_id(i) for i in ids):
            raise ValueError("the quarantine's 'ids' must be a list of ints, strings or tuples "
                             "of them.")
        self.ids, self._set = list(ids), set(ids)

    def __repr__(self) -> str:
        return f"Quarantine({len(self.ids)} batches)"


class QuarantineSampler(torch.utils.data.Sampler):
    """Wrap a sampler or batch sampler: yield only what the guard has not quarantined.

    ``key(item)`` is the batch identity the loop passes as ``step(closure, batch_id=...)``
    (default: the item itself for a sampler of ints; ``tuple(batch)`` for a batch sampler
    is a good key). The guard's quarantine is read at every ``__iter__``, so batches
    quarantined during an epoch are skipped from the next epoch on, and after a resume.
    """

    def __init__(self, sampler, guard, key=None):
        self.sampler, self.guard = sampler, guard
        self.key = key if key is not None else (lambda item: item)

    def __iter__(self) -> Iterator:
        quarantine = self.guard.ladder.quarantine
        for item in self.sampler:
            if quarantine is None or self.key(item) not in quarantine:
                yield item

    def __len__(self) -> int:
        return len(self.sampler)


class ResetMoments(RecoveryAction):
    """Rung 5, opt-in (SPAM-style): after ``after`` rollbacks in a row, zero the optimizer's
    first-moment buffers (``keys``), so a momentum built from the damaging steps does not
    push the restored weights back into it. Second moments are kept (zeroing them makes
    Adam's next updates huge)."""

    name = "reset_moments"

    def __init__(self, after: int = 2, keys: tuple[str, ...] = ("exp_avg", "momentum_buffer")):
        if after < 1:
            raise ValueError(f"Invalid after: {after!r}; it must be >= 1.")
        self.after, self.keys, self.resets = after, tuple(keys), 0

    def on_rollback(self, guard, consecutive):
        if consecutive < self.after:
            return None
        bufs = [v for st in guard.state.values() for k, v in st.items()
                if k in self.keys and isinstance(v, torch.Tensor)]
        if bufs:
            torch._foreach_zero_(bufs)
        self.resets += 1
        return "reset_moments"

    def state_dict(self):
        return {"resets": self.resets}

    def load_state_dict(self, state):
        self.resets = int(state["resets"])

    def __repr__(self):
        return f"ResetMoments(after={self.after}, keys={self.keys})"


class Ladder:
    """The rungs the guard climbs (see the module docstring); each part is optional.

    Args:
        rerun: a :class:`ReRun` (default), or ``None`` to roll back without re-running.
        quarantine: the :class:`Quarantine` to fill (default: a new one).
        on_exhausted: ``"raise"`` (default: :class:`GuardStopped`) or ``"rebaseline"``.
        overrule: skips in a row after which a probe decides the next flagged step
            (opt-in, e.g. 3; default ``None``: never, the signal skips until its own
            patience re-bases). Off by default: on the digits CNN the probe accepted the
            4th step of a x300 gradient window (Adam's normalised update looks harmless to
            a probe while it poisons the second moment), the signal learnt the x300 level
            and the run ended 1.23x clean instead of 1.05x.
    """

    def __init__(self, rerun: ReRun | None = ReRun(), quarantine: Quarantine | None = None,
                 on_exhausted: str = "raise", overrule: int | None = None):
        if overrule is not None and (isinstance(overrule, bool) or not isinstance(overrule, int)
                                     or overrule < 1):
            raise ValueError(f"Invalid overrule: {overrule!r}; use an int >= 1, or None.")
        self.overrule = overrule
        if rerun is not None and not isinstance(rerun, ReRun):
            raise TypeError(f"rerun must be a ReRun() or None, got {rerun!r}.")
        if on_exhausted not in _EXHAUSTED:
            raise ValueError(f"Invalid on_exhausted: {on_exhausted!r}; choose one of {_EXHAUSTED}.")
        self.rerun = ReRun() if rerun is not None else None
        self.quarantine = quarantine if quarantine is not None else Quarantine()
        self.on_exhausted = on_exhausted

    def state_dict(self) -> dict[str, Any]:
        return {"quarantine": self.quarantine.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.quarantine.load_state_dict(state["quarantine"])

    def __repr__(self) -> str:
        return (f"Ladder(rerun={self.rerun!r}, quarantine={self.quarantine!r}, "
                f"on_exhausted={self.on_exhausted!r}, overrule={self.overrule!r})")
