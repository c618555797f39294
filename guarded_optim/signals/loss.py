"""Loss-side signals: non-finite loss or gradients (SKIP), training-loss spikes (FAILURE)."""

from __future__ import annotations

import math
from typing import Any

import torch

from .base import Stateless, StepMeasurement, Verdict

__all__ = ["NonFinite", "LossSpike"]

_LEGACY = ""   # LossSpike: an earlier release's single window, adopted by the next signature


class NonFinite(Stateless):
    """SKIP when the training loss or any gradient is NaN or Inf.

    Any non-finite gradient element makes the global norm non-finite, so one reduction
    covers every layer; the norm is summed so that it never overflows for finite gradients
    (:func:`~.gradients.global_norm`: float16 weights of 300 x 100k, float32 elements of
    1e20), so a finite gradient never reads as non-finite. Stateless.
    """

    name = "nonfinite"
    phase, verdict = "before", Verdict.SKIP

    def judge(self, m: StepMeasurement) -> bool:
        """The test on the host, from the gradient norm and the mean loss the guard's one
        transfer read (a non-finite element makes either non-finite): what the guard
        calls; no device work."""
        return not math.isfinite(m.grad_norm_value) or (
            m.loss_value is not None and not math.isfinite(m.loss_value))

    def measure(self, m: StepMeasurement) -> torch.Tensor:
        bad = ~torch.isfinite(m.grad_norm)
        if isinstance(m.loss, torch.Tensor):
            bad = bad | ~torch.isfinite(m.loss.detach()).all().to(bad.device)
        return bad

    def __repr__(self) -> str:
        return "NonFinite()"


