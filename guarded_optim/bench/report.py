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

from .scenarios import ARMS, Run

__all__ = ["ratio", "steps_to_recover", "outcome", "interventions", "protocol_table", "format_table",
           "compact_scenarios", "write_csv", "write_curves", "plot_protocol", "same_arms"]

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


#: one look per arm (colour, line style, marker), by the arm's place in :data:`ARMS`: arms
#: that coincide stay told apart, and an arm keeps its look whichever arms were run
_LOOKS = (("tab:orange", "-", "o"), ("tab:green", "--", "s"), ("tab:purple", "-.", "^"),
          ("tab:brown", ":", "D"), ("tab:pink", (0, (5, 1, 1, 1)), "v"),
          ("tab:olive", (0, (1, 1)), "P"), ("tab:cyan", (0, (3, 1, 1, 1, 1, 1)), "X"))
_CLEAN_LOOK = ("tab:blue", "-", None)


def same_arms(runs: list[Run]) -> dict[str, list[str]]:
    """Arms whose runs are identical on every seed (probe loss and parameter norm, step by
    step): ``{first arm: [the arms it stands for, itself first]}``, in the order of ``runs``."""
    import numpy as np

    def key(arm):
        rs = sorted((r for r in runs if r.arm == arm), key=lambda r: r.seed)
        return [r.seed for r in rs], [np.asarray([r.curve, r.param_norm], dtype=float) for r in rs]

    groups: dict[str, list[str]] = {}
    for arm in dict.fromkeys(r.arm for r in runs):
        seeds, curves = key(arm)
        for first in groups:
            s0, c0 = key(first)
            if s0 == seeds and all(a.shape == b.shape and np.array_equal(a, b, equal_nan=True)
                                   for a, b in zip(c0, curves)):
                groups[first].append(arm)
                break
        else:
            groups[arm] = [arm]
    return groups


def _group_label(members: list[str]) -> str:
    return members[0] if len(members) == 1 else f"{members[0]} (= {', '.join(members[1:])})"


def _geo_band(ax, curves: list[list[float]], label: str, look, markevery=None) -> None:
    """Geometric mean and +-1 std (in log space) over seeds, on a log axis. A step where a
    seed is not finite (a crashed run) ends the line; an ``x`` marks where."""
    import numpy as np
    a = np.array(curves, dtype=float)
    bad = ~np.isfinite(a) | (a <= 0)
    log = np.log10(np.where(bad, np.nan, a))
    mean, std = log.mean(axis=0), log.std(axis=0)          # NaN where any seed is bad
    steps = np.arange(a.shape[1])
    color, style, marker = look
    ax.plot(steps, 10 ** mean, color=color, ls=style, marker=marker, ms=4,
            markevery=markevery, lw=1.4, label=label)
    if a.shape[0] > 1:
        ax.fill_between(steps, 10 ** (mean - std), 10 ** (mean + std), color=color, alpha=0.12,
                        lw=0)
    if bad.any():
        first = int(np.argmax(bad.any(axis=0)))
        if first > 0 and np.isfinite(mean[first - 1]):
            ax.plot(first - 1, 10 ** mean[first - 1], "x", color=color, ms=9, mew=2)
            ax.annotate(" non-finite after this step", (first - 1, 10 ** mean[first - 1]),
                        color=color, fontsize=7, va="bottom")


def _scale(ax, curves, log: bool | None = None) -> None:
    """A log y axis when the values span more than a decade (or ``log``), else linear; tick
    labels as plain numbers (0.5, 10, 1e+04), never 8.8x10^0."""
    import numpy as np
    from matplotlib.ticker import LogFormatter
    if log is None:
        a = np.asarray([v for c in curves for v in c], dtype=float)
        a = a[np.isfinite(a) & (a > 0)]
        log = a.size > 0 and a.max() > 10 * a.min()
    if log:
        class Plain(LogFormatter):    # LogFormatter's choice of ticks to label, as 0.1, 10
            def __call__(self, x, pos=None):
                return f"{x:g}" if super().__call__(x, pos) else ""

        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(Plain())
        ax.yaxis.set_minor_formatter(Plain(labelOnlyBase=False, minor_thresholds=(1, 0.5)))


def _fault_span(ax, start: int, length: int, label: bool) -> None:
    ax.axvspan(start - 0.5, start + length - 0.5, color="red", alpha=0.08,
               label=f"fault window (steps {start}-{start + length - 1})" if label else None)


