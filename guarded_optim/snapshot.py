"""Exact copies of a training state, for rollback (paper 001, Assumption 7.1 and sec. 8.2).

A :class:`Snapshot` holds the parameters, the inner optimizer's per-parameter state (every
tensor, step counters included) and the module's buffers (BatchNorm statistics). Buffers
are allocated once per layout, in the live tensors' own dtypes (a bf16 parameter costs 2
bytes), and filled with ``torch._foreach_copy_``; ``restore()`` writes them back bit for bit.
RNG states are *not* part of a snapshot: a rollback moves the model back, never the data
stream (see :mod:`.rng`).

Invariant: after ``restore()`` the live state equals the state at the last ``capture()``
exactly (a parameter moved to another dtype or device since, by ``model.double()`` or
``.to()``, is re-laid out at the next capture), and optimizer state that did not exist then (Adam's lazy state, a parameter group
added later) is dropped. ``lr``, ``initial_lr`` and the rest of ``param_groups`` are never
part of a snapshot: LR schedulers own them.

Modes:

* ``"device"`` -- buffers beside the live tensors (same device).
* ``"host"``   -- buffers in CPU memory, pinned when CUDA is present. On CUDA, ``capture()``
  is issued on a side stream and returns at once; the copy overlaps the next forward and
  backward (which only read parameters), and :meth:`Snapshot.wait` makes the current stream
  wait for it before anything writes the parameters again (the guard calls it before
  ``inner.step()``). Module buffers change during the forward pass, so they are copied on
  the current stream, still without a host sync. Small contiguous tensors are *staged*
  (see :func:`plan_groups`): their host copies are slices of one flat pinned buffer per
  (device, dtype), a capture gathers up to :data:`STAGE_BYTES` of them into a device chunk
  with one ``_foreach_copy_`` and moves the chunk with one D2H copy (a restore does the
  reverse), instead of one copy call per tensor. Host memory stays one copy; the GPU memory
  the guard costs is the staging chunks only: per device at most ``STAGE_BYTES`` for the
  parameters and state plus ``STAGE_BYTES`` for the module buffers, each no larger than the
  bytes it stages (:meth:`Snapshot.staging_nbytes`).
* ``"auto"``   -- ``"host"`` when the parameters live on CUDA, else ``"device"``.
"""

from __future__ import annotations

import copy
from typing import Any, Iterable

import torch

__all__ = ["Snapshot", "SnapshotRing", "MODES", "STAGE_BYTES", "STAGE_TENSOR_BYTES", "plan_groups"]

MODES = ("auto", "device", "host")

STAGE_BYTES = 16 << 20
"""Host mode: the largest device staging chunk, per device and per role (params + state on
the side stream; module buffers on the current stream), so at most 2 x 16 MiB of GPU memory
per device. A (device, dtype) group larger than this is staged in several rounds through
the same chunk (one gather + one D2H copy per round)."""

STAGE_TENSOR_BYTES = 1 << 20
"""Host mode: tensors up to this size are staged; larger ones are copied one by one (at
1 MiB the transfer itself, tens of microseconds over PCIe, already dwarfs the few
microseconds of host time one copy call costs)."""

_STAGE_DEVICE_TYPES: tuple[str, ...] = ("cuda",)   # tests add "cpu" to run the staged path on CPU


def _flat_params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a ``DTensor`` (FSDP2), a view sharing its storage; ``t`` otherwise.

    Snapshots are rank-local: each rank copies exactly the tensors it holds."""
    return t.to_local() if hasattr(t, "to_local") else t


def _locals(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    return [_local(t) for t in ts] if any(hasattr(t, "to_local") for t in ts) else ts


def _layout(tensors: list[torch.Tensor]) -> list[tuple]:
    """Each tensor's dtype and device: a snapshot follows them (``model.double()``, ``.to()``)."""
    return [(t.dtype, t.device) for t in tensors]


def _versions(tensors: list[torch.Tensor]) -> list[int]:
    """Each tensor's in-place write counter: any write (``copy_``, ``load_state_dict``) bumps it."""
    return [_local(t)._version for t in tensors]


def _buffered(v: Any) -> bool:
    """Whether an optimizer-state value gets a preallocated buffer: a dense (strided) tensor.
    Anything else (numbers, sparse tensors such as SGD's momentum for sparse gradients) is
    copied whole at each capture."""
    return isinstance(v, torch.Tensor) and v.layout == torch.strided


