"""Quickstart: does the guard save a run? Paper 001's protocol on the bundled digits CNN.

Three arms with identical init and batch order: clean AdamW, AdamW with gradients x300 for
10 steps from step 120, and the same fault under GuardedOptimizer with default settings.
Every number printed is measured in this run.

    python examples/quickstart.py [--task cnn|transformer|mlp] [--seeds 3] [--steps 250]
"""

import argparse
import statistics

import torch

from guarded_optim import GuardedOptimizer
from guarded_optim.bench.tasks import TASKS, make_task, train
from guarded_optim.faults import FaultSchedule, ScaleGradients


def run(task_name, seed, steps, guarded, fault):
    task = make_task(task_name, seed)
    opt = torch.optim.AdamW(task.model.parameters(), lr=task.lr)   # the user's optimizer ...
    if guarded:                                                     # ... and the one-line change
        opt = GuardedOptimizer(opt, probe=task.probe, module=task.model)
    faults = FaultSchedule([ScaleGradients(start=120, length=10, factor=300.0)]) if fault else None
    curve = train(task, opt, steps, faults)
    return curve, (opt.stats if guarded else None)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="cnn", choices=TASKS)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=250)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))

    rows = []
    for seed in range(args.seeds):
        clean, _ = run(args.task, seed, args.steps, guarded=False, fault=False)
        bare, _ = run(args.task, seed, args.steps, guarded=False, fault=True)
        guarded, stats = run(args.task, seed, args.steps, guarded=True, fault=True)
        rows.append((seed, clean[-1], bare[-1], guarded[-1], max(bare), max(guarded), stats))
        print(f"seed {seed}: final probe loss clean {clean[-1]:.4f} | bare+fault {bare[-1]:.4f} "
              f"({bare[-1] / clean[-1]:.2f}x) | guarded+fault {guarded[-1]:.4f} "
              f"({guarded[-1] / clean[-1]:.2f}x) | guard: {stats['skipped']} skipped, "
              f"{stats['rollbacks']} rolled back, {stats['accepted']} accepted", flush=True)

    ratio = lambda i: statistics.mean(r[i] / r[1] for r in rows)  # noqa: E731
    print(f"\n{args.task}, {args.seeds} seeds, gradients x300 for steps 120-129:")
    print(f"  bare AdamW    ends at {ratio(2):.2f}x the clean run's probe loss (mean over seeds)")
    print(f"  GuardedOptim  ends at {ratio(3):.2f}x")


if __name__ == "__main__":
    main()
