"""Checkpoints of a guard: what ``state_dict()["guard"]`` holds, and how a saved one is
checked and committed.

The layout is the inner optimizer's own ``{"state", "param_groups"}`` plus ``"guard"``
(version 2; 0.1.0's ``{"inner", "guard"}`` is version 1 and still loads). :func:`prepare`
checks every key, type, shape and value and builds every object before anything changes;
it returns the ``commit`` that installs them, so a failed load leaves the guard exactly as
it was, and its error names the offending key.
"""

from __future__ import annotations

import copy
import logging
import math
from typing import Any, Callable

import torch

from . import rng, validation
from .distributed import check_world_size, resolve_group, world_size
from .snapshot import SnapshotRing
from .record import fired_names, live_measurement
from .snapshot.layout import _local
from .state import Loaded, from_saved

__all__ = ["STATE_VERSION", "guard_state", "fisher_source", "check_inner", "prepare", "load",
           "check_signal_state", "restore_rng", "fingerprint", "mismatched", "settle_loaded",
           "settle_verification"]

STATE_VERSION = 2


def guard_state(opt) -> dict[str, Any]:
    """``state_dict()["guard"]`` of ``opt``: plain data (see ``GuardedOptimizer.state_dict``)."""
    loaded = opt._pending if isinstance(opt._pending, Loaded) and opt._pending.live else None
    live = loaded is not None or (opt._safe.captured and opt.step_state.live_is_safe
                                  and opt._pending is None)
    step, meta = (loaded.step, loaded.meta) if loaded is not None else (opt._safe.step, opt._safe.meta)
    return {
        "version": STATE_VERSION,
        "shapes": [list(p.shape) for g in opt.param_groups for p in g["params"]],
        **opt.step_state.saved(),
        "threshold": opt.threshold.state_dict(),
        "signals": {s.name: s.state_dict() for s in opt.signals},
        "recovery": [a.state_dict() for a in opt.recovery],
        "ladder": opt.ladder.state_dict(),
        "fisher": fisher_source(opt),
        "rng": rng.capture(),
        "safe": None if live or not opt._safe.captured else opt._safe.state_dict(),
        "safe_is_live": live,
        "safe_step": step, "safe_meta": dict(meta),
        "ring": opt._ring.state_dict() if opt.save_history else [],
        "world_size": world_size(resolve_group(opt.process_group)),
        "fingerprint": fingerprint(opt.param_groups),
    }


def fingerprint(param_groups: list[dict]) -> list[list[float]]:
    """The weights an optimizer state belongs to, in a few bytes per tensor: each
    parameter's sum and sum of squares (float64). Saved with the guard's state and compared
    at the first step after a load (:func:`mismatched`). One pass over the parameters."""
    params = [_local(p.detach()) for g in param_groups for p in g["params"]]   # this rank's shard
    params = [torch.view_as_real(p) if p.is_complex() else p for p in params]
    if not params or any(p.is_meta for p in params):
        return []   # meta parameters hold no values (a checkpoint with [] is not checked)
    stats = [torch.stack([torch.sum(p, dtype=torch.float64),
                          torch.linalg.vector_norm(p, dtype=torch.float64).square()])
             for p in params]
    return torch.stack([s.to(stats[0].device) for s in stats]).tolist()   # one read


def settle_verification(opt) -> None:
    """Before a save, without a probe: run the post-step signals on the live state now, as
    the next step's start would, and on a healthy verdict verify it (the checkpoint then
    records the live state as the verified one instead of a second copy). Rank-local only
    (a collective here would hang the common ``if rank == 0: save(opt.state_dict())``)."""
    st, post = opt.step_state, opt._post
    if (not opt._cadence.live or not st.unverified or opt._on_meta()
            or world_size(resolve_group(opt.process_group)) > 1 or not post):
        return
    m = live_measurement(opt.inner, st.t)
    fired = opt._read(m, [], post, None, None).state_fired
    if not any(fired):
        opt._learn(post, m, True, fired)
        opt._verify(st.t)


def settle_loaded(opt, loaded: Loaded) -> None:
    """At the first step after a load, before its forward pass: a loaded checkpoint meets
    the live weights. If they are not the weights it was saved with (its fingerprint), say
    so (a WARNING, ``stats["checkpoint_mismatches"]``) and check them with the post-step
    signals before anything builds on them: damaged, they are rolled back to the loaded
    verified state, or, where none was loaded, the step raises ``ValueError`` naming the
    fix and changes nothing. Then the loaded live state becomes the verified one, or the
    reference is measured anew."""
    if loaded.fingerprint is not None:
        differs = mismatched(loaded.fingerprint, fingerprint(opt.param_groups))
        if opt._agreed(bool(differs)):
            _check_loaded(opt, loaded, differs)
    if loaded.reference and opt._uses_snapshots:
        opt._take_reference()
    elif loaded.live:
        opt.safe_snapshot.capture(loaded.step, **loaded.meta)
        opt.step_state.live_is_safe = True


