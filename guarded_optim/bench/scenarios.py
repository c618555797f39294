"""Paper 001's protocol (sec. 3.3) as data: arms, one run per (arm, seed), and its summary.

Every arm of a seed sees the same initial weights and batch order (``make_task(name, seed)``
and the task's own batch generator). Numbers come from the runs; nothing is typed in.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..guard import GuardedOptimizer
from ..signals import LossSpike, NonFinite
from ..faults import FaultSchedule, make_fault
from .tasks import Task, make_task, train

__all__ = ["ARMS", "Run", "run_arm", "summarise"]

#: arm name -> wrap(task, inner) (``None``: the bare optimizer)
ARMS: dict[str, Callable[[Task, torch.optim.Optimizer], torch.optim.Optimizer] | None] = {
    "bare": None,
    "guarded_probe": lambda task, inner: GuardedOptimizer(inner, task.probe, module=task.model),
    "guarded_signals": lambda task, inner: GuardedOptimizer(inner, module=task.model),
    "loss_rollback": lambda task, inner: GuardedOptimizer(   # naive: training-loss spikes only
        inner, module=task.model, signals=[NonFinite(), LossSpike()]),
    "skip_nonfinite": lambda task, inner: GuardedOptimizer(  # what GradScaler-style guards do
        inner, signals=[NonFinite()]),
}


@dataclass
class Run:
    """One arm on one seed: the probe-loss curve and the guard's events (if any)."""

    arm: str
    seed: int
    curve: list[float]
    decisions: list[str] = field(default_factory=list)
    steps_of: list[int] = field(default_factory=list)


def run_arm(task_name: str, arm: str, seed: int, steps: int, fault: str | None,
            start: int, length: int) -> Run:
    task = make_task(task_name, seed)
    opt = torch.optim.AdamW(task.model.parameters(), lr=task.lr)
    events = []
    if ARMS[arm] is not None:
        opt = ARMS[arm](task, opt)
        opt.callbacks.append(events.append)
    faults = FaultSchedule([make_fault(fault, start, length, seed=seed)]) if fault else None
    curve = train(task, opt, steps, faults)
    return Run(arm, seed, curve, [e.decision for e in events], [e.step for e in events])


def summarise(runs: list[Run], clean: dict[int, list[float]], start: int, length: int
              ) -> dict[str, dict[str, float]]:
    """Per arm, over seeds: final probe loss / clean (mean, std), peak after the fault / clean
    peak, interventions inside and outside the fault window (mean per run)."""
    out: dict[str, dict[str, float]] = {}
    for arm in dict.fromkeys(r.arm for r in runs):
        rs = [r for r in runs if r.arm == arm]
        finals = [r.curve[-1] / clean[r.seed][-1] for r in rs]
        peaks = [max(r.curve[start:]) / max(clean[r.seed][start:]) for r in rs]
        inside = [sum(d != "accept" and start <= s < start + length + 1
                      for d, s in zip(r.decisions, r.steps_of)) for r in rs]
        outside = [sum(d != "accept" and not start <= s < start + length + 1
                       for d, s in zip(r.decisions, r.steps_of)) for r in rs]
        out[arm] = {
            "final_ratio": statistics.mean(finals),
            "final_ratio_std": statistics.pstdev(finals),
            "peak_ratio": statistics.mean(peaks),
            "interventions_in_window": statistics.mean(inside),
            "false_interventions": statistics.mean(outside),
        }
    return out
