"""What the benchmark reports, computed from the runs: pure metrics, tables, CSV and figures.

Every number here is derived from measured curves and events; nothing is typed in. The
figures need matplotlib (the ``bench`` extra); without it the CSV files are still written.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import statistics
from typing import Iterable, Sequence

from .scenarios import Run

__all__ = ["ratio", "steps_to_recover", "outcome", "interventions", "protocol_table", "format_table",
           "compact_scenarios", "write_csv", "write_curves", "plot_protocol"]

#: a run "ends well" when its final probe loss is within this factor of the clean run's
TOLERANCE = 1.25


def ratio(value: float, clean: float) -> float:
    """``value / clean``; ``inf`` when ``value`` is not finite (a crashed run)."""
    return value / clean if math.isfinite(value) else math.inf


def steps_to_recover(curve: Sequence[float], clean: Sequence[float], start: int,
                     tolerance: float = TOLERANCE) -> int | None:
    """Steps from ``start`` until the probe loss is back within ``tolerance`` x the clean run
    *and stays there* to the end; ``0`` when it never left, ``None`` when it never came back."""
    last_bad = None
    for t in range(start, len(curve)):
        if not curve[t] <= tolerance * clean[t]:     # NaN counts as bad
            last_bad = t
    if last_bad is None:
        return 0
    return None if last_bad == len(curve) - 1 else last_bad + 1 - start


def outcome(final_ratio: float, tolerance: float = TOLERANCE) -> str:
    """``"ok"`` (within ``tolerance`` of clean), ``"damaged"`` (finite, worse) or ``"crashed"``."""
    if not math.isfinite(final_ratio):
        return "crashed"
    return "ok" if final_ratio <= tolerance else "damaged"


def interventions(run: Run, start: int, length: int) -> tuple[int, int]:
    """Non-accept decisions inside ``[start, start + length]`` (one step of grace for signals
    that see damage at the next step's start) and outside it."""
    inside = outside = 0
    for e in run.events:
        if e.decision != "accept":
            if start <= e.step <= start + length:
                inside += 1
            else:
                outside += 1
    return inside, outside


def _mean_std(xs: list[float]) -> tuple[float, float]:
    finite = [x for x in xs if math.isfinite(x)]
    if len(finite) < len(xs):
        return math.inf, math.nan
    return statistics.mean(xs), statistics.pstdev(xs)


def protocol_table(runs: list[Run], clean: dict[int, Run], start: int, length: int
                   ) -> dict[str, dict[str, float]]:
    """Per arm, over seeds: final probe loss / clean (mean, std), peak after the fault /
    clean peak, steps to recover (mean over runs that recovered, and how many did),
    interventions inside and outside the fault window, rollbacks and skips (means)."""
    out: dict[str, dict[str, float]] = {}
    for arm in dict.fromkeys(r.arm for r in runs):
        rs = [r for r in runs if r.arm == arm]
        finals = [ratio(r.curve[-1], clean[r.seed].curve[-1]) for r in rs]
        peaks = [ratio(max(r.curve[start:]), max(clean[r.seed].curve[start:])) for r in rs]
        rec = [steps_to_recover(r.curve, clean[r.seed].curve, start) for r in rs]
        done = [s for s in rec if s is not None]
        inter = [interventions(r, start, length) for r in rs]
        final, final_std = _mean_std(finals)
        out[arm] = {
            "final_ratio": final, "final_ratio_std": final_std,
            "peak_ratio": _mean_std(peaks)[0],
            "steps_to_recover": statistics.mean(done) if done else math.nan,
            "recovered_runs": len(done), "runs": len(rs),
            "interventions_in_window": statistics.mean(i for i, _ in inter),
            "false_interventions": statistics.mean(o for _, o in inter),
            "rollbacks": statistics.mean(r.stats.get("rollbacks", 0) for r in rs),
            "skips": statistics.mean(r.stats.get("skipped", 0) for r in rs),
        }
    return out


def _cell(v) -> str:
    if not isinstance(v, float):
        return str(v)
    if math.isnan(v):
        return "-"
    if math.isinf(v):
        return "inf"
    return f"{v:.3g}" if abs(v) >= 1e3 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.3f}"


def format_table(rows: dict[str, dict], columns: Iterable[str] | None = None, key: str = "") -> str:
    """A fixed-width text table of ``{row: {column: value}}``."""
    rows = dict(rows)
    columns = list(columns or next(iter(rows.values())).keys())
    cells = [[str(name)] + [_cell(r.get(c, "")) for c in columns] for name, r in rows.items()]
    header = [key] + columns
    widths = [max(len(str(x)) for x in col) for col in zip(header, *cells)]
    lines = ["  ".join(str(h).rjust(w) if i else str(h).ljust(w)
                       for i, (h, w) in enumerate(zip(header, widths)))]
    lines += ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
              for r in cells]
    return "\n".join(lines)


