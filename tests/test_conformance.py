"""Drop-in conformance (issue 11): every CPU configuration of torch's own ``optim_db``,
wrapped (``GuardedOptimizer(OptimCls(params, **kwargs))``, no probe) against bare, on
identical copies of the parameters and of the gradients.

Per configuration (each its own test id, ``<check>[<Optimizer>:<desc>]``):

* ``steps``       (a) bit-identical parameters, optimizer state, param_groups and ``step``
                  return values over a few steps (plain steps and closure steps alternate;
                  LBFGS gets a closure computing a deterministic loss of the parameters);
* ``resume``      (b) ``guard.state_dict()`` -> ``torch.save`` -> ``torch.load(weights_only=True)``
                  -> a fresh guard: it continues exactly as the bare optimizer does;
* ``bare_load``   (c) the same guard checkpoint loads into a fresh BARE optimizer of the inner
                  class, which continues exactly as the bare one;
* ``step_hooks``  (d) global and per-optimizer step pre/post hooks fire once per
                  ``guard.step()``, in the bare optimizer's order, with the guard as ``opt``;
                  after a skipped step and after a rolled-back step: pre-hooks only;
* ``add_group``   (e) ``guard.add_param_group`` reaches the inner optimizer, and guard and
                  bare continue identically;
* ``deepcopy``    (f) ``copy.deepcopy(guard)`` is independent: stepping the copy moves the
                  copy exactly as a deep-copied bare optimizer moves, and not the original;
* ``layout``      ``guard.state_dict()`` is ``{"state", "param_groups", "guard"}``, its
                  ``state``/``param_groups`` exactly the bare optimizer's;
* ``sd_hooks``    state_dict / load_state_dict pre and post hooks registered on the guard
                  fire once each, see the layout a bare optimizer's hooks see, and their
                  return values are honoured as a bare optimizer honours them;
* ``legacy``      a checkpoint written by guarded_optim 0.1.0 (``{"inner", "guard"}``, written
                  by the last commit before issue 11, run in a subprocess) loads into a
                  guard, which then continues exactly as the bare optimizer;
* ``meta``        meta-device parameters: the guard does what the bare optimizer does (the
                  same error type at the same call, or a no-op step);
* ``fp16``        a finite fp16 model is never read as non-finite: every step is accepted
                  and the result is the bare optimizer's; ``sq``: the squared norms overflow
                  fp16 (weights ~150, gradients ~100), ``norm``: the per-tensor norms do too
                  (weights and gradients ~2e4). Where the bare optimizer itself turns the
                  model non-finite (Adam's second moment of 2e4 gradients, say), it is no
                  finite model and the case is skipped. ``bf16_huge`` (beyond item 5): finite
                  bf16 weights ~1e30, whose squared norm overflows float32.

Configurations: ``_get_optim_inputs_including_global_cliquey_kwargs("cpu", ...)`` (every
``optim_inputs_func(device="cpu")`` entry, plus its differentiable / fused variants where
the OptimizerInfo supports them on CPU) and the foreach variants that helper leaves out on
CPU (see ``_cpu_inputs``), and, for the optimizers that take
sparse gradients (``supports_sparse``: SGD, Adagrad; ``only_supports_sparse_grads``:
SparseAdam), the same with uncoalesced sparse COO gradients (as torch's own
``test_rosenbrock_sparse`` tortures them). ``differentiable=True`` configurations run on
non-leaf parameters (``leaf.clone()``), as torch's TestDifferentiableOptimizer does: a
bare optimizer with ``differentiable=True`` rejects leaf parameters that require grad.
Configurations the bare optimizer itself cannot run on CPU are skipped with the bare
optimizer's reason (see ``_bare_unsupported``; ``test_bare_fails_where_skipped`` checks each one).

Wherever the BARE optimizer raises for an operation (``deepcopy`` of non-leaf parameters,
say), the guard must raise the same exception type there; the check ends at that point.

``CONFORMANCE_BARE=1 pytest tests/test_conformance.py`` runs every check with the bare
optimizer in place of the guard: it validates the checks themselves (all must pass).
"""

from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
import textwrap
import types
import unittest
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                   register_optimizer_step_pre_hook)

from guarded_optim import GuardedOptimizer


def _import_optim_db():
    """torch's ``common_utils`` imports ``expecttest`` (a torch test dependency, not in the
    wheel); the optimizer database never uses it, so a stand-in is enough when it is absent."""
    try:
        import expecttest  # noqa: F401
    except ImportError:
        stub = types.ModuleType("expecttest")
        stub.TestCase = unittest.TestCase
        sys.modules["expecttest"] = stub
    from torch.testing._internal import common_optimizers
    return common_optimizers


_co = _import_optim_db()

BARE_MODE = os.environ.get("CONFORMANCE_BARE") == "1"   # validate the checks: bare vs bare
STEPS = 3            # (a), deepcopy
BEFORE, AFTER = 2, 2  # steps before a save / add_param_group, and after it
LEGACY_COMMIT = "0354cf2"   # the last commit writing 0.1.0's {"inner", "guard"} layout
REPO = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:Sparse invariant checks:UserWarning"),
]


# -- configurations ---------------------------------------------------------------------------

