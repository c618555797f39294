"""Gradient signals: the global norm, and a spike test against its running median."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from .base import StepMeasurement, Verdict

__all__ = ["global_norm", "global_grad_norm", "GradientSpike", "GradientAgreement", "LayerwiseCV",
           "GradientEntropy"]

_TINY = 1e-30


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all ``tensors`` together, as a 0-d tensor (``torch._foreach_norm``).

    Non-finite if any element is non-finite. No host sync.
    """
    grads = tensors
    if not grads:
        return torch.zeros(())
    get_total_norm = getattr(torch.nn.utils, "get_total_norm", None)
    if get_total_norm is not None:  # torch >= 2.6: groups by device and dtype
        return get_total_norm(grads, 2.0)
    device = grads[0].device
    norms = torch._foreach_norm(list(grads))
    return torch.linalg.vector_norm(torch.stack([n.to(device) for n in norms]))


global_grad_norm = global_norm


def _grads(m: StepMeasurement) -> list[torch.Tensor]:
    return [p.grad.detach() for p in m.params if p.grad is not None]


def _false(device) -> torch.Tensor:
    return torch.zeros((), dtype=torch.bool, device=device)


class _RunningMedian:
    """A device ring buffer of the last ``window`` values of applied, not-fired steps.

    Shared by the median-referenced signals below; host-side bookkeeping only (``count``,
    ``consecutive``), the values never leave the device.
    """

    def __init__(self, window: int, warmup: int, patience: int | None):
        if window < 1 or warmup < 1:
            raise ValueError(f"Invalid window={window!r} / warmup={warmup!r}; both must be >= 1.")
        if patience is not None and patience < 1:
            raise ValueError(f"Invalid patience: {patience!r}; use an int >= 1 or None.")
        self.window, self.warmup, self.patience = window, warmup, patience
        self.buffer: torch.Tensor | None = None
        self.count = 0
        self.consecutive = 0
        self.rebaselines = 0
        self.value: torch.Tensor | None = None

    def reference(self, value: torch.Tensor) -> torch.Tensor | None:
        """Remember ``value``; return the running median, or ``None`` while warming up."""
        self.value = value
        if self.buffer is None or self.buffer.device != value.device:
            self.buffer = torch.zeros(self.window, device=value.device)
        if self.count < self.warmup:
            return None
        return self.buffer[: min(self.count, self.window)].median()

    def observe(self, applied: bool, fired: bool) -> None:
        if self.value is None:
            return
        value = torch.nan_to_num(self.value.float(), nan=0.0, posinf=0.0, neginf=0.0)
        if applied and not fired:
            self.buffer[self.count % self.window] = value
            self.count += 1
            self.consecutive = 0
        elif fired:
            self.consecutive += 1
            if self.patience is not None and self.consecutive >= self.patience:
                self.buffer.fill_(0.0).add_(value)
                self.count, self.consecutive = max(self.count, self.window), 0
                self.rebaselines += 1

    def rebase(self) -> None:
        self.buffer, self.count, self.consecutive = None, 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer, "count": self.count, "consecutive": self.consecutive,
                "rebaselines": self.rebaselines}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        buf = state["buffer"]
        self.buffer = None if buf is None else buf.detach().clone()
        self.count, self.consecutive = int(state["count"]), int(state["consecutive"])
        self.rebaselines = int(state["rebaselines"])


class _MedianReferenced:
    """State handling shared by signals referenced to a :class:`_RunningMedian` (``self.median``)."""

    median: _RunningMedian

    def observe(self, m: StepMeasurement, applied: bool, fired: bool) -> None:
        self.median.observe(applied, fired)

    def rebase(self) -> None:
        """Forget the running median and warm up again."""
        self.median.rebase()

    def state_dict(self) -> dict[str, Any]:
        return self.median.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.median.load_state_dict(state)


