"""Training dynamics (ARC, sec. 3.4): online Lyapunov estimate, phase, oscillation, attractor.

Pure functions on device tensors (no host sync):

* :func:`lyapunov_estimate` -- mean log ratio of consecutive velocities (Algorithm 4).
* :func:`oscillation_ratio` -- ``max P / mean P`` of the detrended velocity spectrum (sec. 3.4.7).
* :func:`attractor_radius` -- ``max_t ||theta_t - mean theta||`` over a window (sec. 3.4.5).
* :func:`classify_phase` -- transient / convergent / oscillatory / divergent (host floats).

:class:`Lyapunov` is an opt-in post-step signal (FAILURE when divergent).

What the velocity is: the paper's ``v_t = ||theta_t - theta_{t-1}||`` needs a copy of the
previous parameters (one more parameter-sized buffer) and a pass over both per step; the
signal instead uses norms the guard already has:

* ``source="grad"`` (default): ``||g_t||``, the global gradient norm the guard computes
  for every step. For SGD without momentum at a constant LR, ``v_t = lr ||g_t||``, so the
  velocity ratios are exactly the gradient-norm ratios; for adaptive optimizers it is the
  force that drives the update. LR schedules do not enter it, so a warm-up is not read as
  growth.
* ``source="param_norm"``: ``| ||theta_t|| - ||theta_{t-1}|| |``, a lower bound of the
  paper's velocity (reverse triangle inequality), from :attr:`StepMeasurement.param_norm`,
  which is free when another post-step signal (``WeightNorm``, ``NonFiniteWeights``, both
  defaults) has already computed it, else one foreach norm pass. It also keeps the norm
  history for :meth:`Lyapunov.radius`, the attractor radius of the norm trajectory (the
  exact radius needs the full states: :func:`attractor_radius` takes them on demand).
  Measured on the tiny model (10 seeds x 150 clean AdamW steps): the estimate reached 0.38
  (false alarms at the 0.2 threshold), and AdamW's normalised update hides growing
  gradients from it; use it for the phase and radius read-outs, not for the alarm. With
  ``source="grad"`` the clean maximum was 0.09 and gradients growing x1.4 per step from
  step 40 were rolled back from step 62 on.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .base import StepMeasurement, Verdict

__all__ = ["lyapunov_estimate", "oscillation_ratio", "attractor_radius", "classify_phase",
           "PHASES", "Lyapunov"]

PHASES = ("transient", "convergent", "oscillatory", "divergent")


def lyapunov_estimate(velocities: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``mean_i ln(v_i / v_{i-1})`` over consecutive pairs with ``v_{i-1} > eps`` (Algorithm 4,
    l. 11-19), per step (``Delta t = 1``). 0 when no pair qualifies. 0-d float32 tensor.

    Without skipped pairs the mean telescopes to ``ln(v_last / v_first) / pairs``: the two
    end points of the window decide it, so a velocity that can come close to 0 (the change
    of the weight norm) makes it swing.
    """
    v = velocities.float()
    if v.numel() < 2:
        return torch.zeros((), device=v.device)
    prev, nxt = v[:-1], v[1:]
    ok = (prev > eps) & (nxt > eps) & torch.isfinite(prev) & torch.isfinite(nxt)
    logs = torch.log(nxt.clamp_min(eps)) - torch.log(prev.clamp_min(eps))
    logs = torch.where(ok, logs, torch.zeros_like(logs))
    return logs.sum() / ok.sum().clamp_min(1)


