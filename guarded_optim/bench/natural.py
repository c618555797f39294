"""``guarded-optim bench --suite natural``: instabilities that arise by themselves.

Nothing is injected into the optimizer. Each mechanism is a small CPU reproduction, on the
bundled data (scikit-learn's digits, the docstrings of Python's standard library as bytes),
of an instability documented in the literature:

* ``postln_no_warmup`` -- a post-LN Transformer trained at a high LR without warm-up (Xiong
  et al. 2020, "On Layer Normalization in the Transformer Architecture"); reference: pre-LN.
* ``attn_logit_growth`` -- attention logits grow without bound at a high LR without
  qk-layernorm (Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer
  training instabilities", sec. 3.1); reference: qk-layernorm.
* ``output_logit_divergence`` -- the output logits drift without z-loss at a high LR and no
  weight decay (Wortsman et al. 2023, sec. 3.2); reference: z-loss 1e-4.
* ``adam_v_decay`` -- a long stretch of near-zero gradients lets Adam's second moment decay,
  so the first normal gradient after it makes an update many times the usual size (Molybog
  et al. 2023, "A Theory on Adam Instability in Large-Scale Machine Learning"); reference:
  the same Adam with Adafactor-style update clipping (StableAdamW, Wortsman et al. 2023b).
* ``adam_spikes_resnet18`` -- the benchmark's ResNet-18 task unchanged: near convergence
  Adam's own updates spike the loss (the same mechanism, at the scale of a real model);
  reference: StableAdamW. Not part of ``--quick`` (about 3 minutes per seed on 2 cores).
* ``fp16_params`` -- fp16 parameters trained directly: Adam's ``v = g^2`` and ``eps = 1e-8``
  underflow to zero (Micikevicius et al. 2018); reference: fp32 master weights under fp16
  autocast with ``torch.amp.GradScaler``.
* ``data_garbage``, ``data_repeat_token``, ``data_mislabel``, ``data_duplicate`` -- bad data
  as it occurs in corpora: a burst of random bytes, a run of one repeated token, a shard of
  mislabelled digits, one batch repeated many times; reference: the clean stream.
* ``edge_of_stability`` -- full-batch gradient descent at ``2.5 / lambda_max`` (Cohen et al.
  2021, "Gradient Descent on Neural Networks Typically Occurs at the Edge of Stability");
  reference: ``0.25 / lambda_max``, well below ``2 / lambda_max`` (the sharpness grows during
  training, so ``1 / lambda_max`` at initialisation already blows up on some seeds).

For each mechanism and seed, five arms start from the same weights and see the same batches:
``bare`` (the unstable setup), ``reference`` (the same model with the stabilising fix), and
the unstable setup under ``GuardedOptimizer`` with a probe (``guarded_probe``), without one
(``guarded_signals``) and with a probe and ``arc_recovery()`` (``guarded_recovery``). The
guarded arms are the library's defaults: a run the guard stops (:class:`GuardStopped`, its
escalation budget spent) ends there, and its remaining steps hold the probe loss of the state
it stopped on. For the LR-driven mechanisms each arm is also swept over LRs on the first
seed, for Wortsman et al.'s LR sensitivity ``mean over LRs of min(loss, loss at init) -
best loss over the sweep``.

Every number in the tables is measured; :func:`run` returns the rows, :func:`format_table`
prints them and :func:`figures` draws one PNG per mechanism.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import statistics
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..guard import GuardedOptimizer
from ..ladder import GuardStopped
from ..policy import arc_recovery
from ..signals import hessian_lambda_max
from . import data, models, report, tasks

__all__ = ["Mechanism", "Setup", "MECHANISMS", "ARMS", "TinyLM", "StableAdamW", "run",
           "format_table", "figures", "train", "lr_sensitivity", "HURT_FINAL", "HURT_PEAK"]

#: the arms of every mechanism, in table order
ARMS = ("bare", "reference", "guarded_probe", "guarded_signals", "guarded_recovery")
#: a mechanism is "reproduced" when bare ends at least this much above the reference
#: (final probe loss, mean over seeds) ...
HURT_FINAL = 1.05
#: ... or peaks at least this much above it
HURT_PEAK = 1.25
#: the final probe loss of a run is the mean over its last FINAL_STEPS steps (one step's
#: value at a high LR jitters by a few percent)
FINAL_STEPS = 5


# ---------------------------------------------------------------------------------------------
# models and optimizers the mechanisms need beyond bench.models

class _Attention(nn.Module):
    """Causal multi-head self-attention, written out so that qk-layernorm can be switched on
    and the largest attention logit read (``max_logit``, of the last forward)."""

    def __init__(self, d: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.out = nn.Linear(d, d, bias=False)
        self.q_norm = nn.LayerNorm(d // heads) if qk_norm else None
        self.k_norm = nn.LayerNorm(d // heads) if qk_norm else None
        self.max_logit = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        logits = q @ k.transpose(-1, -2) / math.sqrt(d // self.heads)
        self.max_logit = float(logits.detach().abs().max())
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).triu(1)
        attn = logits.masked_fill(causal, float("-inf")).softmax(-1)
        return self.out((attn @ v).transpose(1, 2).reshape(b, t, d))


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, post_ln: bool, qk_norm: bool):
        super().__init__()
        self.post_ln = post_ln
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = _Attention(d, heads, qk_norm)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post_ln:        # the original Transformer: normalise after the residual sum
            x = self.norm1(x + self.attn(x))
            return self.norm2(x + self.mlp(x))
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class TinyLM(nn.Module):
    """A byte-level causal Transformer (vocabulary 256): post- or pre-LN, optional
    qk-layernorm. Pre-LN has a final LayerNorm before the head, post-LN does not."""

    def __init__(self, vocab: int = 256, d: int = 32, heads: int = 2, layers: int = 2,
                 seq_len: int = 32, post_ln: bool = False, qk_norm: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(seq_len, d) * 0.02)
        self.blocks = nn.ModuleList(_Block(d, heads, post_ln, qk_norm) for _ in range(layers))
        self.norm = nn.Identity() if post_ln else nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) + self.pos[: x.shape[1]]
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))

    def max_attention_logit(self) -> float:
        return max(b.attn.max_logit for b in self.blocks)


class StableAdamW(torch.optim.AdamW):
    """AdamW with Adafactor-style update clipping per tensor (Wortsman et al. 2023b,
    "Stable and low-precision training for large-scale vision-language models"): the step
    of a tensor is scaled by ``1 / max(1, RMS(g / sqrt(v_hat)))``, so an update whose
    second-moment estimate is out of date (``g^2 >> v``) is not taken at full size."""

    def __init__(self, params, lr: float, **kw):
        super().__init__([{"params": [p]} for p in params], lr, **kw)
        for g in self.param_groups:
            g["base_lr"] = lr

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            p = g["params"][0]
            state = self.state.get(p, {})
            g["lr"] = g["base_lr"]
            if p.grad is None or "exp_avg_sq" not in state:
                continue
            beta2, t = g["betas"][1], float(state["step"]) + 1
            v = (beta2 * state["exp_avg_sq"] + (1 - beta2) * p.grad ** 2) / (1 - beta2 ** t)
            rms = float((p.grad ** 2 / v.clamp_min(g["eps"] ** 2)).mean().sqrt())
            g["lr"] = g["base_lr"] / max(1.0, rms)
        super().step()
        return loss


# ---------------------------------------------------------------------------------------------
# data

@functools.lru_cache(maxsize=1)
def _text_bytes() -> torch.Tensor:
    return torch.tensor(list(data.stdlib_text().encode("ascii")), dtype=torch.int64)


@functools.lru_cache(maxsize=4)
def _digits(seed: int) -> data.Split:
    return data.digits(probe_size=128, seed=seed, flat=True)


class _Windows:
    """Byte windows of the text: batch ``i`` is fixed by ``(seed, i)`` alone, so a run that
    skips batches (``Escape``) and one that does not see the same ``i``-th batch."""

    def __init__(self, seed: int, batch_size: int, seq_len: int, probe_size: int = 16):
        text = _text_bytes()
        self.seed, self.b, self.t = seed, batch_size, seq_len
        self.train_end = int(len(text) * 0.9)       # the probe comes from the last 10%
        g = torch.Generator().manual_seed(10_000 + seed)
        starts = torch.randint(self.train_end, len(text) - seq_len - 1, (probe_size,), generator=g)
        self.x_probe, self.y_probe = self._cut(starts)

    def _cut(self, starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = _text_bytes()[starts[:, None] + torch.arange(self.t + 1)]
        return w[:, :-1], w[:, 1:]

    def __call__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        return self._cut(torch.randint(0, self.train_end - self.t - 1, (self.b,), generator=g))


def _digit_batch(split: data.Split, seed: int, batch_size: int, lo: int = 0, hi: int | None = None
                 ) -> Callable[[int], tuple[torch.Tensor, torch.Tensor]]:
    """Batch ``i`` of the digits training set (rows ``lo:hi``), fixed by ``(seed, i)``."""
    hi = len(split.x_train) if hi is None else hi

    def batch(i: int):
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        idx = torch.randint(lo, hi, (batch_size,), generator=g)
        return split.x_train[idx], split.y_train[idx]
    return batch


# ---------------------------------------------------------------------------------------------
# one run

@dataclass
class Setup:
    """One arm's training, fixed by seed: model, inner optimizer, batches, losses, schedule."""

    model: nn.Module
    optimizer: Callable[[float], torch.optim.Optimizer]   # lr -> inner optimizer
    lr: float
    steps: int
    batch: Callable[[int], tuple[torch.Tensor, torch.Tensor]]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]   # training loss on a batch
    probe: Callable[[], torch.Tensor]                           # clean held-out loss
    lr_mult: Callable[[int], float] | None = None               # schedule (warm-up, decay)
    scaler: bool = False              # fp16 autocast with torch.amp.GradScaler
    window: int = 0                   # where the event can start: the peak is taken from here
    events: tuple[tuple[int, int, str], ...] = ()   # (start, length, label) shaded in figures