class GradientSpike(_MedianReferenced):
    """SKIP a step whose gradient norm exceeds ``factor`` x the running median of applied ones
    (explosion), or, with ``low_factor``, falls below the median / ``low_factor`` (vanishing).

    The reference is the median of the log-norms of the last ``window`` *applied* steps, so
    a skipped outlier never enters it. Non-finite norms are :class:`NonFinite`'s concern.
    The test starts after ``warmup`` applied steps. If ``patience`` steps in a row are
    skipped by this signal, the norm has moved to a new level for good: the reference is
    re-based on it (counted in ``rebaselines``) rather than skipping forever.
    ``patience=None`` never re-bases. Vanishing is off by default (``low_factor=None``): a
    tiny step does no harm, and weight signals see the dead network that causes one.

    Defaults: on clean runs of the bundled models the largest ratio of a gradient norm to
    the running median was below 2.5, while the paper's x300 fault gives about 300.
    """

    name = "grad_spike"
    phase, verdict = "before", Verdict.SKIP

    def __init__(self, factor: float = 10.0, window: int = 50, warmup: int = 10,
                 patience: int | None = 20, low_factor: float | None = None):
        if not (math.isfinite(factor) and factor > 1):
            raise ValueError(f"Invalid factor: {factor!r}; it must be a finite number > 1.")
        if low_factor is not None and not (math.isfinite(low_factor) and low_factor > 1):
            raise ValueError(f"Invalid low_factor: {low_factor!r}; use a number > 1, or None.")
        self.factor, self.low_factor = factor, low_factor
        self._log_factor = math.log(factor)
        self._log_low = None if low_factor is None else math.log(low_factor)
        self.median = _RunningMedian(window, warmup, patience)

    window = property(lambda self: self.median.window)
    warmup = property(lambda self: self.median.warmup)
    patience = property(lambda self: self.median.patience)
    count = property(lambda self: self.median.count)
    consecutive = property(lambda self: self.median.consecutive)
    rebaselines = property(lambda self: self.median.rebaselines)
    buffer = property(lambda self: self.median.buffer)   # log-norms of applied steps (ring)

    def measure(self, m: StepMeasurement) -> torch.Tensor:
        log_norm = torch.log(m.grad_norm.detach().float().clamp_min(_TINY))
        reference = self.median.reference(log_norm)
        if reference is None:
            return _false(log_norm.device)
        fired = log_norm > reference + self._log_factor
        if self._log_low is not None:
            fired = fired | (log_norm < reference - self._log_low)
        return torch.isfinite(log_norm) & fired

    def __repr__(self) -> str:
        low = "" if self.low_factor is None else f", low_factor={self.low_factor}"
        return (f"GradientSpike(factor={self.factor}, window={self.window}, "
                f"warmup={self.warmup}, patience={self.patience}{low})")


