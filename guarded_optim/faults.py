"""Seeded, windowed fault injection for tests, benchmarks and users' own loops.

A fault acts only while ``start <= t < start + length`` (``t`` counts optimizer steps from
0) and does nothing outside its window. Attach faults to any loop::

    loss = faults.loss(t, loss)          # before backward(); only loss faults act here
    loss.backward()
    faults.before_step(t, optimizer)     # after backward(), before optimizer.step()
    optimizer.step()
    faults.after_step(t, optimizer)      # after optimizer.step()

``optimizer`` may be a plain torch optimizer or a :class:`~guarded_optim.GuardedOptimizer`
(only ``param_groups`` and ``state`` are used). Faults that need randomness draw it from
``torch.Generator().manual_seed(seed + t)``: the same seed and step give the same
corruption. All parameter / state edits are in place under ``torch.no_grad()``.

:func:`make_fault` builds a fault from a short name (:data:`FAULTS` lists them).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable

import torch

__all__ = [
    "Fault", "ScaleGradients", "NonFiniteGradients", "NonFiniteLoss", "LRSpike",
    "CorruptWeights", "CorruptOptimizerState", "SlowDrift", "SparsityInjection",
    "RankCollapse", "FaultSchedule", "make_fault", "FAULTS",
]


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in optimizer.param_groups for p in g["params"]]


def _matrices(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The non-empty 2-D parameters (Linear weights, embeddings): what matrix faults touch."""
    return [p for p in _params(optimizer) if p.dim() == 2 and p.numel() > 0]


def _gen(seed: int, t: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed + t)


def _randint(n: int, g: torch.Generator) -> int:
    return int(torch.randint(n, (1,), generator=g))


