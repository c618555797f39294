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
(Theorem 7.3); after a rollback params, optimizer state, buffers and RNG equal the last
accepted state bit for bit (Proposition 7.4); with a fixed ``epsilon``,
``max_k y(theta_k) <= y(theta_0) + t * epsilon`` (Proposition 7.5). The one departure from
Algorithm 1 is the deadlock escape: after ``max_consecutive_rejections`` rejections in a
row the guard first rolls back to an older verified snapshot, and when none is left it
re-baselines ``yhat`` on the latest measurement (both counted in ``stats`` and reported as
events). ``max_consecutive_rejections=None`` gives Algorithm 1 exactly.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Iterable

import torch
from torch.optim import Optimizer
from torch.optim.optimizer import _global_optimizer_post_hooks, _global_optimizer_pre_hooks

from .distributed import (AUTO, agree, agree_mean, check_world_size, full_value, pack,
                          resolve_group, world_size)
from .events import StepEvent
from .innovation import FixedThreshold, RelativeThreshold, Threshold, accepts, ewma, innovation
from .policy import Decision, RecoveryAction
from .signals import StepMeasurement, Verdict, default_signals, global_grad_norm
from .signals.probe import ProbeError, call_probe, check_initial, measure_probe
from .snapshot import Snapshot, SnapshotRing, capture_rng, restore_rng

__all__ = ["GuardedOptimizer"]

_STATE_VERSION = 1


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