def plot_protocol(out_dir: str, task: str, clean: dict[int, Run], runs: list[Run],
                  start: int, length: int, fault: str | None = None) -> list[str]:
    """Paper 001's figures for one task (PNG in ``out_dir``), each over the seeds run:

    * ``<task>_probe_loss.png`` (fig. 2/5): probe loss per arm, and below it the probe loss
      over the clean run of the same seed with the recovery tolerance;
    * ``<task>_param_norm.png`` (fig. 4): the parameter L2 norm;
    * ``<task>_innovation.png`` (fig. 3): the guard's test statistic nu/epsilon on
      ``guarded_probe`` seed 0, with the decision line at 1 (accept iff nu <= epsilon).

    Curves are geometric means with +-1 std bands; arms whose runs are identical on every
    seed are drawn once and named together ("bare (= loss_rollback, ...)"). Returns the PNG
    paths written (empty without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return []
    arms = list(dict.fromkeys(r.arm for r in runs))
    order = list(dict.fromkeys([*ARMS, *arms]))
    looks = {arm: _LOOKS[order.index(arm) % len(_LOOKS)] for arm in arms}
    groups = same_arms(runs)
    seeds = sorted(clean)
    n_steps = len(next(iter(clean.values())).curve)
    what = f"{fault} " if fault else "fault "
    over = (f"seed {seeds[0]}" if len(seeds) == 1 else
            f"geometric mean \u00b1 std over {len(seeds)} seeds")
    subtitle = f"{what}for {length} step{'s' * (length != 1)} from step {start}; {over}"
    written = []

    def markevery(i):   # markers spaced out and offset per arm so coinciding lines show
        every = max(1, n_steps // 10)
        return (i * every // max(1, len(arms)) % every, every)

    def save(fig, name):
        path = os.path.join(out_dir, f"{task}_{name}.png")
        fig.savefig(path, dpi=110, bbox_inches="tight")
        plt.close(fig)
        written.append(path)

    def legend(ax):
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0,
                  frameon=False)

    # probe loss, and probe loss / clean run of the same seed
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9.5, 6.5), sharex=True,
                                      gridspec_kw={"height_ratios": (3, 2)})
    _geo_band(top, [clean[s].curve for s in seeds], "clean (no fault)", _CLEAN_LOOK)
    for arm, members in groups.items():
        rs = {r.seed: r for r in runs if r.arm == arm}
        i = arms.index(arm)
        _geo_band(top, [rs[s].curve for s in seeds], _group_label(members), looks[arm],
                  markevery(i))
        _geo_band(bottom, [[y / c if c > 0 else math.nan for y, c in
                            zip(rs[s].curve, clean[s].curve)] for s in seeds],
                  _group_label(members), looks[arm], markevery(i))
    _scale(top, [c.curve for c in clean.values()] + [r.curve for r in runs])
    _scale(bottom, [], log=True)
    for ax in (top, bottom):
        _fault_span(ax, start, length, label=ax is top)
        ax.grid(True, which="major", alpha=0.3)
    legend(top)      # the arms, once; the lower panel's legend names its reference lines
    ref = [bottom.axhline(1.0, color=_CLEAN_LOOK[0], lw=1, label="1 = clean"),
           bottom.axhline(TOLERANCE, color="black", lw=1, ls=":",
                          label=f"recovery tolerance ({TOLERANCE}x clean)")]
    bottom.legend(handles=ref, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                  borderaxespad=0, frameon=False)
    top.set(ylabel="probe loss\n(cross-entropy, nats)",
            title=f"{task}: probe loss per arm\n{subtitle}")
    bottom.set(xlabel="training step", ylabel="probe loss / clean\n(same seed)")
    save(fig, "probe_loss")

    # parameter norm
    fig, ax = plt.subplots(figsize=(9.5, 4.2))
    _geo_band(ax, [clean[s].param_norm for s in seeds], "clean (no fault)", _CLEAN_LOOK)
    for arm, members in groups.items():
        rs = {r.seed: r for r in runs if r.arm == arm}
        _geo_band(ax, [rs[s].param_norm for s in seeds], _group_label(members), looks[arm],
                  markevery(arms.index(arm)))
    _scale(ax, [c.param_norm for c in clean.values()] + [r.param_norm for r in runs])
    _fault_span(ax, start, length, label=True)
    ax.grid(True, which="major", alpha=0.3)
    ax.set(xlabel="training step", ylabel="parameter L2 norm",
           title=f"{task}: parameter L2 norm per arm\n{subtitle}")
    legend(ax)
    save(fig, "param_norm")

    guarded = sorted((r for r in runs if r.arm == "guarded_probe"), key=lambda r: r.seed)
    if guarded:
        save(_innovation_figure(plt, np, task, guarded[0], start, length, fault), "innovation")
    return written


def _innovation_figure(plt, np, task: str, run: Run, start: int, length: int,
                       fault: str | None):
    """The guard's test per step, nu/epsilon, with the decision line at 1: a symlog axis
    linear in [-1, 1] (values below -1 are clipped and marked; no negative decades) and log
    above. Gaps (skipped steps measure nothing) break the line; legend entries only for
    markers that are drawn."""
    nu, eps = r"$\nu$", r"$\varepsilon$"
    measured = [e for e in run.events if e.innovation is not None and e.threshold]
    steps = np.array([e.step for e in measured], dtype=float)
    r = np.array([e.innovation / e.threshold for e in measured], dtype=float)
    r[np.isnan(r)] = np.inf                          # a NaN measurement never passes
    finite = r[np.isfinite(r)]
    top = max(10.0, float(finite.max()) * 3 if finite.size else 10.0)
    shown = np.clip(r, -1.0, top)
    fig, ax = plt.subplots(figsize=(9.5, 4.2))
    ax.set_yscale("symlog", linthresh=1.0, linscale=1.0)
    _fault_span(ax, start, length, label=True)
    ax.axhline(0.0, color="grey", lw=0.6)
    ax.axhline(1.0, color="red", lw=1.2, label=f"decision line {nu} = {eps}")
    ax.text(1.0, 1.0, f"reject ({nu} > {eps}) ", color="red", fontsize=8, ha="right",
            va="bottom", transform=ax.get_yaxis_transform())
    ax.text(1.0, 1.0, f"accept ({nu} \u2264 {eps}) ", color="tab:blue", fontsize=8,
            ha="right", va="top", transform=ax.get_yaxis_transform())
    gaps = np.flatnonzero(np.diff(steps) > 1) + 1    # no line across unmeasured steps
    ax.plot(np.insert(steps, gaps, np.nan), np.insert(shown, gaps, np.nan), color="tab:blue",
            lw=1.2, label=f"{nu} / {eps} (innovation / threshold)")
    decided = {d: np.array([e.decision == d for e in measured], dtype=bool)
               for d in ("rollback", "skip")}
    marks = (   # (where, marker, colour, hollow, label): hollow ones leave the others visible
        (decided["rollback"], "o", "red", True, "rollback"),
        (decided["skip"], "s", "black", True, "skip"),
        (r < -1, "v", "grey", False, "below -1, drawn at -1"),
        (~np.isfinite(r) | (r > top), "^", "black", False, "non-finite, drawn at the top"),
    )
    for mask, marker, color, hollow, label in marks:
        if mask.any():
            ax.plot(steps[mask], shown[mask], marker, color=color, ms=8 if hollow else 5,
                    mfc="none" if hollow else color, mew=1.5, ls="none", zorder=3, label=label)
    unmeasured = [e for e in run.events if e.innovation is None or not e.threshold]
    for decision, marker, label in (("skip", "|", "skip (nothing proposed: not measured)"),
                                    ("rollback", "x", "rollback (not measured)")):
        at = [e.step for e in unmeasured if e.decision == decision]
        if at:    # on the zero line
            ax.plot(at, [0.0] * len(at), marker, color="red" if decision == "rollback" else
                    "black", ms=12, mew=1.5, ls="none", label=label)
    ax.set_ylim(-1.1, top * 1.5)
    ax.set_yticks([-1, -0.5, 0, 0.5, 1] + [10.0 ** k for k in range(1, int(math.log10(top)) + 1)])
    ax.yaxis.set_major_formatter(plt.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.grid(True, axis="y", alpha=0.3)
    what = f"{fault} " if fault else "fault "
    ax.set(xlabel="training step",
           ylabel=f"{nu} / {eps}\n(linear in [-1, 1], log above)",
           title=f"{task}: the guard's test on guarded_probe, seed {run.seed}: accept iff "
                 f"{nu} \u2264 {eps}\n({nu} = probe loss - its forecast, {eps} = threshold; "
                 f"{what}for {length} steps from step {start})")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0,
              frameon=False)
    return fig