@dataclass
class Case:
    info: Any
    kwargs: dict
    desc: str
    sparse: bool = False
    id: str = ""
    skip: str | None = None

    @property
    def cls(self):
        return self.info.optim_cls

    @property
    def name(self) -> str:
        return self.cls.__name__

    @property
    def lbfgs(self) -> bool:
        return self.info.step_requires_closure

    @property
    def differentiable(self) -> bool:
        return bool(self.kwargs.get("differentiable", False))

    def shapes(self, extra: bool = False) -> list[tuple]:
        """Muon takes 2-D parameters only; the others a matrix and a vector."""
        if extra:
            return [(3, 3)] if self.name == "Muon" else [(3,)]
        return [(4, 3), (3, 3)] if self.name == "Muon" else [(4, 3), (4,)]

    def fp16_shapes(self, extra: bool = False) -> list[tuple]:
        """Enough elements that the squared norms (weights ~150, gradients ~100) overflow fp16."""
        if extra:
            return [(6, 6)] if self.name == "Muon" else [(6,)]
        return [(8, 6), (6, 6)] if self.name == "Muon" else [(8, 6), (8,)]


def _bare_unsupported(case: Case) -> str | None:
    """Why the bare optimizer itself cannot run ``case`` on CPU (checked by test_bare_fails_where_skipped)."""
    kw = case.kwargs
    if not case.sparse:
        return None
    if kw.get("fused"):
        return (f"bare fused {case.name} rejects sparse gradients on CPU (RuntimeError: fused "
                "does not support sparse grad)")
    if case.info.supports_sparse and kw.get("weight_decay", 0) != 0:
        return (f"bare {case.name} rejects weight_decay={kw['weight_decay']} with sparse "
                "gradients on CPU (RuntimeError)")
    return None


def _ident(name: str, desc: str, sparse: bool) -> str:
    d = desc.replace(" & ", "+").replace(", ", ",").replace(" ", "_")
    return f"{name}:{d}" + ("+sparse_grad" if sparse else "")


def _cpu_inputs(info) -> list:
    """``_get_optim_inputs_including_global_cliquey_kwargs("cpu", ...)``, plus the foreach
    variants that helper leaves out on CPU (it keeps foreach to devices with foreach kernels,
    but foreach runs on CPU through its per-tensor fallback, and torch's own
    test_foreach_matches_forloop runs it there): every input with all of the optimizer's
    supported global flags False, then each flag True in turn."""
    out = _co._get_optim_inputs_including_global_cliquey_kwargs("cpu", torch.float32, info)
    if "foreach" in info.supported_impls and not any(o.kwargs.get("foreach") for o in out):
        for oi in info.optim_inputs_func(device="cpu"):
            kwargs = copy.deepcopy(oi.kwargs)
            for flag in info.supported_impls:
                if flag != "fused" or "cpu" in info.supports_fused_on:
                    kwargs[flag] = False
            kwargs["foreach"] = True
            out.append(_co.OptimizerInput(params=None, kwargs=kwargs, desc=f"{oi.desc} & foreach"))
    return out


def _cases() -> list[Case]:
    out: list[Case] = []
    for info in _co.optim_db:
        inputs = _cpu_inputs(info)
        modes = ([True] if info.only_supports_sparse_grads else
                 [False, True] if info.supports_sparse else [False])
        for sparse in modes:
            for oi in inputs:
                case = Case(info, oi.kwargs, oi.desc, sparse, _ident(info.name, oi.desc, sparse))
                case.skip = _bare_unsupported(case)
                out.append(case)
    seen: dict[str, int] = {}
    for c in out:     # unique ids (pytest would append an index; keep them readable)
        n = seen[c.id] = seen.get(c.id, 0) + 1
        if n > 1:
            c.id = f"{c.id}#{n}"
    return out


CASES = _cases()
RUNNABLE = [c for c in CASES if c.skip is None]


def _params_for(cases: list[Case]):
    return [pytest.param(c, id=c.id, marks=[pytest.mark.skip(reason=c.skip)] if c.skip else [])
            for c in cases]


ALL = _params_for(CASES)


# -- parameters, gradients, steps ---------------------------------------------------------------

def _make_params(case: Case, seed: int = 0, dtype=torch.float32, device="cpu",
                 extra: bool = False, fp16: bool = False, scale: float = 150.0) -> list[torch.Tensor]:
    """Leaf tensors requiring grad (non-leaf clones of them for differentiable=True)."""
    g = torch.Generator().manual_seed(seed + (1000 if extra else 0))
    shapes = case.fp16_shapes(extra) if fp16 else case.shapes(extra)
    leaves = []
    for s in shapes:
        v = (torch.rand(s, generator=g) * 2 - 1) * scale if fp16 else torch.randn(s, generator=g)
        leaves.append(v.to(dtype).to(device).requires_grad_(True))
    return _as_kind(case, leaves)


def _as_kind(case: Case, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.clone() for p in leaves] if case.differentiable else leaves


def _copy_params(case: Case, params: list[torch.Tensor]) -> list[torch.Tensor]:
    """An identical, independent set of parameters of the same kind."""
    return _as_kind(case, [p.detach().clone().requires_grad_(True) for p in params])


