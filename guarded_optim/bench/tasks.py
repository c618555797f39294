"""Tasks of the paper-001 protocol: model, data, loss and probe, built for one seed."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ..ladder import GuardStopped
from . import data, models

__all__ = ["Task", "make_task", "scaling_task", "TASKS", "train"]

TASKS = ("cnn", "transformer", "mlp", "resnet18")


@dataclass
class Task:
    """Everything one run needs; identical across arms for a given seed."""

    name: str
    model: torch.nn.Module
    split: data.Split
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    batch_size: int
    lr: float
    seed: int

    def probe(self) -> torch.Tensor:
        """Loss on the fixed probe set (the guard evaluates it under no_grad, in eval mode)."""
        return self.loss_fn(self.model(self.split.x_probe), self.split.y_probe)

    def probe_loss(self) -> float:
        """The probe loss as the report measures it (:func:`eval_value`)."""
        return eval_value(self.model, self.probe)

    def batches(self, steps: int):
        return data.batches(self.split.x_train, self.split.y_train, self.batch_size, steps, self.seed)


def _token_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def make_task(name: str, seed: int = 0, probe_size: int = 16) -> Task:
    """Build task ``name`` (one of :data:`TASKS`) with init and data fixed by ``seed``."""
    torch.manual_seed(seed)
    if name == "cnn":
        split = data.digits(probe_size=probe_size, seed=seed)
        return Task(name, models.DigitsCNN(), split, F.cross_entropy, 128, 1e-3, seed)
    if name == "resnet18":   # the paper's model, on the digits (no CIFAR-10 download here)
        split = data.digits(probe_size=probe_size, seed=seed)
        return Task(name, models.ResNet18(), split, F.cross_entropy, 128, 1e-3, seed)
    if name == "mlp":
        split = data.digits(probe_size=probe_size, seed=seed, flat=True)
        return Task(name, models.MLP(), split, F.cross_entropy, 128, 1e-3, seed)
    if name == "transformer":
        split, vocab = data.char_corpus(probe_size=probe_size, seed=seed)
        return Task(name, models.CharTransformer(vocab), split, _token_ce, 64, 5e-4, seed)
    raise ValueError(f"Unknown task {name!r}; choose one of {TASKS}.")


def scaling_task(params: int, seed: int = 0, inputs: int = 256, classes: int = 10) -> Task:
    """A two-hidden-layer MLP with about ``params`` parameters on :func:`data.teacher` data.

    The hidden width ``h`` solves ``inputs*h + h*h + classes*h ~= params``; the scaling run
    uses it to see how the guard's fixed and per-parameter costs compare as models grow.
    """
    b = inputs + classes
    hidden = max(1, round((-b + math.sqrt(b * b + 4 * params)) / 2))
    torch.manual_seed(seed)
    model = models.MLP(inputs=inputs, hidden=hidden, classes=classes, depth=2)
    return Task(f"mlp_{params:g}", model, data.teacher(inputs=inputs, classes=classes, seed=seed),
                F.cross_entropy, 128, 1e-3, seed)


def eval_value(model: torch.nn.Module, probe: Callable[[], torch.Tensor]) -> float:
    """``probe()`` as a float, measured in eval mode without grad; the mode is restored."""
    was = model.training
    model.eval()
    with torch.no_grad():
        value = float(probe())
    model.train(was)
    return value


def train(task: Task, optimizer: torch.optim.Optimizer, steps: int = 250, faults=None,
          on_step: Callable[[int], None] | None = None) -> list[float]:
    """Train ``steps`` steps; return the probe loss after every step.

    ``optimizer.step`` gets a closure returning the loss already computed (no second
    forward), so loss-based signals see it; bare optimizers return it unchanged. A guard
    that stops (:class:`~guarded_optim.GuardStopped`: its escalation budget spent) ends the
    run there, at its last verified state: the rest of the curve repeats that probe loss.
    """
    curve = []
    for t, (x, y) in enumerate(task.batches(steps)):
        if getattr(optimizer, "stopped", False):
            curve.append(curve[-1])
            continue
        optimizer.zero_grad()
        loss = task.loss_fn(task.model(x), y)
        if faults is not None:
            loss = faults.loss(t, loss)
        loss.backward()
        if faults is not None:
            faults.before_step(t, optimizer)
        try:
            optimizer.step(lambda loss=loss: loss)  # the loss, already computed, for loss signals
        except GuardStopped:
            optimizer.stopped = True
        if faults is not None:
            faults.after_step(t, optimizer)
        curve.append(task.probe_loss())
        if on_step is not None:
            on_step(t)
    return curve
