"""Seeded, windowed fault injection for tests, benchmarks and users' own loops.

A fault acts only while ``start <= t < start + length`` (``t`` counts optimizer steps from
0) and does nothing outside its window. Attach faults to any loop: call
``faults.before_step(t, optimizer)`` after ``backward()`` and before ``optimizer.step()``,
and ``faults.after_step(t, optimizer)`` after it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

import torch

__all__ = ["Fault", "ScaleGradients", "NonFiniteGradients", "LRSpike", "FaultSchedule"]


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


@dataclass
class Fault:
    """Base: a name and a window. Subclasses override ``before_step`` / ``after_step``."""

    start: int
    length: int = 1
    seed: int = 0

    @property
    def name(self) -> str:
        return type(self).__name__

    def active(self, t: int) -> bool:
        return self.start <= t < self.start + self.length

    def before_step(self, t: int, optimizer: torch.optim.Optimizer) -> None:
        pass

    def after_step(self, t: int, optimizer: torch.optim.Optimizer) -> None:
        pass


@dataclass
class ScaleGradients(Fault):
    """Multiply every gradient by ``factor`` (paper 001: ``zeta = 300`` for 10 steps from 120)."""

    factor: float = 300.0

    def before_step(self, t, optimizer):
        if self.active(t):
            grads = [p.grad for p in _params(optimizer) if p.grad is not None]
            if grads:
                torch._foreach_mul_(grads, self.factor)


@dataclass
class NonFiniteGradients(Fault):
    """Write ``value`` (NaN by default) into one seeded element of one gradient."""

    value: float = float("nan")

    def before_step(self, t, optimizer):
        if self.active(t):
            grads = [p.grad for p in _params(optimizer) if p.grad is not None]
            g = torch.Generator().manual_seed(self.seed + t)
            target = grads[int(torch.randint(len(grads), (1,), generator=g))]
            flat = target.view(-1)
            flat[int(torch.randint(flat.numel(), (1,), generator=g))] = self.value


@dataclass
class LRSpike(Fault):
    """Multiply every group's ``lr`` by ``factor`` for the steps in the window, then put it back."""

    factor: float = 1000.0
    _saved: list = field(default_factory=list, repr=False)

    def before_step(self, t, optimizer):
        if self.active(t):
            self._saved = [g["lr"] for g in optimizer.param_groups]
            for g in optimizer.param_groups:
                g["lr"] = g["lr"] * self.factor

    def after_step(self, t, optimizer):
        if self.active(t):
            for g, lr in zip(optimizer.param_groups, self._saved):
                g["lr"] = lr


class FaultSchedule:
    """Several faults applied in order."""

    def __init__(self, faults: Iterable[Fault] = ()):
        self.faults = list(faults)

    def before_step(self, t: int, optimizer: torch.optim.Optimizer) -> None:
        for f in self.faults:
            f.before_step(t, optimizer)

    def after_step(self, t: int, optimizer: torch.optim.Optimizer) -> None:
        for f in reversed(self.faults):
            f.after_step(t, optimizer)
