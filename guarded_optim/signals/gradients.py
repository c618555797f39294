"""Gradient signals: the global norm (overflow-free, sparse and complex aware), and a
spike test against the recent peak of the same gradient signature."""

from __future__ import annotations

import collections
import hashlib
import math
from typing import Any, Sequence

import torch

from .base import StepMeasurement, Verdict

__all__ = ["global_norm", "global_grad_norm", "norm_inputs", "signature", "GradientSpike",
           "GradientAgreement", "LayerwiseCV", "GradientEntropy"]

_TINY = 1e-30
_SPARSE_COMPRESSED = (torch.sparse_csr, torch.sparse_csc, torch.sparse_bsr, torch.sparse_bsc)


def _dense_view(t: torch.Tensor) -> torch.Tensor:
    """What a norm reads of ``t``: the stored values of a sparse tensor (a sparse COO
    gradient is coalesced first, so repeated indices are summed as the dense gradient
    would be), ``view_as_real`` of a complex one, ``t`` itself otherwise. No copy of a
    dense tensor; no host sync."""
    if t.layout == torch.sparse_coo:
        t = (t if t.is_coalesced() else t.coalesce())._values()
    elif t.layout in _SPARSE_COMPRESSED:
        t = t.values()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t


def norm_inputs(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` as plain strided real tensors whose 2-norms are those of ``tensors``
    (sparse: their values; complex: ``view_as_real``); empty tensors dropped."""
    out = []
    for t in tensors:
        if t.layout != torch.strided or t.is_complex():
            t = _dense_view(t)
        if t.numel():
            out.append(t.detach() if t.requires_grad else t)
    return out


def _accumulator(device: torch.device) -> torch.dtype:
    """The dtype norms are summed in: float64, except on MPS (no float64 there)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _is_dtensor(t: torch.Tensor) -> bool:
    return type(t).__name__ == "DTensor" or hasattr(t, "full_tensor")


def _group_norms(group: list[torch.Tensor], device: torch.device, dtype: torch.dtype,
                 acc: torch.dtype) -> torch.Tensor:
    """Per-tensor 2-norms of one (device, dtype) group, stacked (1-d) in ``acc``; never
    overflowing for finite input (see :func:`global_norm`)."""
    dtensor = _is_dtensor(group[0])
    foreach = dtensor or device.type in ("cpu", "cuda", "xpu")
    one_pass = dtensor or dtype == torch.float64 or (acc == torch.float64 and device.type != "cpu")
    # one pass summing in ``acc`` (float64 on CUDA, where the kernel accumulates in double);
    # otherwise (CPU, MPS) in float32, the fast CPU kernel, then a repair below
    sum_dtype = acc if one_pass else torch.float32
    if foreach:
        norms = torch.stack(torch._foreach_norm(group, 2.0, dtype=sum_dtype))
    else:
        norms = torch.stack([torch.linalg.vector_norm(t, 2.0, dtype=sum_dtype) for t in group])
    if not one_pass and acc == torch.float64 and dtype != torch.float16:
        # float16 never overflows a float32 sum; a float32 / bfloat16 tensor whose sum did
        # (norm above 1.8e19) or may have underflowed (squares below 1.2e-38: norm below
        # 1e-17) is summed again in float64, scaled by its largest magnitude (an all-zero
        # tensor costs one max pass, no copy). Reading a CPU tensor is no sync.
        lo, hi = torch.stack(torch.aminmax(norms)).tolist()   # one read; NaN: no repair
        if math.isinf(hi) or lo < 1e-17:
            norms = norms.to(torch.float64)
            redo = torch.isinf(norms) | (norms < 1e-17)
            for i in redo.nonzero().flatten().tolist():
                top = torch.linalg.vector_norm(group[i], math.inf).double()
                if bool(top > 0) and bool(torch.isfinite(top)):
                    norms[i] = top * torch.linalg.vector_norm(group[i].double() / top, 2.0)
                elif not bool(top > 0):
                    norms[i] = 0.0
    return norms


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all ``tensors`` together, as a 0-d float64 tensor (float32 on MPS).

    Finite exactly when every element is finite (NaN or Inf anywhere gives a non-finite
    norm), whatever the dtype and scale: per-tensor norms are taken per (device, dtype)
    group with one ``torch._foreach_norm`` each and combined in float64. On CUDA the
    per-tensor sums are accumulated in float64 (one pass; no overflow for any finite
    float16/bfloat16/float32 tensor). On CPU they are accumulated in float32 (the fast
    kernel; float16 can never overflow it: 65504^2 x 7.9e28 elements) and a float32 or
    bfloat16 tensor whose float32 sum overflowed (norm above 1.8e19) is summed again in
    float64. float64 tensors are summed in float64, which overflows only for norms above
    1.3e154. On MPS (no float64) the accumulator is float32: norms above 1.8e19 read Inf.

    Sparse tensors are measured through their (coalesced) values, complex ones through
    ``view_as_real``. No host sync on CUDA, except that coalescing an uncoalesced sparse COO
    gradient (``nn.Embedding(sparse=True)``'s) sizes its output from the data, as the
    sparse optimizers' own ``coalesce()`` does.
    """
    tensors = norm_inputs(tensors)
    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    first = tensors[0].device
    acc = _accumulator(first)
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    parts = [_group_norms(group, device, dtype, _accumulator(device)).to(first, acc)
             for (device, dtype), group in groups.items()]
    return torch.linalg.vector_norm(parts[0] if len(parts) == 1 else torch.cat(parts), 2.0)


global_grad_norm = global_norm


def _grads(m: StepMeasurement) -> list[torch.Tensor]:
    """The gradients present, as plain real tensors (sparse: values; complex: real view)."""
    return norm_inputs([p.grad for p in m.params if p.grad is not None])


def _false(device) -> torch.Tensor:
    return torch.zeros((), dtype=torch.bool, device=device)


def signature(m: StepMeasurement) -> str | None:
    """Which parameters of the step have a gradient: ``None`` (none), ``"all<n>"`` (all n of
    them), or a 16-hex-digit hash of the pattern. Host-side (no sync), computed once per
    measurement and shared by the signals that key their references by it."""
    cached = m.__dict__.get("_grad_signature", False)
    if cached is not False:
        return cached
    has = bytes(p.grad is not None for p in m.params)
    n = has.count(1)
    key = None if n == 0 else f"all{n}" if n == len(has) else \
        hashlib.blake2b(has, digest_size=8).hexdigest()
    m.__dict__["_grad_signature"] = key
    return key


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


class _Peak:
    """The recent applied log-norms of one gradient signature, on the host: the last
    ``window`` valid values, oldest first (a step whose gradient norm is 0 writes nothing, so
    all-zero gradients neither drag the reference down nor push real values out). They are
    the host values the step's single transfer already read, so keeping them costs no
    device work and no sync. ``above``: the last applied step was above the learn gate.
    ``count`` (applied steps seen), ``consecutive`` (firings in a row), ``used`` (last use,
    for the least-recently-used eviction)."""

    __slots__ = ("values", "losses", "above", "count", "consecutive", "used")

    def __init__(self, window: int, count: int = 0, consecutive: int = 0, used: int = 0,
                 values: Sequence[float] = (), above: bool = False, losses: Sequence[float] = ()):
        self.values: collections.deque[float] = collections.deque(values, maxlen=window)
        # the training losses of the same applied steps (finite ones; steps with a loss)
        self.losses: collections.deque[float] = collections.deque(losses, maxlen=window)
        self.above = above
        self.count, self.consecutive, self.used = count, consecutive, used

    def fill(self, value: float, loss: float | None = None) -> None:
        self.values.extend([value] * self.values.maxlen)
        if loss is not None and math.isfinite(loss):
            self.losses.extend([loss] * self.losses.maxlen)
        self.above = False

    def loss_rise(self, loss: float) -> float:
        """How far ``loss`` lies above the recent applied losses, as a factor >= 1:
        ``1 + (loss - max) / max|.|`` (``loss / max`` for positive losses); 1 without recent
        losses or for a non-finite loss."""
        scale = max((abs(v) for v in self.losses), default=0.0)
        if not (scale > 0 and math.isfinite(loss)):
            return 1.0
        return max(1.0, 1.0 + (loss - max(self.losses)) / scale)

    # the ring as tensors, oldest first (the state_dict layout; what tests read)
    @property
    def buffer(self) -> torch.Tensor:
        out = torch.zeros(self.values.maxlen)
        out[: len(self.values)] = torch.tensor(list(self.values), dtype=torch.float32)
        return out

    @property
    def filled(self) -> torch.Tensor:
        return torch.arange(self.values.maxlen) < len(self.values)

    @property
    def pos(self) -> torch.Tensor:
        return torch.tensor(len(self.values) % self.values.maxlen)

    @classmethod
    def from_ring(cls, values: torch.Tensor, filled: torch.Tensor, pos: int, window: int,
                  count: int = 0, consecutive: int = 0, used: int = 0,
                  above: bool = False) -> "_Peak":
        """The newest ``window`` filled entries of a saved ring whose next slot is ``pos``
        (its newest entry at ``(pos - 1) % len``), oldest first. Host side (loads)."""
        size = len(values)
        order = [(pos + k) % size for k in range(size)]
        host, mask = values.detach().float().cpu().tolist(), filled.detach().cpu().tolist()
        keep = [host[i] for i in order if mask[i]][-window:]
        return cls(window, count, consecutive, used, keep, above)


class GradientSpike:
    """SKIP a step whose gradient norm exceeds ``factor`` x the largest gradient norm of the
    last ``window`` applied steps with the same gradient signature (explosion); with
    ``low_factor``, also one below the smallest of them / ``low_factor`` (vanishing).

    How the reference works, and why:

    * *The recent peak, not the median.* A clean run's gradient norm is noisy (consecutive
      steps differ by up to 10-20x on small batches) and can grow steadily for tens of
      steps (a network leaving saturation: about 500x over 20 steps). A median lags half a
      window behind a rising norm and sits in the middle of the noise, so on those runs
      ordinary steps reached 25-41x the median of the last 50 and were skipped (35 of 120
      steps in the issue's report). The largest of the last ``window`` applied norms moves up with the norm one
      step later and covers the noise's upper tail: a clean step stays within a small
      factor of it, while a x300 gradient exceeds it by about 300 / (peak / norm).
    * *Steps without gradients are neither tested nor learnt.* A step where no parameter
      has a gradient (``opt.step()`` after ``zero_grad()`` without ``backward()``, 2 of 3
      steps of some loops) is ignored, and a step whose gradient norm is exactly 0 leaves
      its ring slot empty, so neither drags the reference down.
    * *One reference per gradient signature.* The signature is which parameters have a
      gradient (``p.grad is not None``, a host-side hash; no sync). Alternating objectives,
      GAN-style alternation (one sub-network's gradients are ``None`` each step), frozen or
      newly added parameters each get their own reference, warmed up on their own steps,
      so one sub-network's norm is never judged by another's. At most ``max_keys``
      signatures are kept (least recently used evicted).

    * *A rise the loss explains is not a fault.* When the step has a training loss
      (``step(closure)``), the limit is multiplied by how far that loss lies above the
      losses of the same applied steps (``1 + (loss - max) / max|loss|``, at least 1; the
      loss rides in the step's one transfer). Fresh data after a memorised shard lifts the
      gradient norm and the loss together (the natural suite's ``adam_v_decay``: 0.1.0
      skipped 20 such steps, then re-based); a fault that scales gradients (x300, a bad
      all-reduce) leaves the loss where it was and is judged as before. A loss scaled by a
      bug scales both and is let through. Without a closure there is no loss and the limit
      is the plain one; ``loss_explains=False`` keeps it plain always.

    A skipped step never enters the reference; non-finite norms are :class:`NonFinite`'s
    concern. With ``learn_factor`` below ``factor`` (default: equal, off), an applied step
    above ``learn_factor`` x the peak enters the reference only when the applied step
    before it did too, with no skip in between, so one fault step that slipped through (a x300 gradient on a step whose clean
    norm was tiny) cannot lift the peak for the rest of a fault window; a sustained new
    level is still learnt from its second step. On ResNet-18 near convergence
    ``learn_factor=sqrt(10)`` cut the x300 steps let through per 10-step window from 4.0 to
    2.8 (6 to 3 for the protocol's window at step 120; simulated on a recorded clean run); it costs margin while the norm grows fast (a
    step 3.2x the peak is not learnt, so the next is compared with an older peak).

    The test starts once a signature has ``warmup`` applied steps with a nonzero
    gradient. If ``patience`` steps of a signature in a row are skipped by this signal, the
    norm has moved to a new level for good: its reference is re-based on it (counted in
    ``rebaselines``) rather than skipping forever; ``patience=None`` never re-bases.
    Vanishing is off by default (``low_factor=None``): a tiny step does no harm, and weight
    signals see the dead network that causes one.

    Clipped gradients: a user who clips (``clip_grad_norm_(params, 1.0)`` before
    ``opt.step()``) hands the guard norms of at most 1.0, so a x300 gradient arrives clipped
    and is not skipped. That is the right outcome, not a blind spot: after clipping it is
    no larger than any clean clipped step and does no harm by its size; a NaN or Inf
    gradient stays non-finite through clipping and :class:`NonFinite` skips it. A fault that
    scales gradients *after* the clipping is caught as without clipping.

    Measured margins (defaults; the 20 clean workloads of ``tests/test_clean_workloads.py``
    x 5 seeds x 80-200 steps: MLP, CNN, transformer, alternating heads, GAN alternation,
    steps without or with all-zero gradients, freezing, fine-tuning, two saturated starts,
    large and zero init, a Gaussian NLL, clipping at 1.0 and 0.1, SGD momentum, LR warm-up,
    dropout): the largest ratio of a clean norm to its reference was 3.77 (a saturated
    start, growing up to 3.2x per step), 3.68 on the Gaussian NLL (whose gradient scales
    with the learnt 1/variance), 1.85 or less elsewhere, against ``factor=10``. A x300
    gradient is 300 x (norm / recent peak): above 10 on 99.8% of those steps (96% on the
    alternating heads, whose regression head's norm falls 100x within a window), and every
    step of the tests' x300 windows is skipped. What slips through is a step whose x300
    gradient is still below 10 x a gradient the model took in the last ``window`` steps:
    where clean norms are heavy-tailed -- ResNet-18 on the digits near convergence (batch
    128), norms 0.004-1.8 from step to step -- that is one step in five, 4.0 of a 10-step
    x300 window on average (simulated on a recorded clean run), and the damage is left to
    :class:`LossSpike` or the probe. The previous reference (median of the last 50 applied
    steps, steps without gradients included) let 0.5 of those 10 through, but reached 12 on
    the alternating heads, 25 and 41 on the saturated starts, 1e30 on the loops with idle
    steps, and 14-24 on ResNet-18's clean spikes (2 clean skips in 125 steps, none now).
    OLMo-core's mean + 6 sigma over 128 steps was exceeded on 6 of the 20 workloads and
    would skip x300 on 98.8% of steps. A window of 5 reached 12.9 on ResNet-18's clean run,
    20 reaches 1.76 there.

    No device work and no host sync of its own: the reference lives on the host, built from
    the gradient norms (and losses) the guard's one transfer per step reads anyway
    (``StepMeasurement.grad_norm_value``, ``loss_value``), and the guard calls
    :meth:`judge`, a comparison of host numbers, once they are read.
    """

    name = "grad_spike"
    phase, verdict = "before", Verdict.SKIP
    overrulable = True   # a judgement of scale: the probe may overrule a streak (.ladder)

    def __init__(self, factor: float = 10.0, window: int = 20, warmup: int = 10,
                 patience: int | None = 20, low_factor: float | None = None, max_keys: int = 8,
                 learn_factor: float | None = None, loss_explains: bool = True):
        if not (math.isfinite(factor) and factor > 1):
            raise ValueError(f"Invalid factor: {factor!r}; it must be a finite number > 1.")
        learn_factor = factor if learn_factor is None else learn_factor
        if not (math.isfinite(learn_factor) and 1 < learn_factor <= factor):
            raise ValueError(f"Invalid learn_factor: {learn_factor!r}; it must lie in (1, factor].")
        self.learn_factor, self.loss_explains = learn_factor, bool(loss_explains)
        self._log_learn = math.log(learn_factor)
        if low_factor is not None and not (math.isfinite(low_factor) and low_factor > 1):
            raise ValueError(f"Invalid low_factor: {low_factor!r}; use a number > 1, or None.")
        if window < 1 or warmup < 1 or max_keys < 1:
            raise ValueError(f"Invalid window={window!r} / warmup={warmup!r} / "
                             f"max_keys={max_keys!r}; each must be >= 1.")
        if patience is not None and patience < 1:
            raise ValueError(f"Invalid patience: {patience!r}; use an int >= 1 or None.")
        self.factor, self.low_factor = factor, low_factor
        self.window, self.warmup, self.patience, self.max_keys = window, warmup, patience, max_keys
        self._log_factor = math.log(factor)
        self._log_low = None if low_factor is None else math.log(low_factor)
        self.references: dict[str, _Peak] = {}
        self.rebaselines = 0
        self.current: str | None = None       # the signature measured last
        self._legacy: _Peak | None = None     # an old single-reference state, not yet keyed
        self._tick = 0
        self._ceiling = math.inf   # log of learn_factor x the peak measured last, or +inf
        self._measured = False     # a measure() awaits its observe()

    # the reference of the signature measured last (what older code and tests read)
    def _current(self) -> _Peak | None:
        return self.references.get(self.current) if self.current is not None else None

    count = property(lambda self: getattr(self._current(), "count", 0))
    consecutive = property(lambda self: getattr(self._current(), "consecutive", 0))
    buffer = property(lambda self: getattr(self._current(), "buffer", None))  # log-norms (ring)

    signature = staticmethod(signature)

    def _reference(self, key: str) -> _Peak | None:
        ref = self.references.get(key)
        if ref is None and self._legacy is not None:     # an old state: adopt it here
            ref, self._legacy = self._legacy, None
            self.references[key] = ref
        return ref

    def _reference_for(self, m: StepMeasurement) -> _Peak | None:
        """Start measuring ``m``: its signature's reference once warmed up, else ``None``."""
        key = self.current = self.signature(m)
        self._ceiling, self._measured = math.inf, key is not None
        if key is None:                       # no gradient at all: nothing to test or learn
            return None
        ref = self._reference(key)
        if ref is None or ref.count < self.warmup or len(ref.values) < min(self.warmup, self.window):
            return None
        if self.learn_factor < self.factor:
            self._ceiling = max(ref.values) + self._log_learn
        return ref

    def judge(self, m: StepMeasurement) -> bool:
        """The test, on the host, from the values the guard's one transfer per step reads
        (``m.grad_norm_value``, ``m.loss_value``): what the guard calls. No device work."""
        ref = self._reference_for(m)
        norm = m.grad_norm_value
        if ref is None or not math.isfinite(norm):
            return False
        limit = math.exp(max(ref.values) + self._log_factor)
        if self.loss_explains and m.loss_value is not None:
            limit *= ref.loss_rise(m.loss_value)
        low = self._log_low is not None and 0 < norm < math.exp(min(ref.values) - self._log_low)
        return norm > limit or low

    def measure(self, m: StepMeasurement) -> torch.Tensor:
        """:meth:`judge` as a 0-d bool tensor, for a caller that has not read the norm and
        loss yet (reads them: a sync on an accelerator)."""
        m.read_values()
        return torch.tensor(self.judge(m), device=m.grad_norm.device)

    def observe(self, m: StepMeasurement, applied: bool, fired: bool) -> None:
        ceiling, self._ceiling = self._ceiling, math.inf
        measured, self._measured = self._measured, False
        key = self.current
        if key is None or not measured:   # observe once per measure
            return
        norm = m.grad_norm_value if m.grad_norm_value is not None else float(m.grad_norm)
        value = math.log(max(norm, _TINY)) if not math.isnan(norm) else math.nan
        ref = self._reference(key)
        if ref is None:
            if len(self.references) >= self.max_keys:
                del self.references[min(self.references, key=lambda k: self.references[k].used)]
            ref = self.references[key] = _Peak(self.window)
        self._tick += 1
        ref.used = self._tick
        if applied and not fired:
            valid = math.isfinite(value) and value > math.log(_TINY) + 1.0   # norm 0: nothing
            above = valid and value > ceiling   # learn_factor: learnt only after a second one
            if valid and (not above or ref.above):
                ref.values.append(value)
                if m.loss_value is not None and math.isfinite(m.loss_value):
                    ref.losses.append(m.loss_value)
            ref.above = above
            ref.count += 1
            ref.consecutive = 0
        elif fired:
            ref.consecutive += 1
            ref.above = False            # learn_factor: a skip in between breaks the run
            if self.patience is not None and ref.consecutive >= self.patience:
                ref.fill(value, m.loss_value)
                ref.count, ref.consecutive = max(ref.count, self.window), 0
                self.rebaselines += 1

    def rebase(self) -> None:
        """Forget every reference and warm up again."""
        self.references, self._legacy, self.current = {}, None, None

    def state_dict(self) -> dict[str, Any]:
        """Flat plain data: one row of ``buffers``/``filled`` and one entry of each list per
        signature in ``keys`` (``""``: a loaded earlier state not yet adopted)."""
        refs = list(self.references.items())
        if self._legacy is not None:
            refs.append(("", self._legacy))
        return {
            "keys": [k for k, _ in refs],
            "buffers": (torch.stack([r.buffer for _, r in refs]) if refs
                        else torch.zeros(0, self.window)),
            "filled": (torch.stack([r.filled for _, r in refs]) if refs
                       else torch.zeros(0, self.window, dtype=torch.bool)),
            "positions": (torch.stack([r.pos for _, r in refs]) if refs
                          else torch.zeros(0, dtype=torch.int64)),
            "above": torch.tensor([r.above for _, r in refs], dtype=torch.bool),
            "counts": [r.count for _, r in refs],
            "consecutive": [r.consecutive for _, r in refs],
            "used": [r.used for _, r in refs],
            "losses": [list(r.losses) for _, r in refs],
            "rebaselines": self.rebaselines, "current": self.current, "tick": self._tick,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load :meth:`state_dict`'s layout, or the single-reference layout of earlier
        releases (``buffer``/``count``/``consecutive``/``rebaselines``, a ring of
        applied log-norms): its newest ``window`` values become the reference of the first
        signature measured after the load."""
        if "keys" not in state:
            buf = state["buffer"]
            count = int(state["count"])
            self.references, self.current, self._tick = {}, None, 0
            self.rebaselines = int(state["rebaselines"])
            self._legacy = None
            if buf is not None and count > 0:
                buf = self._finite(buf.detach().clone().float(), "buffer")
                filled = buf > math.log(_TINY) + 1.0      # old rings stored 0-norms too
                self._legacy = _Peak.from_ring(buf, filled, count % len(buf), self.window,
                                               count, int(state["consecutive"]))
            return
        keys = [str(k) for k in state["keys"]]
        buffers = state["buffers"].detach().float()
        filled = state["filled"].detach().to(torch.bool)
        positions = state["positions"].detach().to(torch.int64).tolist()
        counts, consecutive, used = state["counts"], state["consecutive"], state["used"]
        above = state["above"].detach().tolist() if "above" in state else [False] * len(keys)
        losses = state.get("losses", [[] for _ in keys])   # absent before 0.2: none known
        if not (len(keys) == len(buffers) == len(filled) == len(positions) == len(counts)
                == len(consecutive) == len(used) == len(above) == len(losses)) \
                or buffers.dim() != 2 or buffers.shape != filled.shape:
            raise ValueError("GradientSpike state: keys, buffers, filled, counts, consecutive, "
                             "used and losses must describe the same references.")
        if not all(isinstance(row, (list, tuple)) and all(
                isinstance(v, float) and math.isfinite(v) for v in row) for row in losses):
            raise ValueError("GradientSpike state 'losses' must hold one list of finite floats "
                             "per reference; the checkpoint is corrupt.")
        refs, legacy = {}, None
        for i, key in enumerate(keys):
            buf = self._finite(buffers[i], f"buffers[{i}]")
            peak = _Peak.from_ring(buf, filled[i], int(positions[i]) % max(len(buf), 1),
                                   self.window, int(counts[i]), int(consecutive[i]),
                                   int(used[i]), bool(above[i]))
            peak.losses.extend(losses[i][-self.window:])
            if key == "":
                legacy = peak
            else:
                refs[key] = peak
        self.references, self._legacy = refs, legacy
        self.rebaselines = int(state["rebaselines"])
        self.current = None if state.get("current") is None else str(state["current"])
        self._tick = int(state.get("tick", 0))

    @staticmethod
    def _finite(t: torch.Tensor, key: str) -> torch.Tensor:
        if t.dim() != 1 or not bool(torch.isfinite(t).all()):
            raise ValueError(f"GradientSpike state {key} must be a finite 1-d tensor of "
                             "log-norms; the checkpoint is corrupt.")
        return t

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
