"""Measure the guard's overhead against bare AdamW (paired, interleaved, median of 9+)."""

import argparse

import torch

from guarded_optim.bench.overhead import overhead

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--task", default="cnn", choices=["cnn", "mlp", "transformer"])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    result = overhead(args.task, steps=args.steps, repeats=args.repeats)
    print(f"task={args.task} steps={args.steps} repeats={args.repeats} threads={torch.get_num_threads()}")
    print(f"{'arm':24s} {'ratio (median)':>15s} {'min':>7s} {'max':>7s} {'ms/step':>8s}")
    for arm, r in result.items():
        print(f"{arm:24s} {r['ratio']:15.3f} {r['ratio_min']:7.3f} {r['ratio_max']:7.3f} {r['ms_per_step']:8.2f}")
