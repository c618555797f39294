"""Loss-landscape curvature (ARC, sec. 3.2.2): on-demand diagnostics and an opt-in signal.

Pure functions of ``(loss_fn, params)``; ``loss_fn()`` returns a differentiable scalar loss
(e.g. the probe on a fixed batch). Hessian-vector products come from double backward,
``Hv = grad(grad(L) . v)``, without forming ``H``; ``p.grad`` is never touched, parameters
are left exactly as they were, and random vectors come from a ``torch.Generator`` of their
own (the global RNG is untouched):

* :func:`hessian_vector_product` -- ``H v`` for a list ``v`` shaped like ``params``.
* :func:`hutchinson_trace` -- ``Tr H ~ mean_i v_i^T H v_i``, ``v_i`` Rademacher (unbiased).
* :func:`hessian_lambda_max` -- power iteration (Algorithm 2): the eigenvalue of largest
  magnitude, which is ``lambda_max`` when ``H`` is positive semi-definite near a minimum.
* :func:`sam_sharpness` -- ``L(theta + rho g / ||g||) - L(theta)``.

Each costs one backward with ``create_graph`` plus one extra backward per ``H v``.
:class:`CurvatureSpike` runs one of them every ``every`` measurements as a post-step signal.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Sequence

import torch

from .base import StepMeasurement, Verdict

__all__ = ["hessian_vector_product", "hutchinson_trace", "hessian_lambda_max", "sam_sharpness",
           "CurvatureSpike"]

LossFn = Callable[[], torch.Tensor]


def _grads(loss_fn: LossFn, params: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    with torch.enable_grad():
        loss = loss_fn()
        return torch.autograd.grad(loss, list(params), create_graph=True, allow_unused=True)


def _hvp(grads, params, v: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    pairs = [(g, p, u) for g, p, u in zip(grads, params, v) if g is not None]
    dot = sum((g * u).sum() for g, _, u in pairs)
    hv = torch.autograd.grad(dot, [p for _, p, _ in pairs], retain_graph=True, allow_unused=True)
    out, it = [], iter(hv)
    for g, p in zip(grads, params):
        h = next(it) if g is not None else None
        out.append(torch.zeros_like(p) if h is None else h.detach())
    return out


def _dot(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> torch.Tensor:
    return torch.stack([(x.double() * y.double()).sum() for x, y in zip(a, b)]).sum()


def hessian_vector_product(loss_fn: LossFn, params: Sequence[torch.Tensor],
                           v: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``H v`` at the current parameters (one double backward)."""
    params = list(params)
    return _hvp(_grads(loss_fn, params), params, v)


def hutchinson_trace(loss_fn: LossFn, params: Sequence[torch.Tensor], samples: int = 10,
                     seed: int = 0) -> torch.Tensor:
    """Hutchinson's estimate ``(1/k) sum_i v_i^T H v_i`` with Rademacher ``v_i`` (sec. 3.2.2).

    Unbiased; its variance is ``2 sum_{i != j} H_ij^2 / k`` (exact for a diagonal ``H``).
    0-d float64 tensor. ``samples`` double backwards share one graph.
    """
    params = list(params)
    gen = torch.Generator().manual_seed(seed)
    grads = _grads(loss_fn, params)
    total = torch.zeros((), dtype=torch.float64, device=params[0].device)
    for _ in range(samples):
        v = [(torch.randint(0, 2, p.shape, generator=gen) * 2 - 1).to(p.device, p.dtype)
             for p in params]
        total = total + _dot(v, _hvp(grads, params, v))
    return total / samples


def hessian_lambda_max(loss_fn: LossFn, params: Sequence[torch.Tensor], iters: int = 20,
                       seed: int = 0) -> torch.Tensor:
    """Power iteration on ``H`` (Algorithm 2): ``v <- Hv / ||Hv||`` ``iters`` times from a
    Gaussian start, then the Rayleigh quotient ``v^T H v``. Converges to the eigenvalue of
    largest magnitude at the rate ``|lambda_2 / lambda_1|`` per iteration. 0-d float64."""
    params = list(params)
    gen = torch.Generator().manual_seed(seed)
    grads = _grads(loss_fn, params)
    v = [torch.randn(p.shape, generator=gen).to(p.device, p.dtype) for p in params]
    for _ in range(iters):
        norm = _dot(v, v).sqrt().clamp_min(1e-30)
        v = [u / norm.to(u.dtype) for u in v]
        v = _hvp(grads, params, v)
    norm = _dot(v, v).sqrt().clamp_min(1e-30)
    v = [u / norm.to(u.dtype) for u in v]
    return _dot(v, _hvp(grads, params, v))


