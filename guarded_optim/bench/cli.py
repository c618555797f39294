"""The ``guarded-optim`` command line: ``guarded-optim bench`` runs the recovery benchmark.

The help text is built from the registries (scenarios, faults, tasks, arms) and the defaults
below, so it cannot drift from what the code runs; it is plain text (no reST markup).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
import textwrap
import time

import torch

from .. import __version__
from ..faults import FAULTS
from . import report
from .lr_window import QUICK_SEEDS as LR_WINDOW_QUICK_SEEDS, SEEDS as LR_WINDOW_SEEDS
from .scenarios import ABLATIONS, ARMS, SCENARIOS
from .suites import (ABLATION_SCENARIOS, QUICK_SCENARIOS, ablation, protocol, scaling,
                     scenario_suite, scenario_summary)
from .tasks import TASKS

SUITES = ("default", "protocol", "scenarios", "ablation", "scaling", "memory", "natural",
          "lr_window", "gpu", "all")
#: what ``--suite all`` leaves out (``gpu`` needs a CUDA device)
NOT_IN_ALL = ("default", "gpu", "all")

#: paper 001's protocol: (steps, fault start, fault length), and the ``--quick`` one. The quick
#: fault comes late enough to hurt bare AdamW on seeds 0 and 1 (measured: final probe loss
#: 6.4x clean, guarded 1.08x); at step 60 of 120 it happened not to (0.96x, the guard 1.13x).
PROTOCOL = {"steps": 250, "fault_start": 120, "fault_length": 10}
QUICK_PROTOCOL = {"steps": 150, "fault_start": 100, "fault_length": 10}
#: the scenario suite's run length and fault start, full and ``--quick``
SCENARIO_WINDOW = {"scenario_steps": 150, "scenario_start": 80}
QUICK_SCENARIO_WINDOW = {"scenario_steps": 100, "scenario_start": 50}
SCALING_SIZES = (100_000, 1_000_000, 10_000_000)
QUICK_SCALING_SIZES = SCALING_SIZES[:2]
#: protocol seeds; the transformer runs ceil(seeds / TRANSFORMER_SEED_DIVISOR) of them in
#: the default suite (it is much slower)
SEEDS, QUICK_SEEDS = 5, 2
TRANSFORMER_SEED_DIVISOR = 5
DEFAULT_FAULT = "grad_x300"


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


def _protocol(args, task: str, seeds: int, tick) -> None:
    steps, start, length = args.steps, args.fault_start, args.fault_length
    res = protocol(task, range(seeds), steps, args.fault, start, length, args.arms,
                   overhead_repeats=args.repeats, overhead_steps=10 if args.quick else 40,
                   tick=tick)
    columns = ["final_ratio", "final_ratio_std", "peak_ratio", "steps_to_recover",
               "recovered_runs", "interventions_in_window", "false_interventions", "rollbacks",
               "skips", "overhead"]
    rows = {arm: {c: row.get(c, math.nan) for c in columns} for arm, row in res.table.items()}
    _emit(f"protocol: {task}, {args.fault} for {length} steps from step {start} of {steps}, "
          f"{seeds} seed(s); probe loss / clean run of the same seed (mean over seeds); "
          f"recovered = back within {report.TOLERANCE}x clean and staying there; overhead = "
          f"time per step / bare AdamW (median of {args.repeats} paired repetitions)",
          rows, "arm", args.out, f"protocol_{task}")
    note = harmless_fault_note(res.table)
    if note:
        print(note)
    if args.out:
        report.write_curves(os.path.join(args.out, f"curves_{task}.csv"), task, res.clean, res.runs)
        for path in report.plot_protocol(args.out, task, res.clean, res.runs, start, length,
                                        args.fault):
            print(f"wrote {path}")


def harmless_fault_note(table: dict[str, dict]) -> str | None:
    """One line to print under a protocol table whose fault did not hurt bare AdamW (its final
    probe loss within tolerance of clean): there the guarded arms can only show their cost."""
    bare = table.get("bare", {}).get("final_ratio")
    if bare is None or not math.isfinite(bare) or bare > report.TOLERANCE:
        return None
    return (f"note: this fault did not hurt bare AdamW (final {bare:.2f}x clean, within "
            f"{report.TOLERANCE}x), so this table shows what the guard costs, not what it saves; "
            "try a later --fault-start or a longer --fault-length.")


def _scenarios(args, tick) -> None:
    steps, start = args.scenario_steps, args.scenario_start
    names = args.scenarios or (QUICK_SCENARIOS if args.quick else tuple(SCENARIOS))
    models = args.models
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
    steps, start = args.scenario_steps, args.scenario_start
    names = QUICK_SCENARIOS if args.quick else ABLATION_SCENARIOS
    task = args.ablation_task
    table = ablation(task, names, steps, start, overhead_repeats=args.repeats,
                     overhead_steps=10 if args.quick else 40, tick=tick)
    _emit(f"ablation: {task}, {len(names)} scenarios, fault from step {start} of {steps}; caught "
          f"= faults that hurt bare AdamW and ended within {report.TOLERANCE}x clean; false_alarms "
          "= interventions on clean controls; overhead = time per step / bare AdamW",
          table, "guard", args.out, "ablation")


def _scaling(args, tick) -> None:
    sizes = QUICK_SCALING_SIZES if args.quick else SCALING_SIZES
    table = scaling(sizes, repeats=args.repeats, steps=5 if args.quick else 10, tick=tick)
    _emit(f"scaling: overhead ratio to bare AdamW (MLP on synthetic data, batch 128, median of "
          f"{args.repeats} paired repetitions)", table, "params", args.out, "scaling")


def _memory(args, tick) -> None:
    from . import memory
    reps = min(args.repeats, 3) if args.quick else args.repeats   # memory.run caps quick runs
    rows = memory.run(full=args.full, quick=args.quick, reps=reps, out=args.out, tick=tick)
    print("\n## memory: bytes the guard holds per parameter beyond bare AdamW (its tensors; "
          "RSS growth), checkpoint bytes per parameter bare vs guarded, and opt.step() / "
          f"full-step time ratios (median of {reps} paired repetitions)\n")
    print(memory.format_table(rows))
    if args.out:
        print(f"\nwrote {os.path.join(args.out, 'memory.csv')} and memory.png")


def _natural(args, tick) -> None:
    from . import natural
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 5)
    names = args.mechanisms   # None: every mechanism (--quick shortens each run instead)
    rows = natural.run(names, seeds=seeds, quick=args.quick, out=args.out, progress=tick)
    print(f"\n## natural: instabilities that arise by themselves (nothing injected), {seeds} "
          "seed(s); final/peak = probe loss / the stable reference run of the same seed\n")
    print(natural.format_table(rows))


def _lr_window(args, tick) -> None:
    from . import lr_window
    seeds = args.seeds if getattr(args, "seeds_given", True) else (
        lr_window.QUICK_SEEDS if args.quick else lr_window.SEEDS)
    rows = lr_window.run(seeds=seeds, quick=args.quick, out=args.out, progress=tick)
    first = rows[0]
    window = next(r["window"] for r in rows if r["window"] != "off")
    print(f"\n## lr_window: a nanoGPT-like char GPT, {first['iters']} iterations, the schedule "
          f"{window} (start:stop:factor) on the *_window arms, {seeds} seed(s); final/peak "
          "ratio = val loss / bare_clean of the same seed (peak: from the window's start on); "
          "identical_to_bare = final parameters equal (torch.equal) to the bare arm's under "
          "the same schedule; the guard at its current defaults\n")
    print(lr_window.format_table(rows))
    if args.out:
        print(f"\nwrote {', '.join(os.path.join(args.out, f) for f in lr_window.FILES)}")


def _gpu(args) -> None:
    from . import gpu

    def say(msg: str) -> None:
        if not args.quiet:
            print(f"gpu: {msg}", file=sys.stderr, flush=True)

    text = gpu.run(args.out, dry_run=args.dry_run, reps=args.repeats, say=say)
    print("\n" + text)
    print(f"wrote {', '.join(os.path.join(args.out, f) for f in gpu.FILES)}")


def bench(args: argparse.Namespace) -> None:
    if args.quiet:   # the guard's own WARNING records (re-baselines, stops) would fill the tables
        logging.getLogger("guarded_optim").setLevel(logging.ERROR)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
    tick = _Progress(args.quiet)
    began = time.perf_counter()
    try:
        suites = {args.suite} if args.suite != "all" else set(SUITES) - set(NOT_IN_ALL)
        if args.suite == "default":
            tasks = args.task or (("cnn",) if args.quick else ("cnn", "transformer"))
            for task in tasks:
                seeds = (args.seeds if task != "transformer"
                         else max(1, math.ceil(args.seeds / TRANSFORMER_SEED_DIVISOR)))
                _protocol(args, task, seeds, tick)
            _scenarios(args, tick)
        if "protocol" in suites:
            for task in args.task or ("cnn",):
                _protocol(args, task, args.seeds, tick)
        if "scenarios" in suites:
            _scenarios(args, tick)
        if "ablation" in suites:
            _ablation(args, tick)
        if "scaling" in suites:
            _scaling(args, tick)
        if "memory" in suites:
            _memory(args, tick)
        if "natural" in suites:
            _natural(args, tick)
        if "lr_window" in suites:
            _lr_window(args, tick)
        if "gpu" in suites:
            _gpu(args)
    finally:
        tick.close()
    print(f"\n{args.suite} suite finished in {time.perf_counter() - began:.0f} s "
          f"({torch.get_num_threads()} threads)")


# ---------------------------------------------------------------------------------------------
# help text: plain text, every count and default computed from the registries and constants

def _width() -> int:
    """argparse's own width: the terminal's less 2, here capped to 40..88 columns."""
    return max(40, min(88, shutil.get_terminal_size().columns - 2))


def _wrap(text: str, indent: str = "", first: str | None = None) -> str:
    return textwrap.fill(" ".join(text.split()), width=_width(), initial_indent=first or indent,
                         subsequent_indent=indent, break_on_hyphens=False)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written (pre-wrapped), and the command list without argparse's extra
    ``{bench}`` line above it."""

    def _format_action(self, action):
        text = super()._format_action(action)
        if isinstance(action, argparse._SubParsersAction):
            text = "".join(line[2:] for line in text.splitlines(True)[1:])
        return text