def compact_scenarios(rows: dict[str, dict], arms: Iterable[str]) -> dict[str, dict]:
    """The scenario table for a terminal: per arm ``"final outcome"`` and ``rb/sk/out``."""
    out = {}
    for key, r in rows.items():
        row = {}
        for arm in arms:
            short = arm.replace("guarded_", "")
            row[short] = f"{_cell(r[f'{arm}_final'])} {r[f'{arm}_outcome']}"
            if f"{arm}_rollbacks" in r:
                row[f"{short} rb/sk/out"] = (f"{r[f'{arm}_rollbacks']}/{r[f'{arm}_skips']}/"
                                             f"{r[f'{arm}_outside']}")
        out[key] = row
    return out


def write_csv(path: str, rows: dict[str, dict], key: str) -> None:
    columns = list(dict.fromkeys(c for r in rows.values() for c in r))
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([key, *columns])
        for name, r in rows.items():
            writer.writerow([name, *(r.get(c, "") for c in columns)])


def write_curves(path: str, task: str, clean: dict[int, Run], runs: list[Run]) -> None:
    """Per step: probe loss, parameter L2 norm, and (guarded arms) decision, innovation, threshold."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["task", "arm", "seed", "step", "probe_loss", "param_norm", "decision",
                         "innovation", "threshold"])
        for r in [*(dataclasses.replace(c, arm="clean") for c in clean.values()), *runs]:
            by_step = {e.step: e for e in r.events}
            for t, (y, n) in enumerate(zip(r.curve, r.param_norm)):
                e = by_step.get(t)
                writer.writerow([task, r.arm, r.seed, t, y, n, e.decision if e else "",
                                 "" if e is None or e.innovation is None else e.innovation,
                                 "" if e is None or e.threshold is None else e.threshold])


_STYLES = ("-", "--", "-.", ":")


def _band(ax, curves: list[list[float]], label: str, log: bool = True, style: str = "-") -> None:
    import numpy as np
    a = np.array(curves, dtype=float)
    a[~np.isfinite(a)] = np.nan
    if log:
        a = np.log10(a)
    mean, std = np.nanmean(a, axis=0), np.nanstd(a, axis=0)
    steps = np.arange(a.shape[1])
    line, = ax.plot(steps, mean, style, label=label, lw=1.2)
    ax.fill_between(steps, mean - std, mean + std, color=line.get_color(), alpha=0.2)


def plot_protocol(out_dir: str, task: str, clean: dict[int, Run], runs: list[Run],
                  start: int, length: int) -> list[str]:
    """Paper 001's figures for one task: probe-loss curves (fig. 2/5), innovation with the
    threshold (fig. 3) and the parameter L2 norm (fig. 4), mean +- std over seeds.
    Returns the PNG paths written (empty without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    arms = list(dict.fromkeys(r.arm for r in runs))
    written = []

    def save(fig, name):
        path = os.path.join(out_dir, f"{task}_{name}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    for name, attr, ylabel in (("probe_loss", "curve", "log10 probe loss"),
                               ("param_norm", "param_norm", "log10 parameter L2 norm")):
        fig, ax = plt.subplots(figsize=(7, 4))
        _band(ax, [getattr(c, attr) for c in clean.values()], "clean")
        for i, arm in enumerate(arms):   # arms whose curves coincide differ by line style
            _band(ax, [getattr(r, attr) for r in runs if r.arm == arm], arm,
                  style=_STYLES[(i + 1) % len(_STYLES)])
        ax.axvspan(start, start + length, color="red", alpha=0.08, label="fault window")
        ax.set(xlabel="step", ylabel=ylabel, title=f"{task}: {name.replace('_', ' ')} (mean +- std)")
        ax.legend(fontsize=7)
        save(fig, name)

    guarded = [r for r in runs if r.arm == "guarded_probe"]
    if guarded:
        r = guarded[0]
        ev = [e for e in r.events if e.innovation is not None]
        fig, ax = plt.subplots(figsize=(7, 4))
        ax.plot([e.step for e in ev], [e.innovation for e in ev], lw=1, label="innovation nu_t")
        ax.plot([e.step for e in ev], [e.threshold for e in ev], lw=1, label="threshold epsilon_t")
        rej = [e for e in ev if e.decision == "rollback"]
        ax.scatter([e.step for e in rej], [e.innovation for e in rej], color="red", s=12,
                   label="rollback", zorder=3)
        skips = [e.step for e in r.events if e.decision == "skip"]
        if skips:
            ax.plot(skips, [0.0] * len(skips), "|", color="black", ms=10, label="skip (no proposal)")
        ax.set_yscale("symlog", linthresh=1e-2)
        ax.axvspan(start, start + length, color="red", alpha=0.08)
        ax.set(xlabel="step", ylabel="nu, epsilon", title=f"{task}: innovation and threshold "
               f"(guarded_probe, seed {r.seed})")
        ax.legend(fontsize=7)
        save(fig, "innovation")
    return written
