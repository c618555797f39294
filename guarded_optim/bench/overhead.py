"""Overhead of the guard as a ratio to the bare inner optimizer, measured in one process.

Each repetition times every arm on the same task, seed and batches, in a rotated order
(paired and interleaved, so drift in machine load hits all arms alike); the reported
figure is the median over repetitions of ``time(arm) / time(bare)``.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import torch

from ..guard import GuardedOptimizer
from .tasks import Task, make_task

__all__ = ["ARMS", "time_arm", "overhead", "signal_arms"]

#: name -> how to wrap a fresh AdamW for the task; ``None`` is the bare optimizer.
ARMS: dict[str, Callable | None] = {
    "bare": None,
    "guard_probe_every_1": lambda task, inner: GuardedOptimizer(inner, task.probe, module=task.model),
    "guard_probe_every_10": lambda task, inner: GuardedOptimizer(inner, task.probe, module=task.model,
                                                                 probe_every=10),
    "guard_no_probe": lambda task, inner: GuardedOptimizer(inner),
}


def _task(task: str | Callable[[int], Task], seed: int) -> Task:
    return make_task(task, seed) if isinstance(task, str) else task(seed)


def time_arm(task: str | Callable[[int], Task], wrap: Callable | None, steps: int,
             warmup: int = 5, seed: int = 0) -> float:
    """Seconds for ``steps`` training steps (forward, backward, step) after ``warmup`` steps.

    ``task`` is a name for :func:`make_task` or a ``seed -> Task`` factory.
    """
    task = _task(task, seed)
    opt = torch.optim.AdamW(task.model.parameters(), lr=task.lr)
    if wrap is not None:
        opt = wrap(task, opt)
    batches = list(task.batches(warmup + steps))

    def one(x, y):
        opt.zero_grad(set_to_none=True)
        task.loss_fn(task.model(x), y).backward()
        opt.step()

    for x, y in batches[:warmup]:
        one(x, y)
    start = time.perf_counter()
    for x, y in batches[warmup:]:
        one(x, y)
    return time.perf_counter() - start


def signal_arms(signals: dict[str, Callable[[], Any]]) -> dict[str, Callable]:
    """One arm per signal: a probe-less guard that runs only that signal (its own cost)."""
    return {name: (lambda task, inner, make=make: GuardedOptimizer(inner, signals=[make()]))
            for name, make in signals.items()}


def overhead(task: str | Callable[[int], Task] = "cnn", arms: tuple[str, ...] | dict[str, Callable] = tuple(ARMS),
             steps: int = 50, repeats: int = 9, seed: int = 0, warmup: int = 5,
             progress: Callable[[int], None] | None = None) -> dict[str, dict[str, float]]:
    """Median (and min/max) over ``repeats`` of each arm's time relative to ``bare``.

    ``arms`` names entries of :data:`ARMS`, or maps names to ``wrap(task, inner)``.
    Returns ``{arm: {"ratio": median, "ratio_min":, "ratio_max":, "ms_per_step": median}}``.
    """
    table = dict(arms) if isinstance(arms, dict) else {a: ARMS[a] for a in arms}
    table = {"bare": None, **table}
    arms = tuple(table)
    times: dict[str, list[float]] = {a: [] for a in arms}
    ratios: dict[str, list[float]] = {a: [] for a in arms}
    for r in range(repeats):
        order = list(arms[r % len(arms):]) + list(arms[: r % len(arms)])
        this = {a: time_arm(task, table[a], steps, warmup, seed) for a in order}
        for a in arms:
            times[a].append(this[a])
            ratios[a].append(this[a] / this["bare"])
        if progress is not None:
            progress(r)
    return {a: {"ratio": statistics.median(ratios[a]), "ratio_min": min(ratios[a]),
                "ratio_max": max(ratios[a]), "ms_per_step": 1e3 * statistics.median(times[a]) / steps}
            for a in arms}
