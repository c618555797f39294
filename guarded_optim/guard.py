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
import enum
import logging
import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from . import checkpoint, rng
from .config import VERIFY_EVERY, configure
from .distributed import AUTO, agree, agree_host, full_value, pack, resolve_group, world_size
from .events import StepEvent
from .innovation import Threshold, accepts, ewma, innovation
from .ladder import GuardStopped, Ladder, _plain_id
from .logs import RateLimitedLog
from .outcome import Action, Decision
from .policy import RecoveryAction
from .record import Reading, StepRecord, fired_names
from .rules import PRE_PROPOSAL, Ruling
from .signals import StepMeasurement, Verdict, global_grad_norm
from .signals.base import host_judge
from .signals.probe import ProbeError, call_probe, check_initial, probe_value
from .snapshot import Snapshot, SnapshotRing
from .state import StepState

__all__ = ["GuardedOptimizer", "VERIFY_EVERY"]


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


@dataclass(frozen=True)
class Cadence:
    """When the live state is verified: every ``every``-th applied step. With a probe the
    probe measures that step's proposal; without one (``live``) the post-step signals
    check the live state: right after the proposal when ``every > 1`` (its capture then
    overlaps the next forward and backward), at the next step's start when ``every == 1``
    (damage written between steps is then seen before anything is proposed on it)."""

    every: int
    probe: bool      # a probe measures proposals
    live: bool       # no probe, and some signal can reject: the signals verify the live state

    def measures(self, unverified: int) -> bool:
        """With ``unverified`` applied steps since the verified state, the probe measures."""
        return self.probe and unverified >= self.every

    def due_at_start(self, unverified: int) -> bool:
        return self.live and unverified >= self.every

    def due_after_proposal(self, unverified: int) -> bool:
        return self.every > 1 and self.due_at_start(unverified)


class Pending(enum.Enum):
    """What a construction or a load left for the first step to settle."""

    REFERENCE = "reference"   #: the reference y(theta_0), re-taken if the weights were written