class GuardedOptimizer(Optimizer):
    r"""Wrap ``optimizer`` so that a step that wrecks the run is skipped or rolled back.

    Args:
        optimizer: the inner optimizer (``AdamW``, ``SGD``, ...). Its ``param_groups`` and
            ``state`` *are* the guard's: schedulers, ``add_param_group`` and checkpoint code
            act on the real thing.
        probe: zero-argument callable returning a scalar loss on a small fixed held-out set,
            evaluated under ``torch.no_grad()`` on the proposed parameters. ``None``: no
            probe; only the pre-step signals guard the run (skips, no rollbacks).
        module: the model. Its buffers (BatchNorm statistics) join the snapshot and the probe
            runs in eval mode (each submodule's mode is restored afterwards).
        epsilon: absolute threshold on the innovation (the paper's ``epsilon``), ``> 0``.
            ``None`` (default): the scale-aware :class:`RelativeThreshold`.
        threshold: a threshold object instead of ``epsilon`` (see :mod:`.innovation`).
        alpha: EWMA factor of ``yhat`` in ``(0, 1)`` (default 0.1, as in the paper).
        probe_every: measure every ``k``-th applied step; a failed measurement rolls back the
            ``k`` unverified steps to the last verified state.
        signals: pre-step signals (default: :class:`NonFinite`, :class:`GradientSpike`).
        max_consecutive_rejections: escalate after this many rejections in a row (see the
            module docstring); ``None`` never escalates.
        history: how many older verified snapshots to keep for escalation (0: none).
        checkpoint_every: accepted measured steps between two pushes into that history.
        snapshot: ``"auto"``, ``"device"`` or ``"host"`` (see :mod:`.snapshot`).
        callbacks: callables receiving a :class:`StepEvent` for every ``step()``.
        recovery: healing actions run after rollbacks (:mod:`.policy`: ``ReduceLR``,
            ``Escape``, or ``arc_recovery()``). Default: none, so the guard never changes
            the optimisation itself; every action it takes is reported in the events.
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
    them (plain ints). Step post-hooks fire only for accepted steps.
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
        probe_every: int = 1,
        signals: Iterable[Any] | None = None,
        max_consecutive_rejections: int | None = 20,
        history: int = 3,
        checkpoint_every: int = 50,
        snapshot: str = "auto",
        callbacks: Iterable[Callable[[StepEvent], None]] = (),
        recovery: Iterable[RecoveryAction] = (),
        process_group: Any = AUTO,
    ):
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}; pass e.g. torch.optim.AdamW(params).")
        if isinstance(optimizer, GuardedOptimizer):
            raise TypeError("optimizer is already a GuardedOptimizer; wrap the inner optimizer once.")
        if probe is not None and not callable(probe):
            raise TypeError(f"probe must be callable (zero arguments), got {type(probe).__name__}.")
        if module is not None and not isinstance(module, torch.nn.Module):
            raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}.")
        if epsilon is not None and threshold is not None:
            raise ValueError("Pass either epsilon= (absolute) or threshold=, not both.")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha < 1.0:
            raise ValueError(f"Invalid alpha: {alpha!r}; the EWMA factor must lie in (0, 1), e.g. 0.1.")
        if isinstance(probe_every, bool) or not isinstance(probe_every, int) or probe_every < 1:
            raise ValueError(f"Invalid probe_every: {probe_every!r}; it must be an int >= 1 "
                             "(1 measures every step).")
        if max_consecutive_rejections is not None and (
                not isinstance(max_consecutive_rejections, int) or max_consecutive_rejections < 1):
            raise ValueError(f"Invalid max_consecutive_rejections: {max_consecutive_rejections!r}; "
                             "use an int >= 1, or None to never escalate.")
        if not isinstance(history, int) or history < 0:
            raise ValueError(f"Invalid history: {history!r}; it must be an int >= 0.")
        if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise ValueError(f"Invalid checkpoint_every: {checkpoint_every!r}; it must be an int >= 1.")

        resolve_group(process_group)  # validates; resolved again at every use ("auto")
        self.process_group = process_group
        self.inner = optimizer
        self._initialising = True
        try:  # sets defaults and hook dicts; param_groups/state stay the inner optimizer's
            super().__init__(optimizer.param_groups, optimizer.defaults)
        finally:
            self._initialising = False

        self.probe, self.module, self.alpha, self.probe_every = probe, module, float(alpha), probe_every
        self.threshold: Threshold = (threshold if threshold is not None else
                                     FixedThreshold(epsilon) if epsilon is not None else
                                     RelativeThreshold())
        self.signals = list(default_signals(probe is not None) if signals is None else signals)
        names = [s.name for s in self.signals]
        if len(set(names)) != len(names):
            raise ValueError(f"signals must have distinct names, got {names}.")
        for sig in self.signals:
            if getattr(sig, "phase", None) not in ("before", "after"):
                raise ValueError(f"signal {sig!r} must have phase 'before' or 'after'.")
        self.max_consecutive_rejections = max_consecutive_rejections
        self.checkpoint_every = checkpoint_every
        self.callbacks = list(callbacks)
        self.recovery = list(recovery)

        self._make_snapshot = lambda: Snapshot(optimizer, module, mode=snapshot)  # noqa: E731
        self._ring = SnapshotRing(history, self._make_snapshot)
        self._initial = copy.deepcopy((self.threshold.state_dict(),
                                       [s.state_dict() for s in self.signals],
                                       [a.state_dict() for a in self.recovery]))
        self._reset_guard_state()

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

    def _reset_guard_state(self) -> None:
        """Fresh guard: no reference, counters at zero, theta_safe <- theta_0 (Algorithm 1, l. 3).

        Both happen here, before any forward pass moves BatchNorm statistics or the RNG, so
        a broken probe fails now, with nothing changed. If the weights change before the
        first ``step()`` (a checkpoint loaded after construction), that step measures and
        captures again.
        """
        threshold, signals, recovery = copy.deepcopy(self._initial)
        self.threshold.load_state_dict(threshold)
        for s, sd in zip(self.signals, signals):
            s.load_state_dict(sd)
        for a, sd in zip(self.recovery, recovery):
            a.load_state_dict(sd)
        self._ring.drop_from(-1)
        self._safe = self._make_snapshot()
        self._reset_counters()
        if self._uses_snapshots:
            self._measure_reference()

    def _reset_counters(self) -> None:
        self.yhat: float | None = None     #: EWMA of accepted probe measurements
        self.y0: float | None = None       #: the first probe measurement
        self.last_decision: str | None = None
        self.last_event: StepEvent | None = None
        self._t = 0                        # calls of step()
        self._unverified = 0               # applied steps since the last verified state
        self._consecutive = 0              # rejections in a row
        self._since_push = 0               # accepted measurements since the last ring push
        self._in_row = 0                   # rollbacks since the last healthy applied step
        self.stats: dict[str, int] = {
            "steps": 0, "accepted": 0, "rollbacks": 0, "skipped": 0, "measured": 0,
            "escalations": 0, "rebaselines": 0, "escapes": 0, "skipped_amp_overflow": 0,
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

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def __getstate__(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)

    def __repr__(self) -> str:
        return (f"GuardedOptimizer({self.inner!r},\n  threshold={self.threshold!r}, "
                f"alpha={self.alpha}, probe_every={self.probe_every}, signals={self.signals!r})")

    # -- step ------------------------------------------------------------------------------
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """Propose, measure, then accept or roll back. Returns the closure's loss, if any."""
        args, kwargs = (self,), ({"closure": closure} if closure is not None else {})
        for hook in (*_global_optimizer_pre_hooks.values(), *self._optimizer_step_pre_hooks.values()):
            result = hook(self, args, kwargs)
            if result is not None:
                args, kwargs = result
                closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        with torch.autograd.profiler.record_function(f"Optimizer.step#{type(self).__name__}.step"):
            if (self.probe is not None and self.yhat is None) or (
                    self._t == 0 and self._uses_snapshots and not self._safe.matches_live_params()):
                self._measure_reference()  # before the closure's forward moves anything
            loss = None
            if closure is not None:
                with torch.enable_grad():
                    loss = closure()
            decision = self._guarded_step(loss, closure)
            self._optimizer_step_code()
        if decision is Decision.ACCEPT:
            for hook in (*self._optimizer_step_post_hooks.values(), *_global_optimizer_post_hooks.values()):
                hook(self, args, kwargs)
        return loss

    step.hooked = True  # type: ignore[attr-defined]  # hooks run above, post-hooks on accept only

    def _guarded_step(self, loss: Any, closure: Callable | None) -> Decision:
        t = self._t
        self._t += 1
        self.stats["steps"] += 1
        pre, post = self._pre, self._post

        # 1. measure before proposing (and, while proposals are unverified, the live state's
        #    health with the post-step signals): one host transfer for every flag
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        overflow = self._amp_unscale(grads)   # GradScaler's found_inf (None without AMP)
        m = StepMeasurement(t, full_value(global_grad_norm(grads)),
                            loss if isinstance(loss, torch.Tensor) else None, self.inner)
        device = m.grad_norm.device
        checked = post if self._unverified else []   # unverified proposals: check theta_t now
        parts = [s.measure(m).to(device, torch.float32).reshape(1) for s in pre + checked]
        parts.insert(len(pre), m.grad_norm.detach().float().reshape(1))
        if overflow is not None:
            parts.append(overflow.to(device, torch.float32).reshape(1))
        group = resolve_group(self.process_group)
        values = agree(pack(parts), [len(pre)], group).tolist()  # every rank alike
        overflowed = overflow is not None and bool(values.pop())
        fired, state_fired = ([bool(v) for v in values[: len(pre)]],
                              [bool(v) for v in values[len(pre) + 1:]])
        event = StepEvent(t, Decision.SKIP.value, grad_norm=values[len(pre)],
                          signals={s.name: f for s, f in zip(pre + checked, fired + state_fired)})

        damaged = [s.name for s, f in zip(checked, state_fired) if f]
        damaged += [s.name for s, f in zip(pre, fired) if f and s.verdict is Verdict.FAILURE]
        if damaged:               # the unverified proposals damaged the state (or theta_t is bad)
            self._observe(pre, m, False, fired)
            return self._fail(damaged, None, event)
        self._observe(checked, m, True, state_fired)
        if self._needs_verification_capture():
            self._verify()        # no probe: the flags just read verified the live state
        if overflowed:            # GradScaler's inf/NaN: its own skip; signals learn nothing
            self.stats["skipped_amp_overflow"] += 1
            self.stats["skipped"] += 1
            event.reason = "amp_overflow"
            return self._finish(Decision.SKIP, event)
        names = [s.name for s, f in zip(pre, fired) if f]
        if names:
            self._observe(pre, m, False, fired)
            for name in names:
                self.stats[f"skipped_{name}"] += 1
            self.stats["skipped"] += 1
            event.reason = ",".join(names)
            return self._finish(Decision.SKIP, event)

        # 2. propose
        self._safe.wait()
        for a in self.recovery:
            a.before_propose(self, m.grad_norm)
        self._propose(_replay(loss, closure))
        self._unverified += 1
        if self.probe is None or self._unverified < self.probe_every:
            self._observe(pre, m, True, fired)
            self._healthy()
            self.stats["accepted"] += 1   # provisional: checked at the next step's start
            return self._finish(Decision.ACCEPT, event)

        # 3. measure the proposal: probe and post-step flags in one transfer
        after = m.after_proposal()
        post_flags = [s.measure(after) for s in post]
        try:
            raw = call_probe(self.probe, self.module)
        except ProbeError:
            self._safe.restore()  # never leave an unmeasured proposal behind
            self._unverified = 0
            raise
        parts = [torch.as_tensor(raw).detach().to(device, torch.float64).reshape(1)]
        parts += [f.to(device, torch.float64).reshape(1) for f in post_flags]
        values = agree(pack(parts), [0], group).tolist()  # probe mean, flags any-rank
        y, post_fired = values[0], [bool(v) for v in values[1:]]
        event.signals.update((s.name, f) for s, f in zip(post, post_fired))
        self.stats["measured"] += 1
        nu, eps = innovation(y, self.yhat), self.threshold(self.yhat)
        event.y, event.yhat, event.innovation, event.threshold = y, self.yhat, nu, eps

        # 4. decide; references learn only from the proposals that are kept
        reasons = [s.name for s, f in zip(post, post_fired) if f]
        reasons += [] if accepts(nu, eps) else ["probe"]
        self._observe(pre, m, not reasons, fired)
        self._observe(post, after, not reasons, post_fired)
        if reasons:
            return self._fail(reasons, y, event)
        self.yhat = ewma(self.yhat, y, self.alpha)   # accepted: Algorithm 1, lines 9-12
        self.threshold.update(nu)
        self._consecutive = 0
        self._verify()
        self._healthy()
        self.stats["accepted"] += 1
        return self._finish(Decision.ACCEPT, event)

    def _propose(self, closure: Callable | None) -> None:
        """``inner.step()``, with the recovery actions' LR scale applied around it only."""
        scale = math.prod(a.lr_scale() for a in self.recovery)
        if scale == 1.0:
            self.inner.step(closure)
            return
        base = [g["lr"] for g in self.param_groups]
        for g, lr in zip(self.param_groups, base):
            g["lr"] = lr * scale
        try:
            self.inner.step(closure)
        finally:
            for g, lr in zip(self.param_groups, base):
                g["lr"] = lr

    def _healthy(self) -> None:
        self._in_row = 0
        for a in self.recovery:
            a.on_healthy(self)

    def _needs_verification_capture(self) -> bool:
        return (self.probe is None and self._uses_snapshots
                and self._unverified >= self.probe_every)

    def _verify(self) -> None:
        """The live state is verified: it becomes the safe snapshot (and now and then a ring entry)."""
        self._unverified = 0
        self._safe.capture(self._t, yhat=self.yhat)
        self._since_push += 1
        if self._since_push >= self.checkpoint_every or any(a.wants_checkpoint(self) for a in self.recovery):
            self._ring.push(self._safe)
            self._since_push = 0

    def _fail(self, reasons: list[str], y: float | None, event: StepEvent) -> Decision:
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
            if actions[-1] == "escape":
                self.stats["escapes"] += 1
                event.skip_batches = max(event.skip_batches, getattr(a, "skip_batches", 0))
        event.action = ",".join(a for a in actions if a) or None
        return self._finish(Decision.ROLLBACK, event)

    def _measure_reference(self) -> None:
        """Algorithm 1, lines 2-3: ``yhat_0 = y(theta_0)`` (with a probe); theta_safe <- theta_0."""
        if self.probe is not None:
            self.y0 = self.yhat = check_initial(self._measure_probe())
        if not (self._safe.captured and self._safe.matches_live_params()):
            self._safe.capture(self._t)
        self._safe.meta["yhat"] = self.yhat

    def _measure_probe(self) -> float:
        """One probe measurement outside the step's transfer, averaged over the ranks."""
        return agree_mean(measure_probe(self.probe, self.module), resolve_group(self.process_group))

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

    def _rollback(self, y: float) -> str | None:
        """Restore the safe snapshot; escalate when rejections keep coming. Returns the action."""
        self._consecutive += 1
        self._unverified = 0
        action = None
        limit = self.max_consecutive_rejections
        if limit is not None and self._consecutive >= limit:
            self._consecutive = 0
            older = self._ring.newest_before(self._safe.step)
            if older is not None:      # reach back past damage accepted earlier
                self._ring.drop_from(older.step + 1)
                self._safe.copy_from(older)
                self.yhat = older.meta["yhat"]
                self.stats["escalations"] += 1
                action = "escalate"
            elif y is None:            # nowhere older to go: the signals learn the new level
                for sig in self.signals:
                    getattr(sig, "rebase", lambda: None)()
                self.stats["rebaselines"] += 1
                action = "rebaseline"
            else:                      # nowhere older to go: accept the new level of y
                self._safe.restore()
                if not math.isfinite(y):
                    y = self._measure_probe()
                    if not math.isfinite(y):
                        raise ProbeError(
                            f"probe returned {y} even at the last accepted state, where it was "
                            "finite before: the probe itself is broken (state was rolled back).")
                self.yhat = y
                self.stats["rebaselines"] += 1
                return "rebaseline"
        self._safe.restore()
        return action

    def _finish(self, decision: Decision, event: StepEvent) -> Decision:
        event.decision = decision.value
        self.last_decision, self.last_event = decision.value, event
        for callback in self.callbacks:
            callback(event)
        return decision

    # -- state_dict ------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """``{"inner": inner.state_dict(), "guard": {...}}``; plain data for ``weights_only=True``."""
        for hook in self._optimizer_state_dict_pre_hooks.values():
            hook(self)
        guard = {
            "version": _STATE_VERSION,
            "shapes": [list(p.shape) for g in self.param_groups for p in g["params"]],
            "t": self._t, "yhat": self.yhat, "y0": self.y0,
            "unverified": self._unverified, "consecutive": self._consecutive,
            "since_push": self._since_push, "last_decision": self.last_decision,
            "stats": dict(self.stats),
            "threshold": self.threshold.state_dict(),
            "signals": {s.name: s.state_dict() for s in self.signals},
            "recovery": [a.state_dict() for a in self.recovery], "in_row": self._in_row,
            "rng": capture_rng(),
            "safe": self._safe.state_dict() if self._safe.captured else None,
            "ring": self._ring.state_dict(),
            "world_size": world_size(resolve_group(self.process_group)),
        }
        sd = {"inner": self.inner.state_dict(), "guard": guard}
        for hook in self._optimizer_state_dict_post_hooks.values():
            result = hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a guarded state (or a plain optimizer's, which resets the guard).

        Everything is checked and built before anything is changed: on error the optimizer,
        the guard and the snapshots are exactly as before the call. The RNG states saved
        with the guard are restored too, so a resumed run replays exactly.
        """
        for hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = hook(self, state_dict)
            if result is not None:
                state_dict = result
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}.")
        if "inner" not in state_dict and {"state", "param_groups"} <= state_dict.keys():
            self.inner.load_state_dict(state_dict)  # a bare optimizer's checkpoint
            self._reset_guard_state()
        else:
            commit = self._prepare_guard_state(state_dict)
            self.inner.load_state_dict(state_dict["inner"])  # validates before it mutates
            commit()
        for hook in self._optimizer_load_state_dict_post_hooks.values():
            hook(self)

    def _prepare_guard_state(self, state_dict: dict[str, Any]) -> Callable[[], None]:
        """Validate ``state_dict["guard"]`` and build its objects; return what commits them."""
        if set(state_dict) != {"inner", "guard"}:
            raise ValueError(f"state_dict has keys {sorted(state_dict)}; expected 'inner' and "
                             "'guard' (from GuardedOptimizer.state_dict()).")
        guard = state_dict["guard"]
        if not isinstance(guard, dict):
            raise TypeError(f"state_dict['guard'] must be a dict, got {type(guard).__name__}.")
        if guard.get("version") != _STATE_VERSION:
            raise ValueError(f"state_dict guard version {guard.get('version')!r} is not "
                             f"{_STATE_VERSION}; it was saved by another guarded_optim release.")
        shapes = [list(p.shape) for g in self.param_groups for p in g["params"]]
        check_world_size(guard.get("world_size"), world_size(resolve_group(self.process_group)),
                         [p for g in self.param_groups for p in g["params"]])
        try:
            if [list(s) for s in guard["shapes"]] != shapes:
                raise ValueError(
                    f"state_dict does not match this optimizer's parameters: it was saved for "
                    f"shapes {guard['shapes']}, this optimizer has {shapes}; load a state_dict "
                    "saved from the same model and parameter groups.")
            missing = {s.name for s in self.signals} - set(guard["signals"])
            if missing:
                raise ValueError(f"state_dict has no state for signals {sorted(missing)}; build "
                                 "the guard with the signals it was saved with.")
            threshold = copy.deepcopy(self.threshold)
            try:
                threshold.load_state_dict(guard["threshold"])
            except KeyError as exc:
                raise ValueError(
                    f"state_dict['guard']['threshold'] {guard['threshold']} does not fit this "
                    f"guard's threshold {self.threshold!r}; build the guard with the threshold "
                    "(or epsilon) it was saved with.") from exc
            signals = [copy.deepcopy(s) for s in self.signals]
            for s in signals:
                s.load_state_dict(guard["signals"][s.name])
            if len(guard["recovery"]) != len(self.recovery):
                raise ValueError(f"state_dict has state for {len(guard['recovery'])} recovery "
                                 f"actions, this guard has {len(self.recovery)}; build it with "
                                 "the recovery actions it was saved with.")
            recovery = [copy.deepcopy(a) for a in self.recovery]
            for a, sd in zip(recovery, guard["recovery"]):
                a.load_state_dict(sd)
            safe = self._make_snapshot()
            if guard["safe"] is not None:
                safe.check_state_dict(guard["safe"])
                safe.load_state_dict(guard["safe"])
            ring = SnapshotRing(self._ring.capacity, self._make_snapshot)
            for sd in guard["ring"]:
                safe.check_state_dict(sd)
            ring.load_state_dict(guard["ring"])
            counters = dict(
                _t=int(guard["t"]), yhat=guard["yhat"], y0=guard["y0"],
                _unverified=int(guard["unverified"]), _consecutive=int(guard["consecutive"]),
                _since_push=int(guard["since_push"]), last_decision=guard["last_decision"],
                _in_row=int(guard["in_row"]),
                stats={**self.stats, **{k: int(v) for k, v in guard["stats"].items()}},
                last_event=None)
            rng = guard["rng"]
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"state_dict['guard'] is malformed ({type(exc).__name__}: {exc}); "
                             "pass the unmodified output of GuardedOptimizer.state_dict().") from exc

        def commit() -> None:
            self.threshold, self.signals, self.recovery = threshold, signals, recovery
            self._safe, self._ring = safe, ring
            self.__dict__.update(counters)
            restore_rng(rng)

        return commit