def _items(pairs: list[tuple[str, str]]) -> str:
    pad = max(len(k) for k, _ in pairs) + 4
    return "\n".join(_wrap(v, " " * pad, f"  {k:<{pad - 2}}") for k, v in pairs)


def _millions(n: int) -> str:
    return f"{n / 1e6:g}M"


def _and(items) -> str:
    items = list(items)
    return ", ".join(items[:-1]) + f" and {items[-1]}" if len(items) > 1 else "".join(items)


def _suite_help() -> list[tuple[str, str]]:
    controls = sum(s.control for s in SCENARIOS.values())
    p = PROTOCOL
    pairs = [
        ("default", f"paper 001's protocol ({DEFAULT_FAULT} for {p['fault_length']} steps from "
                    f"step {p['fault_start']} of {p['steps']}, identical init and batch order "
                    "across arms) on the digits CNN (--seeds seeds) and the char transformer "
                    f"(ceil(seeds / {TRANSFORMER_SEED_DIVISOR}) seeds: it is much slower), with "
                    "the guard's overhead measured in the same run; then the scenario suite on "
                    "the CNN and the MLP."),
        ("protocol", "the protocol alone, on --task (repeatable)."),
        ("scenarios", f"{len(SCENARIOS)} named scenarios ({len(SCENARIOS) - controls} faults, "
                      f"{controls} clean controls) x --models, bare AdamW vs guarded."),
        ("ablation", f"the default guard and {len(ABLATIONS) - 1} variants of it (a signal "
                     "family switched off, or an opt-in extra switched on), over "
                     f"{len(ABLATION_SCENARIOS)} scenarios."),
        ("scaling", "the guard's overhead ratio at "
                    f"{_and(_millions(s) for s in SCALING_SIZES)} parameters."),
    ]
    pairs.append(("memory", "bytes held per parameter beyond bare, checkpoint bytes per "
                            "parameter bare vs guarded, peak RSS and time ratios, from 0.1M "
                            "to 10M parameters and the reference GPT (100M with --full)."))
    pairs.append(("natural", "instabilities that arise by themselves, nothing injected: post-LN "
                             "without warm-up, attention- and output-logit growth, Adam "
                             "second-moment decay, fp16, bad data, edge of stability; bare vs "
                             "the guard vs a stable reference, 5 seeds (--mechanisms to pick)."))
    from .lr_window import QUICK, SEEDS as LR_SEEDS, WINDOW, ITERS
    pairs.append(("lr_window", "a nanoGPT-like char GPT (examples/nanogpt_like.py's loop: "
                               "warm-up + cosine LR written into param_groups, gradient "
                               f"accumulation, GradScaler calls, clipping) for {ITERS} "
                               f"iterations, its schedule x{WINDOW[2]:g} for iterations "
                               f"{WINDOW[0]}-{WINDOW[1] - 1}: bare vs the probe guard vs the "
                               "probe-less guard, with and without the window, at the guard's "
                               f"defaults, {LR_SEEDS} seeds (--quick: 1 seed, "
                               f"{QUICK['max_iters']} iterations)."))
    from .gpu import BUDGET_S
    pairs.append(("gpu", f"on one CUDA device, within {BUDGET_S / 60:g} minutes (fewer timing "
                         "repetitions when it runs long): tests/test_cuda.py, "
                         "a 124M-parameter GPT (bf16 autocast, fused AdamW) bare vs guarded "
                         "without a probe, with one every 10 steps and every step: step time "
                         "(CUDA events), peak device memory, pinned host bytes, host syncs "
                         "per step type against docs/host_syncs.md, and a profiler trace "
                         "read for copy/compute overlap; --out required, --dry-run runs it "
                         "tiny on the CPU without timing claims."))
    pairs.append(("all", "every suite above except default and gpu."))
    return pairs