def _kwargs(case: Case) -> dict:
    return copy.deepcopy(case.kwargs)   # a tensor lr must not be shared between optimizers


def _sparse(dense: torch.Tensor, step: int) -> torch.Tensor:
    """An uncoalesced sparse COO gradient: rows alternate, each entry split in two duplicates."""
    rows = torch.arange(dense.shape[0]) % 2 == step % 2
    mask = rows.reshape(-1, *([1] * (dense.dim() - 1))).to(dense.dtype)
    s = (dense * mask).to_sparse()
    idx, val = s.indices(), s.values()
    return torch.sparse_coo_tensor(torch.cat([idx, idx], 1), torch.cat([val * 0.25, val * 0.75]),
                                   dense.shape)


class Grads:
    """Deterministic gradients: step ``t``'s come from a torch.Generator seeded with
    ``(seed, t)``, the same list for the bare and the wrapped optimizer."""

    def __init__(self, case: Case, seed: int = 1, fp16: bool = False, scale: float = 100.0):
        self.case, self.fp16, self.seed, self.scale = case, fp16, seed, scale

    def next(self, params: list[torch.Tensor], step: int) -> list[torch.Tensor]:
        self.gen = torch.Generator().manual_seed(self.seed * 100_003 + step)
        out = []
        for p in params:
            if self.fp16:
                d = (torch.rand(p.shape, generator=self.gen) * 2 - 1) * self.scale
            else:
                d = torch.randn(p.shape, generator=self.gen)
            d = d.to(p.dtype).to(p.device)
            out.append(_sparse(d, step) if self.case.sparse else d)
        return out


def _lbfgs_targets(params: list[torch.Tensor]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return [0.8 * p.detach().float() + 0.1 * torch.randn(p.shape, generator=g) for p in params]


def _lbfgs_loss(params, targets, fp16: bool):
    if fp16:   # low precision: a float64 loss, finite for any finite weights
        return 1e-3 * sum(((p.double() - c.double()) ** 2).sum() for p, c in zip(params, targets))
    loss = sum(((p.float() - c) ** 2).sum() for p, c in zip(params, targets))
    return loss + 0.01 * sum((p.float() ** 4).sum() for p in params)


class Run:
    """One optimizer (bare, or the guard) with its own parameters."""

    def __init__(self, case: Case, opt, params: list[torch.Tensor], fp16: bool = False):
        self.case, self.opt, self.params, self.fp16 = case, opt, params, fp16
        self.targets = _lbfgs_targets(params) if case.lbfgs else None
        self.returned: list[Any] = []

    def add(self, params: list[torch.Tensor]) -> None:
        self.params = self.params + params
        if self.case.lbfgs:
            self.targets = self.targets + _lbfgs_targets(params)

    def step(self, grads: list[torch.Tensor] | None, t: int, poison: bool = False):
        """Step ``t``: LBFGS through a loss closure; others alternate plain and closure steps."""
        params = self.params
        if self.case.lbfgs:
            def closure():
                for p in params:
                    p.grad = None
                loss = _lbfgs_loss(params, self.targets, self.fp16)
                loss.backward()
                if poison:
                    for p in params:
                        p.grad.fill_(float("nan"))
                return loss
            out = self.opt.step(closure)
        else:
            gs = [g.clone() for g in grads]
            if poison:
                gs = [_poisoned(g) for g in gs]

            def set_grads():
                for p, g in zip(params, gs):
                    p.grad = g
                return torch.tensor(1.0)
            if t % 2:
                out = self.opt.step(set_grads)
            else:
                set_grads()
                out = self.opt.step()
        self.returned.append(out)
        return out


def _poisoned(g: torch.Tensor) -> torch.Tensor:
    if g.is_sparse:
        return torch.sparse_coo_tensor(g._indices(), torch.full_like(g._values(), float("nan")),
                                       g.shape)
    return torch.full_like(g, float("nan"))


def _wrap(inner):
    return inner if BARE_MODE else GuardedOptimizer(inner)


def _decision(opt) -> str:
    return "accept" if BARE_MODE else opt.last_decision


def _inner(opt):
    return opt if BARE_MODE else opt.inner


def _pair(case: Case, fp16: bool = False, dtype=torch.float32, scale: float = 150.0):
    """The bare optimizer and the guard, on identical copies of the same parameters."""
    pb = _make_params(case, dtype=dtype, fp16=fp16, scale=scale)
    pg = _copy_params(case, pb)
    bare = Run(case, case.cls(pb, **_kwargs(case)), pb, fp16)
    guard = Run(case, _wrap(case.cls(pg, **_kwargs(case))), pg, fp16)
    return bare, guard


def _both(bare: Run, others: list[Run], grads: Grads, t: int, accept: bool = True) -> bool:
    """Step ``t`` with the same gradients on every run. Where the bare step raises, each other
    run must raise the same exception type, and True (stop) is returned."""
    g = None if bare.case.lbfgs else grads.next(bare.params, t)
    _, eb = _outcome(lambda: bare.step(g, t))
    for o in others:
        _, eo = _outcome(lambda: o.step(g, t))
        if eb is not None:
            assert eo is not None, (f"step {t}: the bare optimizer raises {_short(eb)}; "
                                    "the guard does not")
            assert isinstance(eo, type(eb)), (f"step {t}: the bare optimizer raises "
                                              f"{type(eb).__name__}, the guard {_short(eo)}")
            continue
        if eo is not None:
            raise AssertionError(f"step {t}: the bare optimizer steps, the guard raises "
                                 f"{_short(eo)}") from None
        if accept and isinstance(o.opt, GuardedOptimizer):
            d = _decision(o.opt)
            assert d == "accept", (f"step {t}: the guard intervened ({d}: "
                                   f"{getattr(o.opt.last_event, 'reason', None)}) on a clean run")
    return eb is not None


# -- comparison -----------------------------------------------------------------------------------

def _same(a: Any, b: Any, where: str) -> None:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        assert isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor), where
        assert (a.dtype, a.shape, a.layout, a.device) == (b.dtype, b.shape, b.layout, b.device), \
            f"{where}: {a.dtype}/{tuple(a.shape)}/{a.layout} vs {b.dtype}/{tuple(b.shape)}/{b.layout}"
        if a.device.type == "meta":
            return
        x, y = a.detach(), b.detach()
        if x.is_sparse:
            x, y = x.coalesce().to_dense(), y.coalesce().to_dense()
        assert torch.equal(x, y) or (torch.isnan(x) == torch.isnan(y)).all() and torch.equal(
            torch.nan_to_num(x), torch.nan_to_num(y)), f"{where}: values differ"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a, key=str) == sorted(b, key=str), \
            f"{where}: keys {sorted(a, key=str)} vs {sorted(b, key=str) if isinstance(b, dict) else b}"
        for k in a:
            _same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: {a!r} vs {b!r}"
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and a != a:
        assert isinstance(b, float) and b != b, where
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def _groups(opt) -> list[dict]:
    return [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]


