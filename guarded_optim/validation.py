"""Argument checks with errors that name the argument, the bad value and the fix.

Numbers are accepted in any ``numbers.Real`` / ``numbers.Integral`` form (Python and numpy
scalars alike: ``np.float32(0.1)`` is as good as ``0.1``); ``bool`` is never a number here.
A bad number is a ``ValueError`` (as in ``torch.optim``), a wrong kind of object a
``TypeError``. Every check raises before anything is built or changed.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Iterable

import torch

__all__ = ["real", "integer", "instance", "items"]


def plain_id(x: Any) -> bool:
    """A batch id that a ``weights_only`` checkpoint holds: an int, a str, or a tuple of them."""
    if isinstance(x, tuple):
        return all(isinstance(i, (int, str)) and not isinstance(i, bool) for i in x)
    return isinstance(x, (int, str)) and not isinstance(x, bool)


def batch_id(x: Any) -> Any:
    """``batch_id`` as the quarantine stores it (a list becomes a tuple), or ``TypeError``."""
    if x is None:
        return None
    x = tuple(x) if isinstance(x, list) else x
    if not plain_id(x):
        raise TypeError(f"batch_id must be an int, a str or a tuple of them, got "
                        f"{type(x).__name__}; e.g. step(closure, batch_id=batch_index).")
    return x


def given_loss(loss: Any, closure: Any) -> Any:
    """``step(loss=...)`` as the guard reads it: a tensor (a number becomes one), only
    without a closure (the closure's own loss is the one read then); else ``TypeError``."""
    if loss is None:
        return None
    if closure is not None:
        raise TypeError("step() got both a closure and loss=; pass loss= only without a "
                        "closure (the closure's loss is read already).")
    if isinstance(loss, bool) or not isinstance(loss, (torch.Tensor, numbers.Real)):
        raise TypeError(f"step(loss=...) must be the loss tensor (or a number), got "
                        f"{type(loss).__name__}; e.g. opt.step(loss=loss) after loss.backward().")
    return loss if isinstance(loss, torch.Tensor) else torch.tensor(float(loss))


def real(name: str, value: Any, *, low: float | None = None, high: float | None = None,
         low_open: bool = False, high_open: bool = False, hint: str = "") -> float:
    """``value`` as a float, if it is a finite real number within the bounds; else raise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"Invalid {name}: it must be a number, got {type(value).__name__} {value!r:.60}."
                        f"{' ' + hint if hint else ''}")
    x = float(value)
    ok = math.isfinite(x)
    if ok and low is not None:
        ok = x > low if low_open else x >= low
    if ok and high is not None:
        ok = x < high if high_open else x <= high
    if not ok:
        lo = "" if low is None else f"{'(' if low_open else '['}{low:g}"
        hi = "" if high is None else f"{high:g}{')' if high_open else ']'}"
        where = f" in {lo or '(-inf'}, {hi or 'inf)'}" if lo or hi else ""
        raise ValueError(f"Invalid {name}: {value!r}; it must be a finite number{where}."
                         f"{' ' + hint if hint else ''}")
    return x


def integer(name: str, value: Any, *, low: int = 0, none: bool = False, hint: str = "") -> int | None:
    """``value`` as an int, if it is an integer ``>= low`` (or ``None`` when ``none``)."""
    if value is None and none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < low:
        also = " or None" if none else ""
        raise ValueError(f"Invalid {name}: {value!r}; it must be an int >= {low}{also}."
                         f"{' ' + hint if hint else ''}")
    return int(value)


def instance(name: str, value: Any, ok: Callable[[Any], bool], what: str) -> Any:
    """``value`` if ``ok(value)``; a class where an instance is due gets its own message."""
    if isinstance(value, type):
        raise TypeError(f"{name} got the class {value.__name__}, not an instance: pass "
                        f"{value.__name__}() (with its arguments).")
    if not ok(value):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r:.60}.")
    return value


def items(name: str, value: Any, ok: Callable[[Any], bool], what: str, example: str) -> list:
    """``list(value)`` if it is an iterable of ``what``; a single item, a string or a class
    gets a message saying how to write it."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable) or ok(value):
        raise TypeError(f"{name} must be a list of {what}, got {type(value).__name__} "
                        f"{value!r:.60}; e.g. {name}={example}.")
    out = list(value)
    for i, item in enumerate(out):
        if isinstance(item, str):
            raise TypeError(f"{name}[{i}] is the string {item!r}, not {what}; e.g. {name}={example}.")
        instance(f"{name}[{i}]", item, ok, what)
    return out


# -- checkpoint values ------------------------------------------------------------------
#: optimizer-state keys that are shaped like their parameter (torch.optim's optimizers)
PARAM_SHAPED = frozenset({"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "sum",
                          "square_avg", "acc_delta", "grad_avg", "exp_inf", "prev", "ax",
                          "step_size"})
#: keys whose values are sums of squares (or like them): never negative
NON_NEGATIVE = frozenset({"exp_avg_sq", "max_exp_avg_sq", "sum", "square_avg", "acc_delta",
                          "exp_inf", "step", "step_size"})


def _values(t: Any) -> Any:
    """The stored values of a tensor (a sparse tensor's non-zeros), for value checks."""
    return t.coalesce().values() if t.is_sparse else t


def tensors_finite(key: str, tensors: Iterable[Any]) -> None:
    """Raise ``ValueError`` naming ``key`` if a floating tensor holds NaN or Inf."""
    import torch
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{key}[{i}] must be a tensor, got {type(t).__name__}.")
        if (t.is_floating_point() or t.is_complex()) and t.numel() and not bool(torch.isfinite(_values(t)).all()):
            raise ValueError(f"{key}[{i}] holds NaN or Inf: a verified state is finite; the "
                             "checkpoint is corrupt (load an earlier one).")


def optimizer_state(key: str, state: dict, params: list) -> None:
    """Check an optimizer ``state`` (param index -> {name: value}) against ``params``:
    indices in range, parameter-shaped moments of the parameter's shape, finite values,
    sums of squares and step counts not negative. Raises ``ValueError`` naming the entry."""
    import torch
    for i, entry in state.items():
        if not 0 <= i < len(params):
            raise ValueError(f"{key}[{i}] names no parameter: the optimizer has {len(params)}.")
        if not isinstance(entry, dict):
            raise ValueError(f"{key}[{i}] must be a dict, got {type(entry).__name__}.")
        shape = tuple(params[i].shape)
        for name, v in entry.items():
            where = f"{key}[{i}][{name!r}]"
            if isinstance(v, torch.Tensor):
                if name in PARAM_SHAPED and v.dim() > 0 and tuple(v.shape) != shape:
                    raise ValueError(f"{where} has shape {tuple(v.shape)}, which does not match its "
                                     f"parameter's {shape}; "
                                     "load a state_dict saved from the same model.")
                if (v.is_floating_point() or v.is_complex()) and v.numel() \
                        and not bool(torch.isfinite(_values(v)).all()):
                    raise ValueError(f"{where} holds NaN or Inf; the checkpoint is corrupt.")
                if name in NON_NEGATIVE and v.numel() and not v.is_complex() \
                        and bool((_values(v) < 0).any()):
                    raise ValueError(f"{where} holds negative values; it is a running sum of "
                                     "squares (or a count) and cannot be negative.")
            elif name == "step" and (isinstance(v, bool) or not isinstance(v, numbers.Real) or v < 0):
                raise ValueError(f"{where} must be a number >= 0, got {v!r}.")
