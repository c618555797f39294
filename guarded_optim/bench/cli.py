"""``guarded-optim bench``: does the guard save a run, and what does it cost?

Runs paper 001's protocol (gradients x300 for 10 steps from step 120 over 250 AdamW steps,
identical init and batch order across arms) for each arm and seed, and prints what it
measured. ``--quick`` shrinks seeds and steps to finish in well under two minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

import torch

from .scenarios import ARMS, run_arm, summarise
from .tasks import TASKS


def _progress(total: int, quiet: bool):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is an optional extra
        tqdm = None
    if quiet or tqdm is None:
        return None
    return tqdm(total=total, desc="bench", unit="run", file=sys.stderr)


def bench(args: argparse.Namespace) -> dict:
    steps, start, length = args.steps, args.fault_start, args.fault_length
    if args.quick:
        steps, start, length = min(steps, 120), min(start, 60), min(length, 10)
    seeds = range(args.seeds)
    arms = [a for a in ARMS if a in args.arms]
    bar = _progress(len(seeds) * (len(arms) + 1), args.quiet)
    clean, runs = {}, []
    for seed in seeds:
        clean[seed] = run_arm(args.task, "bare", seed, steps, None, start, length).curve
        if bar:
            bar.update()
        for arm in arms:
            runs.append(run_arm(args.task, arm, seed, steps, args.fault, start, length))
            if bar:
                bar.update()
    if bar:
        bar.close()
    table = summarise(runs, clean, start, length)
    print(f"\n{args.task}: fault {args.fault} for {length} steps from step {start}, {steps} steps, "
          f"{len(seeds)} seed(s); probe loss relative to the clean bare run of the same seed")
    print(f"{'arm':18s} {'final':>16s} {'peak':>12s} {'in window':>10s} {'false':>7s}")
    for arm, row in table.items():
        print(f"{arm:18s} {row['final_ratio']:9.3f} +-{row['final_ratio_std']:5.3f} "
              f"{row['peak_ratio']:12.4g} {row['interventions_in_window']:10.1f} "
              f"{row['false_interventions']:7.1f}")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "protocol.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["arm", *next(iter(table.values())).keys()])
            for arm, row in table.items():
                writer.writerow([arm, *row.values()])
        with open(os.path.join(args.out, "curves.csv"), "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["arm", "seed", "step", "probe_loss"])
            for seed, curve in clean.items():
                writer.writerows(("clean", seed, t, y) for t, y in enumerate(curve))
            for r in runs:
                writer.writerows((r.arm, r.seed, t, y) for t, y in enumerate(r.curve))
        print(f"wrote {args.out}/protocol.csv and {args.out}/curves.csv")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="guarded-optim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="run the recovery benchmark on bundled data")
    b.add_argument("--task", default="cnn", choices=TASKS)
    b.add_argument("--seeds", type=int, default=5)
    b.add_argument("--steps", type=int, default=250)
    b.add_argument("--fault", default="grad_x300", help="a name from guarded_optim.faults.FAULTS")
    b.add_argument("--fault-start", type=int, default=120)
    b.add_argument("--fault-length", type=int, default=10)
    b.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    b.add_argument("--quick", action="store_true", help="fewer steps (fault at 60): a smoke run")
    b.add_argument("--out", help="directory for CSV output")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.command == "bench":
        bench(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
