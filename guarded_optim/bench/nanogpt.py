"""A nanoGPT-shaped training loop with the guard dropped in (``examples/nanogpt_like.py``, and
``guarded-optim bench --suite lr_window`` through :mod:`.lr_window`).

It follows karpathy/nanoGPT's ``train.py`` and ``model.py`` as a practitioner would copy
them: a small GPT (causal self-attention, GELU MLP, pre-LayerNorm, tied embedding and head,
dropout), ``get_batch(split)`` drawing random offsets into a ``uint8`` token array with
``torch.randint``, ``estimate_loss()`` over a few random batches per split, ``get_lr(it)``
(linear warm-up, cosine decay) written into every ``param_groups[i]["lr"]`` each
iteration, gradient accumulation, the ``GradScaler`` calls (``enabled=False`` on the CPU),
``clip_grad_norm_`` after ``scaler.unscale_``, and a checkpoint dict saved with
``torch.save`` and resumed with ``torch.load(weights_only=True)``. The data is the
character-level text of Python's own docstrings (:func:`.data.stdlib_text`); nothing is
downloaded. Nothing here configures logging.

The only changes for the guard are where the optimizer is built (``guard="probe"``: AdamW
wrapped in ``GuardedOptimizer`` with a probe of 16 fixed held-out sequences and
``module=model``; ``guard="signals"``: the probe-less ``GuardedOptimizer(AdamW)``; both
with the guard's defaults) and one ``except GuardStopped`` around ``scaler.step``.

``lr_window=(start, stop, factor)`` is the fault the LR-window benchmark studies: a mis-set
schedule that returns ``factor`` times its value for iterations ``start <= it < stop``.
"""

from __future__ import annotations

import csv
import functools
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F

from .. import GuardedOptimizer, GuardStopped
from .data import stdlib_text

__all__ = ["GPT", "TrainConfig", "TrainResult", "train", "parse_window", "GUARDS"]

#: the ``guard`` choices: no guard, the probe guard, the probe-less (signals only) guard
GUARDS = ("none", "probe", "signals")


# ---------------------------------------------------------------------------------------------
# the model: nanoGPT's model.py, compact

class CausalSelfAttention(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)
        self.n_head, self.n_embd, self.dropout = n_head, n_embd, dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, n_embd: int, dropout: float, bias: bool):
        super().__init__()
        self.c_fc = nn.Linear(n_embd, 4 * n_embd, bias=bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * n_embd, n_embd, bias=bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, n_embd: int, n_head: int, dropout: float, bias: bool):
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd, bias=bias)
        self.attn = CausalSelfAttention(n_embd, n_head, dropout, bias)
        self.ln_2 = nn.LayerNorm(n_embd, bias=bias)
        self.mlp = MLP(n_embd, dropout, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """nanoGPT's GPT: token and position embeddings, ``n_layer`` pre-LN blocks, a final
    LayerNorm and a head tied to the token embedding; ``forward(idx, targets)`` returns
    ``(logits, loss)``."""

    def __init__(self, vocab_size: int, block_size: int, n_layer: int, n_head: int,
                 n_embd: int, dropout: float = 0.0, bias: bool = False):
        super().__init__()
        self.block_size = block_size
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(vocab_size, n_embd),
            wpe=nn.Embedding(block_size, n_embd),
            drop=nn.Dropout(dropout),
            h=nn.ModuleList([Block(n_embd, n_head, dropout, bias) for _ in range(n_layer)]),
            ln_f=nn.LayerNorm(n_embd, bias=bias),
        ))
        self.lm_head = nn.Linear(n_embd, vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight   # weight tying
        self.apply(self._init_weights)
        for name, p in self.named_parameters():               # GPT-2's scaled residual init
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        t = idx.size(1)
        pos = torch.arange(t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))
        loss = None if targets is None else F.cross_entropy(
            logits.view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    def configure_optimizers(self, weight_decay: float, learning_rate: float,
                             betas: tuple[float, float]) -> torch.optim.AdamW:
        """nanoGPT's: weight decay on the 2-D tensors (matmuls, embeddings), none on the rest."""
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)


# ---------------------------------------------------------------------------------------------
# data: nanoGPT's shakespeare_char prepare.py, on the bundled text

@functools.lru_cache(maxsize=1)
def char_data() -> tuple[np.ndarray, np.ndarray, int]:
    """``(train, val, vocab_size)``: the bundled text as ``uint8`` character ids, 90/10."""
    text = stdlib_text()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    ids = np.array([stoi[c] for c in text], dtype=np.uint8)
    n = int(0.9 * len(ids))
    train_ids, val_ids = ids[:n], ids[n:]
    train_ids.flags.writeable = val_ids.flags.writeable = False
    return train_ids, val_ids, len(chars)


