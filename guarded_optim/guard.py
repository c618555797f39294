"""GuardedOptimizer: propose -> measure -> accept or roll back (paper 001, Algorithm 1).

One ``step()`` runs its phases top to bottom (``_guarded_step``; docs/architecture.md
draws them as data flow): read the pre-step flags in one transfer (:mod:`.record`), judge
the live state, ask the pre-proposal rules (:mod:`.rules`), propose (:mod:`.inner`),
measure the proposal with the probe, and accept or reject, climbing the ladder's rungs
(:mod:`.ladder`). Under a process group every transfer is agreed across ranks first
(:mod:`.distributed`). The step's counters are one record (:mod:`.state`); its outcomes
are values (:mod:`.outcome`).

Invariants (tested): every accepted measured step satisfies ``y <= yhat + epsilon_t``
(Theorem 7.3); after a rollback params, optimizer state and buffers equal the last accepted
state (a drift rewind's: an older one) bit for bit (Prop. 7.4); the RNG streams move on;
with a fixed ``epsilon``, ``max_k y(theta_k) <= y(theta_0) + t * epsilon`` (Proposition
7.5); a run in which the guard never intervenes is bit-identical to the bare optimizer's;
a ``step()`` that raises leaves counters, parameters and state as they were.
``max_consecutive_rejections=None, ladder=Ladder(None, backoff=None, rewind=None, bad_batch=None)``:
Algorithm 1.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from . import checkpoint, rng
from .amp import amp_unscale, found_inf
from .config import VERIFY_EVERY, configure
from .distributed import AUTO, agree, agree_host, full_value, pack, resolve_group, world_size
from .events import StepEvent
from .inner import (accelerator, global_step_hooks_muted, inner_step_count, lr_scale, on_meta,
                    propose)
from .innovation import Threshold, accepts, ewma, innovation
from .ladder import GuardStopped, Ladder
from .logs import RateLimitedLog, log_step, stop_message
from .outcome import Action, Decision
from .policy import RecoveryAction
from .record import (Reading, StepRecord, fired_names, live_measurement, pack_reading,
                     unpack_reading)
from .rules import PRE_PROPOSAL, Ruling, batch_explains, live_written
from .signals import StepMeasurement, Verdict, global_grad_norm
from .signals.probe import check_initial, measure_agreed, remote_probe_error, try_probe
from .snapshot import Snapshot, SnapshotRing
from .state import Cadence, Loaded, Pending, StepState, stat_names
from .validation import batch_id as _batch_id, given_loss

__all__ = ["GuardedOptimizer", "VERIFY_EVERY", "amp_unscale"]


def _view(path: str, doc: str) -> property:
    """A read-only attribute of the guard that reads ``path`` (``"step_state.yhat"``)."""
    first, *rest = path.split(".")

    def get(self):
        value = getattr(self, first)
        for name in rest:
            value = getattr(value, name)
        return value

    return property(get, doc=doc)


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
            ``None`` (default): :class:`NoiseBand`, from the run's own noise. Needs a probe.
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
        epsilon: float | None = None, threshold: Threshold | None = None,
        alpha: float = 0.1, probe_every: int | None = None,
        signals: Iterable[Any] | None = None,
        max_consecutive_rejections: int | None = 20,
        history: int = 0, checkpoint_every: int = 50, save_history: bool = False,
        snapshot: str = "auto",
        callbacks: Iterable[Callable[[StepEvent], None]] = (),
        recovery: Iterable[RecoveryAction] = (),
        ladder: Ladder | None = None,
        process_group: Any = AUTO,
    ):
        if isinstance(optimizer, GuardedOptimizer):
            raise TypeError("optimizer is already a GuardedOptimizer; wrap the inner optimizer once.")
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

    # settings the ladder's rungs own, the step state (:mod:`.state`), the verified states
    max_consecutive_rejections = _view("ladder.budget.limit", "The budget rung's limit.")
    checkpoint_every = _view("ladder.reach_back.checkpoint_every", "Verifications per push.")
    save_history = _view("ladder.reach_back.save_history", "Whether the history is saved.")
    yhat = _view("step_state.yhat", "EWMA of accepted probe measurements (the reference).")
    y0 = _view("step_state.y0", "The first probe measurement.")
    stats = _view("step_state.stats", "Counts of every decision, rung and signal (plain ints).")
    last_decision = _view("step_state.last_decision", "``\"accept\"``, ``\"rollback\"`` or ``\"skip\"``.")
    last_event = _view("step_state.last_event", "The last step's :class:`StepEvent`.")
    stopped = _view("step_state.stopped", "The healing budget is spent: every step is skipped "
                    "until :meth:`resume` (the verified state is kept).")
    safe_snapshot = _view("_safe", "The last verified state (what a rollback restores).")
    snapshot_history = _view("_ring", "Older verified states (``history``), newest last.")

    def _accelerator(self) -> torch.device | None:   # where NCCL reduces
        return accelerator(self.param_groups)

    def _agreed(self, flag: bool) -> bool:
        """A rank-local decision that gates a collective (or the ring's length), made the
        same on every rank: true if it is true on any rank. Free without a process group."""
        group = resolve_group(self.process_group)
        if world_size(group) == 1:
            return flag
        return agree_host([float(flag)], [], group, self._accelerator)[0] > 0

    def _on_meta(self) -> bool:   # meta parameters: the guard steps exactly as the bare optimizer
        return on_meta(self.param_groups)

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
        self.step_state = StepState.fresh(stat_names(self.signals))
        self.step_state.t = inner_step_count(self.inner)   # an adopted run keeps its numbers
        self._pending: Pending | Loaded | None = Pending.REFERENCE
        if self._uses_snapshots and not self._on_meta():
            self._take_reference()

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
        ``exp_avg_sq`` (Adam family), or a ``FisherDiagonal`` in ``recovery``; else ``None``."""
        from .fisher import find_fisher
        try:
            return list(find_fisher(self)._require())
        except (ValueError, RuntimeError):
            return None

    def wait_for_snapshot(self) -> None:
        """Order the current CUDA stream after the snapshot copy still in flight (host mode on
        CUDA; no host sync). Call it before writing parameters, optimizer state or buffers in
        place between steps (an EMA swap-in, clamping, ``model.load_state_dict``): that copy
        reads them on a side stream. A no-op on CPU and in device mode."""
        self._safe.wait()

    def resume(self) -> None:
        """Propose again after a stop (``opt.stopped``), e.g. once the script lowered the LR."""
        self.step_state.stopped, self.step_state.consecutive = False, 0

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__ = dict(state)   # a new instance (pickle, deepcopy): its whole state

    def __deepcopy__(self, memo: dict) -> "GuardedOptimizer":
        """An independent copy: its own inner optimizer, parameters and snapshots. A probe or
        callback Python cannot copy is shared (give the copy its own: ``copy.probe = ...``)."""
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
             batch_id: int | str | None = None, loss: torch.Tensor | None = None) -> Any:
        """Propose, measure, then accept or roll back. Returns the closure's loss (or
        ``loss``), if any. ``loss``: without a closure, the loss the loop just backpropagated
        (``opt.step(loss=loss)``, also ``scaler.step(opt, loss=loss)``): read in the step's
        one transfer, it lets the bad-batch rung (:mod:`.badbatch`) see a batch's loss spike.

        ``batch_id`` names the batch for the quarantine (:mod:`.ladder`): a quarantined batch
        is skipped; a persistent rejection or a bad batch quarantines it (without an id,
        nothing is). Raises :class:`GuardStopped` after committing a step that spent the budget.
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
                with global_step_hooks_muted():
                    loss = self.inner.step(closure)
                rec = None
            else:
                loss, rec = self._transaction(closure, _batch_id(batch_id), given_loss(loss, closure))
            self._optimizer_step_code()
        if rec is None or rec.event.decision == Decision.ACCEPT.value:
            for hook in (*self._optimizer_step_post_hooks.values(), *_global_optimizer_post_hooks.values()):
                hook(self, args, kwargs)
        if rec is not None:
            for callback in self.callbacks:   # the step is committed: an error here undoes nothing
                callback(rec.event)
            if Action.STOP in rec.actions and self.ladder.on_exhausted == "raise":
                raise GuardStopped(stop_message(self, rec.event))
        return loss

    # torch.compile of a loop that calls step() graph-breaks here instead of tracing (and
    # recompiling on) the guard's host-side decisions every step
    step = torch._disable_dynamo(step)
    step.hooked = True  # type: ignore[attr-defined]  # hooks run above, post-hooks on accept only

    def _transaction(self, closure: Callable | None, batch_id: Any,
                     loss: torch.Tensor | None = None) -> tuple[Any, StepRecord]:
        """One guarded step that either completes or leaves the guard as it was."""
        before = self.step_state.copy()
        try:   # what a construction or a load left, before the closure's forward: its own undo
            self._settle_pending()
        except BaseException:
            self.step_state = before
            raise
        before = self.step_state.copy()
        try:
            rng_before = None
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
            elif failed.unverified > before.unverified and self._uses_snapshots and self._safe.captured:
                self._restore()   # a proposal left unmeasured: back to the verified state
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
        if rec.bad_batch is not None:                 # 5c. a bad batch: undone, skipped
            return self._skip(rec, rec.bad_batch)
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
        overflow = found_inf(self, grads)   # GradScaler's found_inf (None without AMP)
        m = StepMeasurement(st.t, full_value(global_grad_norm(grads)),
                            loss if isinstance(loss, torch.Tensor) else None, self.inner)
        group, pre = resolve_group(self.process_group), self._pre
        checked = self._post if self._cadence.due_at_start(st.unverified) else []
        reading = self._read(m, pre, checked, overflow, group)
        if any(reading.fired) and not checked and (st.unverified or live_written(self)):
            checked = self._post   # a warning on a state not (or no longer) verified: check it
            reading.state_fired = self._read(m, [], checked, None, group).state_fired
        if batch_explains(self, pre, reading.fired):   # theta_t is verified: the batch is new
            reading.fired = [f and s.verdict is not Verdict.FAILURE for s, f in zip(pre, reading.fired)]
        event = StepEvent(st.t, Decision.SKIP.value, grad_norm=reading.grad_norm, batch_id=batch_id,
                          signals={s.name: f for s, f in zip(pre + checked,
                                                              reading.fired + reading.state_fired)})
        return StepRecord(m, group, pre, checked, reading, event, batch_id)

    def _read(self, m: StepMeasurement, pre: list, checked: list,
              overflow: torch.Tensor | None, group: Any) -> Reading:
        """A reading (:func:`.record.pack_reading`): the pre-step flags, the live state's
        post-step flags, the gradient norm and GradScaler's overflow, agreed over the ranks."""
        parts, judges, k = pack_reading(m, pre + checked, overflow)
        return unpack_reading(self._readout(parts, [k, k + 1], group), m, judges, len(pre))

    def _readout(self, parts: list[torch.Tensor], means: list[int], group: Any) -> list[float]:
        """The one readout path: pack, agree over the ranks (``means`` averaged, the rest
        summed), one host transfer."""
        return agree(pack(parts), means, group, self._accelerator).tolist()

    def _check_live(self, m: StepMeasurement | None = None) -> list[bool]:
        """The post-step signals read the live state (``m``; by default between steps) and
        learn from it (kept when none fired)."""
        m = m if m is not None else live_measurement(self.inner, self.step_state.t)
        fired = self._read(m, [], self._post, None, resolve_group(self.process_group)).state_fired
        self._learn(self._post, m, not any(fired), fired)
        return fired

    def _propose(self, rec: StepRecord, loss: Any, closure: Callable | None) -> None:
        """Phase 4: ``inner.step()`` (:func:`.inner.propose`); the live state is then one more
        step from the verified one."""
        propose(self.inner, lr_scale(self.recovery, self.ladder), loss, closure)
        self.step_state.unverified += 1
        self.step_state.live_is_safe = False

    def _measure_proposal(self, rec: StepRecord) -> None:
        """Phase 5b: probe and post-step flags of the live proposal, agreed over the ranks
        in one transfer, into ``rec`` (``y``, ``nu``, ``reasons``, and the bad-batch rung's
        ruling, which undoes the proposal); the post-step signals learn from it."""
        post, after = self._post, rec.m.after_proposal()
        post_flags = [s.measure(after) for s in post]
        raw, error = try_probe(self.probe, self.module)
        parts = [torch.as_tensor(raw).detach().to(rec.device, torch.float64).reshape(1)]
        parts += [f.to(rec.device, torch.float64).reshape(1) for f in post_flags]
        parts.append(torch.full((1,), float(error is not None), dtype=torch.float64, device=rec.device))
        values = self._readout(parts, [0], rec.group)   # probe mean, flags any-rank
        if values.pop():   # the probe raised on some rank: every rank restores and raises
            self._restore()  # never leave an unmeasured proposal behind
            raise error or remote_probe_error()
        st, y, post_fired = self.step_state, values[0], [bool(v) for v in values[1:]]
        rec.event.signals.update((s.name, f) for s, f in zip(post, post_fired))
        st.stats["measured"] += 1
        rec.undone = st.unverified
        nu, eps = innovation(y, st.yhat), self.threshold(st.yhat)
        rec.event.y, rec.event.yhat, rec.event.innovation, rec.event.threshold = y, st.yhat, nu, eps
        rec.y, rec.nu, rec.after, rec.post_fired = y, nu, after, post_fired
        rec.reasons = fired_names(post, post_fired) + ([] if accepts(nu, eps) else ["probe"])
        rec.bad_batch = self.ladder.judge_batch(self, rec)   # the band let it in: the batch?
        self._learn(post, after, not rec.reasons and rec.bad_batch is None, post_fired)

    def _accept_unmeasured(self, rec: StepRecord) -> StepRecord:
        """Phase 5a: applied, verified later (with ``probe_every=k > 1`` and no probe, the
        k-th proposal is checked right here, so its capture overlaps the next forward and
        backward instead of sitting before the next ``inner.step()``)."""
        self._learn(rec.pre, rec.m, True, rec.reading.fired)
        if self._cadence.due_after_proposal(self.step_state.unverified):
            fired = self._check_live(rec.m.after_proposal())
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
        if self.ladder.rewind is not None and self.ladder.rewind.after_accept(self, rec):
            return self._reject(rec, ["drift"])   # slow damage: back to before its onset
        return self._accept(rec)

    def _accept(self, rec: StepRecord) -> StepRecord:
        st = self.step_state
        st.in_row = st.skips_in_row = 0
        if self.ladder.backoff is not None and self.ladder.backoff.on_healthy(st.yhat):
            st.stats["backoffs"] += 1   # no progress at the reduced LR: back off once more
        for a in self.recovery:
            a.on_healthy(self)
        st.stats["accepted"] += 1   # provisional until a verification, on an unmeasured step
        return self._finish(rec, Decision.ACCEPT)

    def _skip(self, rec: StepRecord, ruling: Ruling) -> StepRecord:
        """Nothing applied: decided before the proposal, or its proposal already undone."""
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
            if name not in ("probe", "drift"):
                st.stats[f"failures_{name}"] += 1
        rec.reasons = list(reasons)
        for a in self.recovery:   # e.g. an importance blend reads the rejected values
            a.before_rollback(self)
        rec.undone = max(rec.undone, st.unverified)   # a re-run may have restored already
        done = [self.ladder.budget.on_rejection(self, rec)]
        st.in_row += 1
        done += self.ladder.heal(self, rec.reasons)   # the healing rungs change what comes next
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
        event.lr_scale = lr_scale(self.recovery, self.ladder)
        st.t += 1
        st.stats["steps"] += 1
        st.last_decision, st.last_event = decision.value, event
        if decision is not Decision.ACCEPT:
            log_step(self, rec)
        return rec

    # -- what the phases share ---------------------------------------------------------------
    @staticmethod
    def _learn(signals: list, m: StepMeasurement, kept: bool, fired: list[bool]) -> None:
        """Signals learn from a reading once the state it judged is decided: ``kept`` when
        that state (or the step it gates) stays. Never on a failed call."""
        for s, f in zip(signals, fired):
            s.observe(m, kept, f)

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
        the references (taken anew if the weights were written since), or the check of a
        loaded checkpoint against the live weights (:func:`.checkpoint.settle_loaded`)."""
        pending = self._pending
        if pending is Pending.REFERENCE and self._uses_snapshots and self._agreed(
                self._safe.written_since_capture() or (self.probe is not None and self.yhat is None)):
            for s, sd in zip(self.signals, copy.deepcopy(self._initial[1])):
                s.load_state_dict(sd)   # the references belong to the weights now live
            self._take_reference()
        elif isinstance(pending, Loaded):
            checkpoint.settle_loaded(self, pending)
        self._pending = None

    def _take_reference(self) -> None:
        """Algorithm 1, lines 2-3: ``yhat_0 = y(theta_0)`` (with a probe); theta_safe <- theta_0;
        the post-step signals learn theta_0 (damage in the first window is seen)."""
        st = self.step_state
        if self.probe is not None:
            st.y0 = st.yhat = check_initial(self._measure_probe())
        if self._post:
            self._check_live()
        self._safe.capture(st.t, yhat=st.yhat)
        st.live_is_safe = True

    def _measure_probe(self) -> float:
        """One probe measurement outside the step's transfer, agreed over the ranks."""
        return measure_agreed(self.probe, self.module, resolve_group(self.process_group),
                              self._accelerator)

    # -- what the user reads -----------------------------------------------------------------
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
        checkpoint.settle_verification(self)
        sd = self.inner.state_dict()
        sd["guard"] = checkpoint.guard_state(self)
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def restore_rng_state(self, state_dict: dict[str, Any]) -> None:
        """Set this process's RNG streams to those saved in ``state_dict`` (from
        :meth:`state_dict` on this rank): with the model and optimizer loaded, training then
        continues bit for bit as it would have. ``load_state_dict`` never does this by
        itself. Raises ``ValueError`` for a state saved by another rank (save one file per
        rank to resume each rank's streams)."""
        checkpoint.restore_rng(state_dict)

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
        checkpoint.load(self, state_dict)
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)