def oscillation_ratio(velocities: torch.Tensor) -> torch.Tensor:
    """``max_w P(w) / mean_w P(w)`` of the velocity power spectrum, DC excluded (sec. 3.4.7).

    The series is detrended (least-squares line removed) first, so a steady rise or decay
    does not read as a low-frequency oscillation. The paper flags an oscillation above 2;
    note that for white noise of ``n`` points the expected ratio is about ``ln(n / 2) +
    0.58`` (3.3 for ``n = 32``), so 2 flags noise as often as periodicity: use it as a
    label (see :func:`classify_phase`), not as an alarm. 0-d float32 tensor.
    """
    v = velocities.float()
    n = v.numel()
    if n < 4:
        return torch.zeros((), device=v.device)
    t = torch.arange(n, device=v.device, dtype=torch.float32)
    tc = t - t.mean()
    slope = (tc * (v - v.mean())).sum() / (tc * tc).sum()
    resid = v - v.mean() - slope * tc
    power = torch.fft.rfft(resid).abs().square()[1:]
    return power.max() / power.mean().clamp_min(1e-30)


def attractor_radius(states: torch.Tensor) -> torch.Tensor:
    """``R = max_t ||theta_t - theta_bar||`` for a window of states, one per row (sec. 3.4.5)."""
    s = states.float().reshape(states.shape[0], -1)
    return (s - s.mean(0)).norm(dim=1).max()


def classify_phase(lam: float, oscillation: float, divergent: float = 0.2,
                   transient: float = 0.1, marginal: float = 0.05, fft_factor: float = 2.0) -> str:
    """The training phase from the Lyapunov estimate and the oscillation ratio (sec. 3.4.4,
    with the decision order of sec. 3.4.8):

    ``lam > divergent``: ``"divergent"`` (FAILURE); ``lam > transient``: ``"transient"``
    (WARNING); ``|lam| < marginal`` and ``oscillation > fft_factor``: ``"oscillatory"``;
    anything else ``"convergent"`` (the paper's HEALTHY band, normal operation; its table
    reserves the word for ``lam < -0.1``, which is included).
    """
    if lam > divergent:
        return "divergent"
    if lam > transient:
        return "transient"
    if abs(lam) < marginal and oscillation > fft_factor:
        return "oscillatory"
    return "convergent"


def _ordered(buffer: torch.Tensor, count: int) -> torch.Tensor:
    """The ring buffer's values, oldest first (host-side indexing only)."""
    n = buffer.numel()
    if count < n:
        return buffer[:count]
    return torch.roll(buffer, -(count % n))