# ---------------------------------------------------------------------------------------------
# the run

@dataclass
class TrainConfig:
    """The run's settings (nanoGPT's config variables). Defaults: the LR-window benchmark."""

    # model
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 64
    dropout: float = 0.1
    bias: bool = False
    # data and steps
    batch_size: int = 12
    gradient_accumulation_steps: int = 2
    max_iters: int = 300
    eval_interval: int = 10
    eval_iters: int = 8
    # AdamW and the schedule
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 30
    lr_decay_iters: int | None = None    # None: max_iters
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    # the guard, the fault, the run
    guard: str = "none"                  # one of GUARDS
    probe_size: int = 16                 # held-out sequences the probe evaluates
    lr_window: tuple[int, int, float] | None = None   # (start, stop, factor)
    seed: int = 0
    ckpt_path: str | None = None         # where the checkpoint is written (None: never)
    ckpt_every: int = 100                # iterations between checkpoints
    resume: bool = False                 # start from ckpt_path
    callbacks: tuple[Callable[[Any], None], ...] = ()   # guard callbacks (StepEvent)

    def as_dict(self) -> dict[str, Any]:
        """The plain settings (what the checkpoint stores): no callbacks."""
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "callbacks"}
        out["lr_window"] = None if self.lr_window is None else list(self.lr_window)
        return out


@dataclass
class TrainResult:
    """What one run measured. ``rows``: one per iteration (``iter``, ``lr``, ``train_loss``
    of the step, ``val_loss`` where evaluated, ``decision`` of the guard); ``evals``:
    ``(iter, train, val)`` of every ``estimate_loss()``; ``stopped_at``: the iteration whose
    step raised :class:`GuardStopped` (the run ends there), else ``None``."""

    config: TrainConfig
    model: GPT
    optimizer: torch.optim.Optimizer
    rows: list[dict] = field(default_factory=list)
    evals: list[tuple[int, float, float]] = field(default_factory=list)
    stopped_at: int | None = None

    @property
    def final_val(self) -> float:
        return self.evals[-1][2]

    @property
    def stats(self) -> dict[str, int]:
        return dict(getattr(self.optimizer, "stats", {}))


def parse_window(text: str | None) -> tuple[int, int, float] | None:
    """``"150:170:30"`` -> ``(150, 170, 30.0)``; ``None``/``""``/``"off"`` -> ``None``."""
    if not text or text == "off":
        return None
    try:
        start, stop, factor = text.split(":")
        window = int(start), int(stop), float(factor)
    except ValueError:
        raise ValueError(f"an LR window is start:stop:factor (e.g. 150:170:30), got {text!r}") from None
    if not 0 <= window[0] < window[1] or not window[2] > 0:
        raise ValueError(f"an LR window needs 0 <= start < stop and factor > 0, got {text!r}")
    return window


