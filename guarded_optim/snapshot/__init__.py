"""Exact copies of a training state, for rollback (paper 001, Assumption 7.1 and sec. 8.2).

A :class:`Snapshot` holds the parameters, the inner optimizer's per-parameter state (every
tensor, step counters included) and the module's buffers (BatchNorm statistics). Buffers
are allocated once per layout, in the live tensors' own dtypes (a bf16 parameter costs 2
bytes), and filled with ``torch._foreach_copy_``; ``restore()`` writes them back bit for bit.
RNG states are *not* part of a snapshot: a rollback moves the model back, never the data
stream (see :mod:`..rng`).

Invariant: after ``restore()`` the live state equals the state at the last ``capture()``
exactly (a parameter moved to another dtype or device since, by ``model.double()`` or
``.to()``, is re-laid out at the next capture), and optimizer state that did not exist then
(Adam's lazy state, a parameter group added later) is dropped. ``lr``, ``initial_lr`` and
the rest of ``param_groups`` are never part of a snapshot: LR schedulers own them.

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

Modules, one concern each:

* :mod:`.layout`    -- *what* is copied: the live tensors, optimizer-state keys and devices
  of a capture (:class:`~.layout.Layout`), whether that layout still fits, and the copies
  of non-tensor optimizer state.
* :mod:`.transport` -- *how* bytes move: buffer allocation (pinned or not), the staging plan
  and chunks, CUDA side streams and events (:class:`~.transport.Transport`).
* :mod:`.core`      -- :class:`Snapshot`, the stateful shell over both.
* :mod:`.ring`      -- :class:`SnapshotRing`, older snapshots.

The staging knobs below are read from this module at call time, so setting
``guarded_optim.snapshot.STAGE_BYTES`` (or monkeypatching it) takes effect at the next
layout.
"""

from __future__ import annotations

from .core import MODES, Snapshot
from .layout import _flat_params  # noqa: F401  (callers and tests reach it here)
from .ring import SnapshotRing
from .transport import plan_groups

__all__ = ["Snapshot", "SnapshotRing", "MODES", "STAGE_BYTES", "STAGE_TENSOR_BYTES", "plan_groups"]

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