@dataclass(frozen=True)
class LoadedLiveState:
    """A loaded checkpoint whose verified state is its live state: captured at the first step."""

    step: int
    meta: dict


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
        cfg = configure(optimizer, probe, module, epsilon=epsilon, threshold=threshold,
                        alpha=alpha, probe_every=probe_every, signals=signals,
                        max_consecutive_rejections=max_consecutive_rejections, history=history,
                        checkpoint_every=checkpoint_every, save_history=save_history,
                        snapshot=snapshot, callbacks=callbacks, recovery=recovery,
                        ladder=ladder, process_group=process_group)
        self.process_group = process_group
        self.inner = optimizer
        self._initialising = True
        try:  # sets defaults and hook dicts; param_groups/state stay the inner optimizer's
            super().__init__(optimizer.param_groups, optimizer.defaults)
        finally:
            self._initialising = False
        self.probe, self.module, self.alpha, self.probe_every = probe, module, cfg.alpha, cfg.probe_every
        self.threshold: Threshold = cfg.threshold
        self.signals, self.callbacks, self.recovery = cfg.signals, cfg.callbacks, cfg.recovery
        self.ladder: Ladder = cfg.ladder
        self._snapshot_mode = cfg.snapshot
        self._ring = SnapshotRing(history, self._new_snapshot)
        self._log = RateLimitedLog()
        self._initial = copy.deepcopy((self.threshold.state_dict(),
                                       [s.state_dict() for s in self.signals],
                                       [a.state_dict() for a in self.recovery],
                                       self.ladder.state_dict()))
        self._reset_guard_state()

    def _new_snapshot(self) -> Snapshot:
        return Snapshot(self.inner, self.module, mode=self._snapshot_mode)

    # -- what the guard is made of ----------------------------------------------------------
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

    @property
    def _cadence(self) -> Cadence:
        probe = self.probe is not None
        return Cadence(self.probe_every, probe, not probe and self._uses_snapshots)

    @property
    def max_consecutive_rejections(self) -> int | None:
        return self.ladder.budget.limit

    @property
    def checkpoint_every(self) -> int:
        return self.ladder.reach_back.checkpoint_every

    @property
    def save_history(self) -> bool:
        return self.ladder.reach_back.save_history

    # the step state (one record, :mod:`.state`) and the verified snapshots, read-only
    @property
    def yhat(self) -> float | None:
        """EWMA of accepted probe measurements (the paper's reference)."""
        return self.step_state.yhat

    @property
    def y0(self) -> float | None:
        """The first probe measurement."""
        return self.step_state.y0

    @property
    def stats(self) -> dict[str, int]:
        return self.step_state.stats

    @property
    def last_decision(self) -> str | None:
        return self.step_state.last_decision

    @property
    def last_event(self) -> StepEvent | None:
        return self.step_state.last_event

    @property
    def safe_snapshot(self) -> Snapshot:
        """The last verified state (what a rollback restores)."""
        return self._safe

    @property
    def snapshot_history(self) -> SnapshotRing:
        """Older verified states (``history``), newest last."""
        return self._ring

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
        self.step_state = StepState.fresh(self._stat_names())
        self._pending: Pending | LoadedLiveState | None = Pending.REFERENCE
        if self._uses_snapshots and not self._on_meta():
            self._take_reference()

    def _stat_names(self) -> list[str]:
        return ["steps", "accepted", "rollbacks", "skipped", "measured", "escalations",
                "rebaselines", "escapes", "skipped_amp_overflow", "reruns", "transient",
                "persistent", "quarantined", "skipped_quarantined", "stops", "overruled",
                "batch_loss_spikes",
                *(f"skipped_{s.name}" for s in self.signals if s.verdict is Verdict.SKIP),
                *(f"failures_{s.name}" for s in self.signals if s.verdict is Verdict.FAILURE)]

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
        new.__setstate__(copy.deepcopy(self.__dict__, memo))
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
                rec = None
            else:
                loss, rec = self._transaction(closure, _batch_id(batch_id))
            self._optimizer_step_code()
        if rec is None or rec.event.decision == Decision.ACCEPT.value:
            for hook in (*self._optimizer_step_post_hooks.values(), *_global_optimizer_post_hooks.values()):
                hook(self, args, kwargs)
        if rec is not None:
            for callback in self.callbacks:   # the step is committed: an error here undoes nothing
                callback(rec.event)
            if Action.STOP in rec.actions:
                raise GuardStopped(self._stop_message(rec.event))
        return loss

    # torch.compile of a loop that calls step() graph-breaks here instead of tracing (and
    # recompiling on) the guard's host-side decisions every step
    step = torch._disable_dynamo(step)
    step.hooked = True  # type: ignore[attr-defined]  # hooks run above, post-hooks on accept only

    def _transaction(self, closure: Callable | None, batch_id: Any) -> tuple[Any, StepRecord]:
        """One guarded step that either completes or leaves the guard as it was."""
        before = self.step_state.copy()
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
            failed, self.step_state = self.step_state, before
            if failed.restores != before.restores:   # it rolled back: the live state is verified
                before.unverified, before.live_is_safe = 0, True
            raise

    def _guarded_step(self, loss: Any, closure: Callable | None, batch_id: Any,
                      rng_before: dict | None) -> StepRecord:
        """One step, its phases in order (docs/architecture.md shows them as data flow)."""
        rec = self._read_before(loss, batch_id)       # 1. one transfer: flags, norm, overflow
        if rec.damaged:                               # 2. the live state itself is damaged
            self._learn(rec.pre, rec.m, False, rec.reading.fired)
            return self._reject(rec, rec.damaged)
        self._learn(rec.checked, rec.m, True, rec.reading.state_fired)
        if self._cadence.due_at_start(self.step_state.unverified):
            self._verify(rec.t)                       #    the flags just read verified it
        for rule in PRE_PROPOSAL:                     # 3. overflow, quarantine, signals
            ruling = rule(self, rec)
            if ruling is not None:
                return self._skip(rec, ruling)
        self._safe.wait()                             # 4. propose
        for a in self.recovery:
            a.before_propose(self, rec.m.grad_norm)
        self._propose(rec, loss, closure)
        if not self._cadence.measures(self.step_state.unverified):
            return self._accept_unmeasured(rec)       # 5a. provisional until verified
        self._measure_proposal(rec)                   # 5b. probe + post-step flags
        self._learn(rec.pre, rec.m, not rec.reasons,
                    [False] * len(rec.pre) if rec.overruled and not rec.reasons
                    else rec.reading.fired)
        if self.ladder.rerun is not None and self.ladder.rerun.applies(self, rec, rng_before):
            self.ladder.rerun.run(self, rec, closure, rng_before)   # rung 2
        if rec.reasons:                               # 6. decide
            return self._reject(rec, rec.reasons)
        return self._accept_measured(rec)

    # -- the phases ----------------------------------------------------------------------------
    def _read_before(self, loss: Any, batch_id: Any) -> StepRecord:
        """Phase 1: the pre-step signals and, when the cadence asks, the post-step signals on
        the live state; the gradient norm; GradScaler's overflow. One transfer (a second
        one only when a pre-step signal fires on unverified steps: they are checked now)."""
        st = self.step_state
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        overflow = self._amp_unscale(grads)   # GradScaler's found_inf (None without AMP)
        m = StepMeasurement(st.t, full_value(global_grad_norm(grads)),
                            loss if isinstance(loss, torch.Tensor) else None, self.inner)
        group, pre = resolve_group(self.process_group), self._pre
        checked = self._post if self._cadence.due_at_start(st.unverified) else []
        reading = self._read(m, pre, checked, overflow, group)
        if st.unverified and not checked and any(reading.fired):   # a warning: verify now
            checked = self._post
            reading.state_fired = self._read(m, [], checked, None, group).state_fired
        if self._batch_explains(pre, reading.fired):   # theta_t is verified: the batch is new
            reading.fired = [f and s.verdict is not Verdict.FAILURE for s, f in zip(pre, reading.fired)]
        event = StepEvent(st.t, Decision.SKIP.value, grad_norm=reading.grad_norm, batch_id=batch_id,
                          signals={s.name: f for s, f in zip(pre + checked,
                                                              reading.fired + reading.state_fired)})
        return StepRecord(m, group, pre, checked, reading, event, batch_id)

    def _read(self, m: StepMeasurement, pre: list, checked: list,
              overflow: torch.Tensor | None, group: Any) -> Reading:
        """The readout of a reading: the pre-step flags, the live state's post-step flags,
        the gradient norm and GradScaler's overflow, packed and agreed over the ranks."""
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
        values = self._readout(parts, [k, k + 1], group)
        m.grad_norm_value = values[k]
        m.loss_value = values[k + 1] if loss is not None else None
        measured = iter(values[:k])
        fired = [judge(m) if judge is not None else bool(next(measured)) for judge in on_host]
        return Reading(fired=fired[:len(pre)], state_fired=fired[len(pre):],
                       grad_norm=values[k], overflow=bool(values[-1]))

    def _readout(self, parts: list[torch.Tensor], means: list[int], group: Any) -> list[float]:
        """The one readout path: pack, agree over the ranks (``means`` averaged, the rest
        summed), one host transfer."""
        return agree(pack(parts), means, group, self._accelerator).tolist()

    def _check_live(self, m: StepMeasurement, group: Any) -> list[bool]:
        """The post-step signals on the live state (a reading of their own); they learn
        from it: kept when none fired."""
        fired = self._read(m, [], self._post, None, group).state_fired
        self._learn(self._post, m, not any(fired), fired)
        return fired

    def _propose(self, rec: StepRecord, loss: Any, closure: Callable | None) -> None:
        """Phase 4: ``inner.step()``, with the recovery actions' LR scale applied around it
        only; the live state is then one more step from the verified one."""
        scale = math.prod(a.lr_scale() for a in self.recovery)
        base = [g["lr"] for g in self.param_groups] if scale != 1.0 else []
        for g, lr in zip(self.param_groups, base):
            g["lr"] = lr * scale
        try:
            with _global_step_hooks_muted():
                self.inner.step(_replay(loss, closure))
        finally:
            for g, lr in zip(self.param_groups, base):
                g["lr"] = lr
        self.step_state.unverified += 1
        self.step_state.live_is_safe = False

    def _measure_proposal(self, rec: StepRecord) -> None:
        """Phase 5b: probe and post-step flags of the live proposal, agreed over the ranks
        in one transfer, into ``rec`` (``y``, ``nu``, ``reasons``); the post-step signals
        learn from it."""
        post, after = self._post, rec.m.after_proposal()
        post_flags = [s.measure(after) for s in post]
        raw, error = _try_probe(self.probe, self.module)
        parts = [torch.as_tensor(raw).detach().to(rec.device, torch.float64).reshape(1)]
        parts += [f.to(rec.device, torch.float64).reshape(1) for f in post_flags]
        parts.append(torch.full((1,), float(error is not None), dtype=torch.float64, device=rec.device))
        values = self._readout(parts, [0], rec.group)   # probe mean, flags any-rank
        if values.pop():   # the probe raised on some rank: every rank restores and raises
            self._restore()  # never leave an unmeasured proposal behind
            raise error or _remote_probe_error()
        st, y, post_fired = self.step_state, values[0], [bool(v) for v in values[1:]]
        rec.event.signals.update((s.name, f) for s, f in zip(post, post_fired))
        st.stats["measured"] += 1
        nu, eps = innovation(y, st.yhat), self.threshold(st.yhat)
        rec.event.y, rec.event.yhat, rec.event.innovation, rec.event.threshold = y, st.yhat, nu, eps
        rec.y, rec.nu, rec.after, rec.post_fired = y, nu, after, post_fired
        rec.reasons = fired_names(post, post_fired) + ([] if accepts(nu, eps) else ["probe"])
        self._learn(post, after, not rec.reasons, post_fired)

    def _accept_unmeasured(self, rec: StepRecord) -> StepRecord:
        """Phase 5a: applied, verified later (with ``probe_every=k > 1`` and no probe, the
        k-th proposal is checked right here, so its capture overlaps the next forward and
        backward instead of sitting before the next ``inner.step()``)."""
        self._learn(rec.pre, rec.m, True, rec.reading.fired)
        if self._cadence.due_after_proposal(self.step_state.unverified):
            fired = self._check_live(rec.m.after_proposal(), rec.group)
            rec.event.signals.update((s.name, f) for s, f in zip(self._post, fired))
            if any(fired):
                return self._reject(rec, fired_names(self._post, fired))
            self._verify(rec.t + 1)
        return self._accept(rec)

    def _accept_measured(self, rec: StepRecord) -> StepRecord:
        """Algorithm 1, lines 9-12: the reference learns ``y``; the proposal is verified."""
        st = self.step_state
        st.yhat = ewma(st.yhat, rec.y, self.alpha)
        self.threshold.update(rec.nu)
        st.consecutive = 0
        self._verify(rec.t + 1)
        return self._accept(rec)

    def _accept(self, rec: StepRecord) -> StepRecord:
        st = self.step_state
        st.in_row = st.skips_in_row = 0
        for a in self.recovery:
            a.on_healthy(self)
        st.stats["accepted"] += 1   # provisional until a verification, on an unmeasured step
        return self._finish(rec, Decision.ACCEPT)

    def _skip(self, rec: StepRecord, ruling: Ruling) -> StepRecord:
        """Decided before the proposal: nothing applied, nothing restored."""
        for name in ruling.counters:
            self.step_state.stats[name] += 1
        self.step_state.stats["skipped"] += 1
        rec.reasons = list(ruling.reasons)
        return self._finish(rec, Decision.SKIP)

    def _reject(self, rec: StepRecord, reasons: list[str]) -> StepRecord:
        """FAILURE (a post-step signal, a pre-step loss spike) or a rejected probe: roll back
        (the ladder's budget may escalate), then the recovery actions act."""
        st = self.step_state
        st.stats["rollbacks"] += 1
        for name in reasons:
            if name != "probe":
                st.stats[f"failures_{name}"] += 1
        rec.reasons = list(reasons)
        for a in self.recovery:   # e.g. an importance blend reads the rejected values
            a.before_rollback(self)
        done = [self.ladder.budget.on_rejection(self, rec.y)]
        st.in_row += 1
        for a in self.recovery:
            done.append(a.on_rollback(self, st.in_row))
            if done[-1] is not None:
                st.live_is_safe = False   # an action may have moved the restored weights
            if done[-1] == Action.ESCAPE:
                st.stats["escapes"] += 1
                rec.event.skip_batches = max(rec.event.skip_batches, getattr(a, "skip_batches", 0))
        rec.actions += [d for d in done if d]
        return self._finish(rec, Decision.ROLLBACK)

    def _finish(self, rec: StepRecord, decision: Decision) -> StepRecord:
        """Commit the step: its counters, its event, and its log record."""
        st = self.step_state
        event = rec.close(decision)
        st.t += 1
        st.stats["steps"] += 1
        st.last_decision, st.last_event = decision.value, event
        if decision is not Decision.ACCEPT:
            self._log_event(rec)
        return rec

    # -- what the phases share ---------------------------------------------------------------
    @staticmethod
    def _learn(signals: list, m: StepMeasurement, kept: bool, fired: list[bool]) -> None:
        """Signals learn from a reading once the state it judged is decided: ``kept`` when
        that state (or the step it gates) stays. Never on a failed call."""
        for s, f in zip(signals, fired):
            s.observe(m, kept, f)

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
        if not (self.step_state.live_is_safe and self._uses_snapshots):
            return False
        if self._agreed(self._safe.written_since_capture() or not self._safe.matches_live_params()):
            return False          # the live state was written since it was verified
        self.step_state.stats["batch_loss_spikes"] += 1
        self._log("batch", logging.DEBUG, "step %d: training-loss spike on the verified state: "
                  "the batch differs, nothing to roll back", self.step_state.t)
        return True

    def _verify(self, step: int) -> None:
        """The live state is verified: it becomes the safe snapshot (and now and then a ring entry)."""
        st = self.step_state
        st.unverified = 0
        self._safe.capture(step, yhat=st.yhat)
        st.live_is_safe = True
        st.since_push += 1
        if st.since_push >= self.checkpoint_every or self._agreed(
                any(a.wants_checkpoint(self) for a in self.recovery)):
            self._ring.push(self._safe)
            st.since_push = 0

    def _restore(self) -> None:
        """Put the safe snapshot back into the live state (RNG streams are left alone)."""
        self._safe.restore()
        st = self.step_state
        st.unverified, st.live_is_safe = 0, True
        st.restores += 1

    def _settle_pending(self) -> None:
        """What a construction or a load left for the first step, before its forward pass:
        the reference (re-measured if the weights were written since it was taken), or the
        capture of a loaded checkpoint's live state as the safe snapshot."""
        pending, self._pending = self._pending, None
        if pending is Pending.REFERENCE and self._uses_snapshots and self._agreed(
                self._safe.written_since_capture() or (self.probe is not None and self.yhat is None)):
            self._take_reference()
        elif isinstance(pending, LoadedLiveState):
            self._safe.capture(pending.step, **pending.meta)
            self.step_state.live_is_safe = True

    def _take_reference(self) -> None:
        """Algorithm 1, lines 2-3: ``yhat_0 = y(theta_0)`` (with a probe); theta_safe <- theta_0."""
        st = self.step_state
        if self.probe is not None:
            st.y0 = st.yhat = check_initial(self._measure_probe())
        self._safe.capture(st.t, yhat=st.yhat)
        st.live_is_safe = True

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

    # -- what the user reads -----------------------------------------------------------------
    def _stop_message(self, e: StepEvent) -> str:
        return (f"GuardedOptimizer stopped at step {e.step}: {self.max_consecutive_rejections} "
                f"proposals in a row were rejected ({e.reason}), and no older verified state is "
                f"kept to reach back to. The model and optimizer hold the state verified at step "
                f"{self._safe.step}; nothing rejected was applied. The run is not converging "
                "from here as configured: save a checkpoint (opt.state_dict()), then resume with "
                "a lower LR, look at the data around this step, keep older states "
                "(history=N), or accept the new level with ladder=Ladder(on_exhausted="
                f"'rebaseline'). stats: { {k: v for k, v in self.stats.items() if v} }")

    _ESCALATIONS = {Action.ESCALATE: "reached back to an older verified state",
                    Action.REBASELINE: "re-based the reference on the new level",
                    Action.STOP: "stopped at the last verified state"}

    def _log_event(self, rec: StepRecord) -> None:
        e = rec.event
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
        for action, what in self._ESCALATIONS.items():
            if action in rec.actions:
                self._log(action.value, logging.WARNING, "step %d: %d rejections in a row, %s "
                          "(%s); stats: %s", e.step, self.max_consecutive_rejections or 0, what,
                          e.reason, {k: v for k, v in self.stats.items() if v})

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
        st = self.step_state
        if (not self._cadence.live or not st.unverified or self._on_meta()
                or world_size(resolve_group(self.process_group)) > 1 or not self._post):
            return
        params = [p for g in self.param_groups for p in g["params"]]
        device = params[0].device if params else torch.device("cpu")
        m = StepMeasurement(st.t, torch.zeros((), device=device), None, self.inner)
        fired = self._read(m, [], self._post, None, None).state_fired
        if not any(fired):
            self._learn(self._post, m, True, fired)
            self._verify(st.t)

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
