"""The benchmark's suites: each runs its arms and returns tables of what it measured.

* :func:`protocol` -- paper 001, sec. 3.3: one fault (default gradients x300 for 10 steps
  from step 120 of 250) over N seeds, every arm against the clean run of the same seed.
* :func:`scenario_suite` -- ARC's tables 6-8: every named scenario x model, bare vs guarded.
* :func:`ablation` -- the guard with each signal family switched off (and the opt-in
  extras), over a subset of scenarios: detection, false alarms, overhead.
* :func:`scaling` -- the overhead ratio as the model grows (0.1M, 1M, 10M parameters).

``tick`` is called once per training run (progress bars); suites never print.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Iterable

from ..faults import FaultSchedule, make_fault
from .overhead import ARMS as OVERHEAD_ARMS, overhead
from .report import interventions, outcome, protocol_table, ratio
from .scenarios import ABLATIONS, ARMS, SCENARIOS, Run, Wrap, run_arm, scenario_faults
from .tasks import scaling_task

__all__ = ["ProtocolResult", "protocol", "scenario_suite", "scenario_summary", "ablation",
           "scaling", "ABLATION_SCENARIOS", "QUICK_SCENARIOS", "SCALING_ARMS"]

#: the scenarios the ablation runs: two controls and one of each kind of fault
ABLATION_SCENARIOS = ("clean", "clean_lr_x3", "nan_bomb", "nan_grad", "inf_nuke", "lr_x50",
                      "lr_x1000", "lr_x100000", "grad_x300", "weights_x1e4", "bitflip_exponent",
                      "adam_state_x1e6", "adam_state_nan", "slow_drift_strong", "sparsity_90",
                      "rank_collapse")
#: what ``--quick`` runs of the scenario suite
QUICK_SCENARIOS = ("clean", "nan_bomb", "lr_x1000", "grad_x300", "weights_x1e4", "adam_state_nan")


def _noop() -> None:
    pass


@dataclass
class ProtocolResult:
    task: str
    start: int
    length: int
    clean: dict[int, Run]
    runs: list[Run]
    table: dict[str, dict[str, float]]
    overhead: dict[str, dict[str, float]] = field(default_factory=dict)


def protocol(task: str, seeds: Iterable[int], steps: int, fault: str, start: int, length: int,
             arms: Iterable[str] = tuple(ARMS), overhead_repeats: int = 9, overhead_steps: int = 40,
             tick: Callable[[], None] = _noop) -> ProtocolResult:
    """Paper 001's protocol for ``task``; with ``overhead_repeats``, the guarded arms' time
    per step as a ratio to bare AdamW, paired and interleaved in this same process."""
    clean, runs = {}, []
    for seed in seeds:
        clean[seed] = run_arm(task, "bare", seed, steps)
        tick()
        for arm in arms:
            faults = FaultSchedule([make_fault(fault, start, length, seed=seed)])
            runs.append(run_arm(task, arm, seed, steps, faults))
            tick()
    result = ProtocolResult(task, start, length, clean, runs, protocol_table(runs, clean, start, length))
    if overhead_repeats:
        timed = {a: ARMS[a] for a in arms if ARMS[a] is not None and a.startswith("guarded")}
        result.overhead = overhead(task, timed, steps=overhead_steps, repeats=overhead_repeats)
        for arm, row in result.overhead.items():   # "bare" is timed too: its ratio is 1
            if arm in result.table:
                result.table[arm]["overhead"] = row["ratio"]
        tick()
    return result


def _scenario_row(scenario, runs: dict[str, Run], clean: Run, start: int) -> dict:
    """Final probe loss / clean and its outcome per arm (on a control, the guarded arms' outcome
    is judged against the bare run of that control); for guarded arms rollbacks, skips and
    interventions outside the fault window (on a clean control: every one, a false alarm)."""
    row: dict = {}
    for arm, r in runs.items():
        final = ratio(r.curve[-1], clean.curve[-1])
        row[f"{arm}_final"] = final
        if not scenario.control:
            row[f"{arm}_outcome"] = outcome(final)
        elif arm == "bare":       # a control changes training on purpose: it is the reference
            row[f"{arm}_outcome"] = "control"
        else:
            row[f"{arm}_outcome"] = outcome(final / row["bare_final"])
        if arm != "bare":
            inside, outside = interventions(r, start, scenario.length)
            row[f"{arm}_rollbacks"] = r.stats.get("rollbacks", 0)
            row[f"{arm}_skips"] = r.stats.get("skipped", 0)
            row[f"{arm}_outside"] = inside + outside if scenario.control else outside
    return row


def scenario_suite(tasks: Iterable[str], scenarios: Iterable[str], steps: int, start: int,
                   seed: int = 0, arms: Iterable[str] = ("guarded_probe", "guarded_signals"),
                   wraps: dict[str, Wrap] | None = None,
                   tick: Callable[[], None] = _noop) -> dict[str, dict]:
    """Every scenario x task on one seed: ``{"task/scenario": row}`` with, per arm, the final
    probe loss / clean, its outcome (ok / damaged / crashed), rollbacks, skips, and
    interventions outside the fault window (on clean controls: all of them, false alarms)."""
    wraps = wraps or {a: ARMS[a] for a in arms}
    rows = {}
    for task in tasks:
        clean = run_arm(task, "bare", seed, steps)
        tick()
        for name in scenarios:
            scenario = SCENARIOS[name]
            runs = {}
            for arm, wrap in {"bare": None, **wraps}.items():
                runs[arm] = clean if arm == "bare" and name == "clean" else run_arm(
                    task, arm, seed, steps, scenario_faults(scenario, start, steps, seed), wrap=wrap)
                tick()
            rows[f"{task}/{name}"] = _scenario_row(scenario, runs, clean, start)
    return rows


def scenario_summary(rows: dict[str, dict], arms: Iterable[str]) -> dict[str, dict]:
    """Per task and arm: faults that hurt bare, how many the arm ended well, false alarms."""
    out: dict[str, dict] = {}
    for task in dict.fromkeys(k.split("/")[0] for k in rows):
        mine = {k.split("/", 1)[1]: r for k, r in rows.items() if k.startswith(task + "/")}
        hurt = [n for n, r in mine.items() if not SCENARIOS[n].control and r["bare_outcome"] != "ok"]
        for arm in arms:
            saved = [n for n in hurt if mine[n][f"{arm}_outcome"] == "ok"]
            worse = [n for n, r in mine.items() if not SCENARIOS[n].control
                     and r["bare_outcome"] == "ok" and r[f"{arm}_outcome"] != "ok"]
            out[f"{task}/{arm}"] = {
                "bare_hurt": len(hurt), "ended_ok": len(saved),
                "not_recovered": " ".join(sorted(set(hurt) - set(saved))) or "-",
                "made_worse": " ".join(worse) or "-",
                "false_alarms": sum(r[f"{arm}_outside"] for n, r in mine.items()
                                    if SCENARIOS[n].control),
            }
    return out


def ablation(task: str, scenarios: Iterable[str], steps: int, start: int, seed: int = 0,
             rows: dict[str, Wrap] | None = None, overhead_repeats: int = 9,
             overhead_steps: int = 40, tick: Callable[[], None] = _noop) -> dict[str, dict]:
    """Each ablation row over ``scenarios``: faults that hurt bare and that the row ended
    within tolerance, which it missed, false alarms on the controls, and its overhead."""
    rows = dict(ABLATIONS if rows is None else rows)
    scenarios = tuple(scenarios)
    per = scenario_suite([task], scenarios, steps, start, seed, wraps=rows, tick=tick)
    summary = scenario_summary(per, rows)
    table = {}
    for name in rows:
        s = summary[f"{task}/{name}"]
        table[name] = {"caught": f"{s['ended_ok']}/{s['bare_hurt']}", "missed": s["not_recovered"],
                       "made_worse": s["made_worse"], "false_alarms": s["false_alarms"]}
    if overhead_repeats:
        timing = overhead(task, rows, steps=overhead_steps, repeats=overhead_repeats)
        for name in rows:
            table[name]["overhead"] = timing[name]["ratio"]
        tick()
    return table


#: the overhead example's guarded arms (probe every step, every 10 steps, none)
SCALING_ARMS: dict[str, Wrap] = {a: w for a, w in OVERHEAD_ARMS.items() if w is not None}


def scaling(sizes: Iterable[int] = (100_000, 1_000_000, 10_000_000), repeats: int = 9,
            steps: int = 10, tick: Callable[[], None] = _noop) -> dict[str, dict]:
    """Overhead ratio to bare AdamW per model size (paired, interleaved, median of ``repeats``)."""
    table = {}
    for size in sizes:
        timing = overhead(functools.partial(scaling_task, size), SCALING_ARMS, steps=steps,
                          repeats=repeats, warmup=3)
        table[f"{size:,}"] = {"bare_ms_per_step": timing["bare"]["ms_per_step"],
                              **{arm: timing[arm]["ratio"] for arm in SCALING_ARMS}}
        tick()
    return table