def _by_device(dst: list[torch.Tensor], src: list[torch.Tensor]) -> dict[torch.device, tuple]:
    """``(dst, src)`` pairs grouped by the source's device, order kept within each group."""
    groups: dict[torch.device, tuple[list, list]] = {}
    for d, t in zip(dst, src):
        pair = groups.setdefault(t.device, ([], []))
        pair[0].append(d)
        pair[1].append(t)
    return groups


def _tree_to(obj: Any, device: torch.device | None) -> Any:
    """A copy of ``obj`` (state that is not a tensor per parameter: LBFGS's direction
    history, counters) with every tensor copied, to ``device`` when one is given (host mode:
    the CPU at capture, the parameter's device at restore), else where it is."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to(device if device is not None else obj.device, copy=True)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_tree_to(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: _tree_to(v, device) for k, v in obj.items()}
    return copy.deepcopy(obj)


def _first_device(obj: Any) -> torch.device | None:
    """The device of the first tensor in ``obj`` (a tensor, or lists/dicts of them)."""
    if isinstance(obj, torch.Tensor):
        return obj.device
    items = obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else ()
    for x in items:
        d = _first_device(x)
        if d is not None:
            return d
    return None


def plan_groups(tensors: list[torch.Tensor], devices: list[torch.device] | None = None,
                chunk_bytes: int | None = None, max_tensor_bytes: int | None = None,
                device_types: tuple[str, ...] | None = None) -> tuple[list[tuple], list[int]]:
    """Which of ``tensors`` a host snapshot copies staged, and in which rounds (metadata only).

    A tensor is staged when it is dense and contiguous, not empty, at most
    ``min(max_tensor_bytes, chunk_bytes)`` bytes, and its device (``devices[i]``, default its
    own) is of one of ``device_types``. Returns ``(groups, rest)``: ``groups`` holds one
    ``(device, dtype, numel, rounds)`` per (device, dtype) with at least two staged tensors,
    in first-seen order; ``numel`` is the length of the group's flat host buffer and each
    round a list of ``(index, offset, numel)`` -- consecutive slices of that buffer, at most
    ``chunk_bytes`` in all. ``rest`` lists the other indices, ascending (copied one by one).
    Defaults: :data:`STAGE_BYTES`, :data:`STAGE_TENSOR_BYTES`, CUDA devices.
    """
    chunk_bytes = STAGE_BYTES if chunk_bytes is None else chunk_bytes
    limit = min(STAGE_TENSOR_BYTES if max_tensor_bytes is None else max_tensor_bytes, chunk_bytes)
    device_types = _STAGE_DEVICE_TYPES if device_types is None else device_types
    keyed: dict[tuple, list[int]] = {}
    rest: list[int] = []
    for i, t in enumerate(tensors):
        device = t.device if devices is None else devices[i]
        if (device.type in device_types and t.layout == torch.strided and not t.is_quantized
                and 0 < t.numel() * t.element_size() <= limit and t.is_contiguous()):
            keyed.setdefault((device, t.dtype), []).append(i)
        else:
            rest.append(i)
    groups = []
    for (device, dtype), members in keyed.items():
        if len(members) < 2:          # nothing to batch: one direct copy is cheaper
            rest.extend(members)
            continue
        rounds: list[list[tuple[int, int, int]]] = [[]]
        offset = used = 0
        for i in members:
            n = tensors[i].numel()
            nbytes = n * tensors[i].element_size()
            if used + nbytes > chunk_bytes:
                rounds.append([])
                used = 0
            rounds[-1].append((i, offset, n))
            offset += n
            used += nbytes
        groups.append((device, dtype, offset, rounds))
    return groups, sorted(rest)


class _Staging:
    """Staged host copies of one tensor list (params + optimizer state, or module buffers).

    ``views[i]`` is the host copy of staged tensor ``i``: a slice of its group's flat host
    buffer with the live tensor's shape and strides. Per round, :meth:`copy_out` gathers the
    live tensors into a device chunk (one ``_foreach_copy_``) and moves it with one copy;
    :meth:`copy_in` does the reverse. The chunk is the caller's (``nbytes[device]`` bytes,
    uint8); views of it are cached per chunk."""

    def __init__(self, plan: tuple[list[tuple], list[int]], templates: list[torch.Tensor], pin: bool):
        groups, self.rest = plan
        self.plan = plan
        self.views: dict[int, torch.Tensor] = {}
        self.rounds: dict[torch.device, list[tuple]] = {}
        self.nbytes: dict[torch.device, int] = {}
        for device, dtype, numel, rounds in groups:
            flat = torch.empty(numel, dtype=dtype, pin_memory=pin)
            for members in rounds:
                start = members[0][1]
                n = members[-1][1] + members[-1][2] - start
                layout = []
                for i, off, _ in members:
                    shape, stride = templates[i].shape, templates[i].stride()
                    self.views[i] = flat.as_strided(shape, stride, off)
                    layout.append((shape, stride, off - start))
                nbytes = n * flat.element_size()
                self.rounds.setdefault(device, []).append(
                    (dtype, flat[start:start + n], nbytes, [m[0] for m in members], layout))
                self.nbytes[device] = max(self.nbytes.get(device, 0), nbytes)
        self._chunk_views: dict[torch.device, tuple] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_chunk_views"] = {}   # views of a device chunk: made anew
        return state

    def _views_of(self, device: torch.device, chunk: torch.Tensor) -> list[tuple]:
        cached = self._chunk_views.get(device)
        if cached is None or cached[0] is not chunk:
            per_round = []
            for dtype, _, nbytes, _, layout in self.rounds[device]:
                typed = chunk[:nbytes].view(dtype)
                per_round.append((typed, [typed.as_strided(shape, stride, off)
                                          for shape, stride, off in layout]))
            cached = self._chunk_views[device] = (chunk, per_round)
        return cached[1]

    def copy_out(self, device: torch.device, chunk: torch.Tensor, live: list[torch.Tensor],
                 non_blocking: bool) -> None:
        """Live tensors -> host copies, through ``chunk``, on the current stream."""
        for (typed, views), (_, host, _, idx, _) in zip(self._views_of(device, chunk), self.rounds[device]):
            torch._foreach_copy_(views, [live[i] for i in idx])
            host.copy_(typed, non_blocking=non_blocking)

    def copy_in(self, device: torch.device, chunk: torch.Tensor, live: list[torch.Tensor],
                non_blocking: bool) -> None:
        """Host copies -> live tensors, through ``chunk``, on the current stream."""
        for (typed, views), (_, host, _, idx, _) in zip(self._views_of(device, chunk), self.rounds[device]):
            typed.copy_(host, non_blocking=non_blocking)
            torch._foreach_copy_([live[i] for i in idx], views)


def _fingerprint(optimizer: torch.optim.Optimizer, buffers: list[torch.Tensor]) -> tuple:
    """Cheap layout key: changes when params are added, state appears, or state is reloaded."""
    state = optimizer.state
    return (
        id(state), len(state), sum(map(len, state.values())),
        sum(len(g["params"]) for g in optimizer.param_groups), len(buffers),
    )


class Snapshot:
    """A preallocated, bit-exact copy of params + optimizer state + buffers.

    Args:
        optimizer: the optimizer whose ``param_groups`` and ``state`` are copied.
        module: optional module whose ``buffers()`` join the snapshot.
        mode: ``"auto"``, ``"device"`` or ``"host"`` (see the module docstring).

    Copies (``copy.deepcopy``, pickling) are independent snapshots of the copied optimizer;
    CUDA streams and events are not copied but made anew on first use.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, module: torch.nn.Module | None = None,
                 mode: str = "auto"):
        if mode not in MODES:
            raise ValueError(f"Invalid snapshot mode: {mode!r}; choose one of {MODES}.")
        self.optimizer, self.module = optimizer, module
        params = _flat_params(optimizer)
        on_cuda = any(p.is_cuda for p in params)
        self.mode = ("host" if on_cuda else "device") if mode == "auto" else mode
        self._pin = self.mode == "host" and torch.cuda.is_available()
        self._side = self.mode == "host" and on_cuda   # copies run on side streams
        self._streams: dict[torch.device, tuple] = {}  # CUDA device -> (side stream, its event)
        self._buffer_events: dict[torch.device, Any] = {}  # buffers copied on the current streams
        self.step = -1          #: the guard's step count at capture (-1: never captured)
        self.meta: dict[str, Any] = {}  #: plain values the owner stores with the state
        self._fp: tuple | None = None
        self._verify = 0        # captures left that check the live tensors are still the same
        self._regather = False  # the optimizer replaces its state tensors (LBFGS): look each time
        self._params: list[torch.Tensor] = []             # live params, in group order
        self._saved_params: list[torch.Tensor] = []
        self._keys: dict[int, list[str]] = {}             # param index -> tensor state keys
        self._others: dict[int, dict[str, Any]] = {}      # param index -> non-tensor state
        self._others_home: dict[tuple[int, str], torch.device] = {}   # host mode: their device
        self._live_state: list[torch.Tensor] = []
        self._saved_state: list[torch.Tensor] = []
        self._state_devices: list[torch.device] = []      # where each live state tensor lives
        self._buffers: list[torch.Tensor] = []
        self._saved_buffers: list[torch.Tensor] = []
        self._param_layout: list[tuple] = []
        self._param_versions: list[int] = []
        self._in_flight: list[torch.Tensor] | None = None   # live tensors a side-stream copy reads
        self._stage: _Staging | None = None          # staged part of params + state (host mode)
        self._buffer_stage: _Staging | None = None   # staged part of the module buffers
        self._chunks: dict[tuple, torch.Tensor] = {}  # (role, device) -> device staging chunk

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_streams"], state["_buffer_events"], state["_in_flight"] = {}, {}, None  # made anew
        state["_chunks"] = {}
        return state

    def _side_stream(self, device: torch.device | None = None):
        """The side stream of ``device`` (default: the first CUDA parameter's) and its event,
        made on first use: one per device, for models spread over several GPUs."""
        if device is None:
            device = next(p.device for p in _flat_params(self.optimizer) if p.is_cuda)
        if device not in self._streams:
            self._streams[device] = (torch.cuda.Stream(device=device), torch.cuda.Event())
        return self._streams[device][0]

    # -- layout ---------------------------------------------------------------------------
    def _alloc(self, t: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """A buffer for ``t`` in its own dtype, beside it (``"device"``, or on ``device``) or
        in host memory; only the shape is read, nothing is copied."""
        t = _local(t)
        if self.mode == "device":
            if device is None or device == t.device:
                return torch.empty_like(t, memory_format=torch.preserve_format)
            return torch.empty(t.shape, dtype=t.dtype, device=device)
        # preserve_format keeps the live strides of a dense tensor (channels_last), so D2H and
        # H2D copies need no contiguous temporary on the GPU
        return torch.empty_like(t.detach(), device="cpu", pin_memory=self._pin,
                                memory_format=torch.preserve_format)

    def _live_buffers(self) -> list[torch.Tensor]:
        return [] if self.module is None else [b for b in self.module.buffers() if b is not None]

    def _alloc_all(self, templates: list[torch.Tensor], plan: tuple | None = None,
                   ) -> tuple[list[torch.Tensor], _Staging | None]:
        """Buffers for ``templates`` and their staging: in host mode the tensors that
        :func:`plan_groups` stages (or ``plan``, for templates that are another snapshot's
        buffers) get views of flat host buffers, the rest one buffer each (:meth:`_alloc`)."""
        if plan is None and self.mode == "host":
            plan = plan_groups([_local(t) for t in templates])
        if plan is None or not plan[0]:
            return [self._alloc(t) for t in templates], None
        stage = _Staging(plan, [_local(t) for t in templates], self._pin)
        return [stage.views[i] if i in stage.views else self._alloc(t)
                for i, t in enumerate(templates)], stage

    def _chunk(self, role: str, device: torch.device, nbytes: int) -> torch.Tensor:
        """The device staging chunk of ``role`` ("state": side stream, "buffers": current
        stream), at least ``nbytes``; grown, never shrunk (``nbytes <= STAGE_BYTES``). It is
        allocated on the current stream; the state chunk is marked used on the side stream,
        so that freeing it (a grown chunk, a dropped snapshot) never hands its block out
        while a capture still reads it."""
        chunk = self._chunks.get((role, device))
        if chunk is None or chunk.numel() < nbytes:
            chunk = self._chunks[(role, device)] = torch.empty(nbytes, dtype=torch.uint8, device=device)
            if role == "state" and self._side and device.type == "cuda":
                chunk.record_stream(self._side_stream(device))
        return chunk

    def _copy(self, dst: list[torch.Tensor], src: list[torch.Tensor], stage: _Staging | None,
              role: str, out: bool) -> None:
        """``dst <- src`` on the current streams, staged where ``stage`` says; ``out``: a
        capture (live -> saved), else a restore (saved -> live)."""
        if stage is None:
            torch._foreach_copy_(dst, src, non_blocking=self._pin)
            return
        if stage.rest:
            torch._foreach_copy_([dst[i] for i in stage.rest], [src[i] for i in stage.rest],
                                 non_blocking=self._pin)
        for device in stage.rounds:
            chunk = self._chunk(role, device, stage.nbytes[device])
            if out:
                stage.copy_out(device, chunk, src, self._pin)
            else:
                stage.copy_in(device, chunk, dst, self._pin)

    def staging_nbytes(self) -> int:
        """Device bytes held by the staging chunks (host mode on CUDA; 0 otherwise)."""
        return sum(c.numel() for c in self._chunks.values())

    def _rebuild(self) -> None:
        """Allocate buffers for the live layout (params, state keys, module buffers)."""
        opt = self.optimizer
        self._params = _flat_params(opt)
        self._keys, self._others, self._others_home = {}, {}, {}
        self._live_state = []
        for i, p in enumerate(self._params):
            if p not in opt.state:
                continue
            keys: list[str] = []
            for k, v in opt.state[p].items():
                if _buffered(v):
                    keys.append(k)
                    self._live_state.append(v)
                else:
                    self._others.setdefault(i, {})[k] = None
            self._keys[i] = keys
        self._state_devices = [t.device for t in self._live_state]
        saved, self._stage = self._alloc_all(self._params + self._live_state)
        self._saved_params, self._saved_state = saved[:len(self._params)], saved[len(self._params):]
        self._buffers = self._live_buffers()
        self._saved_buffers, self._buffer_stage = self._alloc_all(self._buffers)
        self._fp = _fingerprint(opt, self._buffers)
        self._param_layout = _layout(self._params)
        self._verify = 2

    def _gather_state(self) -> list[torch.Tensor] | None:
        """The live state tensors in captured order, or ``None`` if the layout changed."""
        state, live = self.optimizer.state, []
        for i, keys in self._keys.items():
            entry = state.get(self._params[i], {})
            for k in keys:
                t = entry.get(k)
                if not _buffered(t):
                    return None
                live.append(t)
        return live

    def _stale(self) -> bool:
        if self._fp != _fingerprint(self.optimizer, self._buffers):
            return True
        if self._param_layout != _layout(self._params):   # model.double(), .to(device)
            return True
        state = self.optimizer.state  # a non-tensor entry that became a tensor (SGD momentum)
        return any(_buffered(state[self._params[i]].get(k))
                   for i, ks in self._others.items() for k in ks)

    # -- capture / restore ----------------------------------------------------------------
    @torch.no_grad()
    def capture(self, step: int = 0, **meta: Any) -> None:
        """Copy the live state into this snapshot (asynchronously in host mode on CUDA)."""
        if self._fp is None or self._stale():
            self.wait()
            self._rebuild()
        elif self._verify > 0 or self._regather:
            self._verify -= 1
            live_state = self._gather_state()
            if live_state is None or any(
                    a.shape != b.shape or a.dtype != b.dtype for a, b in zip(live_state, self._saved_state)):
                self.wait()
                self._rebuild()
            elif any(a is not b for a, b in zip(live_state, self._live_state)):
                self._regather = True
                self._live_state = live_state
        live = _locals(self._params) + _locals(self._live_state)
        saved = self._saved_params + self._saved_state
        stage = self._stage
        if self._side:
            rest = range(len(saved)) if stage is None else stage.rest
            work = _by_device([saved[i] for i in rest], [live[i] for i in rest])
            for device in () if stage is None else stage.rounds:
                work.setdefault(device, ([], []))
            for device, (dst, src) in work.items():
                staged = stage is not None and device in stage.rounds
                chunk = self._chunk("state", device, stage.nbytes[device]) if staged else None
                if device.type != "cuda":
                    if dst:
                        torch._foreach_copy_(dst, src)
                    if staged:
                        stage.copy_out(device, chunk, live, False)
                    continue
                stream = self._side_stream(device)
                stream.wait_stream(torch.cuda.current_stream(device))
                with torch.cuda.stream(stream):   # the chunk's reuse is ordered on this stream
                    if dst:
                        torch._foreach_copy_(dst, src, non_blocking=True)
                    if staged:
                        stage.copy_out(device, chunk, live, True)
                self._streams[device][1].record(stream)
            self._in_flight = live   # held until wait(): a replaced tensor is not reused mid-copy
        elif live:
            self._copy(saved, live, stage, "state", out=True)
        if self._buffers:
            self._copy(self._saved_buffers, self._buffers, self._buffer_stage, "buffers", out=True)
            if self._pin:   # pinned D2H copies on the current streams: events to wait on
                for device in {b.device for b in self._buffers if b.is_cuda}:
                    event = self._buffer_events.setdefault(device, torch.cuda.Event())
                    event.record(torch.cuda.current_stream(device))
        state = self.optimizer.state
        host = torch.device("cpu") if self.mode == "host" else None   # never a device clone
        for i, ks in self._others.items():
            entry = state[self._params[i]]
            self._others[i] = {k: _tree_to(entry[k], host) for k in ks if k in entry}
            if host is not None:   # where each key's tensors live, to put them back there
                self._others_home.update({(i, k): _first_device(entry[k]) for k in ks if k in entry})
        self._param_versions = _versions(self._params)
        self.step, self.meta = step, dict(meta)

    def wait(self) -> None:
        """Make each device's current CUDA stream wait for a pending capture (no host sync)."""
        for device, (_, event) in self._streams.items():
            torch.cuda.current_stream(device).wait_event(event)
        self._in_flight = None   # later frees are ordered after the copy on the current stream

    def synchronize(self) -> None:
        """Block the host until the snapshot's buffers hold the last capture (on the copies'
        own events, every device; no device-wide synchronize)."""
        for _, event in self._streams.values():
            event.synchronize()
        for event in self._buffer_events.values():
            event.synchronize()

    @property
    def captured(self) -> bool:
        return self.step >= 0

    def written_since_capture(self) -> bool:
        """Whether anything wrote the live parameters since the last capture (a checkpoint
        loaded, ``model.double()``): read from the tensors' write counters, no sync."""
        params = _flat_params(self.optimizer)
        return (not self.captured or len(params) != len(self._param_versions)
                or _layout(params) != self._param_layout or _versions(params) != self._param_versions)

    def matches_live_params(self) -> bool:
        """Whether the saved parameters equal the live ones, value for value (a host copy is
        compared on the parameter's device). A pass over both, and syncs: for rare checks
        (a write the version counters cannot see, such as ``p.data.mul_()``)."""
        self.synchronize()
        live = _flat_params(self.optimizer)
        return len(live) == len(self._saved_params) and all(
            a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b.to(a.device))
            for a, b in zip((_local(p.detach()) for p in live), self._saved_params))

    @torch.no_grad()
    def restore(self) -> None:
        """Write the snapshot back into params, optimizer state, buffers and RNG, exactly.

        State created after the capture (lazy optimizer state, new parameter groups) is
        dropped; parameters the snapshot does not know keep their values.
        """
        if not self.captured:
            raise RuntimeError("Snapshot.restore() called before any capture().")
        self.wait()
        opt = self.optimizer
        live = _locals(self._params) + _locals(self._relayout_state())  # resolved afresh
        saved = self._saved_params + self._saved_state
        if live:   # after wait(): the state chunk is no longer read by a capture
            self._copy(live, saved, self._stage, "state", out=False)
        if self._buffers:
            self._copy(self._buffers, self._saved_buffers, self._buffer_stage, "buffers", out=False)
        for i, values in self._others.items():
            home = self._params[i].device if self.mode == "host" else None
            opt.state[self._params[i]].update(
                {k: _tree_to(v, self._others_home.get((i, k), home) if home is not None else None)
                 for k, v in values.items()})
        fp = _fingerprint(opt, self._buffers)  # params added since capture: rebuild next time
        self._fp = fp if fp[3] == len(self._params) else None

    def _relayout_state(self) -> list[torch.Tensor]:
        """Bring the live optimizer state back to the captured layout; return its tensors."""
        opt = self.optimizer
        known = {id(p): i for i, p in enumerate(self._params)}
        for p in list(opt.state):
            i = known.get(id(p))
            if i is None or (i not in self._keys and i not in self._others):
                del opt.state[p]
        live, pos = [], 0
        for i, keys in self._keys.items():
            entry = opt.state[self._params[i]]
            allowed = set(keys) | set(self._others.get(i, ()))
            for k in [k for k in entry if k not in allowed]:
                del entry[k]
            for k in keys:
                saved, device = self._saved_state[pos], self._state_devices[pos]
                cur = entry.get(k)
                if not (isinstance(cur, torch.Tensor) and _local(cur).shape == saved.shape
                        and cur.dtype == saved.dtype and cur.device == device):
                    cur = entry[k] = torch.empty(saved.shape, dtype=saved.dtype, device=device)
                live.append(cur)
                pos += 1
        self._live_state = live
        return live

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
            self._params.append(p)
            saved = self._alloc(p)
            saved.copy_(_local(p))
            self._saved_params.append(saved)
        self._fp = None
        self._stage = None   # its indices count the state after the params: copy one by one

    def copy_from(self, other: "Snapshot") -> None:
        """Make this snapshot equal to ``other`` (same optimizer), reusing its own buffers."""
        other.synchronize()
        self.synchronize()
        sizes = lambda s: (len(s._saved_params), len(s._saved_state), len(s._saved_buffers))  # noqa: E731
        if self._fp != other._fp or sizes(self) != sizes(other):
            self._params = list(other._params)
            self._live_state = list(other._live_state)
            n = len(other._saved_params)
            plan = None if other._stage is None else other._stage.plan
            saved, self._stage = self._alloc_all(other._saved_params + other._saved_state, plan or ([], []))
            self._saved_params, self._saved_state = saved[:n], saved[n:]
            self._state_devices = list(other._state_devices)
            self._buffers = list(other._buffers)
            plan = None if other._buffer_stage is None else other._buffer_stage.plan
            self._saved_buffers, self._buffer_stage = self._alloc_all(other._saved_buffers, plan or ([], []))
            self._keys = {i: list(k) for i, k in other._keys.items()}
            self._fp = other._fp
        with torch.no_grad():
            for dst, src in ((self._saved_params, other._saved_params),
                             (self._saved_state, other._saved_state),
                             (self._saved_buffers, other._saved_buffers)):
                if dst:
                    torch._foreach_copy_(dst, src)
        self._others = copy.deepcopy(other._others)
        self._others_home = dict(other._others_home)
        self._param_layout, self._param_versions = list(other._param_layout), list(other._param_versions)
        self._verify, self._regather = other._verify, other._regather
        self.step, self.meta = other.step, dict(other.meta)

    def nbytes(self) -> int:
        """Bytes held by this snapshot's buffers."""
        return sum(t.numel() * t.element_size()
                   for t in self._saved_params + self._saved_state + self._saved_buffers)

    # -- serialisation --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Plain data (tensors, ints, floats, lists, dicts): ``weights_only=True`` loads it."""
        self.synchronize()
        state: dict[int, dict[str, Any]] = {}
        pos = 0
        for i, keys in self._keys.items():
            entry = state.setdefault(i, {})
            for k in keys:
                entry[k] = self._saved_state[pos]
                pos += 1
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
        from .validation import optimizer_state, tensors_finite
        if not isinstance(sd, dict) or not {"step", "meta", "params", "state", "buffers"} <= sd.keys():
            raise ValueError(f"{key} must be a snapshot state (a dict with 'step', 'meta', "
                             f"'params', 'state', 'buffers'), got {type(sd).__name__}; pass the "
                             "unmodified state_dict.")
        params = _flat_params(self.optimizer)
        saved = sd["params"]
        if not isinstance(saved, (list, tuple)) or not all(isinstance(s, torch.Tensor) for s in saved) \
                or len(saved) != len(params) or any(s.shape != _local(p).shape for s, p in zip(saved, params)):
            shapes = [tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
                      for s in saved][:4] if isinstance(saved, (list, tuple)) else saved
            raise ValueError(
                f"{key}['params'] does not match this optimizer's parameters: it holds "
                f"{len(saved) if isinstance(saved, (list, tuple)) else '?'} tensors shaped "
                f"{shapes}..., the optimizer has {len(params)} shaped "
                f"{[tuple(p.shape) for p in params][:4]}...; load a state_dict saved from the "
                "same model and parameter groups.")
        tensors_finite(f"{key}['params']", saved)
        buffers = self._live_buffers()
        if not isinstance(sd["buffers"], (list, tuple)) or (sd["buffers"] and (
                len(sd["buffers"]) != len(buffers) or any(
                not isinstance(s, torch.Tensor) or s.shape != b.shape
                for s, b in zip(sd["buffers"], buffers)))):
            raise ValueError(
                f"{key}['buffers'] does not match the module's buffers (count or shapes "
                "differ); pass the same module=... the state was saved with.")
        tensors_finite(f"{key}['buffers']", sd["buffers"])
        if not isinstance(sd["state"], dict):
            raise ValueError(f"{key}['state'] must be a dict, got {type(sd['state']).__name__}.")
        optimizer_state(f"{key}['state']", {int(i): e for i, e in sd["state"].items()}, params)
        if isinstance(sd["step"], bool) or not isinstance(sd["step"], int) or sd["step"] < -1:
            raise ValueError(f"{key}['step'] must be an int >= -1, got {sd['step']!r}.")

    @torch.no_grad()
    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Fill this snapshot from :meth:`state_dict` output (call ``check_state_dict`` first)."""
        self.synchronize()
        opt = self.optimizer
        self._params = _flat_params(opt)
        self._saved_params = [self._alloc(p) for p in self._params]
        torch._foreach_copy_(self._saved_params, [t.to(p.dtype) for t, p in zip(sd["params"], self._params)])
        self._keys, self._others, self._saved_state, self._state_devices = {}, {}, [], []
        for i, entry in sorted((int(i), e) for i, e in sd["state"].items()):
            keys, param = [], self._params[i]
            live = opt.state.get(param, {})
            for k, v in entry.items():
                if _buffered(v):
                    keys.append(k)
                    cur = live.get(k)
                    device = (cur.device if isinstance(cur, torch.Tensor)
                              else param.device if v.dim() else torch.device("cpu"))
                    buf = self._alloc(v, device)
                    buf.copy_(v)
                    self._saved_state.append(buf)
                    self._state_devices.append(device)
                else:
                    self._others.setdefault(i, {})[k] = copy.deepcopy(v)
            self._keys[i] = keys
        self._buffers = self._live_buffers() if sd["buffers"] else []
        self._saved_buffers = [self._alloc(b) for b in self._buffers]
        for dst, src in zip(self._saved_buffers, sd["buffers"]):
            dst.copy_(src)
        self._param_layout = _layout(self._params)
        self.step, self.meta = int(sd["step"]), dict(sd["meta"])
        self._fp = None  # live tensors are resolved at the next restore/capture
        self._live_state = []
        self._stage = self._buffer_stage = None   # one buffer each; staged again at the next capture


class SnapshotRing:
    """Older verified snapshots, newest last, to reach back past damage accepted earlier.

    ``push(src)`` copies a snapshot into the ring, reusing the oldest slot's buffers once
    the ring is full. ``older_than(step)`` lists entries captured before ``step``, newest
    first; ``drop_from(step)`` forgets entries at or after ``step`` (they descend from the
    damage a rollback escapes).
    """

    def __init__(self, capacity: int, factory):
        self.capacity = capacity
        self._factory = factory
        self._slots: list[Snapshot] = []

    def __len__(self) -> int:
        return len(self._slots)

    def __iter__(self):
        return iter(self._slots)

    def push(self, src: Snapshot) -> None:
        if self.capacity <= 0:
            return
        slot = self._slots.pop(0) if len(self._slots) >= self.capacity else self._factory()
        slot.copy_from(src)
        self._slots.append(slot)

    def newest_before(self, step: int) -> Snapshot | None:
        for snap in reversed(self._slots):
            if snap.step < step:
                return snap
        return None

    def drop_from(self, step: int) -> None:
        self._slots = [s for s in self._slots if s.step < step]

    def state_dict(self) -> list[dict[str, Any]]:
        return [s.state_dict() for s in self._slots]

    def load_state_dict(self, entries: Iterable[dict[str, Any]]) -> None:
        self._slots = []
        for sd in entries:
            slot = self._factory()
            slot.load_state_dict(sd)
            self._slots.append(slot)