def _bench_description() -> str:
    q, qs = QUICK_PROTOCOL, QUICK_SCENARIO_WINDOW
    quick = (f"--quick shrinks every suite to a smoke run (under two minutes for the default "
             f"suite on 2 cores): the protocol on the CNN with at most {QUICK_SEEDS} seeds, "
             f"{q['fault_length']} fault steps from step {q['fault_start']} of {q['steps']}; "
             f"{len(QUICK_SCENARIOS)} scenarios on the MLP, fault from step "
             f"{qs['scenario_start']} of {qs['scenario_steps']}. Options given explicitly are "
             "kept.")
    out = ("--out DIR writes each table as CSV, per-step curves, and figures as PNG "
           "(matplotlib). Every number printed is measured in this run.")
    return "\n\n".join(["Does the guard save a run, what does it cost, and how do I see it?",
                        "suites (--suite):\n" + _items(_suite_help()), _wrap(quick), _wrap(out)])


_EPILOG = """examples:
  guarded-optim bench --quick                 smoke run of the default suite
  guarded-optim bench --quick --out figs      the same, plus CSV tables and PNG figures
  guarded-optim bench --suite scenarios --models mlp --scenarios clean nan_bomb
  guarded-optim bench --seeds 20              the paper's N=20 protocol (slow)
  guarded-optim bench --suite gpu --out gpu   on a CUDA machine (--dry-run: tiny, on the CPU)"""