def sam_sharpness(loss_fn: LossFn, params: Sequence[torch.Tensor], rho: float = 0.05) -> torch.Tensor:
    """``L(theta + rho g / ||g||) - L(theta)`` (sec. 3.2.2): the loss rise one ascent step of
    radius ``rho`` away. Parameters are perturbed in place and restored bit for bit. 0-d."""
    params = list(params)
    with torch.enable_grad():
        loss = loss_fn()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params)]
    norm = _dot(grads, grads).sqrt().clamp_min(1e-30)
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        try:
            torch._foreach_add_(params, [g * (rho / norm).to(g.dtype) for g in grads])
            perturbed = loss_fn().detach()
        finally:
            torch._foreach_copy_(params, saved)
    return perturbed - loss.detach()


_METHODS = {"lambda_max": hessian_lambda_max, "trace": hutchinson_trace, "sam": sam_sharpness}


class CurvatureSpike:
    """FAILURE when the curvature of the proposed state explodes against its running reference.

    Every ``every``-th measurement it evaluates ``method`` (``"lambda_max"``, ``"trace"`` or
    ``"sam"``) of ``loss_fn`` (e.g. the probe: ``CurvatureSpike(probe, module=model)``) on
    the measured parameters, in eval mode when ``module`` is given (every submodule's mode
    restored; BatchNorm statistics untouched). It fires when the value is non-finite or
    exceeds ``factor`` x the median of the last ``window`` healthy values (after ``warmup``
    of them). In between it returns a constant ``False`` and costs nothing.

    Cost per evaluation: ``lambda_max`` ``iters + 2`` backward passes of ``loss_fn`` (10
    iterations by default), ``trace`` ``samples + 1``, ``sam`` two forwards and a backward.
    The value stays on the device: no host sync. Opt-in, off by default.
    """

    name = "curvature"
    phase, verdict = "after", Verdict.FAILURE

    def __init__(self, loss_fn: LossFn, module: torch.nn.Module | None = None, every: int = 50,
                 method: str = "lambda_max", factor: float = 10.0, window: int = 20,
                 warmup: int = 3, **options: Any):
        if not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (zero arguments), got {type(loss_fn).__name__}.")
        if method not in _METHODS:
            raise ValueError(f"Invalid method: {method!r}; choose one of {sorted(_METHODS)}.")
        if every < 1 or not factor > 1 or window < 1 or warmup < 1:
            raise ValueError(f"Invalid every={every!r} / factor={factor!r} / window={window!r} / "
                             f"warmup={warmup!r}; need every >= 1, factor > 1, window >= 1, "
                             "warmup >= 1.")
        self.loss_fn, self.module, self.method, self.options = loss_fn, module, method, options
        self.every, self.factor, self.window, self.warmup = every, factor, window, warmup
        if method != "sam":
            self.options.setdefault("iters" if method == "lambda_max" else "samples", 10)
        self.rebase()

    def rebase(self) -> None:
        """Forget the reference values."""
        self.values: list[torch.Tensor] = []
        self.calls = 0
        self.evaluations = 0
        self._value: torch.Tensor | None = None

    def __deepcopy__(self, memo):
        """Copies share ``loss_fn`` and ``module`` (the guard deep-copies signals on load)."""
        new = copy.copy(self)
        new.values = [v.clone() for v in self.values]
        new.options = dict(self.options)
        return new

    def evaluate(self, params: Sequence[torch.Tensor]) -> torch.Tensor:
        """``method`` of ``loss_fn`` at ``params`` now, in eval mode (0-d tensor)."""
        modes = [(m, m.training) for m in self.module.modules()] if self.module is not None else []
        if self.module is not None:
            self.module.eval()
        try:
            return _METHODS[self.method](self.loss_fn, params, **self.options).detach()
        finally:
            for m, training in modes:
                m.training = training

    def measure(self, m: StepMeasurement) -> torch.Tensor:
        self.calls += 1
        device = m.grad_norm.device
        self._value = None
        if (self.calls - 1) % self.every:
            return torch.zeros((), dtype=torch.bool, device=device)
        value = self._value = self.evaluate(m.params).to(device)
        self.evaluations += 1
        bad = ~torch.isfinite(value)
        if len(self.values) >= self.warmup:
            reference = torch.stack(self.values).median()
            bad = bad | (value.abs() > self.factor * reference.abs())
        return bad

    def observe(self, m: StepMeasurement, applied: bool, fired: bool) -> None:
        if self._value is not None and applied and not fired:
            self.values = (self.values + [self._value])[-self.window:]
        self._value = None

    def state_dict(self) -> dict[str, Any]:
        return {"values": list(self.values), "calls": self.calls, "evaluations": self.evaluations}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.values = [v.detach().clone() for v in state["values"]]
        self.calls, self.evaluations = int(state["calls"]), int(state["evaluations"])
        self._value = None

    def __repr__(self) -> str:
        return (f"CurvatureSpike(method={self.method!r}, every={self.every}, factor={self.factor}, "
                f"options={self.options!r})")
