"""GradScaler inside the guard: ``scaler.step(guard)`` hands it ``grad_scale``/``found_inf``.

The guard sets ``_step_supports_amp_scaling``, so the scaler adds no host sync of its own:
the guard unscales the gradients once (unless ``scaler.unscale_`` already did) and reads
``found_inf`` with its other flags, in the step's one transfer.
"""

from __future__ import annotations

import torch

__all__ = ["amp_unscale", "found_inf"]


def amp_unscale(grads: list[torch.Tensor], grad_scale: torch.Tensor) -> torch.Tensor:
    """Divide ``grads`` by ``grad_scale`` in place; return ``found_inf`` (1.0 if any is non-finite).

    The kernel and the reciprocal are GradScaler's own (``unscale_``), so the result is bit
    for bit what ``scaler.unscale_`` gives. No host sync.
    """
    found = torch.zeros((), dtype=torch.float32, device=grad_scale.device)
    inv_scale = grad_scale.double().reciprocal().float()
    groups: dict[tuple, list[torch.Tensor]] = {}
    for g in grads:
        groups.setdefault((g.device, g.dtype), []).append(g._values() if g.is_sparse else g)
    with torch.no_grad():
        for (device, _), group in groups.items():
            local = found.to(device) if device != found.device else found
            torch._amp_foreach_non_finite_check_and_unscale_(group, local, inv_scale.to(device))
            if local is not found:
                found += local.to(found.device)
    return found


def found_inf(optimizer, grads: list[torch.Tensor]) -> torch.Tensor | None:
    """GradScaler's ``found_inf`` for this step (``None`` outside ``scaler.step``).

    With ``grad_scale`` set on ``optimizer`` (the scaler's ``unscale_`` was not called),
    divide the gradients by it here, once, in place, exactly as ``unscale_`` would.
    """
    grad_scale = getattr(optimizer, "grad_scale", None)
    found = getattr(optimizer, "found_inf", None)
    if grad_scale is not None:
        unscaled = amp_unscale(grads, grad_scale)
        found = unscaled if found is None else found.to(unscaled.device) + unscaled
    return found