def _listing(names) -> str:
    return ", ".join(names)


def build_parser() -> argparse.ArgumentParser:
    """The ``guarded-optim`` argument parser (its help is the CLI's documentation)."""
    raw = _Formatter
    parser = argparse.ArgumentParser(
        prog="guarded-optim", formatter_class=raw, epilog=_EPILOG,
        description=_wrap("guarded-optim: PyTorch optimizers that recover by themselves from "
                          "the update that wrecks a run. Run 'guarded-optim bench --help' for "
                          "the benchmark's suites and options."))
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    sub.required = True
    b = sub.add_parser("bench", help="run the recovery benchmark on bundled data",
                       description=_bench_description(), epilog=_EPILOG, formatter_class=raw)
    p, q = PROTOCOL, QUICK_PROTOCOL
    sw, qsw = SCENARIO_WINDOW, QUICK_SCENARIO_WINDOW
    b.add_argument("--suite", default="default", choices=SUITES,
                   help="which benchmark to run, described above (default: '%(default)s')")
    b.add_argument("--mechanisms", nargs="+", metavar="NAME", default=None,
                   help="natural suite: which mechanisms, any of the suite's registry "
                        "(default: all, also under --quick)")
    b.add_argument("--full", action="store_true",
                   help="memory suite: add the 100M-parameter row (about 6 GB of RAM, minutes) "
                        "(default: off)")
    b.add_argument("--task", action="append", choices=TASKS,
                   help="protocol task; repeat for several (default: cnn; the default suite "
                        "adds the transformer except under --quick)")
    b.add_argument("--seeds", type=int, default=None,
                   help=f"protocol seeds; the paper's N=20 is --seeds 20 (default: {SEEDS}; under "
                        f"--quick: {QUICK_SEEDS}); lr_window suite: its own defaults, "
                        f"{LR_WINDOW_SEEDS} and under --quick {LR_WINDOW_QUICK_SEEDS}")
    b.add_argument("--steps", type=int, default=None,
                   help=f"training steps per protocol run (default: {p['steps']}; under "
                        f"--quick: {q['steps']})")
    b.add_argument("--fault", default=DEFAULT_FAULT, choices=FAULTS, metavar="FAULT",
                   help=f"the protocol's fault, one of: {_listing(FAULTS)} (default: %(default)s)")
    b.add_argument("--fault-start", type=int, default=None,
                   help=f"step at which the protocol's fault starts (default: {p['fault_start']}; "
                        f"under --quick: {q['fault_start']})")
    b.add_argument("--fault-length", type=int, default=None,
                   help=f"steps the protocol's fault lasts (default: {p['fault_length']}; under "
                        f"--quick: {q['fault_length']})")
    b.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS), metavar="ARM",
                   help=f"protocol arms, any of: {_listing(ARMS)} (default: all {len(ARMS)})")
    b.add_argument("--models", nargs="+", choices=TASKS, metavar="MODEL",
                   help=f"scenario-suite models, any of: {_listing(TASKS)} (default: cnn mlp; "
                        "under --quick: mlp)")
    b.add_argument("--scenarios", nargs="+", choices=list(SCENARIOS), metavar="NAME",
                   help=f"scenario subset, any of the {len(SCENARIOS)} scenarios: "
                        f"{_listing(SCENARIOS)} (default: all {len(SCENARIOS)}; under --quick: "
                        f"{' '.join(QUICK_SCENARIOS)})")
    b.add_argument("--scenario-steps", type=int, default=None,
                   help=f"training steps per scenario and ablation run (default: "
                        f"{sw['scenario_steps']}; under --quick: {qsw['scenario_steps']})")
    b.add_argument("--scenario-start", type=int, default=None,
                   help=f"step at which each scenario's fault starts (default: "
                        f"{sw['scenario_start']}; under --quick: {qsw['scenario_start']})")
    b.add_argument("--ablation-task", default=None, choices=TASKS,
                   help="model of the ablation suite (default: cnn; under --quick: mlp)")
    b.add_argument("--repeats", type=int, default=9,
                   help="paired repetitions per overhead figure, the median is reported "
                        "(default: %(default)s)")
    b.add_argument("--quick", action="store_true",
                   help="a smoke run of the chosen suite, with the smaller defaults listed "
                        "per option (default: off)")
    b.add_argument("--out", metavar="DIR",
                   help="directory for CSV tables, per-step curves and PNG figures (default: "
                        "none, tables are printed only)")
    b.add_argument("--dry-run", action="store_true",
                   help="gpu suite: the same code at a tiny size on the CPU, writing the same "
                        "files, CUDA tests skipped, no timing claims (default: off)")
    b.add_argument("--quiet", action="store_true",
                   help="no progress bar, and the guard's log records only at ERROR (default: off)")
    return parser


