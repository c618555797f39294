"""The :class:`Snapshot` shell: capture / restore of one training state.

It owns a :class:`~.layout.Layout` (which live tensors a capture copies), a
:class:`~.transport.Transport` (how their bytes move) and the saved data itself: the buffers
``_saved_params``, ``_saved_state``, ``_saved_buffers`` (host copies of staged tensors are
views of ``_stage`` / ``_buffer_stage``), the copies of non-tensor optimizer state
(``_others``), and ``step`` / ``meta``.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

import torch

from .layout import (Layout, _fingerprint, _flat_params, _layout, _local, _locals, _versions,
                     copy_others, module_buffers, put_others, same_shapes, split_state)
from .transport import Transport, _Staging

MODES = ("auto", "device", "host")


class Snapshot:
    """A preallocated, bit-exact copy of params + optimizer state + buffers.

    Args:
        optimizer: the optimizer whose ``param_groups`` and ``state`` are copied.
        module: optional module whose ``buffers()`` join the snapshot.
        mode: ``"auto"``, ``"device"`` or ``"host"`` (see :mod:`guarded_optim.snapshot`).

    Copies (``copy.deepcopy``, pickling) are independent snapshots of the copied optimizer;
    CUDA streams and events are not copied but made anew on first use.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, module: torch.nn.Module | None = None,
                 mode: str = "auto"):
        if mode not in MODES:
            raise ValueError(f"Invalid snapshot mode: {mode!r}; choose one of {MODES}.")
        self.optimizer, self.module = optimizer, module
        on_cuda = any(p.is_cuda for p in _flat_params(optimizer))
        self.mode = ("host" if on_cuda else "device") if mode == "auto" else mode
        self._transport = Transport(host=self.mode == "host", side=self.mode == "host" and on_cuda)
        self.step = -1          #: the guard's step count at capture (-1: never captured)
        self.meta: dict[str, Any] = {}  #: plain values the owner stores with the state
        self._layout = Layout()  # empty: stale, built at the first capture
        self._verify = 0        # captures left that check the live tensors are still the same
        self._regather = False  # the optimizer replaces its state tensors (LBFGS): look each time
        self._saved_params: list[torch.Tensor] = []
        self._saved_state: list[torch.Tensor] = []
        self._saved_buffers: list[torch.Tensor] = []
        self._stage: _Staging | None = None          # staged part of params + state (host mode)
        self._buffer_stage: _Staging | None = None   # staged part of the module buffers
        self._others: dict[int, dict[str, Any]] = {}  # param index -> copied non-tensor state
        self._others_home: dict[tuple[int, str], torch.device] = {}   # host mode: their device
        self._param_versions: list[int] = []

    @property
    def captured(self) -> bool:
        return self.step >= 0

    # -- capture --------------------------------------------------------------------------
    @torch.no_grad()
    def capture(self, step: int = 0, **meta: Any) -> None:
        """Copy the live state into this snapshot (asynchronously in host mode on CUDA:
        call :meth:`wait` before anything writes the parameters or state again)."""
        self._refresh_layout()
        lay = self._layout
        self._transport.capture_state(self._saved_params + self._saved_state,
                                      _locals(lay.params) + _locals(lay.state), self._stage)
        if lay.buffers:
            self._transport.capture_buffers(self._saved_buffers, lay.buffers, self._buffer_stage)
        self._others, homes = copy_others(self.optimizer, lay.params, lay.others, self.mode == "host")
        self._others_home.update(homes)
        self._param_versions = _versions(lay.params)
        self.step, self.meta = step, dict(meta)

    def _refresh_layout(self) -> None:
        """Rebuild the layout if it no longer fits; in the first captures after a rebuild
        (and always once the optimizer was seen replacing its state tensors) also check the
        state tensors themselves, and follow replaced ones."""
        if self._layout.stale(self.optimizer):
            return self._rebuild()
        if self._verify > 0 or self._regather:
            self._verify -= 1
            live = self._layout.gather_state(self.optimizer)
            if live is None or not same_shapes(live, self._saved_state):
                return self._rebuild()
            if any(a is not b for a, b in zip(live, self._layout.state)):
                self._regather = True
                self._layout.state = live

    def _rebuild(self) -> None:
        """Wait for a capture in flight, then lay out and allocate buffers for the live
        params, state and module buffers."""
        self.wait()
        lay = self._layout = Layout.gather(self.optimizer, self.module)
        saved, self._stage = self._transport.alloc_all(lay.params + lay.state)
        n = len(lay.params)
        self._saved_params, self._saved_state = saved[:n], saved[n:]
        self._saved_buffers, self._buffer_stage = self._transport.alloc_all(lay.buffers)
        self._others, self._others_home = {}, {}
        self._verify = 2

    def wait(self) -> None:
        """Make each device's current CUDA stream wait for a pending capture (no host sync)."""
        self._transport.wait()

    def synchronize(self) -> None:
        """Block the host until the snapshot's buffers hold the last capture (on the copies'
        own events, every device; no device-wide synchronize)."""
        self._transport.synchronize()

    # -- checks against the live state ----------------------------------------------------
    def written_since_capture(self) -> bool:
        """Whether anything wrote the live parameters since the last capture (a checkpoint
        loaded, ``model.double()``): read from the tensors' write counters, no sync."""
        params = _flat_params(self.optimizer)
        return (not self.captured or len(params) != len(self._param_versions)
                or _layout(params) != self._layout.placement or _versions(params) != self._param_versions)

    def matches_live_params(self) -> bool:
        """Whether the saved parameters equal the live ones, value for value (a host copy is
        compared on the parameter's device). A pass over both and one read: for rare checks
        (a write the version counters cannot see, such as ``p.data.mul_()``)."""
        self.synchronize()
        live = [_local(p.detach()) for p in _flat_params(self.optimizer)]
        if len(live) != len(self._saved_params) or any(
                a.shape != b.shape or a.dtype != b.dtype for a, b in zip(live, self._saved_params)):
            return False
        if not live:
            return True
        same = [(a == b.to(a.device)).all() for a, b in zip(live, self._saved_params)]
        return bool(torch.stack([t.to(same[0].device) for t in same]).all())   # one read

    # -- restore --------------------------------------------------------------------------
    @torch.no_grad()
    def restore(self) -> None:
        """Write the snapshot back into params, optimizer state and module buffers, exactly
        (RNG states are not part of a snapshot; see :mod:`guarded_optim.rng`).

        State created after the capture (lazy optimizer state, new parameter groups) is
        dropped; parameters the snapshot does not know keep their values. Runs on the
        current streams, after :meth:`wait`.
        """
        if not self.captured:
            raise RuntimeError("Snapshot.restore() called before any capture().")
        self.wait()
        opt, lay = self.optimizer, self._layout
        live = _locals(lay.params) + _locals(lay.relayout(opt, self._saved_state))  # resolved afresh
        if live:   # after wait(): the state chunk is no longer read by a capture
            self._transport.copy(live, self._saved_params + self._saved_state, self._stage,
                                 "state", out=False)
        if lay.buffers:
            self._transport.copy(lay.buffers, self._saved_buffers, self._buffer_stage,
                                 "buffers", out=False)
        self._transport.mark_pinned_copies(live + list(lay.buffers))   # H2D reads in flight
        put_others(opt, lay.params, self._others, self._others_home, self.mode == "host")
        fp = _fingerprint(opt, lay.buffers)  # params added since capture: rebuild next time
        lay.fp = fp if fp[3] == len(lay.params) else None

    # -- changes of the parameter set, copies -------------------------------------------
    @torch.no_grad()
    def add_params(self, params: Iterable[torch.Tensor]) -> None:
        """Join ``params`` (a new parameter group) at their current values, without state.

        The rest of the snapshot is unchanged: a restore puts the new parameters back to
        their values now and drops any optimizer state they gain later.
        """
        if not self.captured:
            return
        self.synchronize()
        for p in params:
            self._layout.params.append(p)
            saved = self._transport.alloc(p)
            saved.copy_(_local(p))
            self._saved_params.append(saved)
        self._layout.fp = None
        self._stage = None   # its indices count the state after the params: copy one by one

    def _sizes(self) -> tuple[int, int, int]:
        return len(self._saved_params), len(self._saved_state), len(self._saved_buffers)

    def copy_from(self, other: "Snapshot") -> None:
        """Make this snapshot equal to ``other`` (same optimizer), reusing its own buffers
        when the layouts agree (same fingerprint and sizes), else allocating like ``other``."""
        other.synchronize()
        self.synchronize()
        if self._layout.fp != other._layout.fp or self._sizes() != other._sizes():
            self._alloc_like(other)
        with torch.no_grad():
            for dst, src in ((self._saved_params, other._saved_params),
                             (self._saved_state, other._saved_state),
                             (self._saved_buffers, other._saved_buffers)):
                if dst:
                    torch._foreach_copy_(dst, src)
        self._layout = other._layout.copy()
        self._others = copy.deepcopy(other._others)
        self._others_home = dict(other._others_home)
        self._param_versions = list(other._param_versions)
        self._verify, self._regather = other._verify, other._regather
        self.step, self.meta = other.step, dict(other.meta)

    def _alloc_like(self, other: "Snapshot") -> None:
        """Buffers (and staging) shaped and planned like ``other``'s."""
        n = len(other._saved_params)
        plan = None if other._stage is None else other._stage.plan
        saved, self._stage = self._transport.alloc_all(other._saved_params + other._saved_state,
                                                       plan or ([], []))
        self._saved_params, self._saved_state = saved[:n], saved[n:]
        plan = None if other._buffer_stage is None else other._buffer_stage.plan
        self._saved_buffers, self._buffer_stage = self._transport.alloc_all(other._saved_buffers,
                                                                            plan or ([], []))

    def nbytes(self) -> int:
        """Bytes held by this snapshot's buffers."""
        return sum(t.numel() * t.element_size()
                   for t in self._saved_params + self._saved_state + self._saved_buffers)

    def staging_nbytes(self) -> int:
        """Device bytes held by the staging chunks (host mode on CUDA; 0 otherwise)."""
        return self._transport.staging_nbytes()

    # -- serialisation --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain data (tensors, ints, floats, lists, dicts): ``weights_only=True`` loads it.
        Keys ``step, meta, params, state, buffers``; ``state`` maps a parameter's index to
        its tensor state (the saved buffers) and its non-tensor state."""
        self.synchronize()
        state: dict[int, dict[str, Any]] = {}
        saved = iter(self._saved_state)
        for i, keys in self._layout.keys.items():
            state.setdefault(i, {}).update({k: next(saved) for k in keys})
        for i, values in self._others.items():
            state.setdefault(i, {}).update(values)
        return {
            "step": self.step, "meta": dict(self.meta),
            "params": list(self._saved_params), "state": state,
            "buffers": list(self._saved_buffers),
        }

    def check_state_dict(self, sd: Any, key: str = "snapshot") -> None:
        """Raise ``ValueError`` naming ``key`` unless ``sd`` is a :meth:`state_dict` that fits
        the live parameters and buffers and holds finite, well-formed values."""
        from ..validation import optimizer_state, tensors_finite
        if not isinstance(sd, dict) or not {"step", "meta", "params", "state", "buffers"} <= sd.keys():
            raise ValueError(f"{key} must be a snapshot state (a dict with 'step', 'meta', "
                             f"'params', 'state', 'buffers'), got {type(sd).__name__}; pass the "
                             "unmodified state_dict.")
        params = _flat_params(self.optimizer)
        _check_params(key, sd["params"], params)
        tensors_finite(f"{key}['params']", sd["params"])
        _check_buffers(key, sd["buffers"], module_buffers(self.module))
        tensors_finite(f"{key}['buffers']", sd["buffers"])
        if not isinstance(sd["state"], dict):
            raise ValueError(f"{key}['state'] must be a dict, got {type(sd['state']).__name__}.")
        optimizer_state(f"{key}['state']", {int(i): e for i, e in sd["state"].items()}, params)
        if isinstance(sd["step"], bool) or not isinstance(sd["step"], int) or sd["step"] < -1:
            raise ValueError(f"{key}['step'] must be an int >= -1, got {sd['step']!r}.")

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Fill this snapshot from :meth:`state_dict` output (call ``check_state_dict`` first).
        The live tensors are resolved at the next restore; the next capture lays out anew."""
        self.synchronize()
        opt, alloc = self.optimizer, self._transport.alloc
        params = _flat_params(opt)
        self._saved_params = [alloc(p) for p in params]
        torch._foreach_copy_(self._saved_params, [t.to(p.dtype) for t, p in zip(sd["params"], params)])
        keys, self._others, tensors = split_state(opt, params, sd["state"])
        self._saved_state = []
        for v, device in tensors:
            buf = alloc(v, device)
            buf.copy_(v)
            self._saved_state.append(buf)
        buffers = module_buffers(self.module) if sd["buffers"] else []
        self._saved_buffers = [alloc(b) for b in buffers]
        for dst, src in zip(self._saved_buffers, sd["buffers"]):
            dst.copy_(src)
        self._layout = Layout(params, keys, {i: list(v) for i, v in self._others.items()}, [],
                              [d for _, d in tensors], buffers, None, _layout(params))
        self.step, self.meta = int(sd["step"]), dict(sd["meta"])
        self._stage = self._buffer_stage = None   # one buffer each; staged again at the next capture