def _check_loaded(opt, loaded: Loaded, differs: list[int]) -> None:
    damaged = fired_names(opt._post, opt._check_live())
    if damaged and (loaded.live or not opt.safe_snapshot.captured):
        raise ValueError(mismatch_message(opt, differs, damaged))
    opt.step_state.stats["checkpoint_mismatches"] += 1
    opt._log("checkpoint", logging.WARNING, "%s", mismatch_message(opt, differs, damaged))
    if damaged:
        opt._restore()


def mismatch_message(opt, differs: list[int], damaged: list[str]) -> str:
    """What a loaded checkpoint's mismatch means, and what to do."""
    params = [p for g in opt.param_groups for p in g["params"]]
    shapes = ", ".join(f"#{i} {list(params[i].shape)}" for i in differs[:4] if i < len(params))
    more = f" and {len(differs) - 4} more" if len(differs) > 4 else ""
    health = (f"They fail the health check ({', '.join(damaged)}). " if damaged else
              "They pass the health check, so the guard goes on from them; the optimizer "
              "state (Adam's moments) was built on other weights. ")
    return (f"the loaded optimizer state was saved with other weights: {len(differs)} of "
            f"{len(params)} parameters differ ({shapes}{more}). {health}If this is a resume, "
            "load the model's state_dict (the weights saved with this optimizer state) before "
            "stepping; to start the guard afresh on new weights, load only the inner "
            "optimizer's state (without the 'guard' key).")


def mismatched(saved: list, live: list, rtol: float = 1e-6) -> list[int]:
    """The indices of the parameters whose fingerprints differ (a relative tolerance absorbs
    a reduction order that differs between devices)."""
    if len(saved) != len(live):
        return list(range(max(len(saved), len(live))))
    return [i for i, (a, b) in enumerate(zip(saved, live))
            if not all(abs(x - y) <= rtol * max(abs(x), abs(y), 1e-30) or x == y
                       or (math.isnan(x) and math.isnan(y)) for x, y in zip(a, b))]


def fisher_source(opt) -> str | None:
    """Where the checkpoint's Fisher diagonal is (the one ``find_fisher`` reads): ``"host"``,
    the default tracker's state (:class:`~guarded_optim.fisher.HostFisher`, in ``recovery``);
    ``"recovery"``, a user's ``FisherDiagonal`` action's state; ``"state.exp_avg_sq"``, the
    inner state's second moment (no second copy); ``None``, nowhere."""
    from .fisher import FisherDiagonal, InnerFisher, is_default_fisher
    for a in opt.recovery:
        if isinstance(a, FisherDiagonal):
            return "host" if is_default_fisher(a) else "recovery"
    return "state.exp_avg_sq" if InnerFisher(opt).available else None


def _load_recovery(opt, saved: Any, key: str) -> list:
    """Copies of ``opt.recovery`` loaded from ``saved`` (a list of states, by index).

    The default Fisher tracker (:class:`~guarded_optim.fisher.HostFisher`, last in
    ``recovery`` when the guard added it) may be on one side only: a checkpoint from a
    release without it (the guard's tracker then starts empty), or one saved where the inner
    optimizer kept no second moment loaded where it does (its saved entry, marked
    ``"default": True``, is dropped). Any other count mismatch is an error. Builds new
    objects only: nothing of ``opt`` changes.
    """
    from .fisher import is_default_fisher, is_default_fisher_state
    if not isinstance(saved, (list, tuple)):
        raise ValueError(f"{key} must be a list of recovery action states, got "
                         f"{type(saved).__name__}.")
    actions, states, fresh = list(opt.recovery), list(saved), []
    has_default = bool(actions) and is_default_fisher(actions[-1])
    saved_default = bool(states) and is_default_fisher_state(states[-1])
    if not has_default and saved_default and len(states) == len(actions) + 1:
        states = states[:-1]
    elif has_default and not saved_default and len(states) == len(actions) - 1:
        fresh, actions = [actions[-1]], actions[:-1]
    if len(states) != len(actions):
        raise ValueError(f"{key} has state for {len(saved)} recovery actions, this guard has "
                         f"{len(opt.recovery)}; build it with the recovery actions it was "
                         "saved with.")
    recovery = [copy.deepcopy(a) for a in actions]
    for a, sd in zip(recovery, states):
        a.load_state_dict(sd)
    for a in fresh:
        a = copy.deepcopy(a)
        a.reset()
        recovery.append(a)
    return recovery