class GradientAgreement:
    """SKIP a step whose gradient points against the previous applied step's gradient.

    Measures the cosine similarity between this step's flattened gradient (all parameters,
    ``torch.cat`` of ``g.flatten()`` in float32) and that of the last applied, not-fired
    step. Fires when the cosine is below ``threshold`` after ``warmup`` applied steps: the
    gradient reversed (a sign flip, a corrupted loss, a reversed objective). A skipped step
    never becomes the reference; after ``patience`` consecutive firings the reference is
    re-based on the current gradient (``patience=None``: never).

    Cost: one float32 copy of the whole gradient is kept on the device (the size of the
    model), and one more is built per step; a dot product and two norms per step.

    Defaults (``threshold=-0.995``): the smallest cosine between consecutive applied
    gradients on clean runs was -0.978 on the tiny model (20 seeds x 80 steps, AdamW
    lr=1e-2; 40 of 1400 steps below -0.9, as full-batch-like AdamW oscillates across a
    valley, so -0.9 is *not* safe there) and -0.599 on the ``cnn`` bench task (2 seeds x 250
    steps, AdamW lr=1e-3). A gradient replaced by minus the previous one gives exactly -1.
    A plain sign flip of the current gradient gives ``-cos(g_t, g_{t-1})``, so it is caught
    only where consecutive gradients agree to better than 0.995: on oscillating problems
    this signal is weak, and the margin on the tiny model is small (0.017).
    """

    name = "grad_agreement"
    phase, verdict = "before", Verdict.SKIP

    def __init__(self, threshold: float = -0.995, warmup: int = 10, patience: int | None = 20):
        if not (math.isfinite(threshold) and -1 <= threshold < 1):
            raise ValueError(f"Invalid threshold: {threshold!r}; it must be in [-1, 1).")
        if warmup < 1:
            raise ValueError(f"Invalid warmup: {warmup!r}; it must be >= 1.")
        if patience is not None and patience < 1:
            raise ValueError(f"Invalid patience: {patience!r}; use an int >= 1 or None.")
        self.threshold, self.warmup, self.patience = threshold, warmup, patience
        self.previous: torch.Tensor | None = None   # flat gradient of the last applied step
        self.count = 0
        self.consecutive = 0
        self.rebaselines = 0
        self._flat: torch.Tensor | None = None
        self.last_cosine: torch.Tensor | None = None

    def measure(self, m: StepMeasurement) -> torch.Tensor:
        grads = _grads(m)
        if not grads:
            self._flat = None
            return _false(m.grad_norm.device)
        flat = self._flat = torch.cat([g.reshape(-1).float() for g in grads])
        prev = self.previous
        if (prev is None or self.count < self.warmup or prev.shape != flat.shape
                or prev.device != flat.device):
            return _false(flat.device)
        denom = (torch.linalg.vector_norm(flat) * torch.linalg.vector_norm(prev)).clamp_min(_TINY)
        cos = self.last_cosine = torch.dot(flat, prev) / denom
        return torch.isfinite(cos) & (cos < self.threshold)

    def observe(self, m: StepMeasurement, applied: bool, fired: bool) -> None:
        if self._flat is None:
            return
        if applied and not fired:
            self.previous = torch.nan_to_num(self._flat, nan=0.0, posinf=0.0, neginf=0.0)
            self.count += 1
            self.consecutive = 0
        elif fired:
            self.consecutive += 1
            if self.patience is not None and self.consecutive >= self.patience:
                self.previous = torch.nan_to_num(self._flat, nan=0.0, posinf=0.0, neginf=0.0)
                self.consecutive = 0
                self.rebaselines += 1
        self._flat = None

    def rebase(self) -> None:
        """Forget the reference gradient and warm up again."""
        self.previous, self.count, self.consecutive = None, 0, 0

    def state_dict(self) -> dict[str, Any]:
        return {"previous": self.previous, "count": self.count, "consecutive": self.consecutive,
                "rebaselines": self.rebaselines}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        prev = state["previous"]
        self.previous = None if prev is None else prev.detach().clone()
        self.count, self.consecutive = int(state["count"]), int(state["consecutive"])
        self.rebaselines = int(state["rebaselines"])

    def __repr__(self) -> str:
        return (f"GradientAgreement(threshold={self.threshold}, warmup={self.warmup}, "
                f"patience={self.patience})")


class LayerwiseCV(_MedianReferenced):
    """SKIP a step whose per-tensor gradient norms are far more uneven than usual.

    Measures the coefficient of variation (std / mean) of the per-tensor gradient norms
    (``torch._foreach_norm``, stacked). Fires after ``warmup`` applied steps when the CV
    exceeds ``factor`` x the running median of the last ``window`` applied, not-fired steps
    (kept in log space on the device): one layer's gradient exploding or vanishing while the
    others do not, which the global norm can miss when that layer is small. Re-bases after
    ``patience`` consecutive firings, like :class:`GradientSpike`.

    Defaults (``factor=1.75``): the largest ratio of the CV to its running median on clean
    runs was 1.376 on the tiny model (20 seeds x 80 steps) and 1.111 on the ``cnn`` task (2
    seeds x 250 steps). The CV of n norms (unbiased std) is at most sqrt(n): with the tiny
    model's 6 tensors it is at most 2.45 against a clean median near 1.1-1.2, so one
    layer's gradient scaled x1000 gives a ratio of about 2.0-2.2 there -- a larger factor
    could never fire on a model with few tensors. Models with many tensors leave more room.
    """

    name = "layerwise_cv"
    phase, verdict = "before", Verdict.SKIP

    def __init__(self, factor: float = 1.75, window: int = 50, warmup: int = 10,
                 patience: int | None = 20):
        if not (math.isfinite(factor) and factor > 1):
            raise ValueError(f"Invalid factor: {factor!r}; it must be a finite number > 1.")
        self.factor = factor
        self._log_factor = math.log(factor)
        self.median = _RunningMedian(window, warmup, patience)
        self.last_cv: torch.Tensor | None = None

    def measure(self, m: StepMeasurement) -> torch.Tensor:
        grads = _grads(m)
        if len(grads) < 2:
            self.median.value = None
            return _false(m.grad_norm.device)
        device = grads[0].device
        norms = torch.stack([n.to(device, torch.float32) for n in torch._foreach_norm(grads)])
        cv = self.last_cv = norms.std() / norms.mean().clamp_min(_TINY)
        log_cv = torch.log(cv.clamp_min(_TINY))
        ref = self.median.reference(log_cv)
        if ref is None:
            return _false(device)
        return torch.isfinite(log_cv) & (log_cv > ref + self._log_factor)

    def __repr__(self) -> str:
        return (f"LayerwiseCV(factor={self.factor}, window={self.median.window}, "
                f"warmup={self.median.warmup}, patience={self.median.patience})")


