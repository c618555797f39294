"""How a snapshot's bytes move: buffers, staging, CUDA side streams and events.

:func:`plan_groups` decides (from metadata) which tensors a host snapshot stages and in
which rounds; :class:`_Staging` lays those host copies out as views of flat host buffers and
moves them through a device chunk; :class:`Transport` owns the device resources of one
snapshot (side streams and their events, buffer-copy events, staging chunks, the live tensors
of a capture in flight) and runs the copy-out (capture) and copy-in (restore) paths.

Ordering contract on CUDA (host mode):

* params + optimizer state are copied on a per-device *side stream* that first waits on the
  current stream; an event is recorded on the side stream after the copies, and
  :meth:`Transport.wait` makes the current stream wait on it. The live tensors read are held
  (``in_flight``) until then, so a replaced tensor is not freed and reused mid-copy.
* the side stream's staging chunk is reused across rounds and captures in that stream's
  order, and is marked used on it (``record_stream``) so freeing it waits for the copies.
* module buffers are copied on the *current* stream (they change during the forward pass);
  with pinned memory an event per device is recorded after them, for
  :meth:`Transport.synchronize`.
* restores run on the current stream, after :meth:`Transport.wait`.

The staging knobs (``STAGE_BYTES``, ``STAGE_TENSOR_BYTES``, ``_STAGE_DEVICE_TYPES``) live in
the package :mod:`guarded_optim.snapshot` and are read from it at call time.
"""

from __future__ import annotations

from typing import Any

import torch

from .layout import _local


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
    from . import _STAGE_DEVICE_TYPES, STAGE_BYTES, STAGE_TENSOR_BYTES   # at call time: patchable
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
        groups.append((device, dtype, *_rounds(tensors, members, chunk_bytes)))
    return groups, sorted(rest)


def _rounds(tensors: list[torch.Tensor], members: list[int], chunk_bytes: int) -> tuple[int, list]:
    """``(numel, rounds)`` of one (device, dtype) group of :func:`plan_groups`: consecutive
    slices of one flat buffer, cut into rounds of at most ``chunk_bytes``."""
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
    return offset, rounds


def _by_device(dst: list[torch.Tensor], src: list[torch.Tensor]) -> dict[torch.device, tuple]:
    """``(dst, src)`` pairs grouped by the source's device, order kept within each group."""
    groups: dict[torch.device, tuple[list, list]] = {}
    for d, t in zip(dst, src):
        pair = groups.setdefault(t.device, ([], []))
        pair[0].append(d)
        pair[1].append(t)
    return groups


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
                self._add_round(device, flat, members, templates)
        self._chunk_views: dict[torch.device, tuple] = {}

    def _add_round(self, device: torch.device, flat: torch.Tensor, members: list[tuple],
                   templates: list[torch.Tensor]) -> None:
        """Record one round: its host views, its slice of ``flat`` and its chunk layout."""
        start = members[0][1]
        n = members[-1][1] + members[-1][2] - start
        layout = []
        for i, off, _ in members:
            shape, stride = templates[i].shape, templates[i].stride()
            self.views[i] = flat.as_strided(shape, stride, off)
            layout.append((shape, stride, off - start))
        nbytes = n * flat.element_size()
        self.rounds.setdefault(device, []).append(
            (flat.dtype, flat[start:start + n], nbytes, [m[0] for m in members], layout))
        self.nbytes[device] = max(self.nbytes.get(device, 0), nbytes)

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