class Lyapunov:
    """FAILURE when the EMA Lyapunov estimate says the run diverges (sec. 3.4.3, 3.4.8).

    Each measured step adds a velocity (see the module docstring for ``source``) to a ring
    of the last ``window``; ``lam_hat`` = :func:`lyapunov_estimate` over the ring; ``lam =
    (1 - beta) lam + beta lam_hat``. Fires when ``lam > divergent`` (default 0.2, the
    paper's FAILURE threshold) after ``warmup`` velocities. References learn only from
    applied steps that did not fire. All on the device: no host sync per step.

    Read-outs (one host read each, on demand): :meth:`training_phase`, :meth:`oscillation`,
    :meth:`radius`, ``float(sig.lam)``. ``rebase()`` forgets everything.

    Opt-in, off by default: it reacts to sustained exponential growth (a 20-step window),
    not to a single bad step, which the default signals already catch.
    """

    name = "lyapunov"
    phase, verdict = "after", Verdict.FAILURE

    def __init__(self, window: int = 20, beta: float = 0.1, divergent: float = 0.2,
                 transient: float = 0.1, marginal: float = 0.05, fft_factor: float = 2.0,
                 warmup: int | None = None, source: str = "grad"):
        if window < 4 or not 0 < beta <= 1:
            raise ValueError(f"Invalid window={window!r} / beta={beta!r}; need window >= 4 and "
                             "0 < beta <= 1.")
        if not divergent > transient > marginal > 0 or not fft_factor > 1:
            raise ValueError(f"Invalid thresholds divergent={divergent!r}, transient={transient!r}, "
                             f"marginal={marginal!r}, fft_factor={fft_factor!r}; need divergent > "
                             "transient > marginal > 0 and fft_factor > 1.")
        if source not in ("grad", "param_norm"):
            raise ValueError(f"Invalid source: {source!r}; use 'grad' or 'param_norm'.")
        self.window, self.beta, self.source = window, beta, source
        self.divergent, self.transient, self.marginal = divergent, transient, marginal
        self.fft_factor = fft_factor
        self.warmup = window if warmup is None else warmup
        self.rebase()

    def rebase(self) -> None:
        """Forget the velocity history and the estimate."""
        self.velocities: torch.Tensor | None = None
        self.norms: torch.Tensor | None = None
        self.count = 0                       # velocities kept
        self.seen = 0                        # norms kept
        self.lam: torch.Tensor | None = None
        self.last_norm: torch.Tensor | None = None
        self._pending: tuple | None = None

    def _velocity(self, m: StepMeasurement) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.source == "grad":
            return m.grad_norm.detach().float().reshape(()), None
        norm = m.param_norm.detach().float().reshape(())
        if self.last_norm is None:
            return None, norm
        return (norm - self.last_norm.to(norm.device)).abs(), norm

    def measure(self, m: StepMeasurement) -> torch.Tensor:
        v, norm = self._velocity(m)
        device = m.grad_norm.device
        if v is None:
            self._pending = (None, None, None, norm)
            return torch.zeros((), dtype=torch.bool, device=device)
        buf = (torch.zeros(self.window, device=v.device) if self.velocities is None
               else self.velocities.clone())
        buf[self.count % self.window] = torch.nan_to_num(v, nan=0.0, posinf=0.0)
        lam_hat = lyapunov_estimate(_ordered(buf, self.count + 1))
        lam = lam_hat * self.beta if self.lam is None else torch.lerp(self.lam, lam_hat, self.beta)
        self._pending = (buf, lam, v, norm)
        if self.count + 1 < self.warmup:
            return torch.zeros((), dtype=torch.bool, device=device)
        return (torch.isfinite(v) & (lam > self.divergent)).to(device)

    def observe(self, m: StepMeasurement, applied: bool, fired: bool) -> None:
        if self._pending is None:
            return
        buf, lam, v, norm = self._pending
        self._pending = None
        if not applied or fired:
            return
        if norm is not None:
            if self.norms is None:
                self.norms = torch.zeros(self.window, device=norm.device)
            self.norms[self.seen % self.window] = norm
            self.seen += 1
            self.last_norm = norm
        if buf is None:
            return
        self.velocities, self.lam = buf, lam
        self.count += 1

    # read-outs (host reads, on demand)
    def oscillation(self) -> float:
        if self.velocities is None:
            return 0.0
        return float(oscillation_ratio(_ordered(self.velocities, self.count)))

    def training_phase(self) -> str:
        """:func:`classify_phase` of the current estimate (one host read)."""
        lam = 0.0 if self.lam is None else float(self.lam)
        return classify_phase(lam, self.oscillation(), self.divergent, self.transient,
                              self.marginal, self.fft_factor)

    def radius(self) -> float:
        """Attractor radius of the parameter-norm trajectory (``source="param_norm"`` only)."""
        if self.norms is None:
            return math.nan
        norms = _ordered(self.norms, self.seen)
        return float(attractor_radius(norms.reshape(-1, 1)))

    def state_dict(self) -> dict[str, Any]:
        return {"velocities": self.velocities, "norms": self.norms, "count": self.count,
                "seen": self.seen, "lam": self.lam, "last_norm": self.last_norm}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def own(t):
            return None if t is None else t.detach().clone()
        self.velocities, self.norms = own(state["velocities"]), own(state["norms"])
        self.count, self.lam = int(state["count"]), own(state["lam"])
        self.seen = int(state["seen"])
        self.last_norm = own(state["last_norm"])
        self._pending = None

    def __repr__(self) -> str:
        return (f"Lyapunov(window={self.window}, beta={self.beta}, divergent={self.divergent}, "
                f"source={self.source!r})")
