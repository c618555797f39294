"""The benchmark's vocabulary as data: arms (how an optimizer is wrapped), scenarios (which
faults hit the run, and when), ablation rows (which signal families the guard runs), and one
run of an arm on a seed.

Every arm of a seed sees the same initial weights and batch order (``make_task(name, seed)``
and the task's own batch generator). Numbers come from the runs; nothing is typed in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..events import StepEvent
from ..faults import (CorruptWeights, Fault, FaultSchedule, LRSpike, ScaleGradients, SlowDrift,
                      make_fault)
from ..conformal import ConformalForecast, ConformalThreshold
from ..fisher import FisherDiagonal, ImportanceWeightedRollback
from ..guard import GuardedOptimizer
from ..signals import (EffectiveRank, GradientAgreement, GradientEntropy, GradientSpike,
                       LayerwiseCV, LossSpike, NonFinite, NonFiniteWeights, OptimizerStateHealth,
                       Sparsity, WeightNorm, default_signals)
from ..signals.curvature import CurvatureSpike
from ..signals.dynamics import Lyapunov
from ..signals.gradients import global_norm
from .tasks import Task, make_task, train

__all__ = ["Wrap", "ARMS", "Scenario", "SCENARIOS", "ABLATIONS", "Run", "run_arm",
           "scenario_faults"]

#: ``wrap(task, inner) -> optimizer``; ``None`` is the bare inner optimizer.
Wrap = Callable[[Task, torch.optim.Optimizer], torch.optim.Optimizer] | None

ARMS: dict[str, Wrap] = {
    "bare": None,
    "guarded_probe": lambda task, inner: GuardedOptimizer(inner, task.probe, module=task.model),
    "guarded_signals": lambda task, inner: GuardedOptimizer(inner, module=task.model),
    "loss_rollback": lambda task, inner: GuardedOptimizer(   # naive: training-loss spikes only
        inner, module=task.model, signals=[NonFinite(), LossSpike()]),
    "skip_nonfinite": lambda task, inner: GuardedOptimizer(  # what GradScaler-style guards do
        inner, signals=[NonFinite()]),
}


@dataclass(frozen=True)
class Scenario:
    """A named fault pattern (ARC, tables 6-8). ``faults`` builds the faults for a run whose
    fault window starts at ``start`` of ``steps``; a control builds none (or a benign change
    for the whole run) and any intervention on it is a false alarm."""

    name: str
    build: Callable[[int, int, int], list[Fault]]   # (start, steps, seed) -> faults
    length: int = 1
    control: bool = False


def _named(fault: str, length: int = 1, **kw) -> Callable[[int, int, int], list[Fault]]:
    return lambda start, steps, seed: [make_fault(fault, start, length, seed=seed, **kw)]


def _whole_run(cls, **kw) -> Callable[[int, int, int], list[Fault]]:
    return lambda start, steps, seed: [cls(start=0, length=steps, seed=seed, **kw)]


def _scenario(name: str, fault: str, length: int = 1, **kw) -> Scenario:
    return Scenario(name, _named(fault, length, **kw), length)


#: At least 30 named scenarios: 4 clean controls, then the faults of ARC's suites and paper 001.
SCENARIOS: dict[str, Scenario] = {s.name: s for s in [
    Scenario("clean", lambda start, steps, seed: [], 0, control=True),
    Scenario("clean_lr_x3", _whole_run(LRSpike, factor=3.0), 0, control=True),
    Scenario("clean_lr_x0.1", _whole_run(LRSpike, factor=0.1), 0, control=True),
    Scenario("clean_grad_x3", _whole_run(ScaleGradients, factor=3.0), 0, control=True),
    _scenario("nan_bomb", "nan_loss"),
    _scenario("nan_loss_burst", "nan_loss", 10),
    _scenario("inf_nuke", "inf_loss"),
    _scenario("nan_grad", "nan_grad"),
    _scenario("nan_grad_burst", "nan_grad", 10),
    _scenario("inf_grad", "inf_grad"),
    _scenario("lr_x50", "lr_x50", 10),
    _scenario("lr_x50_single", "lr_x50"),
    _scenario("lr_x1000", "lr_x1000"),
    _scenario("lr_x1000_burst", "lr_x1000", 10),
    _scenario("lr_x100000", "lr_x100000"),
    _scenario("grad_x300", "grad_x300", 10),             # paper 001's protocol
    _scenario("grad_x300_single", "grad_x300"),
    _scenario("grad_x300_long", "grad_x300", 40),
    _scenario("grad_x30", "grad_x300", 10, factor=30.0),
    _scenario("weights_zero", "weights_zero"),
    _scenario("weights_x1e4", "weights_x1e4"),
    _scenario("weights_nan", "weights_nan"),
    _scenario("weights_noise", "weights_noise"),
    _scenario("bitflip_exponent", "bitflip"),
    _scenario("bitflip_random", "bitflip_random"),
    _scenario("bitflip_x100", "bitflip_random", bits=100),
    _scenario("adam_state_x1e6", "adam_state_x1e6"),
    _scenario("adam_state_nan", "adam_state_nan"),
    _scenario("adam_state_zero", "adam_state_zero"),
    _scenario("slow_drift", "slow_drift", 40),
    Scenario("slow_drift_strong", lambda start, steps, seed: [
        SlowDrift(start=start, length=20, seed=seed, scale=3e-2)], 20),
    _scenario("sparsity_90", "sparsity_90"),
    _scenario("rank_collapse", "rank_collapse"),
    Scenario("compound_nan_lr", lambda start, steps, seed: [       # two faults at once
        make_fault("nan_grad", start, 1, seed=seed), make_fault("lr_x1000", start + 1, 5, seed=seed)], 6),
    Scenario("weights_x1e4_late", lambda start, steps, seed: [
        CorruptWeights(start=steps - 10, length=1, seed=seed, mode="scale", factor=1e4)], 1),
]}


def scenario_faults(scenario: Scenario, start: int, steps: int, seed: int) -> FaultSchedule:
    return FaultSchedule(scenario.build(start, steps, seed))


def _without(*families: str) -> Callable[[], list]:
    drop = {"nonfinite": (NonFinite, NonFiniteWeights), "gradient": (GradientSpike,),
            "loss": (LossSpike,), "weights": (WeightNorm,),
            "optimizer_state": (OptimizerStateHealth,)}
    kinds = tuple(k for f in families for k in drop[f])
    return lambda probe: [s for s in default_signals(probe) if not isinstance(s, kinds)]


def _with(*extra: Callable[[], Any]) -> Callable[[bool], list]:
    return lambda probe: default_signals(probe) + [make() for make in extra]


def _ablation(signals: Callable[[bool], list], probe: bool = True,
              **parts: Callable[[Task], Any]) -> Wrap:
    """A guard with ``signals(probe)``; each of ``parts`` builds a fresh keyword argument per run."""
    return lambda task, inner: GuardedOptimizer(
        inner, task.probe if probe else None, module=task.model, signals=signals(probe),
        **{k: make(task) for k, make in parts.items()})


def _curvature(task: Task) -> list:
    return default_signals(True) + [CurvatureSpike(task.probe, module=task.model, every=50)]


#: Ablation rows: the default guard, each signal family switched off, the opt-in extras of
#: issue 3 and ARC's analytic tools (issue 6). ``EWCPenalty`` has no row: it changes the
#: training loss, which needs the user's closure to call ``ewc_penalty(opt)``; ``FisherDrift``
#: has none until its ``tau`` is calibrated (see the README).
ABLATIONS: dict[str, Wrap] = {
    "default": ARMS["guarded_probe"],
    "-probe": ARMS["guarded_signals"],
    "-nonfinite": _ablation(_without("nonfinite")),
    "-gradient": _ablation(_without("gradient")),
    "-probe-loss": _ablation(_without("loss"), probe=False),   # the probe default lacks it
    "-weights": _ablation(_without("weights")),
    "-optimizer_state": _ablation(_without("optimizer_state")),
    "+loss": _ablation(lambda probe: default_signals(False)),   # LossSpike with a probe too
    "probe_only": _ablation(lambda probe: []),
    "+sparsity_rank": _ablation(_with(Sparsity, EffectiveRank)),
    "+sparsity_rank-probe": _ablation(_with(Sparsity, EffectiveRank), probe=False),
    "+gradient_stats": _ablation(_with(GradientAgreement, LayerwiseCV, GradientEntropy)),
    "+lyapunov": _ablation(_with(Lyapunov)),
    "+lyapunov-probe": _ablation(_with(Lyapunov), probe=False),
    "+curvature": lambda task, inner: GuardedOptimizer(inner, task.probe, module=task.model,
                                                       signals=_curvature(task)),
    "conformal_threshold": _ablation(default_signals,
                                     threshold=lambda task: ConformalThreshold(alpha=0.01)),
    "+forecast": _ablation(default_signals, recovery=lambda task: [ConformalForecast()]),
    "+importance_rollback": _ablation(default_signals, recovery=lambda task: [
        FisherDiagonal(), ImportanceWeightedRollback()]),
}


@dataclass
class Run:
    """One arm on one seed: probe loss and parameter norm after every step, the guard's events."""

    arm: str
    seed: int
    curve: list[float]
    param_norm: list[float] = field(default_factory=list)
    events: list[StepEvent] = field(default_factory=list)
    stats: dict[str, int] = field(default_factory=dict)

    @property
    def decisions(self) -> list[str]:
        return [e.decision for e in self.events]


def run_arm(task_name: str, arm: str, seed: int, steps: int, faults: FaultSchedule | None = None,
            wrap: Wrap | None = None) -> Run:
    """Train a fresh ``task_name`` for ``steps`` steps under ``ARMS[arm]`` (or ``wrap``)."""
    task = make_task(task_name, seed)
    opt = torch.optim.AdamW(task.model.parameters(), lr=task.lr)
    wrap = ARMS.get(arm) if wrap is None else wrap
    events: list[StepEvent] = []
    if wrap is not None:
        opt = wrap(task, opt)
        opt.callbacks.append(events.append)
    params = list(task.model.parameters())
    norms: list[float] = []
    curve = train(task, opt, steps, faults,
                  on_step=lambda t: norms.append(float(global_norm([p.detach() for p in params]))))
    return Run(arm, seed, curve, norms, events, dict(getattr(opt, "stats", {})))
