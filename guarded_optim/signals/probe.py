"""The validation probe (paper 001, sec. 5.3): the loss on a small fixed held-out set."""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable

import torch

from .. import rng

__all__ = ["ProbeError", "call_probe", "try_probe", "remote_probe_error", "measure_agreed", "measure_probe",
           "probe_value", "check_output"]


class ProbeError(ValueError):
    """The ``probe`` argument is unusable: it raised, or returned no finite scalar."""


_CONTRACT = ("probe must be a zero-argument callable returning a scalar loss (a 0-d tensor "
             "or a Python number), e.g. probe=lambda: F.cross_entropy(model(x_probe), y_probe)")


def check_output(out: Any) -> Any:
    """``out`` if it is a scalar tensor or a real number, else ``ProbeError``. No host sync."""
    if isinstance(out, torch.Tensor):
        if out.numel() != 1:
            raise ProbeError(f"probe returned a tensor of shape {tuple(out.shape)}, not a scalar; "
                             f"reduce it (e.g. .mean()). {_CONTRACT}.")
        if out.is_complex() or out.dtype == torch.bool:
            raise ProbeError(f"probe returned a {out.dtype} tensor. {_CONTRACT}.")
        return out
    if isinstance(out, numbers.Real) and not isinstance(out, bool):
        return out
    raise ProbeError(f"probe returned {type(out).__name__} {out!r:.60}. {_CONTRACT}.")


def probe_value(out: Any) -> float:
    """The probe's result as a float (one host sync for a tensor), or ``ProbeError``."""
    out = check_output(out)
    return float(out.item()) if isinstance(out, torch.Tensor) else float(out)


def call_probe(probe: Callable[[], Any], module: torch.nn.Module | None = None) -> Any:
    """Call ``probe`` under ``torch.no_grad()``, in eval mode if ``module`` is given, on the
    user's RNG states without consuming them (:func:`..rng.isolated`).

    Returns its checked output without reading it (no host sync). Every submodule's
    train/eval mode and the RNG states are put back as they were, even if the probe raises:
    a probe of a dropout model run without ``module=`` draws its masks from a copy of the
    streams, so the training run draws exactly what it would draw unguarded. A probe that
    raises is reported as ``ProbeError`` chained to the original exception.
    """
    modes = [(m, m.training) for m in module.modules()] if module is not None else []
    if module is not None:
        module.eval()
    try:
        with torch.no_grad(), rng.isolated():
            out = probe()
    except Exception as exc:
        raise ProbeError(f"probe raised {type(exc).__name__}: {exc}. {_CONTRACT}.") from exc
    finally:
        for m, training in modes:
            m.training = training
    return check_output(out)


def measure_probe(probe: Callable[[], Any], module: torch.nn.Module | None = None) -> float:
    """``y(theta)`` as a float: :func:`call_probe`, then one read."""
    return probe_value(call_probe(probe, module))


def check_initial(y: float) -> float:
    """The first measurement defines ``yhat_0``: it must be finite."""
    if not math.isfinite(y):
        raise ProbeError(f"probe returned {y} at the initial parameters, so no reference yhat "
                         f"can be formed; check the probe data and model. {_CONTRACT}.")
    return y


def try_probe(probe: Callable[[], Any], module: torch.nn.Module | None) -> tuple[Any, ProbeError | None]:
    """``(output, None)``, or ``(nan, error)`` when the probe raised: the error is agreed
    with the other ranks before anyone raises it (a rank raising alone would hang them)."""
    try:
        return call_probe(probe, module), None
    except ProbeError as exc:
        return math.nan, exc


def remote_probe_error() -> ProbeError:
    """What a rank raises when the probe raised on another rank."""
    return ProbeError("the probe raised on another rank; every rank rolled back to the last "
                      "verified state (see that rank's error for the cause).")


def measure_agreed(probe: Callable[[], Any], module: torch.nn.Module | None, group: Any,
                   accelerator: Any = None) -> float:
    """One probe measurement outside a step's transfer, averaged over the ranks of
    ``group``; a probe that raises on any rank raises on every rank."""
    from ..distributed import agree_host
    raw, error = try_probe(probe, module)
    y = math.nan if error is not None else probe_value(raw)
    y, failed = agree_host([y, float(error is not None)], [0], group, accelerator)
    if failed:
        raise error or remote_probe_error()
    return y
