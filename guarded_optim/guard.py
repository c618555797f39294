"""GuardedOptimizer: propose -> measure -> accept or roll back (paper 001, Algorithm 1).

One call of ``step()``:

1. *measure before*: the pre-step signals read the training loss and the global gradient
   norm (non-finite, spike). If one fires the step is SKIPPED: nothing is applied, nothing
   is restored. All flags come to the host in one transfer: the only sync of the step.
   Under a process group that transfer is first summed across ranks (one all_reduce,
   :mod:`.distributed`), so every rank takes the same decision; so is step 3's.
2. *propose*: ``inner.step()`` (after waiting for a pending asynchronous snapshot).
3. *measure*: every ``probe_every``-th applied step, ``y = probe()`` on the proposed
   parameters; innovation ``nu = y - yhat``.
4. *decide*: accept iff ``nu <= epsilon_t``: ``yhat`` <- EWMA, the safe snapshot <- the
   accepted state. Otherwise roll back to the safe snapshot; ``yhat`` is unchanged.

Invariants (tested): every accepted measured step satisfies ``y <= yhat + epsilon_t``
(Theorem 7.3); after a rollback params, optimizer state and buffers equal the last
accepted state bit for bit (Proposition 7.4), while the RNG streams move on (a rollback
never replays the batch or the dropout masks that caused it: :mod:`.rng`); with a fixed
``epsilon``, ``max_k y(theta_k) <= y(theta_0) + t * epsilon`` (Proposition 7.5); a run in
which the guard never intervenes is bit-identical to the bare optimizer's; a ``step()``
that raises leaves counters, parameters and state as they were. Two departures from
Algorithm 1 are the escalation ladder (:mod:`.ladder`): a rejected step is first re-run in
place (with a closure; accepted if the re-run's proposal passes), and after
``max_consecutive_rejections`` rejections in a row the guard rolls back to an older
verified snapshot (if ``history`` keeps any), and when none is left it stops with
:class:`~guarded_optim.ladder.GuardStopped` (or re-baselines ``yhat`` with
``Ladder(on_exhausted="rebaseline")``); every rung is counted in ``stats``, logged and
reported in the events. ``max_consecutive_rejections=None, ladder=Ladder(rerun=None)``
gives Algorithm 1 exactly.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from . import checkpoint, rng, validation
from .distributed import AUTO, agree, agree_host, full_value, pack, resolve_group, world_size
from .events import StepEvent
from .innovation import FixedThreshold, RelativeThreshold, Threshold, accepts, ewma, innovation
from .fisher import FisherDiagonal, default_fisher
from .ladder import GuardStopped, Ladder, _plain_id
from .logs import RateLimitedLog
from .policy import Decision, RecoveryAction
from .signals import StepMeasurement, Verdict, default_signals, global_grad_norm
from .signals.base import host_judge
from .signals.probe import ProbeError, call_probe, check_initial, probe_value
from .snapshot import MODES, Snapshot, SnapshotRing

__all__ = ["GuardedOptimizer", "VERIFY_EVERY"]

#: the default verification cadence of a guard without a probe (``probe_every=None``)
VERIFY_EVERY = 10

_COUNTERS = ("_t", "_unverified", "_consecutive", "_since_push", "_in_row", "_skips_in_row", "yhat",
             "last_decision", "last_event", "_live_is_safe")
def amp_unscale(grads: list[torch.Tensor], grad_scale: torch.Tensor) -> torch.Tensor:
    """Divide ``grads`` by ``grad_scale`` in place; return ``found_inf`` (1.0 if any is non-finite).

    The kernel and the reciprocal are GradScaler's own (``unscale_``), so the result is bit
    for bit what ``scaler.unscale_`` gives. No host sync.
    """
    found_inf = torch.zeros((), dtype=torch.float32, device=grad_scale.device)
    inv_scale = grad_scale.double().reciprocal().float()
    groups: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g._values() if g.is_sparse else g)
    with torch.no_grad():
        for (device, _), group in groups.items():
            local = found_inf.to(device) if device != found_inf.device else found_inf
            torch._amp_foreach_non_finite_check_and_unscale_(group, local, inv_scale.to(device))
            if local is not found_inf:
                found_inf += local.to(found_inf.device)
    return found_inf


def _replay(loss: Any, closure: Callable | None) -> Callable | None:
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
def _global_step_hooks_muted():
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


@dataclass
class _Flags:
    """One step's pre-proposal reading, agreed over the ranks (see ``_read_flags``)."""

    fired: list[bool]        # pre-step signals, in order
    state_fired: list[bool]  # post-step signals on the live, unverified state, in order
    grad_norm: float         # mean over the ranks
    overflow: bool           # GradScaler found inf/NaN on some rank


def _try_probe(probe: Callable[[], Any], module: torch.nn.Module | None) -> tuple[Any, ProbeError | None]:
    """``(output, None)``, or ``(nan, error)`` when the probe raised: the error is agreed
    with the other ranks before anyone raises it (a rank raising alone would hang them)."""
    try:
        return call_probe(probe, module), None
    except ProbeError as exc:
        return math.nan, exc


def _batch_id(x: Any) -> Any:
    """``batch_id`` as the quarantine stores it (a list becomes a tuple), or ``TypeError``."""
    if x is None:
        return None
    x = tuple(x) if isinstance(x, list) else x
    if not _plain_id(x):
        raise TypeError(f"batch_id must be an int, a str or a tuple of them, got "
                        f"{type(x).__name__}; e.g. step(closure, batch_id=batch_index).")
    return x


def _remote_probe_error() -> ProbeError:
    return ProbeError("the probe raised on another rank; every rank rolled back to the last "
                      "verified state (see that rank's error for the cause).")


def _is_signal(x: Any) -> bool:
    return callable(getattr(x, "measure", None)) and getattr(x, "phase", None) in ("before", "after")


def _is_threshold(x: Any) -> bool:
    return callable(x) and callable(getattr(x, "update", None))


def _is_action(x: Any) -> bool:
    return isinstance(x, RecoveryAction) or callable(getattr(x, "on_rollback", None))