@dataclass
class Curve:
    """One arm on one seed at one LR: the probe loss after every step, the guard's decisions."""

    mechanism: str
    arm: str
    seed: int
    lr: float
    curve: list[float]
    init: float
    stats: dict[str, int] = field(default_factory=dict)
    rollbacks_at: list[int] = field(default_factory=list)
    rewinds_at: list[int] = field(default_factory=list)   # the rollbacks that were drift rewinds
    skips_at: list[int] = field(default_factory=list)
    stopped_at: int | None = None
    window: int = 0
    events: tuple = ()
    extra: dict[str, float] = field(default_factory=dict)


def _finite_params(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def _probe_value(setup: Setup) -> float:
    return tasks.eval_value(setup.model, setup.probe)


def train(setup: Setup, arm: str, mechanism: str = "", seed: int = 0) -> Curve:
    """Train ``setup`` under ``arm`` (one of :data:`ARMS`; ``bare`` and ``reference`` use the
    inner optimizer as it is). The guard gets a closure that recomputes the loss (its re-run
    rung evaluates it again); an ``Escape`` recovery's ``skip_batches`` advances the stream."""
    model = setup.model
    inner = setup.optimizer(setup.lr)
    if arm in ("bare", "reference"):
        opt = inner
    elif arm == "guarded_probe":
        opt = GuardedOptimizer(inner, setup.probe, module=model)
    elif arm == "guarded_signals":
        opt = GuardedOptimizer(inner, module=model)
    elif arm == "guarded_recovery":
        opt = GuardedOptimizer(inner, setup.probe, module=model, recovery=arc_recovery())
    else:
        raise ValueError(f"Unknown arm {arm!r}; choose one of {ARMS}.")
    events: list = []
    if isinstance(opt, GuardedOptimizer):
        opt.callbacks.append(events.append)
    scaler = torch.amp.GradScaler("cpu") if setup.scaler else None
    cast = (lambda: torch.autocast("cpu", dtype=torch.float16)) if setup.scaler else \
        contextlib.nullcontext
    base = [g["lr"] for g in inner.param_groups]
    out = Curve(mechanism, arm, seed, setup.lr, [], _probe_value(setup), window=setup.window,
                events=setup.events)
    i = 0
    for t in range(setup.steps):
        if setup.lr_mult is not None:
            for g, lr in zip(inner.param_groups, base):
                g["lr"] = lr * setup.lr_mult(t)
        x, y = setup.batch(i)
        i += 1

        def closure(x=x, y=y):
            opt.zero_grad()
            with cast():
                loss = setup.loss(x, y)
            (scaler.scale(loss) if scaler is not None else loss).backward()
            return loss

        try:
            if scaler is not None:
                closure()
                scaler.step(opt)
                scaler.update()
            else:
                opt.step(closure)
        except GuardStopped:     # committed, reported to the callbacks, then raised
            out.stopped_at = t
        if events and events[-1].step == t:
            e = events[-1]
            if e.decision == "rollback":
                out.rollbacks_at.append(t)
                if e.action and "rewind" in e.action:
                    out.rewinds_at.append(t)
            elif e.decision == "skip":
                out.skips_at.append(t)
            i += getattr(e, "skip_batches", 0) or 0
        out.curve.append(_probe_value(setup))
        if out.stopped_at is not None:     # the guard stopped the run: it ends on this state
            out.curve += [out.curve[-1]] * (setup.steps - len(out.curve))
            break
        if opt is inner and not math.isfinite(out.curve[-1]) and not _finite_params(model):
            out.curve += [math.nan] * (setup.steps - len(out.curve))   # crashed for good
            break    # (a guard may still roll back at the next step's start: not cut short)
    out.stats = {k: int(v) for k, v in getattr(opt, "stats", {}).items()}
    if isinstance(model, TinyLM):
        out.extra["max_attention_logit"] = model.max_attention_logit()
    return out


# ---------------------------------------------------------------------------------------------
# the mechanisms

def _lm_loss(model: nn.Module, z_loss: float = 0.0):
    def loss(x, y):
        logits = model(x).float()
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        if z_loss:
            ce = ce + z_loss * logits.logsumexp(-1).pow(2).mean()
        return ce
    return loss


def _lm_probe(model: nn.Module, windows: _Windows):
    return lambda: F.cross_entropy(model(windows.x_probe).float().reshape(-1, 256),
                                   windows.y_probe.reshape(-1))


def _adamw(model: nn.Module, betas=(0.9, 0.95), weight_decay: float = 0.0, eps: float = 1e-8,
           cls=torch.optim.AdamW):
    return lambda lr: cls(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay,
                          eps=eps)


def _warmup_cosine(steps: int, warmup: int) -> Callable[[int], float]:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10% (Wortsman et al.)."""
    def mult(t: int) -> float:
        if t < warmup:
            return (t + 1) / warmup
        frac = (t - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))
    return mult


def _lm_setup(seed: int, steps: int, lr: float, *, post_ln=False, qk_norm=False, z_loss=0.0,
              layers=2, betas=(0.9, 0.95), lr_mult=None, stream=None, window=0, events=()):
    windows = _Windows(seed, batch_size=16, seq_len=32)
    torch.manual_seed(seed)
    model = TinyLM(layers=layers, post_ln=post_ln, qk_norm=qk_norm)
    return Setup(model, _adamw(model, betas), lr, steps,
                 (lambda i: stream(windows, i)) if stream is not None else windows,
                 _lm_loss(model, z_loss), _lm_probe(model, windows), lr_mult=lr_mult,
                 window=window, events=events)


def _postln(seed, quick, fixed, lr_scale):
    steps = 100 if quick else 150
    return _lm_setup(seed, steps, 0.03 * lr_scale, post_ln=not fixed, layers=4,
                     betas=(0.9, 0.999))


def _attn(seed, quick, fixed, lr_scale):
    steps = 100 if quick else 200
    return _lm_setup(seed, steps, 0.1 * lr_scale, qk_norm=fixed)


def _zloss(seed, quick, fixed, lr_scale):
    steps = 100 if quick else 150
    return _lm_setup(seed, steps, 0.3 * lr_scale, qk_norm=True, z_loss=1e-4 if fixed else 0.0,
                     lr_mult=_warmup_cosine(steps, steps // 10))


def _bad_text(kind: str):
    def build(seed, quick, fixed, lr_scale):
        steps, start, length = (100, 50, 15) if quick else (200, 100, 25)

        def stream(windows, i):
            x, y = windows(i)
            if fixed or not start <= i < start + length:
                return x, y
            if kind == "garbage":        # random bytes, most never seen in the text
                g = torch.Generator().manual_seed(seed * 7919 + i)
                w = torch.randint(0, 256, (x.shape[0], x.shape[1] + 1), generator=g)
                return w[:, :-1], w[:, 1:]
            return torch.full_like(x, 32), torch.full_like(y, 32)   # a run of spaces
        label = "random bytes" if kind == "garbage" else "one repeated token (space)"
        return _lm_setup(seed, steps, 3e-3 * lr_scale, stream=stream, window=start,
                         events=((start, length, label),))
    return build


def _mlp_setup(seed, steps, lr, batch, *, hidden=64, cls=torch.optim.AdamW, betas=(0.9, 0.999),
               window=0, events=(), half=False, scaler=False):
    split = _digits(seed)
    torch.manual_seed(seed)
    model = models.MLP(inputs=64, hidden=hidden, classes=10, depth=2)
    cast = (lambda x: x.half()) if half else (lambda x: x)
    if half:
        model = model.half()

    def loss(x, y):
        return F.cross_entropy(model(cast(x)).float(), y)

    def probe():
        return F.cross_entropy(model(cast(split.x_probe)).float(), split.y_probe)
    return Setup(model, _adamw(model, betas, cls=cls), lr, steps, batch, loss, probe,
                 window=window, events=events, scaler=scaler)


def _bad_digits(kind: str):
    def build(seed, quick, fixed, lr_scale):
        steps, start, length = (150, 60, 30) if quick else (300, 120, 60)
        split = _digits(seed)
        clean = _digit_batch(split, seed, 32)
        perm = torch.randperm(10, generator=torch.Generator().manual_seed(seed + 1))
        while bool((perm == torch.arange(10)).any()):    # every label wrong
            perm = perm.roll(1)

        def batch(i):
            if fixed or not start <= i < start + length:
                return clean(i)
            if kind == "mislabel":
                x, y = clean(i)
                return x, perm[y]
            return clean(start)          # the batch at ``start``, over and over
        label = "labels permuted" if kind == "mislabel" else "one batch repeated"
        return _mlp_setup(seed, steps, 3e-3 * lr_scale, batch, window=start,
                          events=((start, length, label),))
    return build


def _adam_v(seed, quick, fixed, lr_scale):
    """A 128-example shard trained until its gradients are near zero, then fresh data."""
    quiet, after = (600, 150) if quick else (800, 300)
    split = _digits(seed)
    memorise = _digit_batch(split, seed, 32, 0, 128)
    fresh = _digit_batch(split, seed, 32, 128)
    return _mlp_setup(seed, quiet + after, 1e-2 * lr_scale,
                      lambda i: memorise(i) if i < quiet else fresh(i),
                      cls=StableAdamW if fixed else torch.optim.AdamW, window=quiet,
                      events=((quiet, 1, "fresh data after the memorised shard"),))


def _resnet_spikes(seed, quick, fixed, lr_scale):
    """The benchmark's ResNet-18 task as it is (AdamW lr 1e-3, batch 128, the digits): near
    convergence Adam's own updates spike the loss, nothing injected (a 16-probe-sample loss
    going from 0.004 to 0.4-1.3 for 10-20 steps around steps 110-140)."""
    task = tasks.make_task("resnet18", seed)
    steps = 140
    order = list(task.batches(steps))
    return Setup(task.model, _adamw(task.model, (0.9, 0.999), 0.01,
                                    cls=StableAdamW if fixed else torch.optim.AdamW),
                 task.lr * lr_scale, steps, lambda i: order[i],
                 lambda x, y: F.cross_entropy(task.model(x), y), task.probe, window=60)


def _fp16(seed, quick, fixed, lr_scale):
    steps = 100 if quick else 300
    split = _digits(seed)
    return _mlp_setup(seed, steps, 3e-3 * lr_scale, _digit_batch(split, seed, 32),
                      half=not fixed, scaler=fixed)


@functools.lru_cache(maxsize=16)
def _sharpness(seed: int) -> float:
    """lambda_max of the full-batch training loss at initialisation (power iteration)."""
    setup = _eos_setup(seed, 1, 1.0)
    return float(hessian_lambda_max(lambda: setup.loss(*setup.batch(0)),
                                    list(setup.model.parameters()), iters=30, seed=seed))


def _eos_setup(seed: int, steps: int, lr: float) -> Setup:
    split = _digits(seed)
    x, y = split.x_train[:512], split.y_train[:512]
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh(),
                          nn.Linear(64, 10))
    return Setup(model, lambda lr: torch.optim.SGD(model.parameters(), lr=lr), lr, steps,
                 lambda i: (x, y), lambda a, b: F.cross_entropy(model(a), b),
                 lambda: F.cross_entropy(model(split.x_probe), split.y_probe))


#: the step size in units of 1 / lambda_max: bare above the stability limit 2, reference below
EOS_BARE, EOS_REFERENCE = 2.5, 0.25


def _eos(seed, quick, fixed, lr_scale):
    c = EOS_REFERENCE if fixed else EOS_BARE * lr_scale
    return _eos_setup(seed, 100 if quick else 300, c / _sharpness(seed))


@dataclass(frozen=True)
class Mechanism:
    """A documented instability: ``build(seed, quick, fixed, lr_scale) -> Setup`` gives the
    unstable setup (``fixed=False``) or the reference with the stabilising fix; ``sweep``
    the LR multipliers of the sensitivity sweep (empty: not LR-driven)."""

    name: str
    source: str
    bare: str
    fix: str
    build: Callable[[int, bool, bool, float], Setup]
    sweep: tuple[float, ...] = ()
    quick_sweep: tuple[float, ...] = ()
    reference_in_sweep: bool = True     # False where the fix *is* a lower LR
    tried: str = ""                     # what was tried, shown if it does not reproduce
    in_quick: bool = True               # part of the --quick smoke run (CI's budget)


MECHANISMS: dict[str, Mechanism] = {m.name: m for m in [
    Mechanism("postln_no_warmup", "Xiong et al. 2020",
              "post-LN Transformer (4 layers), AdamW lr 3e-2, no warm-up",
              "pre-LN", _postln, (0.1, 0.3, 1.0), (0.1, 1.0)),
    Mechanism("attn_logit_growth", "Wortsman et al. 2023, sec. 3.1",
              "pre-LN Transformer, AdamW lr 0.1, no qk-layernorm",
              "qk-layernorm", _attn, (0.1, 0.3, 1.0, 3.0), (0.3, 1.0)),
    Mechanism("output_logit_divergence", "Wortsman et al. 2023, sec. 3.2",
              "qk-layernorm Transformer, AdamW lr 0.3 (warm-up, cosine), no weight decay, "
              "no z-loss",
              "z-loss 1e-4", _zloss, (0.1, 0.3, 1.0, 3.3), (0.3, 1.0),
              tried="lr 0.1, 0.3 and 1.0 for 150-200 steps, z-loss 1e-4 and 1e-3, with "
                    "and without warm-up and cosine decay: z-loss did not lower the loss at any of them; the "
                    "log-partition stayed near 5-6 (the logits did not drift) within the "
                    "run lengths that fit the budget"),
    Mechanism("adam_v_decay", "Molybog et al. 2023",
              "MLP memorises 128 digits (AdamW lr 1e-2, beta2 0.999), then fresh data",
              "update clipping (StableAdamW)", _adam_v),
    Mechanism("adam_spikes_resnet18", "Molybog et al. 2023",
              "ResNet-18 on the digits, AdamW lr 1e-3, batch 128 (the protocol's task, "
              "no fault): Adam's own loss spikes near convergence",
              "update clipping (StableAdamW)", _resnet_spikes, in_quick=False),
    Mechanism("fp16_params", "Micikevicius et al. 2018",
              "fp16 parameters, AdamW eps 1e-8",
              "fp32 master weights, fp16 autocast, GradScaler", _fp16,
              tried="fp16 autocast without GradScaler (fp32 master weights) on the 2-layer "
                    "byte Transformer matched fp32 and the GradScaler run to 3 decimals "
                    "after 150 steps: no gradient underflowed at this scale"),
    Mechanism("data_garbage", "bad data", "burst of random bytes in the text stream",
              "clean stream", _bad_text("garbage")),
    Mechanism("data_repeat_token", "bad data", "run of one repeated token in the text stream",
              "clean stream", _bad_text("repeat")),
    Mechanism("data_mislabel", "bad data", "shard of digits with permuted labels",
              "clean stream", _bad_digits("mislabel")),
    Mechanism("data_duplicate", "bad data", "one digits batch repeated many times",
              "clean stream", _bad_digits("duplicate")),
    Mechanism("edge_of_stability", "Cohen et al. 2021",
              f"full-batch GD at {EOS_BARE}/lambda_max (tanh MLP, 512 digits)",
              f"GD at {EOS_REFERENCE}/lambda_max", _eos, (0.1, 0.2, 0.4, 1.0, 1.6),
              (0.2, 1.0), reference_in_sweep=False),
]}


# ---------------------------------------------------------------------------------------------
# metrics

def _final(curve: Sequence[float]) -> float:
    tail = curve[-FINAL_STEPS:]
    return statistics.mean(tail) if all(math.isfinite(v) for v in tail) else math.inf


def _peak(curve: Sequence[float], start: int) -> float:
    tail = curve[start:]
    return max(tail) if all(math.isfinite(v) for v in tail) else math.inf


def lr_sensitivity(finals: Sequence[float], init: float) -> float:
    """Wortsman et al. 2023: ``mean over LRs of min(loss, loss at init) - best loss``, the
    best over the sweep; a non-finite loss counts as the loss at init."""
    capped = [min(v, init) if math.isfinite(v) else init for v in finals]
    return statistics.mean(capped) - min(capped)


def _mean(xs: Iterable[float]) -> float:
    xs = list(xs)
    return math.inf if any(not math.isfinite(x) for x in xs) else statistics.mean(xs)


def _rows(mech: Mechanism, curves: list[Curve], sweep: dict[str, dict[float, float]],
          init: dict[str, float]) -> list[dict]:
    ref = {c.seed: c for c in curves if c.arm == "reference"}
    rows = []
    bare_final = bare_peak = math.nan
    for arm in ARMS:
        cs = sorted((c for c in curves if c.arm == arm), key=lambda c: c.seed)
        finals = [report.ratio(_final(c.curve), _final(ref[c.seed].curve)) for c in cs]
        peaks = [report.ratio(_peak(c.curve, c.window), _peak(ref[c.seed].curve, c.window))
                 for c in cs]
        row = {
            "mechanism": mech.name, "arm": arm, "seeds": len(cs),
            "final_ratio": _mean(finals), "peak_ratio": _mean(peaks),
            "final_loss": _mean(_final(c.curve) for c in cs),
            "rollbacks": statistics.mean(c.stats.get("rollbacks", 0) for c in cs),
            "skips": statistics.mean(c.stats.get("skipped", 0) for c in cs),
            "stopped": sum(c.stopped_at is not None for c in cs),
            "lr_sensitivity": (lr_sensitivity(list(sweep[arm].values()), init[arm])
                               if arm in sweep else math.nan),
            "max_attn_logit": (_mean(c.extra["max_attention_logit"] for c in cs)
                               if all("max_attention_logit" in c.extra for c in cs) else math.nan),
        }
        if arm == "bare":
            bare_final, bare_peak = row["final_ratio"], row["peak_ratio"]
        rows.append(row)
    reproduced = bare_final >= HURT_FINAL or bare_peak >= HURT_PEAK
    for row in rows:
        row["reproduced"] = "yes" if reproduced else "not reproduced"
        row["source"], row["bare_setup"], row["fix"] = mech.source, mech.bare, mech.fix
        row["tried"] = "" if reproduced else mech.tried
    return rows


# ---------------------------------------------------------------------------------------------
# the suite

def run(mechanisms: Iterable[str] | None = None, seeds: int = 5, quick: bool = False,
        out: str | None = None, progress: Callable[[], None] | None = None) -> list[dict]:
    """Run every mechanism (or ``mechanisms``) over ``seeds`` seeds (0..seeds-1) and return
    one row per mechanism and arm (see :func:`format_table`). ``quick``: fewer steps and a
    two-point LR sweep. ``out``: write ``natural.csv``, ``natural_curves.csv`` and one
    ``natural_<mechanism>.png`` per mechanism there. ``progress()`` is called after every
    training run."""
    names = (list(mechanisms) if mechanisms is not None else
             [n for n, m in MECHANISMS.items() if m.in_quick or not quick])
    unknown = [n for n in names if n not in MECHANISMS]
    if unknown:
        raise ValueError(f"Unknown mechanism(s) {unknown}; choose from {list(MECHANISMS)}.")
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}.")
    tick = progress or (lambda: None)
    rows: list[dict] = []
    all_curves: dict[str, list[Curve]] = {}
    for name in names:
        mech = MECHANISMS[name]
        curves = []
        for seed in range(seeds):
            for arm in ARMS:
                setup = mech.build(seed, quick, arm == "reference", 1.0)
                curves.append(train(setup, arm, name, seed))
                tick()
        sweep: dict[str, dict[float, float]] = {}
        scales = mech.quick_sweep if quick else mech.sweep
        first = {c.arm: c for c in curves if c.seed == 0}
        init = {arm: c.init for arm, c in first.items()}    # same weights at every LR
        if scales:
            for arm in ARMS:
                if arm == "reference" and not mech.reference_in_sweep:
                    continue
                sweep[arm] = {}
                for s in scales:
                    if s == 1.0:
                        c = first[arm]
                    else:
                        c = train(mech.build(0, quick, arm == "reference", s), arm, name, 0)
                        tick()
                    sweep[arm][c.lr] = _final(c.curve)
        rows += _rows(mech, curves, sweep, init)
        all_curves[name] = curves
    if out:
        os.makedirs(out, exist_ok=True)
        report.write_csv(os.path.join(out, "natural.csv"),
                         {f"{r['mechanism']}/{r['arm']}": r for r in rows}, "mechanism/arm")
        _write_curves(os.path.join(out, "natural_curves.csv"), all_curves)
        figures(all_curves, out)
    return rows


#: the columns :func:`format_table` prints
COLUMNS = ("final_ratio", "peak_ratio", "rollbacks", "skips", "stopped", "lr_sensitivity",
           "max_attn_logit", "reproduced")


def format_table(rows: list[dict]) -> str:
    """A fixed-width table, one line per mechanism and arm: final and peak probe loss over
    the reference run of the same seed (mean over seeds; ``inf``: a crashed run), rollbacks
    and skips (mean per run), runs the guard stopped, LR sensitivity (first seed; ``-``:
    not an LR-driven mechanism), the largest attention logit of the last step (Transformer
    mechanisms) and whether bare was hurt (``reproduced``)."""
    table = {f"{r['mechanism']}/{r['arm']}": {c: r[c] for c in COLUMNS} for r in rows}
    text = report.format_table(table, COLUMNS, key="mechanism/arm")
    notes = {r["mechanism"]: r["tried"] for r in rows if r.get("tried")}
    if notes:
        text += "\n" + "\n".join(f"{m} not reproduced; tried: {t}" for m, t in notes.items())
    return text


def _write_curves(path: str, curves: dict[str, list[Curve]]) -> None:
    import csv
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["mechanism", "arm", "seed", "lr", "step", "probe_loss", "decision"])
        for name, cs in curves.items():
            for c in cs:
                marks = {**{t: "rollback" for t in c.rollbacks_at}, **{t: "skip" for t in c.skips_at}}
                if c.stopped_at is not None:
                    marks[c.stopped_at] = "stop"
                for t, v in enumerate(c.curve):
                    w.writerow([name, c.arm, c.seed, c.lr, t, v, marks.get(t, "")])


_LOOK = {"bare": ("tab:red", "-"), "reference": ("tab:blue", "-"),
         "guarded_probe": ("tab:green", "--"), "guarded_signals": ("tab:purple", "-."),
         "guarded_recovery": ("tab:orange", ":")}


def _panel(ax, mine: dict[str, Curve], mech: Mechanism | None, span: tuple[int, int],
           labels: bool) -> None:
    """Probe loss of every arm over steps ``span``, guard decisions marked, events shaded."""
    lo, hi = span
    values = [v for c in mine.values() for v in c.curve[lo:hi] if math.isfinite(v) and v > 0]
    for start, length, label in next(iter(mine.values())).events:
        ax.axvspan(start - 0.5, start + length - 0.5, color="grey", alpha=0.15,
                   label=label if labels else None)
    for arm in ARMS:
        if arm not in mine:
            continue
        c = mine[arm]
        color, style = _LOOK[arm]
        label = {"bare": f"bare: {mech.bare}" if mech else "bare",
                 "reference": f"reference: {mech.fix}" if mech else "reference"}.get(arm, arm)
        if arm.startswith("guarded"):
            rewinds = f" ({len(c.rewinds_at)} drift rewinds)" if c.rewinds_at else ""
            label += f": {len(c.rollbacks_at)} rollbacks{rewinds}, {len(c.skips_at)} skips"
            if c.stopped_at is not None:
                label += f", stopped at step {c.stopped_at}"
        ax.plot(range(lo, hi), c.curve[lo:hi], color=color, ls=style, lw=1.4,
                label=label if labels else None)
        bad = next((t for t, v in enumerate(c.curve) if not math.isfinite(v)), None)
        if bad is not None and lo <= bad < hi:
            at = max(bad - 1, lo)
            y = c.curve[at] if math.isfinite(c.curve[at]) else c.init
            ax.plot(at, y, "X", color=color, ms=11, mec="black")
            if not arm.startswith("guarded"):     # one label; guarded arms get the marker
                ax.annotate(f"  {arm}: non-finite from step {bad}", (at, y), color=color,
                            fontsize=8, va="top")
        for ts, marker in ((c.rollbacks_at, "o"), (c.skips_at, "x"), (c.rewinds_at, "D")):
            ts = [t for t in ts if lo <= t < hi and math.isfinite(c.curve[t])]
            if ts:
                ax.plot(ts, [c.curve[t] for t in ts], marker, color=color, ms=6, mfc="none",
                        mew=1.3, ls="none")
        if c.stopped_at is not None and lo <= c.stopped_at < hi:
            ax.plot(c.stopped_at, c.curve[c.stopped_at], "s", color=color, ms=9, mec="black")
    if values and max(values) > 10 * min(values):
        ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.set_xlim(lo - 0.5, hi - 0.5)


def figures(curves: dict[str, list[Curve]], out_dir: str) -> list[str]:
    """One PNG per mechanism, ``natural_<mechanism>.png``: the probe loss of every arm on the
    first seed (log axis when it spans more than a decade), rollbacks (o; a drift rewind
    also a diamond) and skips (x) of the guarded arms marked on their curves, a stop marked
    with a square, the data event shaded; where the event starts mid-run, a second panel zooms in on it. Returns the paths
    written (none without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for name, cs in curves.items():
        mech = MECHANISMS.get(name)
        seed = min(c.seed for c in cs)
        mine = {c.arm: c for c in cs if c.seed == seed}
        first = next(iter(mine.values()))
        steps, window = len(first.curve), first.window
        if window > 0:
            fig, (ax, zoom) = plt.subplots(1, 2, figsize=(13, 4.8),
                                           gridspec_kw={"width_ratios": (3, 2)})
            lo = max(0, window - steps // 20)
            _panel(zoom, mine, mech, (lo, min(steps, window + max(60, steps // 5))), False)
            zoom.set(xlabel="training step", title=f"zoom: steps {lo} and on")
        else:
            fig, ax = plt.subplots(figsize=(9.5, 4.8))
        _panel(ax, mine, mech, (0, steps), True)
        ax.set(xlabel="training step", ylabel="probe loss (held-out cross-entropy, nats)",
               title=f"{name} ({mech.source if mech else ''}), seed {seed}\n"
                     "guard decisions on its curves: o rollback, \u25c7 drift rewind, x skip, "
                     "\u25a0 stopped")
        fig.legend(fontsize=8, loc="lower center", ncol=2, frameon=False,
                   bbox_to_anchor=(0.5, -0.02), borderaxespad=0)
        fig.tight_layout(rect=(0, 0.16, 1, 1))
        path = os.path.join(out_dir, f"natural_{name}.png")
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        written.append(path)
    return written