class Transport:
    """Buffer allocation and the copies of one snapshot, with its device resources.

    Args:
        host: host mode (buffers in CPU memory) rather than device mode (beside the tensors).
        side: copy params + state on CUDA side streams (host mode with CUDA parameters).

    Buffers are pinned in host mode when CUDA is available. Streams, events, chunks and the
    tensors of a capture in flight are not pickled or deep-copied: they are made anew on
    first use.
    """

    def __init__(self, host: bool, side: bool):
        self.host = host
        self.pin = host and torch.cuda.is_available()
        self.side = side                                    # copies run on side streams
        self.streams: dict[torch.device, tuple] = {}        # CUDA device -> (side stream, its event)
        self.buffer_events: dict[torch.device, Any] = {}    # buffers copied on the current streams
        self.chunks: dict[tuple, torch.Tensor] = {}         # (role, device) -> device staging chunk
        self.in_flight: list[torch.Tensor] | None = None    # live tensors a side-stream copy reads

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state.update(streams={}, buffer_events={}, chunks={}, in_flight=None)   # made anew
        return state

    # -- allocation -----------------------------------------------------------------------
    def alloc(self, t: torch.Tensor, device: torch.device | None = None) -> torch.Tensor:
        """A buffer for ``t`` in its own dtype, beside it (device mode, or on ``device``) or
        in host memory; only the shape is read, nothing is copied."""
        t = _local(t)
        if not self.host:
            if device is None or device == t.device:
                return torch.empty_like(t, memory_format=torch.preserve_format)
            return torch.empty(t.shape, dtype=t.dtype, device=device)
        # preserve_format keeps the live strides of a dense tensor (channels_last), so D2H and
        # H2D copies need no contiguous temporary on the GPU
        return torch.empty_like(t.detach(), device="cpu", pin_memory=self.pin,
                                memory_format=torch.preserve_format)

    def alloc_all(self, templates: list[torch.Tensor], plan: tuple | None = None,
                  ) -> tuple[list[torch.Tensor], _Staging | None]:
        """Buffers for ``templates`` and their staging: in host mode the tensors that
        :func:`plan_groups` stages (or ``plan``, for templates that are another snapshot's
        buffers) get views of flat host buffers, the rest one buffer each (:meth:`alloc`)."""
        if plan is None and self.host:
            plan = plan_groups([_local(t) for t in templates])
        if plan is None or not plan[0]:
            return [self.alloc(t) for t in templates], None
        stage = _Staging(plan, [_local(t) for t in templates], self.pin)
        return [stage.views[i] if i in stage.views else self.alloc(t)
                for i, t in enumerate(templates)], stage

    def side_stream(self, device: torch.device):
        """The side stream of CUDA ``device``, made on first use with its event: one per
        device, for models spread over several GPUs."""
        if device not in self.streams:
            self.streams[device] = (torch.cuda.Stream(device=device), torch.cuda.Event())
        return self.streams[device][0]

    def _chunk(self, role: str, device: torch.device, nbytes: int) -> torch.Tensor:
        """The device staging chunk of ``role`` ("state": side stream, "buffers": current
        stream), at least ``nbytes``; grown, never shrunk (``nbytes <= STAGE_BYTES``). It is
        allocated on the current stream; the state chunk is marked used on the side stream,
        so that freeing it (a grown chunk, a dropped snapshot) never hands its block out
        while a capture still reads it."""
        chunk = self.chunks.get((role, device))
        if chunk is None or chunk.numel() < nbytes:
            chunk = self.chunks[(role, device)] = torch.empty(nbytes, dtype=torch.uint8, device=device)
            if role == "state" and self.side and device.type == "cuda":
                chunk.record_stream(self.side_stream(device))
        return chunk

    def staging_nbytes(self) -> int:
        """Device bytes held by the staging chunks (host mode on CUDA; 0 otherwise)."""
        return sum(c.numel() for c in self.chunks.values())

    # -- copies ---------------------------------------------------------------------------
    def copy(self, dst: list[torch.Tensor], src: list[torch.Tensor], stage: _Staging | None,
             role: str, out: bool) -> None:
        """``dst <- src`` on the current streams, staged where ``stage`` says; ``out``: a
        capture (live -> saved), else a restore (saved -> live)."""
        if stage is None:
            torch._foreach_copy_(dst, src, non_blocking=self.pin)
            return
        if stage.rest:
            torch._foreach_copy_([dst[i] for i in stage.rest], [src[i] for i in stage.rest],
                                 non_blocking=self.pin)
        for device in stage.rounds:
            chunk = self._chunk(role, device, stage.nbytes[device])
            if out:
                stage.copy_out(device, chunk, src, self.pin)
            else:
                stage.copy_in(device, chunk, dst, self.pin)

    def capture_state(self, saved: list[torch.Tensor], live: list[torch.Tensor],
                      stage: _Staging | None) -> None:
        """Params + optimizer state, live -> saved: on the side streams (asynchronous, see
        the module docstring) when :attr:`side`, else on the current streams."""
        if self.side:
            self._capture_on_side(saved, live, stage)
        elif live:
            self.copy(saved, live, stage, "state", out=True)

    def _capture_on_side(self, saved: list[torch.Tensor], live: list[torch.Tensor],
                         stage: _Staging | None) -> None:
        """Per device: the side stream waits on the current stream, copies the per-tensor
        rest and the staged rounds, and records its event. Non-CUDA tensors are copied at
        once. ``live`` is held in :attr:`in_flight` until :meth:`wait`."""
        rest = range(len(saved)) if stage is None else stage.rest
        work = _by_device([saved[i] for i in rest], [live[i] for i in rest])
        for device in () if stage is None else stage.rounds:
            work.setdefault(device, ([], []))
        for device, (dst, src) in work.items():
            staged = stage is not None and device in stage.rounds
            chunk = self._chunk("state", device, stage.nbytes[device]) if staged else None
            if device.type != "cuda":
                _copy_out(dst, src, stage if staged else None, device, chunk, live, False)
                continue
            stream = self.side_stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):   # the chunk's reuse is ordered on this stream
                _copy_out(dst, src, stage if staged else None, device, chunk, live, True)
            self.streams[device][1].record(stream)
        self.in_flight = live   # held until wait(): a replaced tensor is not reused mid-copy

    def capture_buffers(self, saved: list[torch.Tensor], live: list[torch.Tensor],
                        stage: _Staging | None) -> None:
        """Module buffers, live -> saved, on the current streams; pinned copies record an
        event per CUDA device for :meth:`synchronize`."""
        self.copy(saved, live, stage, "buffers", out=True)
        self.mark_pinned_copies(live)

    def mark_pinned_copies(self, live: list[torch.Tensor]) -> None:
        """Pinned copies on the current streams (a capture's module buffers, every restore)
        use the host buffers until they run: record an event per CUDA device of ``live``,
        which :meth:`synchronize` waits on before the host touches the buffers again
        (``copy_from``, ``load_state_dict``, ``add_params``, ``state_dict``)."""
        if self.pin:
            for device in {t.device for t in live if t.is_cuda}:
                event = self.buffer_events.setdefault(device, torch.cuda.Event())
                event.record(torch.cuda.current_stream(device))

    def wait(self) -> None:
        """Make each device's current CUDA stream wait for a pending capture (no host sync)."""
        for device, (_, event) in self.streams.items():
            torch.cuda.current_stream(device).wait_event(event)
        self.in_flight = None   # later frees are ordered after the copy on the current stream

    def synchronize(self) -> None:
        """Block the host until the buffers hold the last capture (on the copies' own
        events, every device; no device-wide synchronize)."""
        for _, event in self.streams.values():
            event.synchronize()
        for event in self.buffer_events.values():
            event.synchronize()


def _copy_out(dst: list[torch.Tensor], src: list[torch.Tensor], stage: _Staging | None,
              device: torch.device, chunk: torch.Tensor | None, live: list[torch.Tensor],
              non_blocking: bool) -> None:
    """One device's share of a capture on the current stream: the per-tensor ``dst <- src``
    and, when ``stage`` is given, its staged rounds of ``live`` through ``chunk``."""
    if dst:
        torch._foreach_copy_(dst, src, non_blocking=non_blocking)
    if stage is not None:
        stage.copy_out(device, chunk, live, non_blocking)