def _randn_like(p: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    return torch.randn(p.shape, generator=g, dtype=p.dtype).to(p.device)


def wait_for_snapshot(optimizer: torch.optim.Optimizer) -> None:
    """Before writing parameters or optimizer state in place between steps: let a guard's
    in-flight snapshot copy (host mode on CUDA) finish reading them first. No-op otherwise."""
    wait = getattr(optimizer, "wait_for_snapshot", None)
    if wait is not None:
        wait()


@dataclass
class Fault:
    """Base: a name and a window. Subclasses override ``loss`` / ``before_step`` / ``after_step``."""

    start: int
    length: int = 1
    seed: int = 0

    @property
    def name(self) -> str:
        return type(self).__name__

    def active(self, t: int) -> bool:
        return self.start <= t < self.start + self.length

    def loss(self, t: int, loss: torch.Tensor) -> torch.Tensor:
        """Hook on the loss before ``backward()``; the default returns ``loss`` unchanged."""
        return loss

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
class NonFiniteLoss(Fault):
    """Return ``loss * value`` (NaN by default; ``value=inf`` for an infinite loss) from ``loss()``.

    A loss cannot be changed after ``backward()``, so this fault acts only through the
    loss hook: the training loop must call ``loss = faults.loss(t, loss)`` *before*
    ``loss.backward()``. The gradients are then ``value * dloss/dparam``, i.e. non-finite too
    (NaN everywhere for ``value=nan``; +-inf, or NaN where the clean gradient is 0, for inf).
    ``before_step`` / ``after_step`` do nothing; a loop that never calls ``loss()`` sees no fault.
    """

    value: float = float("nan")

    def loss(self, t, loss):
        return loss * self.value if self.active(t) else loss


@dataclass
class LRSpike(Fault):
    """Multiply every group's ``lr`` by ``factor`` for the steps in the window, then put it back.

    ``before_step`` saves each group's lr and multiplies it; ``after_step`` writes the saved
    values back exactly, whatever the lr became in between (a scheduler stepping between the
    two calls is overridden: the lr is the one found before the step).
    """

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
            self._saved = []


_WEIGHT_MODES = ("zero", "scale", "nan", "inf", "bitflip", "noise")


@dataclass
class CorruptWeights(Fault):
    """Damage the parameters in ``before_step`` (so the damage is there when the optimizer steps).

    Modes (applied at every step of the window):

    * ``"zero"``: ``fraction=1.0`` sets every parameter to 0; ``fraction < 1`` zeroes a seeded
      random ``round(fraction * numel)`` elements of each parameter.
    * ``"scale"``: multiplies every parameter by ``factor`` (default ``1e4``).
    * ``"nan"`` / ``"inf"``: writes NaN / +inf into one seeded element of one seeded parameter.
    * ``"bitflip"``: flips ``bits`` distinct bits of float32 elements, each in a seeded random
      parameter (uniform over the contiguous float32 parameters) and a seeded random element,
      by viewing the storage as int32 and xor-ing. ``bit=None`` picks each bit uniformly in
      ``0..31`` (0-22 mantissa, 23-30 exponent, 31 sign); an int fixes it, e.g. ``bit=30``, the
      top exponent bit (turns a weight of magnitude < 2 into ~1e38 or inf-scale values).
      Exactly ``bits`` bits of the parameters change (the chosen (element, bit) pairs are
      distinct). Non-float32 or non-contiguous parameters are never chosen.
    * ``"noise"``: adds seeded gaussian noise of standard deviation ``scale`` to every element.
    """

    mode: str = "zero"
    fraction: float = 1.0
    factor: float = 1e4
    bits: int = 1
    bit: int | None = None
    scale: float = 1e-2

    def __post_init__(self):
        if self.mode not in _WEIGHT_MODES:
            raise ValueError(f"mode must be one of {_WEIGHT_MODES}, got {self.mode!r}")
        if self.bit is not None and not 0 <= self.bit <= 31:
            raise ValueError(f"bit must be None or in 0..31, got {self.bit}")

    @torch.no_grad()
    def before_step(self, t, optimizer):
        wait_for_snapshot(optimizer)
        if not self.active(t):
            return
        params = _params(optimizer)
        g = _gen(self.seed, t)
        if self.mode == "zero":
            for p in params:
                if self.fraction >= 1.0:
                    p.zero_()
                else:
                    k = int(round(self.fraction * p.numel()))
                    idx = torch.randperm(p.numel(), generator=g)[:k].to(p.device)
                    p.view(-1)[idx] = 0
        elif self.mode == "scale":
            torch._foreach_mul_(params, self.factor)
        elif self.mode in ("nan", "inf"):
            p = params[_randint(len(params), g)]
            p.view(-1)[_randint(p.numel(), g)] = float(self.mode)
        elif self.mode == "noise":
            for p in params:
                p.add_(_randn_like(p, g), alpha=self.scale)
        else:
            self._bitflip(params, g)

    def _bitflip(self, params, g):
        cands = [p for p in params if p.dtype == torch.float32 and p.is_contiguous() and p.numel()]
        if not cands:
            return
        capacity = sum(p.numel() for p in cands) * (32 if self.bit is None else 1)
        chosen: set[tuple[int, int, int]] = set()
        while len(chosen) < min(self.bits, capacity):
            i = _randint(len(cands), g)
            j = _randint(cands[i].numel(), g)
            b = _randint(32, g) if self.bit is None else self.bit
            chosen.add((i, j, b))
        for i, j, b in sorted(chosen):
            mask = (1 << b) if b < 31 else -(1 << 31)  # bit 31 as a signed int32
            ints = cands[i].view(torch.int32).view(-1)
            ints[j : j + 1].bitwise_xor_(mask)


_STATE_MODES = ("scale", "nan", "zero")


@dataclass
class CorruptOptimizerState(Fault):
    """Corrupt the optimizer-state tensor ``key`` of every parameter that has it, in ``before_step``.

    ``mode="scale"`` multiplies it by ``factor``; ``"nan"`` fills it with NaN; ``"zero"`` with 0.
    Parameters whose state lacks ``key`` (or is not a tensor) are skipped, so before the first
    step (no state yet) or with an optimizer without that key (SGD and ``exp_avg_sq``) the
    fault silently does nothing. The default ``key="exp_avg_sq"`` is Adam/AdamW's second moment.
    """

    key: str = "exp_avg_sq"
    mode: str = "scale"
    factor: float = 1e6

    def __post_init__(self):
        if self.mode not in _STATE_MODES:
            raise ValueError(f"mode must be one of {_STATE_MODES}, got {self.mode!r}")

    @torch.no_grad()
    def before_step(self, t, optimizer):
        wait_for_snapshot(optimizer)
        if not self.active(t):
            return
        state = optimizer.state
        for p in _params(optimizer):
            s = state.get(p) if hasattr(state, "get") else None  # .get: no defaultdict entries
            v = s.get(self.key) if s else None
            if not isinstance(v, torch.Tensor):
                continue
            if self.mode == "scale":
                v.mul_(self.factor)
            elif self.mode == "nan":
                v.fill_(float("nan"))
            else:
                v.zero_()


def _magnitude(p: torch.Tensor) -> float:
    """``p.std()``; for a 1-element or constant tensor ``mean|p|``; if that is 0 too, 1."""
    if p.numel() > 1:
        s = float(p.detach().float().std())
        if math.isfinite(s) and s > 0:
            return s
    m = float(p.detach().float().abs().mean()) if p.numel() else 0.0
    return m if math.isfinite(m) and m > 0 else 1.0


@dataclass
class SlowDrift(Fault):
    """Silent gradual drift: each step of the window adds ``noise * scale * std(p)`` to each param.

    ``noise`` is seeded standard gaussian noise of ``p``'s shape (a fresh draw every step);
    ``std(p)`` is measured on the current values (a 1-element or constant parameter, such as a
    fresh BatchNorm weight, uses ``mean|p|``, or 1 where that is 0). Applied in ``before_step``.
    """

    scale: float = 1e-3

    @torch.no_grad()
    def before_step(self, t, optimizer):
        wait_for_snapshot(optimizer)
        if not self.active(t):
            return
        g = _gen(self.seed, t)
        for p in _params(optimizer):
            p.add_(_randn_like(p, g), alpha=self.scale * _magnitude(p))


@dataclass
class SparsityInjection(Fault):
    """Zero the ``ceil(fraction * numel)`` smallest-``|w|`` elements of every 2-D parameter.

    Only 2-D parameters (Linear weights, embeddings) are touched; biases, norms and conv
    kernels are left alone. Deterministic (``seed`` unused). Applied in ``before_step``.
    """

    fraction: float = 0.9

    @torch.no_grad()
    def before_step(self, t, optimizer):
        wait_for_snapshot(optimizer)
        if not self.active(t):
            return
        for p in _matrices(optimizer):
            k = min(p.numel(), math.ceil(self.fraction * p.numel() - 1e-9))
            if k <= 0:
                continue
            idx = torch.topk(p.detach().abs().reshape(-1), k, largest=False).indices
            p.view(-1)[idx] = 0


@dataclass
class RankCollapse(Fault):
    """Replace every 2-D parameter by its best rank-``rank`` approximation, same Frobenius norm.

    Truncated SVD (``torch.linalg.svd``, computed in float64) keeps the ``rank`` largest
    singular values; the result is rescaled to the original Frobenius norm. Other parameters
    are left alone; a weight whose rank is already ``<= rank`` is unchanged up to rounding.
    Deterministic (``seed`` unused). Applied in ``before_step``.
    """

    rank: int = 1

    @torch.no_grad()
    def before_step(self, t, optimizer):
        wait_for_snapshot(optimizer)
        if not self.active(t):
            return
        for p in _matrices(optimizer):
            w = p.detach().double()
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            r = min(self.rank, s.numel())
            low = (u[:, :r] * s[:r]) @ vh[:r]
            n_low = torch.linalg.matrix_norm(low)
            if n_low > 0:
                low = low * (torch.linalg.matrix_norm(w) / n_low)
            p.copy_(low.to(p.dtype))


class FaultSchedule:
    """Several faults applied in order (``after_step`` in reverse order, undoing like a stack)."""

    def __init__(self, faults: Iterable[Fault] = ()):
        self.faults = list(faults)

    def loss(self, t: int, loss: torch.Tensor) -> torch.Tensor:
        """Pass ``loss`` through every fault's ``loss`` hook; call it before ``backward()``."""
        for f in self.faults:
            loss = f.loss(t, loss)
        return loss

    def before_step(self, t: int, optimizer: torch.optim.Optimizer) -> None:
        for f in self.faults:
            f.before_step(t, optimizer)

    def after_step(self, t: int, optimizer: torch.optim.Optimizer) -> None:
        for f in reversed(self.faults):
            f.after_step(t, optimizer)


_REGISTRY: dict[str, tuple[type, dict]] = {
    "grad_x300": (ScaleGradients, {"factor": 300.0}),
    "nan_grad": (NonFiniteGradients, {"value": float("nan")}),
    "inf_grad": (NonFiniteGradients, {"value": float("inf")}),
    "nan_loss": (NonFiniteLoss, {"value": float("nan")}),
    "inf_loss": (NonFiniteLoss, {"value": float("inf")}),
    "lr_x50": (LRSpike, {"factor": 50.0}),
    "lr_x1000": (LRSpike, {"factor": 1000.0}),
    "lr_x100000": (LRSpike, {"factor": 100000.0}),
    "weights_zero": (CorruptWeights, {"mode": "zero"}),
    "weights_x1e4": (CorruptWeights, {"mode": "scale", "factor": 1e4}),
    "weights_nan": (CorruptWeights, {"mode": "nan"}),
    "weights_noise": (CorruptWeights, {"mode": "noise", "scale": 1e-1}),
    "bitflip": (CorruptWeights, {"mode": "bitflip", "bits": 1, "bit": 30}),
    "bitflip_random": (CorruptWeights, {"mode": "bitflip", "bits": 1, "bit": None}),
    "adam_state_x1e6": (CorruptOptimizerState, {"key": "exp_avg_sq", "mode": "scale", "factor": 1e6}),
    "adam_state_nan": (CorruptOptimizerState, {"key": "exp_avg_sq", "mode": "nan"}),
    "adam_state_zero": (CorruptOptimizerState, {"key": "exp_avg_sq", "mode": "zero"}),
    "slow_drift": (SlowDrift, {"scale": 1e-3}),
    "sparsity_90": (SparsityInjection, {"fraction": 0.9}),
    "rank_collapse": (RankCollapse, {"rank": 1}),
}

#: Names accepted by :func:`make_fault`. ``"bitflip"`` flips exponent bit 30 of one weight;
#: ``"bitflip_random"`` one uniformly random bit. ``"nan_loss"`` / ``"inf_loss"`` act only in
#: loops that call ``faults.loss(t, loss)`` before ``backward()``.
FAULTS: tuple[str, ...] = tuple(_REGISTRY)


def make_fault(name: str, start: int, length: int, seed: int = 0, **kw) -> Fault:
    """Build the fault called ``name`` (one of :data:`FAULTS`); ``kw`` overrides its defaults."""
    try:
        cls, defaults = _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown fault {name!r}; known: {', '.join(FAULTS)}") from None
    return cls(start=start, length=length, seed=seed, **{**defaults, **kw})
