"""nanoGPT's train.py with the guard dropped in: a char-level GPT on CPU, about a minute.

The training loop is ``guarded_optim/bench/nanogpt.py`` (``train``), one copy shared with the
LR-window benchmark (``guarded-optim bench --suite lr_window``). It has karpathy/nanoGPT's
shape: ``get_batch(split)`` with ``torch.randint`` offsets into a ``uint8`` token array,
``estimate_loss()``, ``get_lr(it)`` (linear warm-up + cosine decay) written into
``optimizer.param_groups`` every iteration, 2 micro-batches of gradient accumulation,
``scaler.scale(loss).backward()`` / ``scaler.unscale_`` / ``clip_grad_norm_(.., 1.0)`` /
``scaler.step`` / ``scaler.update`` (a disabled ``GradScaler``: float32 on the CPU), and a
checkpoint ``{"model", "optimizer", "iter_num", "config"}`` every ``--ckpt-every`` iterations.
The model: 4 layers, 128 wide, 4 heads, block 64, dropout 0.1, batch 12 x 2; AdamW at 1e-3.
The text is the docstrings of Python's standard library (nothing is downloaded).

The guard changes one line, where the optimizer is built:

    optimizer = model.configure_optimizers(...)                       # AdamW
    optimizer = GuardedOptimizer(optimizer, probe=lambda: model(x_probe, y_probe)[1],
                                 module=model)                         # --guard probe
    optimizer = GuardedOptimizer(optimizer)                            # --guard signals

with ``x_probe, y_probe`` 16 fixed held-out sequences (the guard's defaults otherwise); the
loop adds one ``except GuardStopped`` around ``scaler.step`` (the guard's rejection budget
spent: the run ends there) and nothing else.

    python examples/nanogpt_like.py                                    # bare AdamW
    python examples/nanogpt_like.py --guard probe --lr-window 150:170:30 --out run.csv
    python examples/nanogpt_like.py --guard probe --resume             # from ckpt_nanogpt.pt

``--lr-window start:stop:factor`` mis-sets the schedule: ``get_lr`` returns ``factor`` times
its value for iterations ``start <= it < stop``. ``--out`` writes one CSV row per iteration:
iter, lr, train loss (of that step), val loss (where evaluated), and the guard's
``optimizer.last_decision``.
"""

import argparse

from guarded_optim.bench.nanogpt import GUARDS, TrainConfig, parse_window, train, write_rows


def window(text):
    try:
        return parse_window(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv=None):
    p = argparse.ArgumentParser(description="nanoGPT-like char GPT, bare or guarded")
    p.add_argument("--guard", choices=GUARDS, default="none",
                   help="none: bare AdamW; probe: GuardedOptimizer with a 16-sequence probe; "
                        "signals: GuardedOptimizer without a probe (default: none)")
    p.add_argument("--lr-window", type=window, default=None, metavar="START:STOP:FACTOR",
                   help="multiply the schedule's LR by FACTOR for START <= iter < STOP, "
                        "e.g. 150:170:30 (default: off)")
    p.add_argument("--iters", type=int, default=300, help="training iterations (default: 300)")
    p.add_argument("--seed", type=int, default=0, help="torch.manual_seed (default: 0)")
    p.add_argument("--out", default=None, help="per-iteration CSV to write (default: none)")
    p.add_argument("--ckpt", default="ckpt_nanogpt.pt", help="checkpoint path (default: %(default)s)")
    p.add_argument("--ckpt-every", type=int, default=100,
                   help="iterations between checkpoints (default: %(default)s)")
    p.add_argument("--resume", action="store_true", help="resume from --ckpt")
    args = p.parse_args(argv)

    cfg = TrainConfig(max_iters=args.iters, guard=args.guard, lr_window=args.lr_window,
                      seed=args.seed, ckpt_path=args.ckpt, ckpt_every=args.ckpt_every,
                      resume=args.resume)
    result = train(cfg, say=print)
    if args.out:
        write_rows(args.out, result.rows)
        print(f"wrote {args.out}")
    print(f"final val loss {result.final_val:.4f}")
    if args.guard != "none":
        stats = {k: v for k, v in result.optimizer.stats.items() if v}
        print(f"guard stats (nonzero): {stats}"
              + (f"; stopped at iteration {result.stopped_at}" if result.stopped_at is not None else ""))
    return result


if __name__ == "__main__":
    main()