def _check_params(key: str, saved: Any, params: list[torch.Tensor]) -> None:
    """Raise ``ValueError`` unless ``saved`` is a list of tensors shaped like ``params``."""
    if isinstance(saved, (list, tuple)) and all(isinstance(s, torch.Tensor) for s in saved) \
            and len(saved) == len(params) and all(s.shape == _local(p).shape for s, p in zip(saved, params)):
        return
    shapes = [tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
              for s in saved][:4] if isinstance(saved, (list, tuple)) else saved
    raise ValueError(
        f"{key}['params'] does not match this optimizer's parameters: it holds "
        f"{len(saved) if isinstance(saved, (list, tuple)) else '?'} tensors shaped "
        f"{shapes}..., the optimizer has {len(params)} shaped "
        f"{[tuple(p.shape) for p in params][:4]}...; load a state_dict saved from the "
        "same model and parameter groups.")


def _check_buffers(key: str, saved: Any, buffers: list[torch.Tensor]) -> None:
    """Raise ``ValueError`` unless ``saved`` is a list, empty or of tensors shaped like
    ``buffers``."""
    if not isinstance(saved, (list, tuple)) or (saved and (
            len(saved) != len(buffers) or any(
            not isinstance(s, torch.Tensor) or s.shape != b.shape for s, b in zip(saved, buffers)))):
        raise ValueError(
            f"{key}['buffers'] does not match the module's buffers (count or shapes "
            "differ); pass the same module=... the state was saved with.")