def _assert_runs_equal(bare: Run, other: Run, what: str) -> None:
    """Parameters, per-parameter state, param_groups and step return values: bit for bit."""
    assert len(bare.params) == len(other.params)
    for i, (a, b) in enumerate(zip(bare.params, other.params)):
        assert a is not b
        _same(a, b, f"{what}: param {i}")
    ob, oo = bare.opt, other.opt
    for i, (a, b) in enumerate(zip(bare.params, other.params)):
        _same(dict(ob.state.get(a, {})), dict(oo.state.get(b, {})), f"{what}: state of param {i}")
    _same(_groups(ob), _groups(oo), f"{what}: param_groups")
    _same(bare.returned, other.returned, f"{what}: values returned by step()")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:200] if text else ''}"


def _outcome(fn: Callable[[], Any]):
    try:
        return fn(), None
    except Exception as exc:   # noqa: BLE001 -- compared with the bare optimizer's
        return None, exc


def _mirror(bare_fn: Callable[[], Any], guard_fn: Callable[[], Any], what: str):
    """Run an operation on the bare optimizer, then on the guard. Where the bare one raises,
    the guard must raise the same exception type; returns (bare_result, guard_result, stop)."""
    rb, eb = _outcome(bare_fn)
    rg, eg = _outcome(guard_fn)
    if eb is not None:
        assert eg is not None, f"{what}: the bare optimizer raises {_short(eb)}; the guard does not"
        assert isinstance(eg, type(eb)), (f"{what}: the bare optimizer raises {type(eb).__name__}, "
                                          f"the guard {_short(eg)}")
        return rb, rg, True
    if eg is not None:
        raise AssertionError(f"{what}: the bare optimizer succeeds, the guard raises "
                             f"{_short(eg)}") from None
    return rb, rg, False


def _save_load(sd: dict) -> dict:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# -- (a) steps ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ALL)
def test_steps(case):
    bare, guard = _pair(case)
    grads = Grads(case)
    for t in range(STEPS):
        _both(bare, [guard], grads, t)
        _assert_runs_equal(bare, guard, f"after step {t}")


# -- (b), (c): shared by both resume checks --------------------------------------------------------

def _resumed(case: Case, like: Run, sd: dict, wrap: bool) -> Run:
    """A new optimizer (guard or bare) on new parameters holding ``like``'s values, loaded from ``sd``."""
    params = _copy_params(case, like.params)
    inner = case.cls(params, **_kwargs(case))
    run = Run(case, _wrap(inner) if wrap else inner, params)
    run.targets, run.returned = like.targets, list(like.returned)
    run.opt.load_state_dict(sd)
    return run