def _resolve(args: argparse.Namespace) -> None:
    """Fill the options left unset with the full or ``--quick`` defaults."""
    quick = args.quick
    args.seeds_given = args.seeds is not None   # suites with their own seed counts (lr_window)
    defaults = {**(QUICK_PROTOCOL if quick else PROTOCOL),
                **(QUICK_SCENARIO_WINDOW if quick else SCENARIO_WINDOW),
                "seeds": QUICK_SEEDS if quick else SEEDS,
                "models": ["mlp"] if quick else ["cnn", "mlp"],
                "ablation_task": "mlp" if quick else "cnn"}
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def _validate(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name in ("seeds", "steps", "repeats", "fault_length", "scenario_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 <= args.fault_start <= args.steps - args.fault_length:
        parser.error(f"the fault (--fault-start {args.fault_start}, --fault-length "
                     f"{args.fault_length}) must lie inside the run (--steps {args.steps})")
    if args.dry_run and args.suite != "gpu":
        parser.error("--dry-run applies to --suite gpu only")
    if args.suite == "gpu" and not args.out:
        parser.error("--suite gpu needs --out DIR (it writes its summary, tables and trace there)")
    if not 0 <= args.scenario_start < args.scenario_steps:
        parser.error(f"--scenario-start {args.scenario_start} must lie inside the run "
                     f"(--scenario-steps {args.scenario_steps})")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        parser.print_help()
        return 0
    args = parser.parse_args(argv)
    if args.command == "bench":
        _resolve(args)
        _validate(parser, args)
        if args.suite == "gpu" and not args.dry_run and not torch.cuda.is_available():
            print("guarded-optim bench --suite gpu needs a CUDA GPU, and torch sees none here "
                  f"(torch {torch.__version__}, torch.cuda.is_available() is False). Run it on a "
                  "machine with one, or add --dry-run to run the same code tiny on the CPU "
                  "(no timing claims).", file=sys.stderr)
            return 2
        torch.set_num_threads(min(2, torch.get_num_threads()))
        bench(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