def train(cfg: TrainConfig, say: Callable[[str], None] | None = None) -> TrainResult:
    """Train one run as nanoGPT's train.py does (see the module docstring); ``say`` gets the
    lines nanoGPT prints (none when ``None``)."""
    if cfg.guard not in GUARDS:
        raise ValueError(f"guard must be one of {GUARDS}, got {cfg.guard!r}")
    say = say or (lambda line: None)
    torch.manual_seed(cfg.seed)
    train_data, val_data, vocab_size = char_data()
    block_size, batch_size = cfg.block_size, cfg.batch_size

    def get_batch(split: str):
        data = train_data if split == "train" else val_data
        ix = torch.randint(len(data) - block_size, (batch_size,))
        x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64))
                         for i in ix])
        return x, y

    # the probe: 16 fixed held-out sequences, evenly spaced over the validation text
    starts = np.linspace(0, len(val_data) - block_size - 1, cfg.probe_size).astype(np.int64)
    x_probe = torch.stack([torch.from_numpy(val_data[i:i + block_size].astype(np.int64))
                           for i in starts])
    y_probe = torch.stack([torch.from_numpy(val_data[i + 1:i + 1 + block_size].astype(np.int64))
                           for i in starts])

    iter_num, checkpoint = 0, None
    model = GPT(vocab_size, block_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.dropout, cfg.bias)
    if cfg.resume:
        checkpoint = torch.load(cfg.ckpt_path, map_location="cpu", weights_only=True)
        model.load_state_dict(checkpoint["model"])
        iter_num = checkpoint["iter_num"]
    scaler = torch.amp.GradScaler("cpu", enabled=False)   # float32 on the CPU: a no-op, as nanoGPT
    optimizer = model.configure_optimizers(cfg.weight_decay, cfg.learning_rate,
                                           (cfg.beta1, cfg.beta2))
    if cfg.guard == "probe":
        extra = {"callbacks": list(cfg.callbacks)} if cfg.callbacks else {}
        optimizer = GuardedOptimizer(optimizer, probe=lambda: model(x_probe, y_probe)[1],
                                     module=model, **extra)
    elif cfg.guard == "signals":
        extra = {"callbacks": list(cfg.callbacks)} if cfg.callbacks else {}
        optimizer = GuardedOptimizer(optimizer, **extra)
    if checkpoint is not None:
        optimizer.load_state_dict(checkpoint["optimizer"])
    start_iter, checkpoint = iter_num, None

    @torch.no_grad()
    def estimate_loss() -> dict[str, float]:
        out = {}
        model.eval()
        for split in ("train", "val"):
            losses = torch.zeros(cfg.eval_iters)
            for k in range(cfg.eval_iters):
                X, Y = get_batch(split)
                _, loss = model(X, Y)
                losses[k] = loss.item()
            out[split] = losses.mean().item()
        model.train()
        return out

    decay_iters = cfg.lr_decay_iters or cfg.max_iters

    def get_lr(it: int) -> float:
        if it < cfg.warmup_iters:                    # 1) linear warm-up
            lr = cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
        elif it >= decay_iters:                      # 2) from decay_iters on: min_lr
            lr = cfg.min_lr
        else:                                        # 3) cosine decay down to min_lr
            ratio = (it - cfg.warmup_iters) / (decay_iters - cfg.warmup_iters)
            lr = cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (cfg.learning_rate - cfg.min_lr)
        if cfg.lr_window and cfg.lr_window[0] <= it < cfg.lr_window[1]:
            lr *= cfg.lr_window[2]                   # the mis-set schedule
        return lr

    result = TrainResult(cfg, model, optimizer)
    model.train()
    X, Y = get_batch("train")
    while True:
        lr = get_lr(iter_num)
        for param_group in optimizer.param_groups:
            param_group["lr"] = lr
        row = {"iter": iter_num, "lr": lr, "train_loss": math.nan, "val_loss": math.nan,
               "decision": ""}
        if iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters:
            losses = estimate_loss()
            result.evals.append((iter_num, losses["train"], losses["val"]))
            row["val_loss"] = losses["val"]
            say(f"step {iter_num}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}")
            if cfg.ckpt_path and iter_num > start_iter and iter_num % cfg.ckpt_every == 0:
                checkpoint = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                              "iter_num": iter_num, "config": cfg.as_dict()}
                torch.save(checkpoint, cfg.ckpt_path)
                say(f"saving checkpoint to {cfg.ckpt_path}")
        if iter_num >= cfg.max_iters:
            result.rows.append(row)
            break
        for micro_step in range(cfg.gradient_accumulation_steps):
            _, loss = model(X, Y)
            loss = loss / cfg.gradient_accumulation_steps
            X, Y = get_batch("train")                # prefetch the next batch, as nanoGPT
            scaler.scale(loss).backward()
        if cfg.grad_clip != 0.0:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        try:
            scaler.step(optimizer)
        except GuardStopped as stop:                 # the guard's budget is spent: stop here
            say(f"iter {iter_num}: the guard stopped the run: {stop}")
            result.stopped_at = iter_num
            losses = estimate_loss()
            result.evals.append((iter_num, losses["train"], losses["val"]))
            row.update(val_loss=losses["val"], decision="stop",
                       train_loss=loss.item() * cfg.gradient_accumulation_steps)
            result.rows.append(row)
            break
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        row["train_loss"] = loss.item() * cfg.gradient_accumulation_steps
        row["decision"] = getattr(optimizer, "last_decision", "") or ""
        result.rows.append(row)
        if iter_num % 10 == 0:
            say(f"iter {iter_num}: loss {row['train_loss']:.4f}, lr {lr:.2e}"
                + (f", guard {row['decision']}" if row["decision"] else ""))
        iter_num += 1
    return result


def write_rows(path: str, rows: list[dict]) -> None:
    """The per-iteration CSV: iter, lr, train_loss, val_loss, decision (blank where none)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["iter", "lr", "train_loss", "val_loss", "decision"])
        for r in rows:
            w.writerow([r["iter"], f"{r['lr']:.6g}",
                        "" if math.isnan(r["train_loss"]) else f"{r['train_loss']:.6f}",
                        "" if math.isnan(r["val_loss"]) else f"{r['val_loss']:.6f}",
                        r["decision"]])