def _resume_check(case: Case, into_guard: bool) -> None:
    """Save both after BEFORE steps (torch.save, torch.load(weights_only=True)), load the bare
    checkpoint into a bare optimizer and the guard's into a guard (``into_guard``) or into a
    bare optimizer; both continue identically (and, where a bare optimizer can resume at all,
    exactly as the run that was never saved)."""
    bare, guard = _pair(case)
    grads = Grads(case)
    for t in range(BEFORE):
        if _both(bare, [guard], grads, t):
            return
    bsd, gsd, stop = _mirror(lambda: _save_load(bare.opt.state_dict()),
                             lambda: _save_load(guard.opt.state_dict()),
                             "state_dict -> torch.save -> torch.load(weights_only=True)")
    if stop:
        return
    ref, res, stop = _mirror(lambda: _resumed(case, bare, bsd, wrap=False),
                             lambda: _resumed(case, guard, gsd, wrap=into_guard), "load_state_dict")
    if stop:
        return
    for t in range(BEFORE, BEFORE + AFTER):
        if _both(ref, [res], grads, t):
            return
        _, e = _outcome(lambda: bare.step(None if case.lbfgs else grads.next(bare.params, t), t))
        if e is not None:
            return
    what = "guard" if into_guard else "bare optimizer"
    _assert_runs_equal(ref, res, f"{what} loaded from the guard's checkpoint")
    _assert_runs_equal(bare, res, f"{what} loaded from the guard's checkpoint vs the unsaved run")


# -- (b) resume from a guard checkpoint, weights_only -----------------------------------------------

@pytest.mark.parametrize("case", ALL)
def test_resume(case):
    _resume_check(case, into_guard=True)


# -- (c) a guard checkpoint loads into a bare optimizer ---------------------------------------------

@pytest.mark.parametrize("case", ALL)
def test_bare_load(case):
    _resume_check(case, into_guard=False)


def test_torch_bare_load_state_dict_ignores_an_extra_top_level_key():
    """The premise of the layout (torch 2.13): a bare load_state_dict ignores a key it does not know."""
    for info in _co.optim_db:
        case = Case(info, {}, "default", info.only_supports_sparse_grads)
        pb = _make_params(case)
        bare = Run(case, case.cls(pb, **_kwargs(case)), pb)
        grads = Grads(case)
        for t in range(BEFORE):
            g = None if case.lbfgs else grads.next(pb, t)
            bare.step(g, t)
        sd = bare.opt.state_dict()
        sd["guard"] = {"anything": torch.ones(2), "version": 2}
        pc = _copy_params(case, pb)
        other = Run(case, case.cls(pc, **_kwargs(case)), pc)
        other.targets, other.returned = bare.targets, list(bare.returned)
        other.opt.load_state_dict(sd)
        _same(other.opt.state_dict(), {k: v for k, v in sd.items() if k != "guard"}, info.name)


# -- (d) step hooks --------------------------------------------------------------------------------

def _record_step_hooks(opt, log: list) -> list:
    return [opt.register_step_pre_hook(lambda o, a, k: log.append(("pre", o))),
            opt.register_step_post_hook(lambda o, a, k: log.append(("post", o)))]


@pytest.fixture
def global_step_hooks():
    log: list = []
    handles = [register_optimizer_step_pre_hook(lambda o, a, k: log.append(("global_pre", o))),
               register_optimizer_step_post_hook(lambda o, a, k: log.append(("global_post", o)))]
    yield log
    for h in handles:
        h.remove()


@pytest.mark.parametrize("case", ALL)
def test_step_hooks(case, global_step_hooks):
    log = global_step_hooks
    bare, guard = _pair(case)
    handles = _record_step_hooks(bare.opt, log) + _record_step_hooks(guard.opt, log)
    try:
        grads = Grads(case)
        g = None if case.lbfgs else grads.next(bare.params, 0)
        bare.step(g, 0)
        reference = [(name, "opt" if o is bare.opt else o) for name, o in log]
        assert [n for n, _ in reference] == ["global_pre", "pre", "post", "global_post"]
        assert all(o == "opt" for _, o in reference), reference
        log.clear()

        guard.step(g, 0)
        assert _decision(guard.opt) == "accept"
        seen = [(name, "opt" if o is guard.opt else ("INNER" if o is _inner(guard.opt) else o))
                for name, o in log]
        assert seen == reference, f"applied step: hooks fired {seen}, a bare step fires {reference}"
        if BARE_MODE:
            return
        guard.opt.probe_every = 1   # verify every step: the damage below is seen at once

        log.clear()   # a skipped step: non-finite gradients
        g = None if case.lbfgs else grads.next(guard.params, 1)
        guard.step(g, 2, poison=True)
        assert _decision(guard.opt) == "skip", guard.opt.last_event
        seen = [(name, "opt" if o is guard.opt else o) for name, o in log]
        assert seen == reference[:2], f"skipped step: hooks fired {seen}, expected pre-hooks only"

        log.clear()   # a rolled-back step: the weights were damaged after an accepted step
        g = None if case.lbfgs else grads.next(guard.params, 2)
        guard.step(g, 2)
        assert _decision(guard.opt) == "accept"
        with torch.no_grad():
            guard.params[0].view(-1)[0] = float("nan")
        log.clear()
        g = None if case.lbfgs else grads.next(guard.params, 3)
        guard.step(g, 4)
        assert _decision(guard.opt) in ("rollback", "skip"), guard.opt.last_event
        seen = [(name, "opt" if o is guard.opt else o) for name, o in log]
        assert seen == reference[:2], (f"{_decision(guard.opt)} step: hooks fired {seen}, "
                                       "expected pre-hooks only")
    finally:
        for h in handles:
            h.remove()


# -- (e) add_param_group -----------------------------------------------------------------------------

