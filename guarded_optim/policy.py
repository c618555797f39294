"""The recovery actions the guard can compose after a rollback (ARC, sec. 3.2). (``Decision``
lives in :mod:`.outcome`; it is importable from here as before.)"""

from __future__ import annotations

import torch

from .outcome import Action, Decision

__all__ = ["Decision", "RecoveryAction", "ReduceLR", "TightenClip", "Escape", "ResetMoments",
           "arc_recovery"]


class RecoveryAction:
    """Base of the healing actions the guard composes (ARC, sec. 3.2): all hooks optional.

    ``on_rollback`` runs after every rollback (FAILURE or rejected probe) with the number
    of rollbacks in a row and returns the name of what it did, or ``None``; ``on_healthy``
    runs after every applied step that nothing flagged; ``lr_scale`` is the factor the
    guard applies to every group's ``lr`` around ``inner.step()`` only (so LR schedulers
    keep owning the base value).
    """

    name = "action"

    def on_rollback(self, guard, consecutive: int) -> str | None:
        return None

    def on_healthy(self, guard) -> None:
        pass

    def lr_scale(self) -> float:
        return 1.0

    def before_propose(self, guard, grad_norm: torch.Tensor) -> None:
        """Runs just before ``inner.step()`` with the step's gradient norm (device tensor)."""

    def before_rollback(self, guard) -> None:
        """Runs just before the guard restores its snapshot: the rejected state is still live."""

    def wants_checkpoint(self, guard) -> bool:
        """Asked when the guard verifies the live state: ``True`` pushes it into the history
        ring now (a preventive verified snapshot), besides every ``checkpoint_every``."""
        return False

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ReduceLR(RecoveryAction):
    """After a rollback, scale the LR by ``factor`` (down to ``min_scale``); after
    ``patience`` healthy steps in a row, lift the scale back by ``1 / factor`` (up to 1).

    The scale is the guard's own multiplier, applied around ``inner.step()``: the group's
    ``lr`` that schedulers read and write is never changed.
    """

    name = "reduce_lr"

    def __init__(self, factor: float = 0.5, min_scale: float = 1e-3, patience: int = 50):
        if not 0 < factor < 1 or not 0 < min_scale <= 1 or patience < 1:
            raise ValueError(f"Invalid factor={factor!r} / min_scale={min_scale!r} / "
                             f"patience={patience!r}; need 0 < factor < 1, 0 < min_scale <= 1, "
                             "patience >= 1.")
        self.factor, self.min_scale, self.patience = factor, min_scale, patience
        self.scale, self.healthy = 1.0, 0

    def on_rollback(self, guard, consecutive):
        self.scale, self.healthy = max(self.scale * self.factor, self.min_scale), 0
        return f"lr_scale={self.scale:g}"

    def on_healthy(self, guard):
        if self.scale < 1.0:
            self.healthy += 1
            if self.healthy >= self.patience:
                self.scale, self.healthy = min(1.0, self.scale / self.factor), 0

    def lr_scale(self):
        return self.scale

    def state_dict(self):
        return {"scale": self.scale, "healthy": self.healthy}

    def load_state_dict(self, state):
        self.scale, self.healthy = float(state["scale"]), int(state["healthy"])

    def __repr__(self):
        return f"ReduceLR(factor={self.factor}, min_scale={self.min_scale}, patience={self.patience})"


class Escape(RecoveryAction):
    """When rollbacks repeat ``after`` times in a row, perturb the restored weights slightly
    and ask the training loop to skip ahead ``skip_batches`` batches.

    Each parameter gets Gaussian noise of ``scale`` x its own standard deviation, drawn
    from a generator of its own (seeded by ``seed`` and the step), so the global RNG, and
    with it reproducibility, is untouched. The data iterator is the user's: the guard
    reports ``action="escape"`` and ``skip_batches`` in the :class:`StepEvent`, and a
    callback can advance the loader (see the README).
    """

    name = "escape"

    def __init__(self, after: int = 3, scale: float = 1e-3, skip_batches: int = 8, seed: int = 0):
        if after < 1 or scale < 0 or skip_batches < 0:
            raise ValueError(f"Invalid after={after!r} / scale={scale!r} / "
                             f"skip_batches={skip_batches!r}; need after >= 1, scale >= 0, "
                             "skip_batches >= 0.")
        self.after, self.scale, self.skip_batches, self.seed = after, scale, skip_batches, seed
        self.escapes = 0

    def on_rollback(self, guard, consecutive):
        if consecutive % self.after:
            return None
        params = [p for g in guard.param_groups for p in g["params"]]
        gen = torch.Generator().manual_seed(self.seed + guard.step_state.t)
        with torch.no_grad():
            torch._foreach_add_(params, [_noise(p, gen, self.scale) for p in params])
        self.escapes += 1
        return Action.ESCAPE

    def state_dict(self):
        return {"escapes": self.escapes}

    def load_state_dict(self, state):
        self.escapes = int(state["escapes"])

    def __repr__(self):
        return (f"Escape(after={self.after}, scale={self.scale}, skip_batches={self.skip_batches}, "
                f"seed={self.seed})")