class GuardedOptimizer(Optimizer):
    r"""Wrap ``optimizer`` so that a step that wrecks the run is skipped or rolled back.

    Args:
        optimizer: the inner optimizer (``AdamW``, ``SGD``, ...). Its ``param_groups`` and
            ``state`` *are* the guard's: schedulers, ``add_param_group`` and checkpoint code
            act on the real thing.
        probe: zero-argument callable returning a scalar loss on a small fixed held-out set,
            *lower is better* (with ``maximize=True`` return the negated objective),
            evaluated under ``torch.no_grad()`` on the proposed parameters, on a copy of the
            RNG streams (it never consumes yours). ``None``: no probe; the default signals
            still skip bad gradients and roll back damaged weights or optimizer state.
        module: the model. Its buffers (BatchNorm statistics) join the snapshot and the probe
            runs in eval mode (each submodule's mode is restored afterwards). Without it a
            probe runs in the mode the model is in (dropout active, BatchNorm statistics
            updated by the probe).
        epsilon: absolute threshold on the innovation (the paper's ``epsilon``), ``> 0``.
            ``None`` (default): the scale-aware :class:`RelativeThreshold`. Needs a probe.
        threshold: a threshold object instead of ``epsilon`` (see :mod:`.innovation`).
        alpha: EWMA factor of ``yhat`` in ``(0, 1)`` (default 0.1, as in the paper).
        probe_every: the verification cadence: every ``k``-th applied step is verified (with
            a probe: measured on its proposal; without: the post-step signals check the live
            state right after its proposal, or at the next step's start when ``k=1``; see
            ``_check_live``) and becomes the safe snapshot; a failed
            verification rolls back the ``k`` unverified steps. A pre-step signal that fires
            while steps are unverified has the post-step signals check them at once.
            Default ``None``: 1 with a probe, :data:`VERIFY_EVERY` (10) without, where the
            check and the capture are the guard's main cost (about 1.6 ms per verification
            on a 0.43M-parameter GPT, for an ``opt.step()`` of 2.2 ms): a probe-less
            rollback then returns to a state up to ``k`` steps old.
        signals: a list of signals (default :func:`~guarded_optim.signals.default_signals`:
            :class:`NonFinite` and :class:`GradientSpike` skip before the step;
            :class:`NonFiniteWeights`, :class:`WeightNorm` and :class:`OptimizerStateHealth`
            roll back after it; without a probe also :class:`LossSpike`).
        max_consecutive_rejections: escalate after this many rejections in a row (see the
            module docstring); ``None`` never escalates.
        history: how many older verified snapshots to keep for escalation (default 0: one
            copy of the training state in all; each entry costs one more copy).
        save_history: whether ``state_dict()`` saves those older snapshots too (default
            ``False``: a resumed run starts with an empty history).
        checkpoint_every: accepted measured steps between two pushes into that history.
        snapshot: ``"auto"``, ``"device"`` or ``"host"`` (see :mod:`.snapshot`).
        callbacks: a list of callables receiving a :class:`StepEvent` after every completed
            ``step()`` (e.g. ``[CSVSink("guard.csv")]``). A callback that raises does not undo
            the step: it was applied and committed; the error propagates to the caller.
        recovery: healing actions run after rollbacks (:mod:`.policy`: ``ReduceLR``,
            ``Escape``, or ``arc_recovery()``). Default: none, so the guard never changes
            the optimisation itself; every action it takes is reported in the events. One
            tracker is added when the inner optimizer keeps no second moment (SGD, Adagrad,
            ...): :class:`~guarded_optim.fisher.HostFisher`, the diagonal Fisher in host
            memory (4 B/param), updated once per verification; the Adam family's
            ``exp_avg_sq`` already is that estimate, at no extra byte.
        ladder: the escalation ladder (:mod:`.ladder`): re-run a rejected step in place,
            quarantine persistent bad batches, and when ``max_consecutive_rejections`` is
            spent, stop with :class:`GuardStopped` (default) or re-baseline.
        process_group: the ranks that must take the same decision (:mod:`.distributed`):
            ``"auto"`` (default) reduces over the default group when one is initialised;
            a ``ProcessGroup`` reduces over it; ``None``/``False`` decides rank-locally.

    AMP: ``scaler.step(guard)`` hands the guard ``grad_scale``/``found_inf`` (the guard sets
    ``_step_supports_amp_scaling``), so the scaler adds no host sync of its own. The guard
    unscales the gradients once (unless ``scaler.unscale_`` already did), reads ``found_inf``
    with its other flags, and counts an overflow as a SKIP with reason ``"amp_overflow"``
    (``stats["skipped_amp_overflow"]``); nothing is applied, and ``scaler.update()`` backs
    off as usual.

    ``opt.last_decision`` is ``"accept"``, ``"rollback"`` or ``"skip"``; ``opt.stats`` counts
    them (plain ints); every skip, rollback, escalation and re-baseline is also a record of
    the ``"guarded_optim"`` logger (:mod:`.logs`). Step hooks (global and the guard's own)
    fire once per ``step()`` with the guard as ``opt``; post-hooks only for applied steps.

    ``state_dict()`` is the inner optimizer's own layout plus one key, ``"guard"``: a bare
    optimizer of the inner class loads it unchanged. It carries the RNG states of this rank,
    which ``load_state_dict`` does not impose on the process: call
    :meth:`restore_rng_state` for a bit-identical resume.
    """

    _initialising = False
    _step_supports_amp_scaling = True  # GradScaler passes grad_scale/found_inf, no sync

    def __init__(
        self,
        optimizer: Optimizer,
        probe: Callable[[], Any] | None = None,
        *,
        module: torch.nn.Module | None = None,
        epsilon: float | None = None,
        threshold: Threshold | None = None,
        alpha: float = 0.1,
        probe_every: int | None = None,
        signals: Iterable[Any] | None = None,
        max_consecutive_rejections: int | None = 20,
        history: int = 0,
        checkpoint_every: int = 50,
        save_history: bool = False,
        snapshot: str = "auto",
        callbacks: Iterable[Callable[[StepEvent], None]] = (),
        recovery: Iterable[RecoveryAction] = (),
        ladder: Ladder | None = None,
        process_group: Any = AUTO,
    ):
        if isinstance(optimizer, GuardedOptimizer):
            raise TypeError("optimizer is already a GuardedOptimizer; wrap the inner optimizer once.")
        validation.instance("optimizer", optimizer, lambda x: isinstance(x, Optimizer),
                            "a torch.optim.Optimizer, e.g. torch.optim.AdamW(model.parameters())")
        if probe is not None:
            validation.instance("probe", probe, callable, "a zero-argument callable returning "
                                "a scalar loss, e.g. probe=lambda: loss_fn(model(x_val), y_val)")
        if module is not None:
            validation.instance("module", module, lambda x: isinstance(x, torch.nn.Module),
                                "a torch.nn.Module (the model)")
        if epsilon is not None and threshold is not None:
            raise ValueError("Pass either epsilon= (absolute) or threshold=, not both.")
        if epsilon is not None:
            epsilon = validation.real("epsilon", epsilon, low=0, low_open=True,
                                      hint="e.g. epsilon=0.1, or None for the scale-aware default.")
        if threshold is not None:
            validation.instance("threshold", threshold, _is_threshold, "a threshold object "
                                "such as RelativeThreshold() or FixedThreshold(0.1); for a "
                                "number use epsilon=")
        alpha = validation.real("alpha", alpha, low=0, high=1, low_open=True, high_open=True,
                                hint="The EWMA factor, e.g. 0.1.")
        probe_every = validation.integer("probe_every", probe_every, low=1, none=True,
                                         hint="1 verifies every step.")
        if probe_every is None:
            probe_every = 1 if probe is not None else VERIFY_EVERY
        max_consecutive_rejections = validation.integer(
            "max_consecutive_rejections", max_consecutive_rejections, low=1, none=True,
            hint="None never escalates.")
        history = validation.integer("history", history, low=0, hint="0 keeps no older snapshot.")
        checkpoint_every = validation.integer("checkpoint_every", checkpoint_every, low=1)
        if not isinstance(save_history, bool):
            raise ValueError(f"Invalid save_history: {save_history!r}; pass True or False.")
        if snapshot not in MODES:
            raise ValueError(f"Invalid snapshot: {snapshot!r}; choose one of {MODES}.")
        signals = (default_signals(probe is not None) if signals is None else
                   validation.items("signals", signals, _is_signal, "signal instances",
                                    "[NonFinite(), GradientSpike()]"))
        names = [s.name for s in signals]
        if len(set(names)) != len(names):
            raise ValueError(f"signals must have distinct names, got {names}.")
        callbacks = validation.items("callbacks", callbacks, callable, "callables",
                                     '[CSVSink("guard.csv")]')
        recovery = validation.items("recovery", recovery, _is_action, "RecoveryAction instances",
                                    "[ReduceLR()]")
        if not any(isinstance(a, FisherDiagonal) for a in recovery):
            tracker = default_fisher(optimizer)   # None where the inner keeps exp_avg_sq
            if tracker is not None:               # (design card: a Fisher diagonal is saved)
                recovery = [*recovery, tracker]   # last: the checkpoint loader relies on it
        if ladder is not None:
            validation.instance("ladder", ladder, lambda x: isinstance(x, Ladder),
                                "a guarded_optim.Ladder, e.g. Ladder(on_exhausted='rebaseline')")
        resolve_group(process_group)  # validates; resolved again at every use ("auto")
        self._warn_on_mismatch(optimizer, probe, module, epsilon, threshold)

        self.process_group = process_group
        self.inner = optimizer
        self._initialising = True
        try:  # sets defaults and hook dicts; param_groups/state stay the inner optimizer's
            super().__init__(optimizer.param_groups, optimizer.defaults)
        finally:
            self._initialising = False

        self.probe, self.module, self.alpha, self.probe_every = probe, module, alpha, probe_every
        self.threshold: Threshold = (threshold if threshold is not None else
                                     FixedThreshold(epsilon) if epsilon is not None else
                                     RelativeThreshold())
        self.signals = signals
        self.max_consecutive_rejections = max_consecutive_rejections
        self.checkpoint_every, self.save_history = checkpoint_every, save_history
        self.callbacks = callbacks
        self.recovery = recovery
        self.ladder = ladder if ladder is not None else Ladder()
        self._snapshot_mode = snapshot
        self._ring = SnapshotRing(history, self._new_snapshot)
        self._log = RateLimitedLog()
        self._initial = copy.deepcopy((self.threshold.state_dict(),
                                       [s.state_dict() for s in self.signals],
                                       [a.state_dict() for a in self.recovery],
                                       self.ladder.state_dict()))
        self._reset_guard_state()

    @staticmethod
    def _warn_on_mismatch(optimizer, probe, module, epsilon, threshold) -> None:
        """Arguments that are valid but probably not what the user meant."""
        if probe is None and (epsilon is not None or threshold is not None):
            warnings.warn("epsilon/threshold bound the probe's innovation, but no probe was "
                          "given, so they have no effect; pass probe=... or drop them.",
                          UserWarning, stacklevel=3)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        if module is not None and params:
            owned = {id(p) for p in module.parameters()}
            if not any(id(p) in owned for p in params):
                warnings.warn("module= owns none of the optimizer's parameters: its buffers "
                              "are snapshotted and its mode switched for the probe, but it is "
                              "not the model being optimized; pass module=model.",
                              UserWarning, stacklevel=3)
        if probe is not None and any(g.get("maximize", False) for g in optimizer.param_groups):
            warnings.warn("a param group has maximize=True, but the probe is lower-is-better: "
                          "return the negated objective from probe (e.g. lambda: -reward()), "
                          "or every improvement reads as a rejection.", UserWarning, stacklevel=3)

    def _new_snapshot(self) -> Snapshot:
        return Snapshot(self.inner, self.module, mode=self._snapshot_mode)

    @property
    def _pre(self) -> list:
        return [s for s in self.signals if s.phase == "before"]

    @property
    def _post(self) -> list:
        return [s for s in self.signals if s.phase == "after"]

    @property
    def _uses_snapshots(self) -> bool:
        """Rollback needs snapshots: a probe, or any signal that can issue FAILURE."""
        return self.probe is not None or any(s.verdict is Verdict.FAILURE for s in self.signals)

    def _accelerator(self) -> torch.device | None:
        """The device of the first parameter not on the CPU (where NCCL reduces), if any."""
        for g in self.param_groups:
            for p in g["params"]:
                if p.device.type != "cpu":
                    return p.device
        return None

    def _agreed(self, flag: bool) -> bool:
        """A rank-local decision that gates a collective (or the ring's length), made the
        same on every rank: true if it is true on any rank. Free without a process group."""
        group = resolve_group(self.process_group)
        if world_size(group) == 1:
            return flag
        return agree_host([float(flag)], [], group, self._accelerator)[0] > 0

    def _on_meta(self) -> bool:
        """Meta parameters hold no values: the guard then steps exactly as the bare optimizer."""
        for g in self.param_groups:
            for p in g["params"]:
                return p.is_meta
        return False

    def _reset_guard_state(self) -> None:
        """Fresh guard: no reference, counters at zero, theta_safe <- theta_0 (Algorithm 1, l. 3).

        Both happen here, before any forward pass moves BatchNorm statistics, so a broken
        probe fails now, with nothing changed. If the weights are written before the first
        ``step()`` (a checkpoint loaded after construction), that step measures and
        captures again, before its forward pass (seen from the tensors' write counters).
        """
        threshold, signals, recovery, ladder = copy.deepcopy(self._initial)
        self.threshold.load_state_dict(threshold)
        self.ladder.load_state_dict(ladder)
        for s, sd in zip(self.signals, signals):
            s.load_state_dict(sd)
        for a, sd in zip(self.recovery, recovery):
            a.load_state_dict(sd)
        self._ring.drop_from(-1)
        self._safe = self._new_snapshot()
        self._reset_counters()
        self._pending: str | None = "reference"   # what the next step() must settle first
        if self._uses_snapshots and not self._on_meta():
            self._take_reference()

    def _reset_counters(self) -> None:
        self.yhat: float | None = None     #: EWMA of accepted probe measurements
        self.y0: float | None = None       #: the first probe measurement
        self.last_decision: str | None = None
        self.last_event: StepEvent | None = None
        self._t = 0                        # completed calls of step()
        self._unverified = 0               # applied steps since the last verified state
        self._consecutive = 0              # rejections in a row
        self._since_push = 0               # accepted measurements since the last ring push
        self._in_row = 0                   # rollbacks since the last healthy applied step
        self._skips_in_row = 0             # overrulable skips since the last applied step
        self._live_is_safe = True          # the live state equals the safe snapshot
        self._restores = 0                 # restores of the safe snapshot, ever
        self.stats: dict[str, int] = {
            "steps": 0, "accepted": 0, "rollbacks": 0, "skipped": 0, "measured": 0,
            "escalations": 0, "rebaselines": 0, "escapes": 0, "skipped_amp_overflow": 0,
            "reruns": 0, "transient": 0, "persistent": 0, "quarantined": 0,
            "skipped_quarantined": 0, "stops": 0, "overruled": 0, "batch_loss_spikes": 0,
            **{f"skipped_{s.name}": 0 for s in self.signals if s.verdict is Verdict.SKIP},
            **{f"failures_{s.name}": 0 for s in self.signals if s.verdict is Verdict.FAILURE},
        }

    # -- the inner optimizer's attributes are the guard's ---------------------------------
    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return self.inner.param_groups

    @param_groups.setter
    def param_groups(self, value: list[dict[str, Any]]) -> None:
        if not self._initialising:
            self.inner.param_groups = value

    @property
    def state(self):  # type: ignore[override]
        return self.inner.state

    @state.setter
    def state(self, value) -> None:
        if not self._initialising:
            self.inner.state = value

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group to the inner optimizer; its params join the safe snapshot as they are."""
        if not self._initialising:
            self.inner.add_param_group(param_group)
            self._safe.add_params(self.inner.param_groups[-1]["params"])

    def fisher_diagonal(self) -> list[torch.Tensor] | None:
        """The diagonal Fisher estimate (design card): the inner optimizer's bias-corrected
        ``exp_avg_sq`` (Adam family; zero extra bytes, saved with the state), or a
        ``FisherDiagonal`` among ``recovery``; ``None`` when neither exists."""
        from .fisher import find_fisher
        try:
            return list(find_fisher(self)._require())
        except (ValueError, RuntimeError):
            return None

    def wait_for_snapshot(self) -> None:
        """Order the current CUDA stream after the snapshot copy still in flight (host mode on
        CUDA), without a host sync. Call it before writing parameters, optimizer state or
        buffers in place between steps (an EMA swap-in, clamping, pruning masks,
        ``model.load_state_dict``): the copy that becomes the verified state reads them on a
        side stream. A no-op on CPU and in device mode."""
        self._safe.wait()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __deepcopy__(self, memo: dict) -> "GuardedOptimizer":
        """An independent copy: its own inner optimizer, parameters and snapshots. A probe or
        callback that Python cannot copy (a function) is shared: if it reads the original
        model, give the copy its own (``copy.probe = ...``)."""
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        if self.probe is not None and new.probe is self.probe:
            warnings.warn("copy.deepcopy(guard): the copy shares the original's probe function; "
                          "if it evaluates the original model, set copy.probe to one that "
                          "evaluates the copy.", UserWarning, stacklevel=2)
        return new

    def __repr__(self) -> str:
        return (f"GuardedOptimizer({self.inner!r},\n  threshold={self.threshold!r}, "
                f"alpha={self.alpha}, probe_every={self.probe_every}, signals={self.signals!r})")

    # -- step ------------------------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None, *,  # type: ignore[override]
             batch_id: int | str | None = None) -> Any:
        """Propose, measure, then accept or roll back. Returns the closure's loss, if any.

        ``batch_id`` names the batch for the quarantine (:mod:`.ladder`): a quarantined batch
        is skipped, and a persistent rejection quarantines it (without a ``batch_id`` nothing
        is quarantined: a step index never comes again).
        Raises :class:`GuardStopped` after committing a step that spent the escalation budget.
        """
        args, kwargs = (self,), ({"closure": closure} if closure is not None else {})
        for hook in (*_global_optimizer_pre_hooks.values(), *self._optimizer_step_pre_hooks.values()):
            result = hook(self, args, kwargs)
            if result is not None:
                args, kwargs = result
                closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("GuardedOptimizer.step() cannot run inside CUDA-graph capture: its "
                               "decision is read on the host each step. Capture the forward and "
                               "backward only, and call opt.step() outside the graph.")
        with torch.autograd.profiler.record_function(f"Optimizer.step#{type(self).__name__}.step"):
            if self._on_meta():
                with _global_step_hooks_muted():
                    loss = self.inner.step(closure)
                event = None
            else:
                loss, event = self._transaction(closure, _batch_id(batch_id))
            self._optimizer_step_code()
        if event is None or event.decision == Decision.ACCEPT.value:
            for hook in (*self._optimizer_step_post_hooks.values(), *_global_optimizer_post_hooks.values()):
                hook(self, args, kwargs)
        if event is not None:
            for callback in self.callbacks:   # the step is committed: an error here undoes nothing
                callback(event)
            if event.action and "stop" in event.action.split(","):
                raise GuardStopped(self._stop_message(event))
        return loss

    # torch.compile of a loop that calls step() graph-breaks here instead of tracing (and
    # recompiling on) the guard's host-side decisions every step
    step = torch._disable_dynamo(step)
    step.hooked = True  # type: ignore[attr-defined]  # hooks run above, post-hooks on accept only

    def _transaction(self, closure: Callable | None, batch_id: Any) -> tuple[Any, StepEvent]:
        """One guarded step that either completes or leaves the guard as it was."""
        saved = {k: getattr(self, k) for k in _COUNTERS}, dict(self.stats)
        restores = self._restores
        try:
            self._settle_pending()   # before the closure's forward moves anything
            loss, rng_before = None, None
            if closure is not None:
                if self.ladder.rerun is not None and self.probe is not None:
                    rng_before = rng.capture()   # a re-run draws what this run draws
                with torch.enable_grad():
                    loss = closure()
            return loss, self._guarded_step(loss, closure, batch_id, rng_before)
        except BaseException:
            self.__dict__.update(saved[0])
            self.stats = saved[1]
            if self._restores != restores:   # the failed call rolled back to the verified state
                self._unverified, self._live_is_safe = 0, True
            raise

    def _guarded_step(self, loss: Any, closure: Callable | None, batch_id: Any = None,
                      rng_before: dict | None = None) -> StepEvent:
        t = self._t
        pre, post = self._pre, self._post

        # 1. measure before proposing (and, while proposals are unverified, the live state's
        #    health with the post-step signals): one host transfer for every flag
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        overflow = self._amp_unscale(grads)   # GradScaler's found_inf (None without AMP)
        m = StepMeasurement(t, full_value(global_grad_norm(grads)),
                            loss if isinstance(loss, torch.Tensor) else None, self.inner)
        device, group = m.grad_norm.device, resolve_group(self.process_group)
        checked = post if self._needs_verification_capture() else []   # verify theta_t now
        flags = self._read_flags(m, pre, checked, overflow, group)
        if self._unverified and not checked and any(flags.fired):   # a warning: verify now
            checked = post
            flags.state_fired = self._read_flags(m, [], checked, None, group).state_fired
        if self._batch_explains(pre, flags.fired):   # theta_t is verified: the batch is new
            flags.fired = [f and s.verdict is not Verdict.FAILURE for s, f in zip(pre, flags.fired)]
        fired, state_fired = flags.fired, flags.state_fired
        event = StepEvent(t, Decision.SKIP.value, grad_norm=flags.grad_norm, batch_id=batch_id,
                          signals={s.name: f for s, f in zip(pre + checked, fired + state_fired)})

        damaged = [s.name for s, f in zip(checked, state_fired) if f]
        damaged += [s.name for s, f in zip(pre, fired) if f and s.verdict is Verdict.FAILURE]
        if damaged:               # the unverified proposals damaged the state (or theta_t is bad)
            self._observe(pre, m, False, fired)
            return self._fail(damaged, None, event)
        self._observe(checked, m, True, state_fired)
        if self._needs_verification_capture():
            self._verify(t)       # no probe: the flags just read verified the live state
        if flags.overflow:        # GradScaler's inf/NaN: its own skip; signals learn nothing
            self.stats["skipped_amp_overflow"] += 1
            return self._skip("amp_overflow", event)
        if batch_id is not None and batch_id in self.ladder.quarantine:
            self.stats["skipped_quarantined"] += 1
            return self._skip("quarantined", event)
        names = [s.name for s, f in zip(pre, fired) if f]
        overruled = bool(names) and self._overrules(pre, fired)
        if names and not overruled:
            self._observe(pre, m, False, fired)
            for name in names:
                self.stats[f"skipped_{name}"] += 1
            self._skips_in_row += 1
            return self._skip(",".join(names), event)
        if overruled:             # the probe decides this flagged step (.ladder, rung 1)
            self.stats["overruled"] += 1
            event.action, self._skips_in_row = "overrule", 0
            m.flagged = True

        # 2. propose
        self._safe.wait()
        for a in self.recovery:
            a.before_propose(self, m.grad_norm)
        self._propose(_replay(loss, closure))
        self._unverified += 1
        self._live_is_safe = False
        if self.probe is None or self._unverified < self.probe_every:
            self._observe(pre, m, True, fired)
            if self.probe_every > 1 and self._needs_verification_capture():   # see _check_live
                damaged = self._check_live(m, group, event)
                if damaged:
                    return self._fail(damaged, None, event)
                self._verify(t + 1)   # the copy overlaps the next forward and backward
            self._healthy()
            self.stats["accepted"] += 1   # provisional until a verification
            return self._finish(Decision.ACCEPT, event)

        # 3. measure the proposal: probe and post-step flags in one transfer
        y, nu, eps, after, post_fired, reasons = self._measure_proposal(m, group, device, event)

        # 4. decide; references learn only from the proposals that are kept (an overruled
        #    step that is kept is an ordinary one to them)
        self._observe(pre, m, not reasons, [False] * len(fired) if overruled and not reasons
                      else fired)
        self._observe(post, after, not reasons, post_fired)
        if reasons and rng_before is not None and self._unverified == 1:
            kind, remeasured = self._rerun(m, closure, rng_before, group, device, event)
            event.action = f"rerun:{kind}"
            if kind == "transient":
                y, nu, eps = remeasured
                reasons = []
            elif batch_id is not None:
                self._quarantine(batch_id, event)
        if reasons:
            return self._fail(reasons, y, event)
        self.yhat = ewma(self.yhat, y, self.alpha)   # accepted: Algorithm 1, lines 9-12
        self.threshold.update(nu)
        self._consecutive = 0
        self._verify(t + 1)
        self._healthy()
        self.stats["accepted"] += 1
        return self._finish(Decision.ACCEPT, event)

    def _read_flags(self, m: StepMeasurement, pre: list, checked: list,
                    overflow: torch.Tensor | None, group: Any) -> "_Flags":
        """The pre-step flags, the live state's post-step flags, the gradient norm and
        GradScaler's overflow: packed, agreed over the ranks, read in one transfer."""
        device, dtype = m.grad_norm.device, m.grad_norm.dtype   # float64 (float32 on MPS)
        signals = pre + checked
        on_host = [host_judge(s) for s in signals]   # judged from the values read
        parts = [s.measure(m).to(device, dtype).reshape(1)
                 for s, judge in zip(signals, on_host) if judge is None]
        k = len(parts)
        loss = m.loss_mean()
        parts.append(m.grad_norm.detach().reshape(1))
        if loss is None and overflow is None:        # made on the device: no upload, no sync
            parts.append(m.grad_norm.new_zeros(2))
        else:
            parts += [(t.reshape(1).to(device, dtype) if t is not None else m.grad_norm.new_zeros(1))
                      for t in (loss, overflow)]
        values = agree(pack(parts), [k, k + 1], group, self._accelerator).tolist()
        m.grad_norm_value = values[k]
        m.loss_value = values[k + 1] if loss is not None else None
        measured = iter(values[:k])
        fired = [judge(m) if judge is not None else bool(next(measured)) for judge in on_host]
        return _Flags(fired=fired[:len(pre)], state_fired=fired[len(pre):],
                      grad_norm=values[k], overflow=bool(values[-1]))

    def _measure_proposal(self, m: StepMeasurement, group: Any, device: torch.device,
                          event: StepEvent) -> tuple:
        """Probe and post-step flags of the live proposal, agreed over the ranks in one
        transfer; returns ``(y, nu, epsilon, measurement, post flags, reasons to reject)``."""
        post = self._post
        after = m.after_proposal()
        post_flags = [s.measure(after) for s in post]
        raw, error = _try_probe(self.probe, self.module)
        parts = [torch.as_tensor(raw).detach().to(device, torch.float64).reshape(1)]
        parts += [f.to(device, torch.float64).reshape(1) for f in post_flags]
        parts.append(torch.full((1,), float(error is not None), dtype=torch.float64, device=device))
        values = agree(pack(parts), [0], group, self._accelerator).tolist()  # probe mean, flags any-rank
        if values.pop():   # the probe raised on some rank: every rank restores and raises
            self._restore()  # never leave an unmeasured proposal behind
            raise error or _remote_probe_error()
        y, post_fired = values[0], [bool(v) for v in values[1:]]
        event.signals.update((s.name, f) for s, f in zip(post, post_fired))
        self.stats["measured"] += 1
        nu, eps = innovation(y, self.yhat), self.threshold(self.yhat)
        event.y, event.yhat, event.innovation, event.threshold = y, self.yhat, nu, eps
        reasons = [s.name for s, f in zip(post, post_fired) if f]
        reasons += [] if accepts(nu, eps) else ["probe"]
        return y, nu, eps, after, post_fired, reasons

    def _rerun(self, m: StepMeasurement, closure: Callable, rng_before: dict,
               group: Any, device: torch.device, event: StepEvent) -> tuple[str, tuple | None]:
        """Rung 2 (:mod:`.ladder`): from the verified state, evaluate the closure again on the
        same batch and the same RNG draws, and measure its proposal. ``("transient",
        (y, nu, eps))`` if that passes (it is then live); ``("persistent", None)`` if it is
        rejected too (the verified state is then live)."""
        self.stats["reruns"] += 1
        self._restore()
        rng_after = rng.capture()
        rng.restore(rng_before)
        try:
            with torch.enable_grad():
                loss2 = closure()
        finally:
            rng.restore(rng_after)   # the data stream goes on from the first run
        self._propose(_replay(loss2, closure))
        self._unverified, self._live_is_safe = 1, False
        y, nu, eps, after, post_fired, reasons = self._measure_proposal(m, group, device, event)
        self._observe(self._post, after, not reasons, post_fired)
        if not reasons:
            self.stats["transient"] += 1
            return "transient", (y, nu, eps)
        self._restore()
        self.stats["persistent"] += 1
        return "persistent", None

    def _quarantine(self, batch_id: Any, event: StepEvent) -> None:
        """Rung 4: remember a batch whose rejection was persistent."""
        if self.ladder.quarantine.add(batch_id):
            self.stats["quarantined"] += 1

    def _propose(self, closure: Callable | None) -> None:
        """``inner.step()``, with the recovery actions' LR scale applied around it only."""
        scale = math.prod(a.lr_scale() for a in self.recovery)
        base = [g["lr"] for g in self.param_groups] if scale != 1.0 else []
        for g, lr in zip(self.param_groups, base):
            g["lr"] = lr * scale
        try:
            with _global_step_hooks_muted():
                self.inner.step(closure)
        finally:
            for g, lr in zip(self.param_groups, base):
                g["lr"] = lr

    def _check_live(self, m: StepMeasurement, group: Any, event: StepEvent) -> list[str]:
        """Without a probe and with ``probe_every=k > 1``: the post-step signals on the
        live state right after the k-th unverified proposal (a second transfer, on every
        k-th step only), so its capture is issued at once and overlaps the next step's
        forward and backward instead of sitting before its ``inner.step()``. With ``k=1``
        the check stays at the next step's start, in the transfer that step makes anyway
        (damage written between steps is then seen before anything is proposed on it).
        Returns the signals that fired."""
        post, after = self._post, m.after_proposal()
        fired = self._read_flags(after, [], post, None, group).state_fired
        event.signals.update((s.name, f) for s, f in zip(post, fired))
        self._observe(post, after, not any(fired), fired)
        return [s.name for s, f in zip(post, fired) if f]

    def _overrules(self, pre: list, fired: list[bool]) -> bool:
        """Whether the probe decides this flagged step instead of skipping it: a probe
        measures it, the ladder allows it, the skip streak is long enough, and every signal
        that fired judges scale (``overrulable``), not validity."""
        return (self.probe is not None and self.ladder.overrule is not None
                and self._unverified + 1 >= self.probe_every
                and self._skips_in_row >= self.ladder.overrule
                and all(getattr(s, "overrulable", False) for s, f in zip(pre, fired) if f))

    def _batch_explains(self, pre: list, fired: list[bool]) -> bool:
        """Whether a pre-step FAILURE (a training-loss spike) fired on a live state that is
        the verified one, nothing written since: no unverified change to blame, so the
        batch is what differs (fresh data after a memorised shard) and the step goes on as
        an ordinary one. Rolling it back would only skip the batch, and every batch after
        it (the natural suite's ``adam_v_decay``: 20 rollbacks, then a re-base). Counted in
        ``stats["batch_loss_spikes"]``. Checked by the version counters, then value for value
        against the snapshot (a write through ``p.data`` bumps no counter): one pass over
        the parameters, only when such a spike fires."""
        if not any(f and s.verdict is Verdict.FAILURE for s, f in zip(pre, fired)):
            return False
        if not (self._live_is_safe and self._uses_snapshots):
            return False
        if self._agreed(self._safe.written_since_capture() or not self._safe.matches_live_params()):
            return False          # the live state was written since it was verified
        self.stats["batch_loss_spikes"] += 1
        self._log("batch", logging.DEBUG, "step %d: training-loss spike on the verified state: "
                  "the batch differs, nothing to roll back", self._t)
        return True

    def _healthy(self) -> None:
        self._in_row = 0
        self._skips_in_row = 0
        for a in self.recovery:
            a.on_healthy(self)

    @property
    def _checks_live_state(self) -> bool:
        """Without a probe, the post-step signals verify the live state (between steps)."""
        return self.probe is None and self._uses_snapshots

    def _needs_verification_capture(self) -> bool:
        return self._checks_live_state and self._unverified >= self.probe_every

    def _verify(self, step: int) -> None:
        """The live state is verified: it becomes the safe snapshot (and now and then a ring entry)."""
        self._unverified = 0
        self._safe.capture(step, yhat=self.yhat)
        self._live_is_safe = True
        self._since_push += 1
        if self._since_push >= self.checkpoint_every or self._agreed(
                any(a.wants_checkpoint(self) for a in self.recovery)):
            self._ring.push(self._safe)
            self._since_push = 0

    def _restore(self) -> None:
        """Put the safe snapshot back into the live state (RNG streams are left alone)."""
        self._safe.restore()
        self._unverified = 0
        self._live_is_safe = True
        self._restores += 1

    def _skip(self, reason: str, event: StepEvent) -> StepEvent:
        self.stats["skipped"] += 1
        event.reason = reason
        return self._finish(Decision.SKIP, event)

    def _fail(self, reasons: list[str], y: float | None, event: StepEvent) -> StepEvent:
        """FAILURE (a post-step signal, a pre-step loss spike) or a rejected probe: roll back."""
        self.stats["rollbacks"] += 1
        for name in reasons:
            if name != "probe":
                self.stats[f"failures_{name}"] += 1
        event.reason = ",".join(reasons)
        for a in self.recovery:   # e.g. an importance blend reads the rejected values
            a.before_rollback(self)
        actions = [self._rollback(y)]
        self._in_row += 1
        for a in self.recovery:
            actions.append(a.on_rollback(self, self._in_row))
            if actions[-1] is not None:
                self._live_is_safe = False   # an action may have moved the restored weights
            if actions[-1] == "escape":
                self.stats["escapes"] += 1
                event.skip_batches = max(event.skip_batches, getattr(a, "skip_batches", 0))
        if event.action:   # what the ladder did before the rollback (a re-run)
            actions.insert(0, event.action)
        if event.action and event.action.endswith("persistent") and event.batch_id is not None:
            actions.insert(1, "quarantine")
        event.action = ",".join(a for a in actions if a) or None
        return self._finish(Decision.ROLLBACK, event)

    def _settle_pending(self) -> None:
        """What a construction or a load left for the first step, before its forward pass:
        the reference (re-measured if the weights were written since it was taken), or the
        capture of a loaded checkpoint's live state as the safe snapshot."""
        pending, self._pending = self._pending, None
        if pending == "reference" and self._uses_snapshots and self._agreed(
                self._safe.written_since_capture() or (self.probe is not None and self.yhat is None)):
            self._take_reference()
        elif pending is not None and pending != "reference":   # ("capture", step, meta)
            _, step, meta = pending
            self._safe.capture(step, **meta)
            self._live_is_safe = True

    def _take_reference(self) -> None:
        """Algorithm 1, lines 2-3: ``yhat_0 = y(theta_0)`` (with a probe); theta_safe <- theta_0."""
        if self.probe is not None:
            self.y0 = self.yhat = check_initial(self._measure_probe())
        self._safe.capture(self._t, yhat=self.yhat)
        self._live_is_safe = True

    def _measure_probe(self) -> float:
        """One probe measurement outside the step's transfer, averaged over the ranks; a probe
        that raises on any rank raises on every rank."""
        raw, error = _try_probe(self.probe, self.module)
        y = math.nan if error is not None else probe_value(raw)
        y, failed = agree_host([y, float(error is not None)], [0], resolve_group(self.process_group),
                               self._accelerator)
        if failed:
            raise error or _remote_probe_error()
        return y

    def _amp_unscale(self, grads: list[torch.Tensor]) -> torch.Tensor | None:
        """GradScaler's ``found_inf`` for this step (``None`` outside ``scaler.step``).

        With ``grad_scale`` set (the scaler's ``unscale_`` was not called), divide the
        gradients by it here, once, in place, exactly as ``unscale_`` would.
        """
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if grad_scale is not None:
            found = amp_unscale(grads, grad_scale)
            found_inf = found if found_inf is None else found_inf.to(found.device) + found
        return found_inf

    @staticmethod
    def _observe(signals, m: StepMeasurement, applied: bool, fired: list[bool]) -> None:
        """Signals update their state once the step is decided (never on a failed call)."""
        for s, f in zip(signals, fired):
            s.observe(m, applied, f)

    def _rollback(self, y: float | None) -> str | None:
        """Restore the safe snapshot; escalate when rejections keep coming. Returns the action."""
        self._consecutive += 1
        limit = self.max_consecutive_rejections
        if limit is None or self._consecutive < limit:
            self._restore()
            return None
        self._consecutive = 0
        older = self._ring.newest_before(self._safe.step)
        if older is not None:      # reach back past damage accepted earlier
            self._ring.drop_from(older.step + 1)
            self._safe.copy_from(older)
            self.yhat = older.meta["yhat"]
            self.stats["escalations"] += 1
            self._restore()
            return "escalate"
        self._restore()
        if self.ladder.on_exhausted == "raise" and y is not None:
            self.stats["stops"] += 1   # the probe kept rejecting: stop, accept nothing
            return "stop"
        if y is None:              # nowhere older to go: the signals learn the new level
            for sig in self.signals:
                getattr(sig, "rebase", lambda: None)()
        else:                      # nowhere older to go: accept the new level of y
            if not math.isfinite(y):
                y = self._measure_probe()
                if not math.isfinite(y):
                    raise ProbeError(
                        f"probe returned {y} even at the last accepted state, where it was "
                        "finite before: the probe itself is broken (state was rolled back).")
            self.yhat = y
        self.stats["rebaselines"] += 1
        return "rebaseline"

    def _stop_message(self, e: StepEvent) -> str:
        return (f"GuardedOptimizer stopped at step {e.step}: {self.max_consecutive_rejections} "
                f"proposals in a row were rejected ({e.reason}), and no older verified state is "
                f"kept to reach back to. The model and optimizer hold the state verified at step "
                f"{self._safe.step}; nothing rejected was applied. The run is not converging "
                "from here as configured: save a checkpoint (opt.state_dict()), then resume with "
                "a lower LR, look at the data around this step, keep older states "
                "(history=N), or accept the new level with ladder=Ladder(on_exhausted="
                f"'rebaseline'). stats: { {k: v for k, v in self.stats.items() if v} }")

    def _finish(self, decision: Decision, event: StepEvent) -> StepEvent:
        """Commit the step: its counters, its decision, and its log record."""
        event.decision = decision.value
        self._t += 1
        self.stats["steps"] += 1
        self.last_decision, self.last_event = decision.value, event
        if decision is not Decision.ACCEPT:
            self._log_event(event)
        return event

    def _log_event(self, e: StepEvent) -> None:
        measured = "" if e.y is None else (f", probe {e.y:.4g} vs reference {e.yhat:.4g} "
                                           f"(threshold +{e.threshold:.3g})")
        grad = "" if e.grad_norm is None else f", gradient norm {e.grad_norm:.3g}"
        if e.decision == Decision.SKIP.value:
            level = logging.DEBUG if e.reason == "amp_overflow" else logging.INFO
            self._log("skip", level, "step %d skipped (%s%s)", e.step, e.reason, grad)
        else:
            self._log("rollback", logging.INFO, "step %d rolled back to the state verified at "
                      "step %d (%s%s%s)%s", e.step, self._safe.step, e.reason, measured, grad,
                      f"; action: {e.action}" if e.action else "")
        for kind in ("escalate", "rebaseline", "stop"):
            if e.action and kind in e.action.split(","):
                self._log(kind, logging.WARNING, "step %d: %d rejections in a row, %s (%s); "
                          "stats: %s", e.step, self.max_consecutive_rejections or 0,
                          {"escalate": "reached back to an older verified state",
                           "rebaseline": "re-based the reference on the new level",
                           "stop": "stopped at the last verified state"}[kind], e.reason,
                          {k: v for k, v in self.stats.items() if v})

    # -- state_dict ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The inner optimizer's state_dict plus ``"guard"``: plain data (``weights_only=True``).

        ``"guard"`` holds the EWMA reference, counters, the thresholds' and signals' state,
        this rank's RNG states, the Fisher diagonal where the signals keep one, and the safe
        snapshot -- recorded, not copied again, when it equals the live state (every step
        that ended verified), so the checkpoint costs about what the bare optimizer's does.
        Without a probe the live state is verified at the start of the next step; a
        single-process guard does that check here instead, exactly as that step would.
        Older verified states (``history``) are not saved.
        """
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        self._settle_verification()
        sd = self.inner.state_dict()
        sd["guard"] = checkpoint.guard_state(self)
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def _settle_verification(self) -> None:
        """Without a probe: run the post-step signals on the live state now, as the next
        step's start would, and on a healthy verdict verify it. Rank-local only (a collective
        here would hang the common ``if rank == 0: save(opt.state_dict())``)."""
        if (not self._checks_live_state or not self._unverified or self._on_meta()
                or world_size(resolve_group(self.process_group)) > 1):
            return
        post = self._post
        params = [p for g in self.param_groups for p in g["params"]]
        device = params[0].device if params else torch.device("cpu")
        m = StepMeasurement(self._t, torch.zeros((), device=device), None, self.inner)
        flags = [s.measure(m) for s in post]
        fired = [bool(v) for v in torch.stack([f.to(device).reshape(()) for f in flags]).tolist()] if flags else []
        if not any(fired):
            self._observe(post, m, True, fired)
            self._verify(self._t)

    def restore_rng_state(self, state_dict: dict[str, Any]) -> None:
        """Set this process's RNG streams to those saved in ``state_dict`` (from
        :meth:`state_dict` on this rank): with the model and optimizer loaded, training then
        continues bit for bit as it would have. ``load_state_dict`` never does this by
        itself. Raises ``ValueError`` for a state saved by another rank (save one file per
        rank to resume each rank's streams)."""
        guard = state_dict.get("guard") if isinstance(state_dict, dict) else None
        state = guard.get("rng") if isinstance(guard, dict) else None
        rng.check(state)
        here = rng.capture()["rank"]
        if int(state.get("rank", 0)) != here:
            raise ValueError(f"state_dict['guard']['rng'] was saved by rank {state.get('rank')}, "
                             f"this is rank {here}: each rank restores its own streams (save "
                             "opt.state_dict() per rank, e.g. to f'opt_rank{rank}.pt').")
        rng.restore(state)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a guarded state (or a plain optimizer's, which resets the guard).

        Accepts this release's layout (the inner optimizer's plus ``"guard"``), 0.1.0's
        (``{"inner", "guard"}``) and a bare optimizer's. Every part is checked (keys, types,
        shapes, finite values, counters) before anything is changed: on error the optimizer,
        the guard and the snapshots are exactly as before the call, and the message names
        the offending key. RNG states are not touched (see :meth:`restore_rng_state`).
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}.")
        state_dict = dict(state_dict)
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        if "guard" not in state_dict:
            if "inner" in state_dict or not {"state", "param_groups"} <= state_dict.keys():
                raise ValueError(f"state_dict has keys {sorted(state_dict)}; expected an "
                                 "optimizer state_dict ('state', 'param_groups', and 'guard' "
                                 "from GuardedOptimizer.state_dict()).")
            checkpoint.check_inner(self, state_dict, "state_dict")
            self.inner.load_state_dict(state_dict)  # a bare optimizer's checkpoint
            self._reset_guard_state()
        else:
            if "inner" in state_dict:   # 0.1.0's layout
                if set(state_dict) != {"inner", "guard"}:
                    raise ValueError(f"state_dict has keys {sorted(state_dict)}; expected "
                                     "'state', 'param_groups' and 'guard'.")
                inner, key = state_dict["inner"], "state_dict['inner']"
            else:
                inner = {k: v for k, v in state_dict.items() if k != "guard"}
                key = "state_dict"
            if not isinstance(inner, dict) or not {"state", "param_groups"} <= inner.keys():
                raise ValueError(f"{key} must hold the inner optimizer's 'state' and "
                                 "'param_groups'; pass the unmodified output of state_dict().")
            checkpoint.check_inner(self, inner, key)
            commit = checkpoint.prepare(self, state_dict["guard"])
            self.inner.load_state_dict(inner)  # validates before it mutates
            commit()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)