@pytest.mark.parametrize("case", ALL)
def test_add_group(case):
    bare, guard = _pair(case)
    grads = Grads(case)
    for t in range(BEFORE):
        _both(bare, [guard], grads, t)
    qb = _make_params(case, extra=True)
    qg = _copy_params(case, qb)
    _, _, stop = _mirror(lambda: bare.opt.add_param_group({"params": qb}),
                         lambda: guard.opt.add_param_group({"params": qg}), "add_param_group")
    if stop:
        return
    inner = _inner(guard.opt)
    assert len(inner.param_groups) == len(bare.opt.param_groups)
    assert inner.param_groups[-1]["params"][0] is qg[0], "the group did not reach the inner optimizer"
    bare.add(qb)
    guard.add(qg)
    for t in range(BEFORE, BEFORE + AFTER):
        _both(bare, [guard], grads, t)
    _assert_runs_equal(bare, guard, "after add_param_group")


# -- (f) deepcopy ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ALL)
def test_deepcopy(case):
    bare, guard = _pair(case)
    grads = Grads(case)
    for t in range(BEFORE):
        _both(bare, [guard], grads, t)
    bc, gc, stop = _mirror(lambda: copy.deepcopy(bare.opt), lambda: copy.deepcopy(guard.opt),
                           "copy.deepcopy")
    if stop:
        return
    original = [p.detach().clone() for p in guard.params]
    original_state = copy.deepcopy({i: dict(guard.opt.state.get(p, {}))
                                    for i, p in enumerate(guard.params)})
    bare_copy = Run(case, bc, [p for g in bc.param_groups for p in g["params"]])
    guard_copy = Run(case, gc, [p for g in gc.param_groups for p in g["params"]])
    for r, src in ((bare_copy, bare), (guard_copy, guard)):
        r.returned = list(src.returned)   # LBFGS: new targets, or a converged copy would not move
        r.targets = [c + 0.5 for c in src.targets] if case.lbfgs else None
        assert not any(a is b for a, b in zip(r.params, src.params)), "the copy shares parameters"
    _assert_runs_equal(bare, guard_copy, "the copy, before stepping")
    for t in range(BEFORE, BEFORE + AFTER):
        g = None if case.lbfgs else grads.next(bare_copy.params, t)
        _, eb = _outcome(lambda: bare_copy.step(g, t))
        _, eg = _outcome(lambda: guard_copy.step(g, t))
        if eb is not None:
            # torch 2.13: a deep-copied bare LBFGS loses ``_params`` (Optimizer.__getstate__)
            # and its step raises AttributeError. The guard's copy may fail alike, or work.
            assert eg is None or isinstance(eg, type(eb)), (
                f"the bare copy raises {type(eb).__name__}, the guard's {_short(eg)}")
            if eg is not None:
                return
        elif eg is not None:
            raise AssertionError(f"the bare copy steps, the guard's copy raises "
                                 f"{_short(eg)}") from None
    if eb is None:
        _assert_runs_equal(bare_copy, guard_copy, "the copy, stepped")
    for i, (p, before) in enumerate(zip(guard.params, original)):
        _same(p, before, f"the original's param {i} after stepping the copy")
    _same({i: dict(guard.opt.state.get(p, {})) for i, p in enumerate(guard.params)},
          original_state, "the original's state after stepping the copy")
    assert any(not torch.equal(a.detach(), b.detach()) for a, b in zip(guard_copy.params, original)), \
        "stepping the copy moved none of its parameters"


# -- layout ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", ALL)
def test_layout(case):
    bare, guard = _pair(case)
    grads = Grads(case)
    for t in range(BEFORE):
        _both(bare, [guard], grads, t)
    bsd, gsd = bare.opt.state_dict(), guard.opt.state_dict()
    expected = {"state", "param_groups"} | (set() if BARE_MODE else {"guard"})
    assert set(gsd) == expected, f"guard.state_dict() has keys {sorted(gsd)}, expected {sorted(expected)}"
    _same(gsd["state"], bsd["state"], "state_dict()['state']")
    _same(gsd["param_groups"], bsd["param_groups"], "state_dict()['param_groups']")


# -- state_dict hooks ------------------------------------------------------------------------------

def _sd_hooks(opt, log: list) -> list:
    def post(o, sd):
        log.append(("sd_post", o, sorted(sd)))
        sd = dict(sd)
        sd["from_post_hook"] = 1
        return sd

    def load_pre(o, sd):
        log.append(("load_pre", o, sorted(sd)))
        sd = dict(sd)
        sd.pop("from_post_hook", None)
        return sd

    return [opt.register_state_dict_pre_hook(lambda o: log.append(("sd_pre", o))),
            opt.register_state_dict_post_hook(post),
            opt.register_load_state_dict_pre_hook(load_pre),
            opt.register_load_state_dict_post_hook(lambda o: log.append(("load_post", o)))]