class LossSpike:
    """FAILURE when the training loss jumps far above its recent trajectory.

    The training loss of step ``t`` is measured at the current parameters before anything
    is proposed, so a spike means the state is *already* damaged (by an earlier accepted
    step, or between steps): the verdict is FAILURE, roll back. It fires when the loss
    exceeds the largest finite loss of the last ``window`` applied steps by more than
    ``factor - 1`` times the largest magnitude among them -- for positive losses, when it
    exceeds ``factor`` x the window maximum (non-finite values never enter the window).

    The guard acts on it only where there is something to blame: on a live state that is
    the verified one, nothing written since, the spike says the *batch* differs (fresh
    data, a harder shard), and the step goes on as an ordinary one (the guard's
    ``stats["batch_loss_spikes"]``); rolling back would only skip that batch and every one
    after it.

    Why the window maximum and not the median: near convergence the loss sits at its noise
    floor, where the median is tiny. On 20 clean seeded runs of a small regression model the
    loss reached 7.7x its running median, but never more than 1.53x the window maximum (the
    bundled CNN, MLP and transformer stay below 1.71x their median). Damage moves the loss by
    orders of magnitude.

    Why the magnitude: a loss that can be negative or cross zero (a Gaussian NLL with
    learnt variance, a WGAN critic) has a window maximum near 0 at times, and ``factor`` x
    that is no bound at all; the largest magnitude in the window is the loss's own scale.

    Why one window per gradient signature (which parameters have a gradient, as in
    :class:`~.gradients.GradientSpike`): steps that train different parts of the model
    often optimise different objectives -- alternating heads, a generator and its
    discriminator, a new head in fine-tuning -- whose losses differ in scale; each is
    compared with its own recent values (steps without any gradient share one window).
    A new signature warms up on its own ``warmup`` applied steps; at most ``max_keys`` are
    kept (least recently used evicted).

    Measured on the 20 clean workloads of ``tests/test_clean_workloads.py`` (5 seeds x 80-200
    steps), as the factor at which the rule would have fired: at most 2.12 (the Gaussian NLL,
    whose loss crosses zero; 1.12 elsewhere) against ``factor=3``. The previous rule
    (``factor`` x the window maximum's magnitude, one window for all steps) reached 5.92
    on the Gaussian NLL and rolled back clean steps there.
    """

    name = "loss_spike"
    phase, verdict = "before", Verdict.FAILURE

    def __init__(self, factor: float = 3.0, window: int = 50, warmup: int = 20,
                 max_keys: int = 8):
        if not (math.isfinite(factor) and factor > 1):
            raise ValueError(f"Invalid factor: {factor!r}; it must be a finite number > 1.")
        if window < 1 or warmup < 1 or max_keys < 1:
            raise ValueError(f"Invalid window={window!r} / warmup={warmup!r} / "
                             f"max_keys={max_keys!r}; each must be >= 1.")
        self.factor, self.window, self.warmup, self.max_keys = factor, window, warmup, max_keys
        self.references: dict[str, dict[str, Any]] = {}   # key -> {"buffer", "count", "used"}
        self.current: str | None = None
        self._tick = 0
        self._loss: float | None = None   # the loss judged last, for observe()

    # the window of the signature measured last (what older code and tests read)
    buffer = property(lambda self: torch.tensor(self.references[self.current]["buffer"])
                      if self.current in self.references else None)
    count = property(lambda self: self.references.get(self.current, {}).get("count", 0))

    @staticmethod
    def _key(m: StepMeasurement) -> str:
        from .gradients import signature
        key = signature(m) if m.optimizer is not None else None
        return "none" if key is None else key

    def judge(self, m: StepMeasurement) -> bool:
        """The test on the host, from the mean training loss the guard's one transfer read
        (``m.loss_value``): what the guard calls; no device work. The windows are host
        lists of those same values."""
        loss = self._loss = m.loss_value
        if loss is None:
            return False
        self.current = self._key(m)
        ref = self.references.get(self.current)
        if ref is None and _LEGACY in self.references:
            ref = self.references[self.current] = self.references.pop(_LEGACY)
        if ref is None or ref["count"] < self.warmup:
            return False
        window = ref["buffer"][: min(ref["count"], self.window)]
        peak, scale = max(window), max(abs(v) for v in window)
        return math.isfinite(loss) and loss > peak + (self.factor - 1.0) * scale

    def measure(self, m: StepMeasurement) -> torch.Tensor:
        """:meth:`judge` as a 0-d bool tensor, for a caller that has not read the loss yet
        (reads it: a sync on an accelerator)."""
        m.read_values()
        return torch.tensor(self.judge(m), device=m.grad_norm.device)

    def observe(self, m: StepMeasurement, applied: bool, fired: bool) -> None:
        loss, self._loss = self._loss, None
        if not (applied and not fired) or loss is None:
            return
        ref = self.references.get(self.current)
        if ref is None:
            if len(self.references) >= self.max_keys:
                del self.references[min(self.references, key=lambda k: self.references[k]["used"])]
            ref = self.references[self.current] = {"buffer": [0.0] * self.window, "count": 0,
                                                   "used": 0}
        self._tick += 1
        ref["used"] = self._tick
        ref["buffer"][ref["count"] % self.window] = loss if math.isfinite(loss) else 0.0
        ref["count"] += 1

    def rebase(self) -> None:
        self.references, self.current = {}, None

    def state_dict(self) -> dict[str, Any]:
        """Flat plain data: one row of ``buffers`` and one entry of each list per signature
        in ``keys`` (``""``: a loaded earlier window not yet adopted)."""
        refs = list(self.references.items())
        return {"keys": [k for k, _ in refs],
                "buffers": (torch.tensor([r["buffer"] for _, r in refs]) if refs
                            else torch.zeros(0, self.window)),
                "counts": [r["count"] for _, r in refs], "used": [r["used"] for _, r in refs],
                "current": self.current, "tick": self._tick}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """This release's layout, or the earlier single window ``{"buffer", "count"}``
        (adopted by the first signature measured after the load)."""
        self.references, self._tick = {}, int(state.get("tick", 0))
        self.current = None if state.get("current") is None else str(state["current"])
        if "keys" in state:
            keys, buffers = state["keys"], state["buffers"]
            counts, used = state["counts"], state["used"]
            if not len(keys) == len(buffers) == len(counts) == len(used):
                raise ValueError("LossSpike state: keys, buffers, counts and used must "
                                 "describe the same windows.")
            for i, k in enumerate(keys):
                self.references[str(k)] = self._ring(buffers[i], int(counts[i]), int(used[i]))
            return
        if state["buffer"] is not None and int(state["count"]) > 0:
            self.references[_LEGACY] = self._ring(state["buffer"], int(state["count"]), 0)

    def _ring(self, buf: torch.Tensor, count: int, used: int) -> dict[str, Any]:
        buf = buf.detach().float().cpu()
        if buf.dim() != 1 or not bool(torch.isfinite(buf).all()):
            raise ValueError("LossSpike state: each buffer must be a finite 1-d tensor of "
                             "losses; the checkpoint is corrupt.")
        values = buf.tolist()
        if len(values) != self.window:     # another window: keep the newest losses in order
            n = min(count, len(values), self.window)
            newest = [values[(count - n + k) % len(values)] for k in range(n)]
            values, count = newest + [0.0] * (self.window - n), n
        return {"buffer": values, "count": count, "used": used}

    def __repr__(self) -> str:
        return f"LossSpike(factor={self.factor}, window={self.window}, warmup={self.warmup})"
