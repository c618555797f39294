"""Older verified snapshots, kept to reach back past damage accepted earlier."""

from __future__ import annotations

from typing import Any, Callable, Iterable

from .core import Snapshot


class SnapshotRing:
    """Older verified snapshots, newest last, to reach back past damage accepted earlier.

    ``push(src)`` copies a snapshot into the ring, reusing the oldest slot's buffers once
    the ring is full. ``newest_before(step)`` returns the newest entry captured before
    ``step``; ``drop_from(step)`` forgets entries at or after ``step`` (they descend from the
    damage a rollback escapes). ``factory`` makes an empty slot.
    """

    def __init__(self, capacity: int, factory: Callable[[], Snapshot]):
        self.capacity = capacity
        self._factory = factory
        self._slots: list[Snapshot] = []

    def __len__(self) -> int:
        return len(self._slots)

    def __iter__(self):
        return iter(self._slots)

    def push(self, src: Snapshot) -> None:
        if self.capacity <= 0:
            return
        slot = self._slots.pop(0) if len(self._slots) >= self.capacity else self._factory()
        slot.copy_from(src)
        self._slots.append(slot)

    def newest_before(self, step: int) -> Snapshot | None:
        for snap in reversed(self._slots):
            if snap.step < step:
                return snap
        return None

    def drop_from(self, step: int) -> None:
        self._slots = [s for s in self._slots if s.step < step]

    def state_dict(self) -> list[dict[str, Any]]:
        return [s.state_dict() for s in self._slots]

    def load_state_dict(self, entries: Iterable[dict[str, Any]]) -> None:
        self._slots = []
        for sd in entries:
            slot = self._factory()
            slot.load_state_dict(sd)
            self._slots.append(slot)