@pytest.mark.parametrize("case", ALL)
def test_sd_hooks(case):
    bare, guard = _pair(case)
    grads = Grads(case)
    for t in range(BEFORE):
        _both(bare, [guard], grads, t)
    blog, glog = [], []
    _sd_hooks(bare.opt, blog)
    _sd_hooks(guard.opt, glog)
    bsd = bare.opt.state_dict()
    gsd = guard.opt.state_dict()
    assert "from_post_hook" in bsd
    assert "from_post_hook" in gsd, "the state_dict post-hook's return value was dropped"
    bare.opt.load_state_dict(bsd)
    guard.opt.load_state_dict(gsd)

    def names(log, opt):
        return [(e[0], "opt" if e[1] is opt else ("INNER" if e[1] is _inner(opt) else e[1]))
                + tuple(e[2:]) for e in log]

    b, g = names(blog, bare.opt), names(glog, guard.opt)
    assert [e[0] for e in g] == [e[0] for e in b] == ["sd_pre", "sd_post", "load_pre", "load_post"], \
        f"guard hooks fired {g}; a bare optimizer's fire {b}"
    assert all(e[1] == "opt" for e in g), f"guard hooks received {g}"
    extra = set() if BARE_MODE else {"guard"}
    for (_, _, kb), (_, _, kg) in ((b[1], g[1]), (b[2], g[2])):
        assert set(kg) == set(kb) | extra, f"a hook saw keys {kg}; a bare optimizer's sees {kb}"
    for t in range(BEFORE, BEFORE + AFTER):   # the loads changed nothing
        _both(bare, [guard], grads, t)
    _assert_runs_equal(bare, guard, "after state_dict / load_state_dict with hooks")


# -- legacy (0.1.0) layout ---------------------------------------------------------------------------

_LEGACY_SCRIPT = textwrap.dedent("""
    import sys, torch
    sys.path.insert(0, {tests!r})
    import guarded_optim
    assert guarded_optim.__file__.startswith({old!r}), guarded_optim.__file__
    import test_conformance as tc
    torch.set_num_threads(1)
    out = {{}}
    for case in tc.RUNNABLE:
        try:
            pb = tc._make_params(case)
            run = tc.Run(case, guarded_optim.GuardedOptimizer(case.cls(pb, **tc._kwargs(case))), pb)
            grads = tc.Grads(case)
            for t in range(tc.BEFORE):
                run.step(None if case.lbfgs else grads.next(pb, t), t)
            sd = run.opt.state_dict()
            assert set(sd) == {{"inner", "guard"}}, sorted(sd)
            buf = tc.io.BytesIO()
            torch.save({{"sd": sd, "params": [p.detach() for p in pb]}}, buf)
            out[case.id] = buf.getvalue()
        except Exception as exc:
            out[case.id] = f"{{type(exc).__name__}}: {{exc}}"
    torch.save(out, {path!r})
""")


@pytest.fixture(scope="module")
def legacy(tmp_path_factory):
    if BARE_MODE:
        pytest.skip("bare mode: no guard checkpoint")
    old = tmp_path_factory.mktemp("guarded_optim_0_1_0")
    try:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", LEGACY_COMMIT, "guarded_optim"],
                                 capture_output=True, check=True, timeout=60).stdout
        subprocess.run(["tar", "-x", "-C", str(old)], input=archive, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"guarded_optim 0.1.0 ({LEGACY_COMMIT}) not available from git: {exc}")
    path = old / "legacy.pt"
    script = _LEGACY_SCRIPT.format(tests=str(Path(__file__).parent), old=str(old), path=str(path))
    env = dict(os.environ, PYTHONPATH=str(old), OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                          timeout=300, cwd=str(old))   # not the checkout: "" leads sys.path
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize("case", ALL)
def test_legacy(case, legacy):
    entry = legacy.get(case.id)
    assert entry is not None
    if isinstance(entry, str):
        pytest.skip(f"0.1.0 itself could not checkpoint this configuration ({entry[:200]})")
    saved = torch.load(io.BytesIO(entry), weights_only=True)   # 0.1.0's file, weights_only
    sd = saved["sd"]
    assert set(sd) == {"inner", "guard"}
    bare, _ = _pair(case)
    grads = Grads(case)
    for t in range(BEFORE):
        _both(bare, [], grads, t)
    for i, (a, b) in enumerate(zip(bare.params, saved["params"])):
        _same(a.detach(), b, f"0.1.0 run's param {i}")   # 0.1.0 stepped as bare does
    params = _as_kind(case, [p.clone().requires_grad_(True) for p in saved["params"]])
    resumed = Run(case, GuardedOptimizer(case.cls(params, **_kwargs(case))), params)
    resumed.targets, resumed.returned = bare.targets, list(bare.returned)
    resumed.opt.load_state_dict(sd)
    # the reference: the bare optimizer resumed from its own checkpoint (a differentiable one
    # cannot step after a load: its state comes back as leaves requiring grad)
    ref = _resumed(case, bare, _save_load(bare.opt.state_dict()), wrap=False)
    for t in range(BEFORE, BEFORE + AFTER):
        if _both(ref, [resumed], grads, t):
            return
    _assert_runs_equal(ref, resumed, "guard resumed from a 0.1.0 checkpoint")


# -- meta-device parameters ----------------------------------------------------------------------------