class GradientEntropy(_MedianReferenced):
    """SKIP a step whose gradient magnitudes collapse onto few orders of magnitude.

    Measures the normalised Shannon entropy (in [0, 1], divided by ``log(bins)``) of a
    ``bins``-bin histogram (``torch.histc``) of ``log10|g|`` over *all gradient elements*,
    on the fixed range ``[lo, hi]`` decades; values outside (zeros included) are clamped into
    the end bins, so the range is never data-dependent and nothing is read back to the host.
    Elements rather than per-tensor norms: a handful of norms makes too coarse a histogram,
    while the element distribution sees gradients going dead (mostly zero) or saturating.
    Fires after ``warmup`` applied steps when the entropy is below the running median (last
    ``window`` applied, not-fired steps) minus ``delta``. Re-bases after ``patience``
    consecutive firings.

    Cost: one float32 temporary the size of the gradient per step, and a histogram.

    Defaults (``delta=0.15``, 64 bins on [-20, 5] decades): the largest drop of the entropy
    below its running median on clean runs was 0.056 on the tiny model (20 seeds x 80 steps)
    and 0.027 on the ``cnn`` task (2 seeds x 250 steps); zeroing 9 in 10 gradient elements
    takes the tiny model's entropy from about 0.50-0.54 to 0.13-0.14 (a drop of about 0.37).
    """

    name = "grad_entropy"
    phase, verdict = "before", Verdict.SKIP

    def __init__(self, delta: float = 0.15, bins: int = 64, lo: float = -20.0, hi: float = 5.0,
                 window: int = 50, warmup: int = 10, patience: int | None = 20):
        if not (math.isfinite(delta) and 0 < delta < 1):
            raise ValueError(f"Invalid delta: {delta!r}; it must be in (0, 1).")
        if bins < 2 or not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
            raise ValueError(f"Invalid bins={bins!r} / lo={lo!r} / hi={hi!r}; need bins >= 2 "
                             "and finite lo < hi.")
        self.delta, self.bins, self.lo, self.hi = delta, bins, lo, hi
        self.median = _RunningMedian(window, warmup, patience)
        self.last_entropy: torch.Tensor | None = None

    def entropy(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """Normalised entropy of the histogram of ``log10|g|`` (0-d float32 tensor)."""
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        x = torch.log10(flat.abs().clamp_min(10.0 ** self.lo))
        x = torch.nan_to_num(x, nan=self.lo).clamp_(self.lo, self.hi)
        hist = torch.histc(x, bins=self.bins, min=self.lo, max=self.hi)
        p = hist / hist.sum().clamp_min(1.0)
        return -torch.special.xlogy(p, p).sum() / math.log(self.bins)

    def measure(self, m: StepMeasurement) -> torch.Tensor:
        grads = _grads(m)
        if not grads:
            self.median.value = None
            return _false(m.grad_norm.device)
        h = self.last_entropy = self.entropy(grads)
        ref = self.median.reference(h)
        if ref is None:
            return _false(h.device)
        return torch.isfinite(h) & (h < ref - self.delta)

    def __repr__(self) -> str:
        return (f"GradientEntropy(delta={self.delta}, bins={self.bins}, lo={self.lo}, "
                f"hi={self.hi}, window={self.median.window}, warmup={self.median.warmup}, "
                f"patience={self.median.patience})")