def check_inner(opt, inner: dict[str, Any], key: str) -> None:
    """The inner optimizer's state values: finite, parameter-shaped, not negative."""
    groups = inner["param_groups"]
    if not isinstance(groups, list) or not all(isinstance(g, dict) and "params" in g for g in groups):
        raise ValueError(f"{key}['param_groups'] must be a list of dicts with 'params'.")
    ids = [i for g in groups for i in g["params"]]
    params = [p for g in opt.param_groups for p in g["params"]]
    if len(ids) != len(params) or not isinstance(inner["state"], dict):
        return  # torch's own load_state_dict reports the mismatch
    position = {i: n for n, i in enumerate(ids)}
    state = {}
    for i, entry in inner["state"].items():
        if i not in position:
            raise ValueError(f"{key}['state'] has an entry for parameter id {i!r}, which no "
                             "param group lists; pass the unmodified state_dict.")
        state[position[i]] = entry
    validation.optimizer_state(f"{key}['state']", state, params)

def prepare(opt, saved: Any) -> Callable[[], None]:
    """Validate ``state_dict["guard"]`` and build its objects; return what commits them."""
    key = "state_dict['guard']"
    if not isinstance(saved, dict):
        raise TypeError(f"{key} must be a dict, got {type(saved).__name__}.")
    version = saved.get("version")
    if version not in (1, STATE_VERSION):
        raise ValueError(f"{key}['version'] is {version!r}, not 1 or {STATE_VERSION}; it was "
                         "saved by another guarded_optim release.")
    params = [p for g in opt.param_groups for p in g["params"]]
    shapes = [list(p.shape) for p in params]
    check_world_size(saved.get("world_size"), world_size(resolve_group(opt.process_group)), params)
    try:
        if [list(s) for s in saved["shapes"]] != shapes:
            raise ValueError(
                f"state_dict does not match this optimizer's parameters: it was saved for "
                f"shapes {saved['shapes']}, this optimizer has {shapes}; load a state_dict "
                "saved from the same model and parameter groups.")
        step_state = from_saved(saved, opt.stats, key)
        if opt.probe is not None and step_state.yhat is None and opt._uses_snapshots \
                and step_state.t > 0:
            raise ValueError(f"{key}['yhat'] is None but this guard has a probe: the "
                             "state was saved by a guard without one; build it alike.")
        missing = {s.name for s in opt.signals} - set(saved["signals"])
        if missing:
            raise ValueError(f"{key}['signals'] has no state for signals {sorted(missing)}; "
                             "build the saved with the signals it was saved with.")
        threshold = copy.deepcopy(opt.threshold)
        try:
            threshold.load_state_dict(saved["threshold"])
        except (KeyError, ValueError) as exc:
            raise ValueError(
                f"{key}['threshold'] {saved['threshold']} does not fit this guard's "
                f"threshold {opt.threshold!r}; build the saved with the threshold (or "
                "epsilon) it was saved with.") from exc
        signals = [copy.deepcopy(s) for s in opt.signals]
        for s in signals:
            state = saved["signals"][s.name]
            check_signal_state(f"{key}['signals'][{s.name!r}]", state)
            s.load_state_dict(state)
        recovery = _load_recovery(opt, saved["recovery"], f"{key}['recovery']")
        ladder = copy.deepcopy(opt.ladder)
        if "ladder" in saved:
            try:
                ladder.load_state_dict(saved["ladder"])
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{key}['ladder'] is malformed: {exc}") from exc
        rng.check(saved["rng"], f"{key}['rng']")
        safe = opt._new_snapshot()
        fp = _check_fingerprint(saved.get("fingerprint"), len(shapes), f"{key}['fingerprint']")
        if saved["safe"] is not None:
            safe.check_state_dict(saved["safe"], f"{key}['safe']")
            safe.load_state_dict(saved["safe"])
            pending = Loaded(live=False, fingerprint=fp)
        elif saved.get("safe_is_live", False):
            step = validation.integer(f"{key}['safe_step']", saved["safe_step"], low=0)
            meta = saved["safe_meta"]
            if not isinstance(meta, dict):
                raise ValueError(f"{key}['safe_meta'] must be a dict.")
            pending = Loaded(live=True, step=step, meta=dict(meta), fingerprint=fp)
        else:
            pending = Loaded(live=False, fingerprint=fp, reference=opt._uses_snapshots)
        ring = SnapshotRing(opt._ring.capacity, opt._new_snapshot)
        for i, sd in enumerate(saved.get("ring", ())):
            safe.check_state_dict(sd, f"{key}['ring'][{i}]")
        ring.load_state_dict(saved.get("ring", ()))
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"{key} is malformed ({type(exc).__name__}: {exc}); pass the "
                         "unmodified output of GuardedOptimizer.state_dict().") from exc

    def commit() -> None:
        opt.threshold, opt.signals, opt.recovery = threshold, signals, recovery
        opt.ladder = ladder
        opt._safe, opt._ring, opt._pending = safe, ring, pending
        step_state.live_is_safe = pending.live
        opt.step_state = step_state

    return commit


