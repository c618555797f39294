"""Random-number streams: the guard reads and saves them, and never rewinds them on its own.

The contract (tested):

* A rollback restores the model (parameters, optimizer state, buffers), never the data
  stream: the RNG streams that feed ``torch.randint`` batch draws, ``randperm`` shuffles
  and dropout masks move on, so a rejected batch is not drawn again.
* The guard's own work (the probe, :class:`~guarded_optim.policy.Escape`) runs inside
  :func:`isolated`, so it neither consumes nor disturbs the user's streams: a guarded run
  with no intervention is bit-identical to bare, with or without ``module=``.
* ``GuardedOptimizer.state_dict()`` carries this rank's RNG states (:func:`capture`), as the
  design card asks; ``load_state_dict`` does *not* impose them on the process (forks of one
  checkpoint seeded differently stay different, and ranks that load rank 0's file keep their
  own streams). ``GuardedOptimizer.restore_rng_state(sd)`` restores them on request, for a
  bit-identical resume; it refuses a state saved by another rank.

Only the CPU generator and the *current* CUDA device's generator are saved and restored.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch

__all__ = ["capture", "restore", "check", "isolated"]


def _cuda_device() -> int | None:
    """The current CUDA device, if CUDA is initialised (never initialises it)."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.current_device()
    return None


def _rank() -> int:
    import torch.distributed as dist
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def capture() -> dict[str, Any]:
    """This process's RNG states as plain data: the CPU generator, the current CUDA device's
    generator (when CUDA is initialised) and the rank that saved them."""
    state: dict[str, Any] = {"rank": _rank(), "cpu": torch.get_rng_state()}
    device = _cuda_device()
    if device is not None:
        state["cuda"], state["cuda_device"] = torch.cuda.get_rng_state(device), device
    return state


def check(state: Any, key: str = "state_dict['guard']['rng']") -> None:
    """Raise ``ValueError`` naming ``key`` if ``state`` is not :func:`capture` output."""
    if not isinstance(state, dict) or not isinstance(state.get("cpu"), torch.Tensor) \
            or state["cpu"].dtype != torch.uint8 or state["cpu"].dim() != 1:
        raise ValueError(f"{key} is not an RNG state saved by guarded_optim (expected a dict "
                         "with a uint8 'cpu' tensor); pass the unmodified state_dict.")
    if state["cpu"].numel() != torch.get_rng_state().numel():
        raise ValueError(f"{key}['cpu'] has {state['cpu'].numel()} bytes, a CPU generator state "
                         f"has {torch.get_rng_state().numel()}; pass the unmodified state_dict.")
    cuda = state.get("cuda")
    if cuda is not None and (not isinstance(cuda, torch.Tensor) or cuda.dtype != torch.uint8):
        raise ValueError(f"{key}['cuda'] must be a uint8 tensor (a CUDA generator state).")


def restore(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture` (the CUDA state only if CUDA is initialised now)."""
    torch.set_rng_state(state["cpu"])
    device = _cuda_device()
    if state.get("cuda") is not None and device is not None:
        torch.cuda.set_rng_state(state["cuda"], device)


@contextlib.contextmanager
def isolated() -> Iterator[None]:
    """Run the body on the current RNG states and put them back afterwards (even on error).

    Cheaper than ``torch.random.fork_rng``: one CPU state (5 kB) and the current CUDA
    device's state only; no device sync.
    """
    cpu = torch.get_rng_state()
    device = _cuda_device()
    cuda = torch.cuda.get_rng_state(device) if device is not None else None
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state(cuda, device)
