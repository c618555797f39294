"""Every rank takes the same decision (``torch.distributed``).

Under data parallelism each rank measures its own step: its own gradients (identical after
DDP's all_reduce, unless one rank's are damaged after backward), its own training loss, its
own probe (each rank may probe its own shard of the held-out set). If the ranks decided
alone, one could skip or roll back while another applies the step: the replicas diverge,
and the next collective pairs mismatched calls and hangs. So the guard reduces every host
transfer of a step across ranks *before* reading it:

* the guard packs the flags and measurements of one transfer into one vector (it already
  does, to read them in one host sync);
* :func:`agree` sums that vector over the ranks with ONE ``all_reduce``;
* a flag (0 or 1 on each rank) is then ``> 0`` iff any rank fired (``max`` semantics:
  any SKIP or FAILURE anywhere is a SKIP or FAILURE everywhere);
* a measurement (probe value, gradient norm) is divided by the world size: the mean. A
  NaN on one rank makes the mean NaN on every rank, and every rank rejects.

Transfers per step, hence all_reduces: one on an unmeasured step (pre-step flags and the
gradient norm), two on a measured step (then the probe value and the post-step flags). They
cannot be merged: whether to propose at all (the pre-step SKIP) must be agreed before
``inner.step()``, and the probe can only measure what was proposed. The rare re-measurements
(the initial reference ``y(theta_0)``, the rebaseline after repeated rejections) are reduced
the same way, so ``yhat`` is the same number on every rank.

A probe that raises on one rank must not leave the others waiting in that all_reduce: the
raising rank puts an error flag into the vector instead, and after the reduction *every*
rank restores the last verified state and raises :class:`ProbeError` together.

Snapshots stay rank-local: each rank copies the tensors it holds (a full replica under DDP,
its own shards under FSDP2), and a rollback restores them on every rank at the same step.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

__all__ = ["AUTO", "resolve_group", "world_size", "pack", "full_value", "agree", "agree_mean",
           "agree_host", "collective_device", "sharded", "check_world_size"]

AUTO = "auto"


def _dist():
    import torch.distributed as dist
    return dist


def resolve_group(process_group: Any) -> Any:
    """The process group the guard reduces over, or ``None`` for rank-local decisions.

    * ``"auto"`` (the default of ``GuardedOptimizer``): the default group when
      ``torch.distributed`` is available and initialised, else ``None``. Resolved at every
      use, so a group initialised after construction is picked up by ``step()`` (the initial
      reference ``y(theta_0)`` is measured at construction, though: build the guard after
      ``init_process_group``, as you build DDP).
    * a ``ProcessGroup``: that group (e.g. the data-parallel group of a 2-D mesh).
    * ``None`` or ``False``: never reduce; each rank decides alone (independent runs that
      happen to share a process group; never under DDP or FSDP).
    """
    if process_group is None or process_group is False:
        return None
    if isinstance(process_group, str) and process_group == AUTO:
        dist = _dist()
        return dist.group.WORLD if dist.is_available() and dist.is_initialized() else None
    dist = _dist()
    if dist.is_available() and isinstance(process_group, dist.ProcessGroup):
        return process_group
    raise TypeError(f"Invalid process_group: {process_group!r}; pass 'auto' (the default group "
                    "when one is initialised), a torch.distributed.ProcessGroup, or None/False "
                    "for rank-local decisions.")


def world_size(group: Any) -> int:
    """Ranks in ``group`` (1 for ``None``: no reduction)."""
    return 1 if group is None else _dist().get_world_size(group)


def pack(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """One flat vector of a step's flags and measurements, ready for :func:`agree`.

    Under FSDP2 the signals measure ``DTensor`` parameters and gradients, so some parts are
    ``DTensor``: each becomes its full value (no communication for a replicated flag; a
    pending partial sum, such as a sharded gradient norm, is reduced here). Plain tensors
    are concatenated as they are.
    """
    return torch.cat([full_value(p) for p in parts])


def full_value(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor holding the full value of ``t`` (``DTensor.full_tensor()``), or ``t``."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def agree(values: torch.Tensor, means: Sequence[int], group: Any,
          device: torch.device | Callable[[], torch.device | None] | None = None) -> torch.Tensor:
    """``values`` summed over the ranks of ``group``, ``means`` entries averaged.

    ``values`` packs one host transfer: flags (0/1; after the sum, ``> 0`` iff any rank
    fired) and measurements at the indices ``means`` (after the sum, divided by the world
    size). One ``all_reduce``, on the device the group's backend can reduce on
    (:func:`collective_device`; ``device`` is the parameters' accelerator, if any, or a
    function returning it, called only when there is more than one rank); no host
    sync of its own (the caller reads the result). With ``group=None`` or one rank,
    ``values`` is returned untouched, so a single process behaves bit for bit as without
    this module.
    """
    n = world_size(group)
    if n == 1:
        return values
    if callable(device):        # found only when a collective needs it (a scan of the params)
        device = device()
    where = collective_device(str(_dist().get_backend(group)), values.device, device)
    buf = values if where == values.device else values.to(where)
    _dist().all_reduce(buf, op=_dist().ReduceOp.SUM, group=group)
    for i in means:
        buf[i] /= n
    return buf


def agree_mean(y: float, group: Any, device: torch.device | None = None) -> float:
    """The mean of a host scalar over the ranks (one ``all_reduce``, one sync); ``y`` alone
    without a group. For the rare re-measurements of the probe outside the step's transfer."""
    return agree_host([y], [0], group, device)[0]