@pytest.mark.parametrize("case", ALL)
def test_meta(case):
    def meta_params():
        leaves = [torch.empty(s, device="meta", requires_grad=True) for s in case.shapes()]
        return _as_kind(case, leaves)

    def meta_grads(params):
        out = []
        for p in params:
            g = torch.empty(p.shape, device="meta")
            if case.sparse:
                g = torch.sparse_coo_tensor(torch.zeros(p.dim(), 2, dtype=torch.long, device="meta"),
                                            torch.empty(2, device="meta"), p.shape)
            out.append(g)
        return out

    pb, pg = meta_params(), meta_params()
    ob, og, stop = _mirror(lambda: case.cls(pb, **_kwargs(case)),
                           lambda: _wrap(case.cls(pg, **_kwargs(case))), "construction")
    if stop:
        return
    for t in range(2):
        for ps in (pb, pg):
            for p, g in zip(ps, meta_grads(ps)):
                p.grad = g

        def closure_for(ps):
            def closure():
                return sum((p * 1.0).sum() for p in ps)
            return closure

        if case.lbfgs:
            _, _, stop = _mirror(lambda: ob.step(closure_for(pb)), lambda: og.step(closure_for(pg)),
                                 f"step {t}")
        else:
            _, _, stop = _mirror(ob.step, og.step, f"step {t}")
        if stop:
            return
        for p in pg:
            assert p.device.type == "meta"
    _, _, stop = _mirror(ob.state_dict, og.state_dict, "state_dict")


# -- fp16 -------------------------------------------------------------------------------------------------

FP16_SCALES = {
    # weights ~150, gradients ~100: squared norms overflow fp16, norms and Adam/Adagrad state do not
    "sq": (150.0, 100.0),
    # weights and gradients ~2e4: the per-tensor norms themselves overflow fp16 (finite elements)
    "norm": (2e4, 2e4),
}


@pytest.mark.parametrize("scale", list(FP16_SCALES))
@pytest.mark.parametrize("case", ALL)
def test_fp16(case, scale):
    wscale, gscale = FP16_SCALES[scale]
    _finite_low_precision(case, torch.float16, wscale, gscale, norm_overflows=scale == "norm")


@pytest.mark.parametrize("case", ALL)
def test_bf16_huge(case):
    """Beyond item 5, the same for bf16: finite weights of ~1e30 (bf16 reaches 3.4e38), whose
    squared norm overflows even float32. torch's own test_fused_matches_forloop meets this by
    chance (its 0-d ``torch.empty`` parameter holds whatever was in memory, 4e34 say)."""
    _finite_low_precision(case, torch.bfloat16, 1e30, 1.0, norm_overflows=False)


def _finite_low_precision(case, dtype, wscale, gscale, norm_overflows: bool) -> None:
    if case.name == "SGD" and case.kwargs.get("fused") and case.kwargs.get("momentum", 0):
        pytest.skip("torch 2.13: the bare fused SGD with momentum on CPU reads uninitialised "
                    "memory into momentum_buffer for fp16/bf16 parameters of 48 elements (two "
                    "bare runs differ), so there is no reference to compare with")
    bare, guard = _pair(case, fp16=True, dtype=dtype, scale=wscale)
    grads = Grads(case, fp16=True, scale=gscale)
    p32 = torch.cat([p.detach().float().reshape(-1) for p in bare.params])
    assert torch.isinf((p32 ** 2).sum().to(dtype)), "the weights' squared norm must overflow"
    if norm_overflows:
        assert torch.isinf(torch.linalg.vector_norm(bare.params[0].detach())), \
            "the weights' fp16 norm must overflow"
    for t in range(STEPS + 1):
        if t == STEPS and not BARE_MODE:
            guard.opt.state_dict()   # a no-probe guard verifies the live state here
        g = None if case.lbfgs else grads.next(bare.params, t)
        _, e = _outcome(lambda: bare.step(g, t))
        if e is not None:
            pytest.skip(f"the bare {case.name} cannot step {dtype} parameters on CPU: {_short(e)}")
        finite = all(torch.isfinite(p.detach()).all() for p in bare.params) and all(
            torch.isfinite(v).all() for st in bare.opt.state.values() for v in st.values()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not v.is_sparse)
        if not finite:
            pytest.skip(f"the bare {case.name} turns this {dtype} model non-finite at step {t}: "
                        "not a finite model")
        guard.step(g, t)   # step t+1 checks step t's proposal (weights and state)
        d = _decision(guard.opt)
        assert d == "accept", (f"step {t}: a finite {dtype} model read as non-finite or "
                               f"exploding ({d}: {getattr(guard.opt.last_event, 'reason', None)})")
        _assert_runs_equal(bare, guard, f"{dtype}, after step {t}")


# -- the skips are the bare optimizer's ------------------------------------------------------------------

def _skip_reason_cases():
    out = []
    for c in CASES:
        if c.skip is not None:
            out.append(pytest.param(c, id=c.id))
    return out


@pytest.mark.parametrize("case", _skip_reason_cases())
def test_bare_fails_where_skipped(case):
    pb = _make_params(case)
    bare = Run(case, case.cls(pb, **_kwargs(case)), pb)
    grads = Grads(case)
    with pytest.raises(RuntimeError):
        for t in range(BEFORE):
            bare.step(None if case.lbfgs else grads.next(pb, t), t)
