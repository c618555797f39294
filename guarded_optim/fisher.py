"""Diagonal Fisher information and the recovery tools built on it (ARC, sec. 3.3 and 3.6).

Pure functions (lists of tensors in, tensors out, ``torch._foreach_*``, no host sync):

* :func:`fisher_update_` -- ``F <- (1 - alpha) F + alpha g^2`` (sec. 3.3.2), in place.
* :func:`fisher_rao_distance` -- ``sqrt(sum_i F_i (a_i - b_i)^2)`` (sec. 3.3.3).
* :func:`fisher_effective_rank` -- ``exp(H(F / sum F))`` (sec. 3.3.4).
* :func:`gradient_snr` -- ``sum F / sum Var(g)`` from the EMAs of ``g`` and ``g^2`` (sec. 3.3.5).
* :func:`restore_weights` -- the importance-weighted rollback coefficient ``beta`` (sec. 3.3.3).
* :func:`ewc_penalty_value` -- ``sum_i w_i (theta_i - theta*_i)^2`` (sec. 3.6.8), differentiable.

Stateful shells, all :class:`~guarded_optim.policy.RecoveryAction` so they plug into
``GuardedOptimizer(recovery=[...])`` and their state lands in the guard's ``state_dict``
(tensors and plain values only: ``torch.load(weights_only=True)`` reads it):

* :class:`FisherDiagonal` -- the EMA, updated in ``on_healthy`` from the ``p.grad`` of the
  step just applied (so only kept proposals teach it), optionally kept on the host.
* :class:`FisherDrift` -- a preventive verified snapshot when the Fisher-Rao distance from
  the newest snapshot in the guard's history ring exceeds ``tau`` (Algorithm 3, l. 5-7).
* :class:`ImportanceWeightedRollback` -- opt-in: after the exact restore, blend the rejected
  values back in per element, least for the important parameters (Algorithm 3, l. 14).
* :class:`EWCPenalty` -- opt-in: after a rollback, a penalty the closure adds to its loss
  (:func:`ewc_penalty`), decaying as stability returns (sec. 3.6.5, 3.6.9, 3.6.7).

The default estimate (issue 12): :func:`keeps_second_moment` says whether the inner optimizer
already keeps ``EMA(g^2)`` (Adam family: read in place by :class:`InnerFisher`, zero extra
bytes); where it does not, :func:`default_fisher` gives the :class:`HostFisher` tracker the
default guard carries (host memory, updated on verified steps only).

The tools that need the Fisher find the :class:`FisherDiagonal` in ``guard.recovery`` when
they act, rather than holding a reference: ``load_state_dict`` replaces every action by a
loaded copy, and a held reference would go stale. Put it first:
``recovery=[FisherDiagonal(), ImportanceWeightedRollback()]``.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Any, Sequence

import torch

from .policy import RecoveryAction

__all__ = ["fisher_update_", "fisher_rao_distance", "fisher_effective_rank", "gradient_snr",
           "restore_weights", "ewc_penalty_value", "verified_params", "FisherDiagonal",
           "FisherDrift", "ImportanceWeightedRollback", "EWCPenalty", "ewc_penalty",
           "find_fisher", "InnerFisher", "keeps_second_moment", "default_fisher", "HostFisher",
           "SECOND_MOMENT_OPTIMIZERS"]

Tensors = Sequence[torch.Tensor]


# -- pure functions ------------------------------------------------------------------------
@torch.no_grad()
def fisher_update_(fisher: list[torch.Tensor], grads: Tensors, alpha: float) -> None:
    """``F <- (1 - alpha) * F + alpha * g * g`` in place (sec. 3.3.2, one foreach pass)."""
    torch._foreach_mul_(fisher, 1.0 - alpha)
    torch._foreach_addcmul_(fisher, list(grads), list(grads), value=alpha)


def _sum_all(tensors: Tensors, device: torch.device) -> torch.Tensor:
    """Sum of every element of non-negative ``tensors`` (1-norms), float64, on ``device``."""
    if not tensors:
        return torch.zeros((), dtype=torch.float64, device=device)
    norms = torch._foreach_norm(list(tensors), 1)
    return torch.stack([n.to(device, torch.float64) for n in norms]).sum()


def fisher_rao_distance(fisher: Tensors, a: Tensors, b: Tensors) -> torch.Tensor:
    """``d_FR(a, b) = sqrt(sum_i F_i (a_i - b_i)^2)`` (sec. 3.3.3) as a 0-d float64 tensor.

    ``fisher``, ``a`` and ``b`` are aligned lists (one tensor per parameter) on one device.
    No host sync.
    """
    device = a[0].device if len(a) else torch.device("cpu")
    diff = torch._foreach_sub([t.detach().float() for t in a], [t.detach().float() for t in b])
    torch._foreach_mul_(diff, diff)
    torch._foreach_mul_(diff, [f.float() for f in fisher])
    return _sum_all(diff, device).sqrt()


def fisher_effective_rank(fisher: Tensors) -> torch.Tensor:
    """``exp(-sum_i p_i log p_i)`` with ``p = F / sum F`` (sec. 3.3.4), a 0-d float64 tensor.

    Between 1 (all Fisher mass on one element) and the element count (uniform mass); 0 for
    an all-zero Fisher. Uses ``H = log S - sum F log F / S`` (``S = sum F``) so nothing is
    normalised in place.
    """
    device = fisher[0].device
    f = [t.detach().double() for t in fisher]
    total = _sum_all(f, device)
    flogf = torch.stack([torch.special.xlogy(t, t).sum() for t in f])
    entropy = total.log() - flogf.sum() / total
    return torch.where(total > 0, entropy.exp(), torch.zeros_like(total))


def gradient_snr(mean: Tensors, second: Tensors) -> torch.Tensor:
    """Global gradient signal-to-noise ratio (sec. 3.3.5): ``sum_i F_i / sum_i sigma_i^2``.

    ``mean`` and ``second`` are EMAs of ``g`` and ``g^2`` (the latter *is* the diagonal
    Fisher), ``sigma^2 = F - mean^2``. The paper's per-element ratio ``F_i / sigma_i^2`` is
    aggregated over the elements as a ratio of sums, which is dominated by the elements that
    carry the gradient, not by the near-silent ones. It is ``>= 1``; near 1: the updates are
    mostly sampling noise; large: a consistent direction. ``inf`` when there is no noise.
    """
    device = second[0].device
    var = torch._foreach_mul([m.double() for m in mean], [m.double() for m in mean])
    var = torch._foreach_sub([s.double() for s in second], var)
    torch._foreach_clamp_min_(var, 0.0)
    return _sum_all([s.double() for s in second], device) / _sum_all(var, device)


def restore_weights(fisher: Tensors, lam: float, centre: float) -> list[torch.Tensor]:
    """``beta_i = sigmoid(lam * (F_i / mean(F) - centre))``: how much of parameter element
    ``i`` is put back to the snapshot by an importance-weighted rollback (sec. 3.3.3).

    The paper writes ``beta_i = sigmoid(lam_p (F_i - mean F))``. That is this formula with
    ``centre = 1`` and ``lam = lam_p * mean F`` (a scale-free ``lam``: the same value works
    whatever the loss scale). See :class:`ImportanceWeightedRollback` for why the default
    centre lies below 0. An all-zero Fisher (nothing learned yet) gives ``beta = 1``: exact
    rollback. Each ``beta_i`` has its Fisher tensor's shape, in float32 or wider.
    """
    f = [t.detach() if t.dtype in (torch.float32, torch.float64) else t.detach().float()
         for t in fisher]
    device = f[0].device
    count = sum(t.numel() for t in f)
    mean = _sum_all(f, device) / max(count, 1)
    scale = torch.where(mean > 0, lam / mean, torch.zeros_like(mean))
    exact = (mean <= 0) | ~torch.isfinite(mean)
    out = []
    for t in f:
        z = (torch.nan_to_num(t, nan=0.0, posinf=0.0) * scale.to(t.dtype) - lam * centre)
        out.append(torch.where(exact, torch.ones_like(z), torch.sigmoid(z)))
    return out


def ewc_penalty_value(params: Tensors, anchors: Tensors, weights: Tensors) -> torch.Tensor:
    """``sum_i w_i (theta_i - theta*_i)^2`` (Algorithm 8), differentiable in ``params``."""
    diff = torch._foreach_sub(list(params), list(anchors))
    sq = torch._foreach_mul(diff, diff)
    sq = torch._foreach_mul(sq, list(weights))
    return torch.stack([s.sum() for s in sq]).sum()


# -- helpers reading the guard -------------------------------------------------------------
def _params(guard) -> list[torch.Tensor]:
    return [p for g in guard.param_groups for p in g["params"]]


def verified_params(snapshot) -> list[torch.Tensor]:
    """The parameters saved in a :class:`~guarded_optim.snapshot.Snapshot` (read-only views,
    on the snapshot's device: the host in ``"host"`` mode). Waits for a pending copy."""
    return list(snapshot.state_dict()["params"])


def find_fisher(guard) -> "FisherDiagonal | InnerFisher":
    """The diagonal Fisher the guard's tools read: a :class:`FisherDiagonal` among
    ``guard.recovery``, else the inner optimizer's own second moment (:class:`InnerFisher`,
    Adam family, zero extra bytes), else a ``ValueError`` saying how to add one."""
    for a in guard.recovery:
        if isinstance(a, FisherDiagonal):
            return a
    inner = InnerFisher(guard)
    if inner.available:
        return inner
    raise ValueError("this tool reads the diagonal Fisher, but the inner optimizer keeps no "
                     "second moment (exp_avg_sq) and guard.recovery has no FisherDiagonal; "
                     "build the guard with recovery=[FisherDiagonal(host=True), ...].")


class InnerFisher:
    """The diagonal Fisher the Adam family already keeps: ``exp_avg_sq``, an EMA of ``g^2``
    with factor ``1 - beta2``, bias-corrected by ``1 - beta2^step`` (the design card's
    "Fisher diagonal", at zero extra bytes: it *is* the optimizer state, saved in every
    ``state_dict``). Read-only; the same read-outs as :class:`FisherDiagonal`.
    Parameters with no state yet read as 0."""

    def __init__(self, guard):
        self.guard = guard

    @property
    def available(self) -> bool:
        return any("exp_avg_sq" in st for st in self.guard.state.values())

    @property
    def ready(self) -> bool:
        return self.available

    def _require(self) -> list[torch.Tensor]:
        out = []
        for g in self.guard.param_groups:
            beta2 = g.get("betas", (0.9, 0.999))[1]
            for p in g["params"]:
                st = self.guard.state.get(p, {})
                v = st.get("exp_avg_sq")
                if v is None:
                    out.append(torch.zeros_like(p, dtype=torch.float32))
                    continue
                step = float(st.get("step", 1))
                out.append(v.detach().float() / max(1.0 - beta2 ** max(step, 1.0), 1e-12))
        return out

    def distance(self, a: Tensors, b: Tensors) -> torch.Tensor:
        f = self._require()
        return fisher_rao_distance(f, _on(a, f), _on(b, f))

    def effective_rank(self) -> torch.Tensor:
        return fisher_effective_rank(self._require())


def _on(tensors: Tensors, like: Tensors) -> list[torch.Tensor]:
    return [t.to(p.device) for t, p in zip(tensors, like)]


# -- the Fisher EMA ------------------------------------------------------------------------
def _dense_real(g: torch.Tensor) -> torch.Tensor:
    """A gradient as the dense real tensor whose square is its Fisher term: sparse gradients
    (``nn.Embedding(sparse=True)``) densified, complex ones as ``|g|``."""
    if g.layout != torch.strided:
        g = g.to_dense()
    return g.abs() if g.is_complex() else g


class FisherDiagonal(RecoveryAction):
    """Diagonal Fisher ``F = EMA(g^2)`` (sec. 3.3.2), learned from accepted steps only.

    ``on_healthy`` runs after every applied step that nothing flagged and reads ``p.grad`` of
    that step (the gradients the inner optimizer just used), every ``every``-th time. The
    first update sets ``F = g^2``; later ones ``F <- (1 - alpha) F + alpha g^2``, so after
    updates with ``g_1 .. g_n``: ``F = (1-alpha)^(n-1) g_1^2 + sum_{k>=2} alpha (1-alpha)^(n-k) g_k^2``.
    Parameters without a gradient keep their value (0 until they get one).

    With ``probe_every=k > 1`` the unmeasured steps count as applied (as in the guard's
    stats): a later rollback of them does not take their gradients back out of ``F``.

    ``host=True`` keeps ``F`` in CPU memory: no accelerator memory, at the price of a
    device-to-host copy of the gradients at every update (a sync on CUDA; raise ``every``
    to amortise it). ``track_mean=True`` also keeps ``EMA(g)`` for :meth:`snr` (one more
    copy of the parameters' size). Cost per update: one or two foreach passes over the
    gradients.
    """

    name = "fisher"

    def __init__(self, alpha: float = 0.01, host: bool = False, track_mean: bool = False,
                 every: int = 1):
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"Invalid alpha: {alpha!r}; the EMA factor must lie in (0, 1], "
                             "e.g. 0.01.")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"Invalid every: {every!r}; use an int >= 1 (1: every healthy step).")
        self.alpha, self.host, self.track_mean, self.every = float(alpha), bool(host), track_mean, every
        self.fisher: list[torch.Tensor] | None = None
        self.mean: list[torch.Tensor] | None = None
        self.updates = 0      # EMA updates made
        self.healthy = 0      # healthy steps seen (the every-N counter)

    # the EMA
    def update(self, params: Tensors) -> None:
        """Fold the gradients of ``params`` into ``F`` (the ``on_healthy`` body)."""
        params = list(params)
        if self.fisher is None or len(self.fisher) != len(params):
            self.fisher = [self._zeros(p) for p in params]
            self.mean = [self._zeros(p) for p in params] if self.track_mean else None
            self.updates = 0
        idx = [i for i, p in enumerate(params) if p.grad is not None]
        if not idx:
            return
        grads = [params[i].grad.detach() for i in idx]
        if self.host:
            grads = [g.to("cpu") for g in grads]
        grads = [_dense_real(g).to(self.fisher[i].dtype) for g, i in zip(grads, idx)]
        alpha = 1.0 if self.updates == 0 else self.alpha
        fisher_update_([self.fisher[i] for i in idx], grads, alpha)
        if self.mean is not None:
            torch._foreach_lerp_([self.mean[i] for i in idx], grads, alpha)
        self.updates += 1

    def _zeros(self, p: torch.Tensor) -> torch.Tensor:
        dtype = p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32
        return torch.zeros(p.shape, dtype=dtype, device="cpu" if self.host else p.device)

    def on_healthy(self, guard) -> None:
        self.healthy += 1
        if (self.healthy - 1) % self.every == 0:
            self.update(_params(guard))

    # read-outs (on demand; each returns a 0-d tensor, no host sync)
    @property
    def ready(self) -> bool:
        return self.fisher is not None and self.updates > 0

    def _require(self) -> list[torch.Tensor]:
        if not self.ready:
            raise RuntimeError("FisherDiagonal has seen no accepted step yet; read it after "
                               "training has taken at least one healthy step.")
        return self.fisher

    def distance(self, a: Tensors, b: Tensors) -> torch.Tensor:
        """Fisher-Rao distance between two aligned parameter lists (on the Fisher's device)."""
        f = self._require()
        return fisher_rao_distance(f, _on(a, f), _on(b, f))

    def effective_rank(self) -> torch.Tensor:
        return fisher_effective_rank(self._require())

    def snr(self) -> torch.Tensor:
        if self.mean is None:
            raise RuntimeError("FisherDiagonal.snr() needs EMA(g): build it with track_mean=True.")
        return gradient_snr(self.mean, self._require())

    # state
    def state_dict(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "updates": self.updates, "healthy": self.healthy,
                "fisher": None if self.fisher is None else list(self.fisher),
                "mean": None if self.mean is None else list(self.mean)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def own(ts):
            return None if ts is None else [t.detach().clone().to("cpu") if self.host else
                                            t.detach().clone() for t in ts]
        self.alpha, self.updates = float(state["alpha"]), int(state["updates"])
        self.healthy = int(state["healthy"])
        self.fisher, self.mean = own(state["fisher"]), own(state["mean"])

    def __repr__(self) -> str:
        return (f"FisherDiagonal(alpha={self.alpha}, host={self.host}, "
                f"track_mean={self.track_mean}, every={self.every})")


# -- the default estimate ------------------------------------------------------------------
def _second_moment_classes() -> tuple[type, ...]:
    names = ("Adam", "AdamW", "NAdam", "RAdam", "SparseAdam")
    return tuple(getattr(torch.optim, n) for n in names if hasattr(torch.optim, n))


#: torch optimizers whose per-parameter state holds ``exp_avg_sq``, an EMA of ``g^2`` with
#: factor ``1 - betas[1]`` (what :class:`InnerFisher` reads). Not Adamax (``exp_inf``, an
#: infinity norm), Adagrad (``sum``, no decay), RMSprop / Adadelta (``square_avg``, no
#: ``betas`` or bias correction), Adafactor (factored ``row_var`` / ``col_var``).
SECOND_MOMENT_OPTIMIZERS: tuple[type, ...] = _second_moment_classes()


def keeps_second_moment(optimizer) -> bool:
    """Whether ``optimizer`` keeps, per parameter, the EMA of squared gradients that
    :class:`InnerFisher` reads (``state[p]["exp_avg_sq"]``).

    Decided without a step: true for the classes in :data:`SECOND_MOMENT_OPTIMIZERS` (and
    their subclasses), and for any optimizer whose existing state already holds an
    ``exp_avg_sq`` (a custom Adam-like optimizer after its first step). A
    ``GuardedOptimizer`` is looked through to its inner optimizer. Pure: reads only.
    """
    inner = getattr(optimizer, "inner", None)
    if isinstance(inner, torch.optim.Optimizer):
        optimizer = inner
    if isinstance(optimizer, SECOND_MOMENT_OPTIMIZERS):
        return True
    state = getattr(optimizer, "state", None) or {}
    return any(isinstance(st, dict) and "exp_avg_sq" in st for st in state.values())


def default_fisher(optimizer) -> "HostFisher | None":
    """The Fisher tracker the default guard adds for ``optimizer``: ``None`` where the inner
    optimizer already keeps one (:func:`keeps_second_moment`: zero extra bytes), else a
    fresh :class:`HostFisher` (host memory, float32, updated on verified steps)."""
    return None if keeps_second_moment(optimizer) else HostFisher()


def is_default_fisher(action: Any) -> bool:
    """Whether ``action`` is the default tracker (a :class:`HostFisher`)."""
    return isinstance(action, HostFisher)


def is_default_fisher_state(state: Any) -> bool:
    """Whether a saved recovery action's state is the default tracker's (its marker key)."""
    return isinstance(state, dict) and state.get("default") is True


class HostFisher(FisherDiagonal):
    """The default guard's diagonal Fisher where the inner optimizer keeps no second moment
    (SGD, RMSprop, Adagrad, ...): ``F = EMA(g^2)`` in host memory, float32 (4 bytes per
    parameter on the CPU, no accelerator memory), learned from verified steps only.

    *Which steps teach it.* ``on_healthy`` runs after every applied step nothing flagged,
    including the unverified ones between a probe-less guard's verifications. This tracker
    folds in ``p.grad`` only when the guard has just verified what that gradient touches:

    * with a probe (``guard.probe`` set): when ``guard.step_state.unverified == 0`` at ``on_healthy``,
      i.e. the step just applied was measured by the probe and accepted (every step with
      ``probe_every=1``; every ``probe_every``-th applied step otherwise). A gradient whose
      proposal is later rolled back never reaches ``F``.
    * without a probe: when ``(guard.step_state.unverified - 1) % guard.probe_every == 0``. A guard
      that verifies (post-step signals, by default every ``VERIFY_EVERY = 10`` applied steps)
      keeps ``1 <= _unverified <= probe_every`` at ``on_healthy``, so this is
      ``unverified == 1``: the first proposal from a verified state (just verified at this
      step's start, or restored, or the reference), whose gradient was computed at that
      verified state and passed the pre-step signals (finite, no spike). A guard that
      never verifies (no FAILURE signal, no probe) keeps counting up, and the same rule is a
      plain cadence of one update per ``probe_every`` applied steps.

    Either way, in steady state one update per verification window: the cost follows the
    guard's own verification cadence (bounded: on CUDA each update is a device-to-host copy
    of the gradients, a sync, so it must not run every step when the guard itself verifies
    every ``k`` steps). ``every=n`` keeps only every ``n``-th of those updates. The update is
    ``F = g^2`` the first time, then ``F <- (1 - alpha) F + alpha g^2`` (as
    :class:`FisherDiagonal`); at ``alpha = 0.01`` and one update per 10 steps its horizon,
    ~1000 steps, is Adam's ``beta2 = 0.999``'s.

    It reads gradients and writes only its own tensors: the optimisation is unchanged bit for
    bit. Its state (``fisher``, counters, ``"default": True``) lands in the guard's
    ``state_dict`` (``weights_only=True`` loads it); ``fisher_source`` reports it as ``"host"``.

    Measured cost (1,050,624 params: ``nn.Sequential`` of 4 ``Linear(512, 512)`` + ReLU,
    ``SGD(lr=0.01, momentum=0.9)``, CPU, torch 2.13, 1 thread; times are medians of 9
    paired, interleaved repetitions of 20 calls in one process; the script is in the commit
    message that added this class):

    * memory: 4.000 bytes per parameter, host, float32 (none on the accelerator);
    * checkpoint: 4.003 bytes per parameter for bare SGD's ``state_dict`` (the momentum
      buffers), 8.005 with the tracker's state (+4.002); a probe-less guard's
      ``state_dict`` 4.012 without it, 8.014 with it;
    * time: one update 0.208 ms against 0.404 ms for a bare SGD step, a paired ratio of
      0.51 (range 0.47-0.57; a second run on the busy shared 2-core machine: 0.231 against
      0.634 ms, 0.36); at one update per 10 steps (the probe-less default) that is ~0.05 of
      a bare SGD step per step, and a whole guarded training step (forward, backward, step,
      batch 64) measured a paired ratio with/without of 0.986 (range 0.94-1.07; second run
      1.012, 0.93-1.08): below the noise. On CUDA add, per update, the device-to-host copy
      of the gradients (their bytes over PCIe, and a sync): not measured (no GPU here).
    """

    default = True

    def __init__(self, alpha: float = 0.01, every: int = 1):
        super().__init__(alpha=alpha, host=True, track_mean=False, every=every)
        self.verified = 0     # verified steps seen (the every-n counter)

    def _zeros(self, p: torch.Tensor) -> torch.Tensor:
        return torch.zeros(p.shape, dtype=torch.float32, device="cpu")

    @staticmethod
    def verified_step(guard) -> bool:
        """Whether the step ``guard`` just applied counts as verified (see the class doc).
        Without the guard's counters (a bare object): every step."""
        unverified = getattr(getattr(guard, "step_state", None), "unverified", None)
        if not isinstance(unverified, int):
            return True
        if getattr(guard, "probe", None) is not None:
            return unverified == 0
        k = getattr(guard, "probe_every", None) or 1
        return unverified >= 1 and (unverified - 1) % k == 0

    def on_healthy(self, guard) -> None:
        self.healthy += 1
        if not self.verified_step(guard):
            return
        self.verified += 1
        if (self.verified - 1) % self.every == 0:
            self.update(_params(guard))

    def reset(self) -> None:
        """Forget the estimate (a fresh tracker with the same settings)."""
        self.fisher = self.mean = None
        self.updates = self.healthy = self.verified = 0

    def nbytes(self) -> int:
        """Host bytes held by the estimate."""
        return sum(t.numel() * t.element_size() for t in self.fisher or ())

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "verified": self.verified, "default": True}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.verified = int(state.get("verified", 0))
        if self.fisher is not None:
            self.fisher = [t.float() for t in self.fisher]
        self.mean = None

    def __repr__(self) -> str:
        return f"HostFisher(alpha={self.alpha}, every={self.every})"