class TightenClip(RecoveryAction):
    """For ``duration`` applied steps after a rollback, clip the gradient norm to ``factor``
    x its running reference (an EWMA, ``beta``, of the norms of applied steps).

    The clip coefficient ``min(1, limit / norm)`` stays on the device (no host sync). Outside
    the recovery window it only updates the reference: no clipping behind your back.
    """

    name = "tighten_clip"

    def __init__(self, factor: float = 1.0, duration: int = 50, beta: float = 0.05):
        if not factor > 0 or duration < 1 or not 0 < beta <= 1:
            raise ValueError(f"Invalid factor={factor!r} / duration={duration!r} / beta={beta!r}; "
                             "need factor > 0, duration >= 1, 0 < beta <= 1.")
        self.factor, self.duration, self.beta = factor, duration, beta
        self.reference: torch.Tensor | None = None
        self.left = 0        # clipped steps left in the recovery window
        self.clipped = 0

    def on_rollback(self, guard, consecutive):
        self.left = self.duration
        return "tighten_clip"

    def before_propose(self, guard, grad_norm):
        norm = grad_norm.detach().float()
        if self.reference is None:
            self.reference = norm.clone()
        if self.left > 0:
            grads = [p.grad for g in guard.param_groups for p in g["params"] if p.grad is not None]
            coef = (self.factor * self.reference / (norm + 1e-12)).clamp(max=1.0)
            if grads:
                torch._foreach_mul_(grads, coef.to(grads[0].device))
            self.left -= 1
            self.clipped += 1
            norm = torch.minimum(norm, self.factor * self.reference)
        self.reference = torch.lerp(self.reference, norm, self.beta)

    def state_dict(self):
        return {"reference": self.reference, "left": self.left, "clipped": self.clipped}

    def load_state_dict(self, state):
        self.reference, self.left = state["reference"], int(state["left"])
        self.clipped = int(state["clipped"])

    def __repr__(self):
        return f"TightenClip(factor={self.factor}, duration={self.duration}, beta={self.beta})"


class ResetMoments(RecoveryAction):
    """Opt-in (SPAM-style; listed in the ladder as rung 5): after ``after`` rollbacks in a row, zero the optimizer's
    first-moment buffers (``keys``), so a momentum built from the damaging steps does not
    push the restored weights back into it. Second moments are kept (zeroing them makes
    Adam's next updates huge)."""

    name = "reset_moments"

    def __init__(self, after: int = 2, keys: tuple[str, ...] = ("exp_avg", "momentum_buffer")):
        if after < 1:
            raise ValueError(f"Invalid after: {after!r}; it must be >= 1.")
        self.after, self.keys, self.resets = after, tuple(keys), 0

    def on_rollback(self, guard, consecutive):
        if consecutive < self.after:
            return None
        bufs = [v for st in guard.state.values() for k, v in st.items()
                if k in self.keys and isinstance(v, torch.Tensor)]
        if bufs:
            torch._foreach_zero_(bufs)
        self.resets += 1
        return "reset_moments"

    def state_dict(self):
        return {"resets": self.resets}

    def load_state_dict(self, state):
        self.resets = int(state["resets"])

    def __repr__(self):
        return f"ResetMoments(after={self.after}, keys={self.keys})"


def _noise(p: torch.Tensor, gen: torch.Generator, scale: float) -> torch.Tensor:
    """Gaussian noise shaped like ``p``, of ``scale`` x its spread (no host sync)."""
    x = p.detach().float()
    spread = x.std() if p.numel() > 1 else x.abs().reshape(())
    return torch.randn(p.shape, generator=gen).to(p.device) * (scale * torch.nan_to_num(spread))


def arc_recovery() -> list[RecoveryAction]:
    """ARC's healing: LR reduction and tighter clipping after a rollback, escape when
    rollbacks repeat."""
    return [ReduceLR(), TightenClip(), Escape()]