def _check_fingerprint(fp: Any, n: int, key: str) -> list | None:
    """A saved fingerprint: ``None`` (saved before fingerprints) or ``n`` pairs of floats."""
    if fp is None or fp == []:
        return None
    if not isinstance(fp, list) or len(fp) != n or not all(
            isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, float) for x in v)
            for v in fp):
        raise ValueError(f"{key} must hold one [sum, sum of squares] pair of floats per "
                         "parameter; pass the unmodified output of state_dict().")
    return [list(v) for v in fp]


def check_signal_state(key: str, state: Any) -> None:
    """A signal's saved state: a dict whose tensors (at any depth) are finite (references are
    only ever learnt from healthy steps)."""
    if not isinstance(state, dict):
        raise ValueError(f"{key} must be a dict, got {type(state).__name__}.")

    def walk(x: Any, where: str) -> None:
        if isinstance(x, torch.Tensor):
            if (x.is_floating_point() or x.is_complex()) and x.numel() and not bool(torch.isfinite(x).all()):
                raise ValueError(f"{where} holds NaN or Inf; a signal's reference is learnt from "
                                 "healthy steps only: the checkpoint is corrupt.")
        elif isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{where}[{k!r}]")
        elif isinstance(x, (list, tuple)):
            for i, v in enumerate(x):
                walk(v, f"{where}[{i}]")

    walk(state, key)


def load(opt, state_dict: dict[str, Any]) -> None:
    """``opt.load_state_dict(state_dict)`` after its pre-hooks: a guarded layout (this
    release's, or 0.1.0's ``{"inner", "guard"}``) or a bare optimizer's (the guard resets).
    Everything is checked before anything changes."""
    if "guard" not in state_dict:
        if "inner" in state_dict or not {"state", "param_groups"} <= state_dict.keys():
            raise ValueError(f"state_dict has keys {sorted(state_dict)}; expected an "
                             "optimizer state_dict ('state', 'param_groups', and 'guard' "
                             "from GuardedOptimizer.state_dict()).")
        check_inner(opt, state_dict, "state_dict")
        opt.inner.load_state_dict(state_dict)  # a bare optimizer's checkpoint
        opt._reset_guard_state()
        return
    if "inner" in state_dict:   # 0.1.0's layout
        if set(state_dict) != {"inner", "guard"}:
            raise ValueError(f"state_dict has keys {sorted(state_dict)}; expected "
                             "'state', 'param_groups' and 'guard'.")
        inner, key = state_dict["inner"], "state_dict['inner']"
    else:
        inner, key = {k: v for k, v in state_dict.items() if k != "guard"}, "state_dict"
    if not isinstance(inner, dict) or not {"state", "param_groups"} <= inner.keys():
        raise ValueError(f"{key} must hold the inner optimizer's 'state' and "
                         "'param_groups'; pass the unmodified output of state_dict().")
    check_inner(opt, inner, key)
    commit = prepare(opt, state_dict["guard"])
    opt.inner.load_state_dict(inner)  # validates before it mutates
    commit()


def restore_rng(state_dict: Any) -> None:
    """Set this process's RNG streams to those ``state_dict["guard"]["rng"]`` holds
    (``ValueError`` for a state saved by another rank)."""
    guard = state_dict.get("guard") if isinstance(state_dict, dict) else None
    state = guard.get("rng") if isinstance(guard, dict) else None
    rng.check(state)
    here = rng.capture()["rank"]
    if int(state.get("rank", 0)) != here:
        raise ValueError(f"state_dict['guard']['rng'] was saved by rank {state.get('rank')}, "
                         f"this is rank {here}: each rank restores its own streams (save "
                         "opt.state_dict() per rank, e.g. to f'opt_rank{rank}.pt').")
    rng.restore(state)
