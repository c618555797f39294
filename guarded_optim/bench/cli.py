"""``guarded-optim bench``: does the guard save a run, what does it cost, and how do I see it?

Suites (``--suite``):

* ``default``   -- paper 001's protocol (gradients x300 for 10 steps from step 120 of 250,
  identical init and batch order across arms) on the digits CNN (``--seeds`` seeds) and the
  char transformer (``ceil(seeds / 5)`` seeds: it is 7x slower), with the guard's overhead
  measured in the same run; then the scenario suite on the CNN and the MLP.
* ``protocol``  -- the protocol alone, on ``--task`` (repeatable).
* ``scenarios`` -- 30+ named faults and clean controls x ``--models``, bare vs guarded.
* ``ablation``  -- the guard with each signal family switched off, over 16 scenarios.
* ``scaling``   -- the overhead ratio at 0.1M, 1M and 10M parameters.
* ``all``       -- every suite.

``--quick`` shrinks every suite to a smoke run (under two minutes on 2 cores). ``--out DIR``
writes each table as CSV, per-step curves, and the paper's figures as PNG (matplotlib).
Every number printed is measured in this run.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch

from . import report
from .scenarios import ARMS, SCENARIOS
from .suites import (ABLATION_SCENARIOS, QUICK_SCENARIOS, ablation, protocol, scaling,
                     scenario_suite, scenario_summary)
from .tasks import TASKS

SUITES = ("default", "protocol", "scenarios", "ablation", "scaling", "all")


class _Progress:
    """A tqdm bar when tqdm is installed and not ``--quiet``; otherwise silent."""

    def __init__(self, quiet: bool):
        self.bar = None
        if not quiet:
            try:
                from tqdm import tqdm
                self.bar = tqdm(desc="bench", unit="run", file=sys.stderr)
            except ImportError:  # tqdm is an optional extra
                pass

    def __call__(self) -> None:
        if self.bar is not None:
            self.bar.update()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _emit(title: str, rows: dict, key: str, out: str | None, name: str) -> None:
    print(f"\n## {title}\n")
    print(report.format_table(rows, key=key))
    if out:
        report.write_csv(os.path.join(out, f"{name}.csv"), rows, key)


def _scenario_window(args) -> tuple[int, int]:
    """(steps, fault start) of a scenario run: short under ``--quick``."""
    return (100, 50) if args.quick else (args.scenario_steps, args.scenario_start)


def _protocol(args, task: str, seeds: int, tick) -> None:
    steps, start, length = args.steps, args.fault_start, args.fault_length
    if args.quick:
        steps, start, length = min(steps, 120), min(start, 60), min(length, 10)
    res = protocol(task, range(seeds), steps, args.fault, start, length, args.arms,
                   overhead_repeats=args.repeats, overhead_steps=10 if args.quick else 40, tick=tick)
    columns = ["final_ratio", "final_ratio_std", "peak_ratio", "steps_to_recover",
               "recovered_runs", "interventions_in_window", "false_interventions", "rollbacks",
               "skips", "overhead"]
    rows = {arm: {c: row.get(c, math.nan) for c in columns} for arm, row in res.table.items()}
    _emit(f"protocol: {task}, {args.fault} for {length} steps from step {start} of {steps}, "
          f"{seeds} seed(s); probe loss / clean run of the same seed (mean over seeds); "
          f"recovered = back within {report.TOLERANCE}x clean and staying there; overhead = "
          f"time per step / bare AdamW (median of {args.repeats} paired repetitions)",
          rows, "arm", args.out, f"protocol_{task}")
    if args.out:
        report.write_curves(os.path.join(args.out, f"curves_{task}.csv"), task, res.clean, res.runs)
        for path in report.plot_protocol(args.out, task, res.clean, res.runs, start, length):
            print(f"wrote {path}")


def _scenarios(args, tick) -> None:
    steps, start = _scenario_window(args)
    names = args.scenarios or (QUICK_SCENARIOS if args.quick else tuple(SCENARIOS))
    models = args.models or (("mlp",) if args.quick else ("cnn", "mlp"))
    arms = ("guarded_probe", "guarded_signals")
    rows = scenario_suite(models, names, steps, start, arms=arms, tick=tick)
    print(f"\n## scenarios: {len(names)} x {', '.join(models)}, fault from step {start} of {steps}, "
          f"seed 0; final probe loss / clean, outcome (ok: within {report.TOLERANCE}x clean); "
          "rb/sk/out: rollbacks / skips / interventions outside the fault window (on a clean "
          "control every intervention is a false alarm)\n")
    print(report.format_table(report.compact_scenarios(rows, ("bare", *arms)), key="model/scenario"))
    if args.out:
        report.write_csv(os.path.join(args.out, "scenarios.csv"), rows, "model/scenario")
    _emit("scenario summary: faults that hurt bare AdamW, and how many each arm ended ok",
          scenario_summary(rows, arms), "model/arm", args.out, "scenario_summary")


def _ablation(args, tick) -> None:
    steps, start = _scenario_window(args)
    names = QUICK_SCENARIOS if args.quick else ABLATION_SCENARIOS
    task = "mlp" if args.quick else args.ablation_task
    table = ablation(task, names, steps, start, overhead_repeats=args.repeats,
                     overhead_steps=10 if args.quick else 40, tick=tick)
    _emit(f"ablation: {task}, {len(names)} scenarios, fault from step {start} of {steps}; caught "
          f"= faults that hurt bare AdamW and ended within {report.TOLERANCE}x clean; false_alarms "
          "= interventions on clean controls; overhead = time per step / bare AdamW",
          table, "guard", args.out, "ablation")


def _scaling(args, tick) -> None:
    sizes = (100_000, 1_000_000) if args.quick else (100_000, 1_000_000, 10_000_000)
    table = scaling(sizes, repeats=args.repeats, steps=5 if args.quick else 10, tick=tick)
    _emit(f"scaling: overhead ratio to bare AdamW (MLP on synthetic data, batch 128, median of "
          f"{args.repeats} paired repetitions)", table, "params", args.out, "scaling")


def bench(args: argparse.Namespace) -> None:
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    tick = _Progress(args.quiet)
    began = time.perf_counter()
    try:
        suites = {args.suite} if args.suite != "all" else {"protocol", "scenarios", "ablation", "scaling"}
        if args.suite == "default":
            tasks = args.task or (("cnn",) if args.quick else ("cnn", "transformer"))
            for task in tasks:
                seeds = args.seeds if task != "transformer" else max(1, math.ceil(args.seeds / 5))
                _protocol(args, task, min(seeds, 2) if args.quick else seeds, tick)
            _scenarios(args, tick)
        if "protocol" in suites:
            for task in args.task or ("cnn",):
                _protocol(args, task, min(args.seeds, 2) if args.quick else args.seeds, tick)
        if "scenarios" in suites:
            _scenarios(args, tick)
        if "ablation" in suites:
            _ablation(args, tick)
        if "scaling" in suites:
            _scaling(args, tick)
    finally:
        tick.close()
    print(f"\n{args.suite} suite finished in {time.perf_counter() - began:.0f} s "
          f"({torch.get_num_threads()} threads)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="guarded-optim", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("bench", help="run the recovery benchmark on bundled data",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    b.add_argument("--suite", default="default", choices=SUITES)
    b.add_argument("--task", action="append", choices=TASKS,
                   help="protocol task (repeatable; default: cnn, and the transformer in 'default')")
    b.add_argument("--seeds", type=int, default=5, help="protocol seeds (the paper's N=20: --seeds 20)")
    b.add_argument("--steps", type=int, default=250)
    b.add_argument("--fault", default="grad_x300", help="a name from guarded_optim.faults.FAULTS")
    b.add_argument("--fault-start", type=int, default=120)
    b.add_argument("--fault-length", type=int, default=10)
    b.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    b.add_argument("--models", nargs="+", choices=TASKS, help="scenario suite models (default cnn mlp)")
    b.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), help="scenario subset")
    b.add_argument("--scenario-steps", type=int, default=150)
    b.add_argument("--scenario-start", type=int, default=80)
    b.add_argument("--ablation-task", default="cnn", choices=TASKS)
    b.add_argument("--repeats", type=int, default=9, help="paired repetitions per overhead figure")
    b.add_argument("--quick", action="store_true", help="a smoke run of the chosen suite (< 2 min)")
    b.add_argument("--out", help="directory for CSV tables, per-step curves and PNG figures")
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    for name in ("seeds", "steps", "repeats", "fault_length", "scenario_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if args.command == "bench":
        bench(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