def agree_host(values: Sequence[float], means: Sequence[int], group: Any,
               device: torch.device | Callable[[], torch.device | None] | None = None
               ) -> list[float]:
    """:func:`agree` for host numbers (flags and measurements read outside a step's transfer,
    or rank-local decisions that gate a collective): the values themselves without a group."""
    if world_size(group) == 1:
        return list(values)
    return agree(torch.tensor(list(values), dtype=torch.float64), means, group, device).tolist()


def collective_device(backend: str, tensor: torch.device, accelerator: torch.device | None) -> torch.device:
    """Where a vector on ``tensor``'s device can be all_reduced by ``backend``.

    * a backend that serves the tensor's device type (``"gloo"`` for CPU and CUDA tensors,
      ``"cpu:gloo,cuda:nccl"`` for both) reduces it where it is: no copy;
    * a CUDA-only backend (``"nccl"``) gets a CPU vector (flags of a step with no gradient, a
      CPU-offloaded FSDP2 model) moved to ``accelerator``, the device of the parameters this
      rank trains -- never ``cuda:current_device()``, which is ``cuda:0`` on every rank that
      did not call ``set_device``. For CPU offload under NCCL, initialise the group as
      ``init_process_group("cpu:gloo,cuda:nccl")`` and nothing is copied.
    """
    backend = backend.lower()
    kind = tensor.type
    if backend in ("gloo", "mpi"):
        return tensor                       # they reduce CPU (and gloo CUDA) tensors
    served = {part.split(":")[0] for part in backend.split(",") if ":" in part}
    if kind in served or (not served and kind != "cpu"):
        return tensor
    if accelerator is not None and accelerator.type != "cpu":
        return accelerator
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    raise RuntimeError(f"process group backend {backend!r} cannot reduce a {kind} tensor and no "
                       "accelerator holds this rank's parameters; use "
                       "init_process_group('cpu:gloo,cuda:nccl').")


def sharded(params: Sequence[torch.Tensor]) -> bool:
    """Whether any of ``params`` is a sharded ``DTensor`` (FSDP2): each rank's snapshot then
    holds its own shard, and a guard state saved on N ranks fits only N ranks."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch.distributed not built
        return False
    return any(isinstance(p, DTensor) and any(pl.is_shard() for pl in p.placements)
               for p in params)


def check_world_size(saved: int | None, current: int, params: Sequence[torch.Tensor]) -> None:
    """Loading a guard state saved on ``saved`` ranks into ``current`` ranks.

    Replicated parameters (DDP, a single process): the guard state is the same on every rank,
    so it loads on any world size. Sharded parameters (FSDP2): the snapshots hold one
    rank's shards, so the world size must match; ``ValueError`` names the fix otherwise.
    ``saved=None`` (a state from before world sizes were recorded) is not checked.
    """
    if saved is None or int(saved) == current or not sharded(params):
        return
    raise ValueError(
        f"state_dict was saved on world size {saved}, this run has {current}, and the "
        "parameters are sharded (FSDP): the guard's snapshots hold per-rank shards. Load it "
        "on the same world size, or load only the inner optimizer's state "
        "(opt.load_state_dict(sd['inner']) resets the guard).")