# -- preventive snapshot on drift ----------------------------------------------------------
class FisherDrift(RecoveryAction):
    """Push the verified state into the guard's history ring when it has drifted (Algorithm 3,
    l. 5-7): ``d_FR(theta, theta_ref) > tau`` where ``theta_ref`` is the newest snapshot in
    the ring (with an empty ring: push now, so escalation has somewhere to go).

    How: the guard asks every recovery action ``wants_checkpoint(guard)`` when it verifies
    the live state (``_verify``: after an accepted probe measurement, or, without a probe,
    when the post-step signals pass); ``True`` pushes the just-verified state into the ring,
    as ``checkpoint_every`` does. The guard's safe snapshot already follows every verified
    step, so what drift adds is an *older* verified state to escalate to, placed where the
    trajectory has moved far in the directions that matter rather than every N steps.

    Cost: every ``check_every``-th verification, one foreach pass over the parameters and
    the ring entry's copy (moved to the Fisher's device) and one host read of the distance.
    ``tau`` is in the units of ``sqrt(sum F dtheta^2)``, i.e. roughly the first-order
    change of the loss that the drift could cause; ``drift_history`` keeps the measured
    distances (last 100) to set it.
    """

    name = "fisher_drift"

    def __init__(self, tau: float, check_every: int = 10):
        if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
            raise ValueError(f"Invalid tau: {tau!r}; the drift threshold must be a finite "
                             "number > 0 (units of sqrt(sum F dtheta^2)).")
        if isinstance(check_every, bool) or not isinstance(check_every, int) or check_every < 1:
            raise ValueError(f"Invalid check_every: {check_every!r}; use an int >= 1.")
        self.tau, self.check_every = float(tau), check_every
        self.verifications = 0
        self.triggered = 0
        self.drift_history: list[float] = []

    def wants_checkpoint(self, guard) -> bool:
        self.verifications += 1
        if self.verifications % self.check_every:
            return False
        fisher = find_fisher(guard)
        if not fisher.ready or guard.snapshot_history.capacity <= 0:
            return False
        ring = list(guard.snapshot_history)
        if not ring:
            self.triggered += 1
            return True
        d = float(fisher.distance(_params(guard), verified_params(ring[-1])))
        self.drift_history = (self.drift_history + [d])[-100:]
        if d > self.tau:
            self.triggered += 1
            return True
        return False

    def state_dict(self) -> dict[str, Any]:
        return {"verifications": self.verifications, "triggered": self.triggered,
                "drift_history": list(self.drift_history)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.verifications, self.triggered = int(state["verifications"]), int(state["triggered"])
        self.drift_history = [float(d) for d in state["drift_history"]]

    def __repr__(self) -> str:
        return f"FisherDrift(tau={self.tau}, check_every={self.check_every})"


# -- importance-weighted rollback ----------------------------------------------------------
class ImportanceWeightedRollback(RecoveryAction):
    """Opt-in recovery mode (sec. 3.3.3): after the guard's exact restore, blend part of the
    rejected values back in, per element:
    ``theta_i = beta_i * theta_i(snapshot) + (1 - beta_i) * theta_i(rejected)`` with
    ``beta_i = sigmoid(lam * (F_i / mean F - centre))`` (:func:`restore_weights`).

    Why not the paper's centre (``centre=1``, i.e. ``sigmoid(lam_p (F_i - mean F))``): with
    it, every element below the mean Fisher tends to ``beta = 0`` as ``lam`` grows and keeps
    its *rejected* value; no ``lam`` gives exact rollback. The required property "``lam ->
    inf`` equals exact rollback" holds for a single multiplier ``lam`` iff the centre lies
    below every ``F_i / mean F``, i.e. below 0 for an arbitrary ``F >= 0``. The default
    ``centre=-0.05`` is the closest such choice: it keeps the paper's sigmoid, its
    importance ordering and its scale-free slope, and moves the centre just below the
    least informative element. Consequences: ``beta_i > 1/2`` for every ``lam > 0`` (a
    rejected proposal never contributes more than half of any element, the right side to
    err on for values the guard just rejected), ``lam = 0`` gives the midpoint, and once
    ``lam * (F_i / mean F - centre)`` exceeds 17 (float32; 37 in float64) ``beta_i`` rounds
    to exactly 1 and the element equals the snapshot bit for bit (tested). ``centre=1.0``
    gives the paper's formula exactly.

    The optimizer state, buffers and RNG are restored exactly; only parameters are blended,
    and non-finite rejected values are never blended in. The blend is skipped when the
    guard escalated, re-baselined or rewound slow damage instead of restoring its snapshot.
    The blended state is not captured as verified: it is measured with the next proposal, and a rejection there
    returns to the exact snapshot. Cost: one copy of the parameters at each rollback.
    """

    name = "importance_rollback"

    def __init__(self, lam: float = 4.0, centre: float = -0.05):
        if not (math.isfinite(lam) and lam >= 0) or not math.isfinite(centre):
            raise ValueError(f"Invalid lam={lam!r} / centre={centre!r}; need a finite lam >= 0 "
                             "and a finite centre (< 0 for exact rollback as lam grows).")
        self.lam, self.centre = float(lam), float(centre)
        self.blends = 0
        self._rejected: list[torch.Tensor] | None = None
        self._marks: tuple[int, ...] = (0, 0, 0)

    @staticmethod
    def _went_elsewhere(guard) -> tuple[int, ...]:
        """Counters of the rollbacks that do not return to the snapshot just verified."""
        return guard.stats["escalations"], guard.stats["rebaselines"], guard.stats["rewinds"]

    def before_rollback(self, guard) -> None:
        self._rejected = [p.detach().clone() for p in _params(guard)]
        self._marks = self._went_elsewhere(guard)

    @torch.no_grad()
    def on_rollback(self, guard, consecutive):
        rejected, self._rejected = self._rejected, None
        fisher = find_fisher(guard)
        if rejected is None or not fisher.ready or self._marks != self._went_elsewhere(guard):
            return None
        params = _params(guard)
        beta = _on(restore_weights(fisher.fisher, self.lam, self.centre), params)
        for p, r, b in zip(params, rejected, beta):
            keep = (1.0 - b).to(p.dtype)                  # exactly 0 where beta rounds to 1
            ok = (keep > 0) & torch.isfinite(r)
            p.copy_(torch.where(ok, p + keep * (r - p), p))
        self.blends += 1
        return "importance_blend"

    def state_dict(self) -> dict[str, Any]:
        return {"lam": self.lam, "centre": self.centre, "blends": self.blends}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.lam, self.centre = float(state["lam"]), float(state["centre"])
        self.blends = int(state["blends"])

    def __repr__(self) -> str:
        return f"ImportanceWeightedRollback(lam={self.lam}, centre={self.centre})"


# -- EWC-regularised recovery --------------------------------------------------------------
class EWCPenalty(RecoveryAction):
    """Opt-in EWC-regularised recovery (sec. 3.6.5): after a rollback, the closure adds
    ``(lam_t / 2) * sum_i s_i F_i (theta_i - theta*_i)^2`` to its loss through
    :func:`ewc_penalty` (``loss = loss + ewc_penalty(opt)``).

    * ``theta*`` and ``F`` are consolidated at the rollback (Algorithm 7): the restored
      (verified) parameters and the Fisher of the :class:`FisherDiagonal` in
      ``guard.recovery`` at that moment, copied beside the parameters.
    * ``lam_t = lam * (1 + growth * (recoveries - 1)) * exp(-healthy / tau)`` (sec. 3.6.5,
      3.6.9): ``recoveries`` counts the rollbacks since the penalty was last inactive, so
      repeated recoveries protect more; ``healthy`` counts the healthy steps since the last
      rollback, so the penalty fades as stability returns. Below ``lam * min_fraction``
      it switches off and frees its copies; the recovery count starts again.
    * ``layers``: ``{pattern: scale}`` with :mod:`fnmatch` patterns over the names of
      ``guard.module.named_parameters()`` (sec. 3.6.7, e.g. ``{"embed*": 4.0, "head.*":
      0.25}``); the first matching pattern gives ``s_i``, 1 otherwise. Needs the guard's
      ``module=``; a pattern that matches no parameter is an error (a typo would silently
      protect nothing).

    While inactive :func:`ewc_penalty` returns a zero tensor and costs nothing; while active,
    one foreach pass over the parameters inside the closure's graph and two copies of the
    parameters' size (anchors, weights).
    """

    name = "ewc"

    def __init__(self, lam: float = 1.0, tau: float = 100.0, growth: float = 0.5,
                 layers: dict[str, float] | None = None, min_fraction: float = 1e-3):
        if not (math.isfinite(lam) and lam > 0) or not (math.isfinite(tau) and tau > 0):
            raise ValueError(f"Invalid lam={lam!r} / tau={tau!r}; both must be finite and > 0.")
        if not (math.isfinite(growth) and growth >= 0) or not 0 < min_fraction < 1:
            raise ValueError(f"Invalid growth={growth!r} / min_fraction={min_fraction!r}; need "
                             "growth >= 0 and 0 < min_fraction < 1.")
        for pattern, scale in (layers or {}).items():
            if not isinstance(pattern, str) or not (math.isfinite(scale) and scale >= 0):
                raise ValueError(f"Invalid layers entry {pattern!r}: {scale!r}; layers maps "
                                 "fnmatch patterns (str) to finite scales >= 0.")
        self.lam, self.tau, self.growth = float(lam), float(tau), float(growth)
        self.layers = dict(layers or {})
        self.min_fraction = float(min_fraction)
        self.recoveries = 0
        self.healthy = 0
        self.anchors: list[torch.Tensor] | None = None
        self.weights: list[torch.Tensor] | None = None

    @property
    def active(self) -> bool:
        return self.anchors is not None

    def strength(self) -> float:
        """``lam_t`` now (0 while inactive)."""
        if not self.active:
            return 0.0
        return (self.lam * (1.0 + self.growth * (self.recoveries - 1))
                * math.exp(-self.healthy / self.tau))

    def layer_scales(self, guard) -> list[float]:
        """``s_i`` for each parameter, in the guard's order, from ``layers``."""
        params = _params(guard)
        if not self.layers:
            return [1.0] * len(params)
        if guard.module is None:
            raise ValueError("EWCPenalty(layers=...) matches module parameter names; build the "
                             "guard with module=model.")
        names = {id(p): n for n, p in guard.module.named_parameters()}
        unused = [pat for pat in self.layers
                  if not any(fnmatch.fnmatchcase(n, pat) for n in names.values())]
        if unused:
            raise ValueError(f"EWCPenalty layers patterns {unused} match no parameter of the "
                             f"module (names look like {sorted(names.values())[:4]}).")
        scales = []
        for p in params:
            name = names.get(id(p), "")
            scales.append(next((s for pat, s in self.layers.items()
                                if fnmatch.fnmatchcase(name, pat)), 1.0))
        return scales

    @torch.no_grad()
    def on_rollback(self, guard, consecutive):
        fisher = find_fisher(guard)
        if not fisher.ready:
            return None
        params = _params(guard)
        self.anchors = [p.detach().clone() for p in params]
        self.weights = [f.to(p.device, p.dtype) * s for f, p, s in
                        zip(fisher.fisher, params, self.layer_scales(guard))]
        self.recoveries += 1
        self.healthy = 0
        return f"ewc_lambda={self.strength():g}"

    def on_healthy(self, guard) -> None:
        if self.active:
            self.healthy += 1
            if self.strength() < self.lam * self.min_fraction:
                self.anchors = self.weights = None
                self.recoveries = self.healthy = 0

    def penalty(self, guard) -> torch.Tensor:
        """``(lam_t / 2) sum s_i F_i (theta_i - theta*_i)^2``, differentiable; 0 when inactive."""
        params = _params(guard)
        if not self.active:
            return torch.zeros((), device=params[0].device)
        return 0.5 * self.strength() * ewc_penalty_value(params, self.anchors, self.weights)

    def state_dict(self) -> dict[str, Any]:
        return {"recoveries": self.recoveries, "healthy": self.healthy,
                "anchors": None if self.anchors is None else list(self.anchors),
                "weights": None if self.weights is None else list(self.weights)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        def own(ts):
            return None if ts is None else [t.detach().clone() for t in ts]
        self.recoveries, self.healthy = int(state["recoveries"]), int(state["healthy"])
        self.anchors, self.weights = own(state["anchors"]), own(state["weights"])

    def __repr__(self) -> str:
        return (f"EWCPenalty(lam={self.lam}, tau={self.tau}, growth={self.growth}, "
                f"layers={self.layers!r})")


def ewc_penalty(guard) -> torch.Tensor:
    """The sum of the :class:`EWCPenalty` terms among ``guard.recovery`` (0 when none is active).

    Call it inside the closure, on the guard itself, so it keeps working after
    ``guard.load_state_dict`` (which replaces the action objects)::

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y) + ewc_penalty(opt)
            loss.backward()
            return loss
    """
    terms = [a.penalty(guard) for a in guard.recovery if isinstance(a, EWCPenalty)]
    if not terms:
        return torch.zeros((), device=_params(guard)[0].device)
    return torch.stack(terms).sum() if len(terms) > 1 else terms[0]
