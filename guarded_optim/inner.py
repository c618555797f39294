"""Running the inner optimizer's ``step`` inside the guard's: the proposal (phase 4).

The guard owns torch's step hooks (global ones fire once per ``guard.step()``, with the
guard as ``opt``), hands the inner optimizer the loss its closure already computed, and
applies the recovery actions' LR scale around ``inner.step()`` only, so LR schedulers keep
owning ``param_groups[i]["lr"]``.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

__all__ = ["propose", "lr_scale", "replay", "global_step_hooks_muted", "on_meta", "accelerator",
           "inner_step_count"]


def replay(loss: Any, closure: Callable | None) -> Callable | None:
    """A closure whose first call returns ``loss`` (already computed) and later calls recompute.

    Optimizers that evaluate the closure once (Adam, SGD) get the cached loss; those that
    evaluate it again (LBFGS) get fresh evaluations after the first.
    """
    if closure is None:
        return None
    first = [True]

    def cached():
        if first[0]:
            first[0] = False
            return loss
        with torch.enable_grad():
            return closure()

    return cached


@contextlib.contextmanager
def global_step_hooks_muted():
    """Run the inner optimizer's ``step`` without torch's global step hooks: they fire once
    per ``guard.step()``, with the guard as ``opt`` (the inner optimizer's own hooks still
    fire). Free when no global hook is registered."""
    hooks = (_global_optimizer_pre_hooks, _global_optimizer_post_hooks)
    if not any(hooks):
        yield
        return
    saved = [dict(h) for h in hooks]
    for h in hooks:
        h.clear()
    try:
        yield
    finally:
        for h, s in zip(hooks, saved):
            added = dict(h)
            h.clear()
            h.update(s)
            h.update(added)


def lr_scale(recovery: list, ladder) -> float:
    """The guard's LR multiplier: the healing rung's scale times the recovery actions'."""
    return ladder.lr_scale() * math.prod(a.lr_scale() for a in recovery)


def propose(inner: Optimizer, scale: float, loss: Any, closure: Callable | None) -> None:
    """``inner.step()`` on the cached loss, with the guard's LR ``scale`` applied to every
    group around it only (the groups' ``lr`` is back as it was afterwards)."""
    base = [g["lr"] for g in inner.param_groups] if scale != 1.0 else []
    for g, lr in zip(inner.param_groups, base):
        g["lr"] = lr * scale
    try:
        with global_step_hooks_muted():
            inner.step(replay(loss, closure))
    finally:
        for g, lr in zip(inner.param_groups, base):
            g["lr"] = lr


def on_meta(param_groups: list[dict]) -> bool:
    """Whether the parameters are on the meta device (they hold no values: the guard then
    steps exactly as the bare optimizer)."""
    for g in param_groups:
        for p in g["params"]:
            return p.is_meta
    return False


def accelerator(param_groups: list[dict]) -> torch.device | None:
    """The device of the first parameter not on the CPU (where NCCL reduces), if any."""
    for g in param_groups:
        for p in g["params"]:
            if p.device.type != "cpu":
                return p.device
    return None


def inner_step_count(inner: Optimizer) -> int:
    """The steps the inner optimizer has taken, where its state counts them (Adam's
    ``state[p]["step"]``; the largest over the parameters), else 0. A guard that adopts a
    running optimizer numbers its steps from here, so its events line up with the run."""
    steps = [float(st["step"]) for st in inner.state.values()
             if isinstance(st, dict) and "step" in st
             and not (isinstance(st["step"], torch.Tensor) and st["step"].is_meta)]
    return int(max(steps)) if steps else 0
