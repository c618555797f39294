"""``guarded-optim bench --suite lr_window``: a mis-set LR schedule in a nanoGPT-like run.

The loop is :func:`.nanogpt.train` (the one ``examples/nanogpt_like.py`` runs): a 4-layer,
128-wide char-level GPT, AdamW with warm-up and cosine decay written into ``param_groups``
every iteration, gradient accumulation, ``GradScaler`` calls, ``clip_grad_norm_(.., 1.0)``,
dropout 0.1, 300 iterations. The fault: the schedule returns ``factor`` times its value for
iterations ``start <= it < stop`` (default 30x for 150-169, the "LR window").

Per seed, six arms on the same initial weights and batch order: ``bare_clean``,
``bare_window``, ``guarded_probe_clean``, ``guarded_probe_window`` (``GuardedOptimizer(AdamW,
probe=<16 held-out sequences>, module=model)``), ``guarded_signals_clean``,
``guarded_signals_window`` (``GuardedOptimizer(AdamW)``): the guard's *current defaults*,
through the public constructor; the only extra argument is ``callbacks=[events.append]``,
which observes. Each row: the final validation loss and its ratio to the same seed's
``bare_clean``; the peak validation loss from the window's start on (the same iterations on
clean arms); the guard's counters; whether the guard stopped the run (:class:`GuardStopped`,
caught: the arm ends there); whether the final parameters equal (``torch.equal``) those of
the bare arm under the same schedule; and, for the probe arms, the innovation ``nu = y -
yhat`` of every measured step after warm-up (max, 99th percentile, median, median absolute
deviation; on a clean run: the spread a threshold must let through).
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import statistics
import time
from typing import Callable, Iterable

import numpy as np
import torch

from . import report
from .nanogpt import TrainConfig, TrainResult, train

__all__ = ["ARMS", "WINDOW", "ITERS", "QUICK", "SEEDS", "QUICK_SEEDS", "FILES", "run", "run_seed",
           "format_table", "COLUMNS"]

#: arm -> (guard, with the LR window)
ARMS = {
    "bare_clean": ("none", False),
    "bare_window": ("none", True),
    "guarded_probe_clean": ("probe", False),
    "guarded_probe_window": ("probe", True),
    "guarded_signals_clean": ("signals", False),
    "guarded_signals_window": ("signals", True),
}
#: the full run: 300 iterations, the schedule x30 for iterations 150-169
WINDOW = (150, 170, 30.0)
ITERS = 300
#: ``--quick``: half the iterations, the window at the same point of the schedule
QUICK = {"max_iters": 150, "lr_window": (75, 85, 30.0)}
SEEDS, QUICK_SEEDS = 3, 1
#: what ``out`` receives
FILES = ("lr_window.csv", "lr_window_curves.csv", "lr_window.png")
#: counters every guarded run has nonzero (not listed under ``other_stats``)
_ROUTINE = ("steps", "accepted", "measured", "rollbacks", "skipped")


def _innovation_stats(events: list, after: int) -> dict[str, float]:
    nus = [e.innovation for e in events if e.innovation is not None and e.step >= after]
    rel = [e.innovation / abs(e.yhat) for e in events
           if e.innovation is not None and e.step >= after and e.yhat]
    thr = [e.threshold for e in events if e.threshold is not None and e.step >= after]
    if not nus:
        return {k: math.nan for k in ("inno_n", "inno_max", "inno_p99", "inno_median",
                                      "inno_mad", "inno_rel_max", "threshold_median")}
    med = statistics.median(nus)
    return {"inno_n": len(nus), "inno_max": max(nus),
            "inno_p99": float(np.percentile(np.asarray(nus, dtype=float), 99)),
            "inno_median": med, "inno_mad": statistics.median(abs(x - med) for x in nus),
            "inno_rel_max": max(rel) if rel else math.nan,
            "threshold_median": statistics.median(thr) if thr else math.nan}


def _peak_after(result: TrainResult, start: int) -> float:
    vals = [v for it, _, v in result.evals if it >= start]
    return max(vals) if vals else math.nan


def _identical(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    return pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


def run_seed(seed: int, base: TrainConfig, window: tuple[int, int, float],
             arms: Iterable[str] = tuple(ARMS), tick: Callable[[], None] = lambda: None
             ) -> tuple[list[dict], dict[str, TrainResult]]:
    """Every arm of one seed: ``(rows, {arm: result})``. The bare arms run first (the
    guarded ones are compared to them)."""
    arms = sorted(arms, key=lambda a: ARMS[a][0] != "none")
    results: dict[str, TrainResult] = {}
    rows: list[dict] = []
    for arm in arms:
        guard, windowed = ARMS[arm]
        events: list = []
        cfg = dataclasses.replace(base, guard=guard, seed=seed,
                                  lr_window=window if windowed else None,
                                  callbacks=(events.append,) if guard != "none" else ())
        began = time.perf_counter()
        res = train(cfg)
        seconds = time.perf_counter() - began
        results[arm] = res
        bare = results.get("bare_window" if windowed else "bare_clean")
        clean = results.get("bare_clean")
        stats = res.stats
        row = {
            "arm": arm, "seed": seed, "guard": guard,
            "window": f"{window[0]}:{window[1]}:x{window[2]:g}" if windowed else "off",
            "iters": base.max_iters, "final_val": res.final_val,
            "final_ratio": report.ratio(res.final_val, clean.final_val) if clean else math.nan,
            "peak_val": _peak_after(res, window[0]),
            "peak_ratio": (report.ratio(_peak_after(res, window[0]), _peak_after(clean, window[0]))
                           if clean else math.nan),
            "stopped": res.stopped_at is not None,
            "stopped_at": "" if res.stopped_at is None else res.stopped_at,
            "rollbacks": stats.get("rollbacks", 0) if guard != "none" else "",
            "skips": stats.get("skipped", 0) if guard != "none" else "",
            "other_stats": " ".join(f"{k}={v}" for k, v in stats.items()
                                    if v and k not in _ROUTINE) or ("-" if guard != "none" else ""),
            "identical_to_bare": ("" if guard == "none" or bare is None
                                  else _identical(res.model, bare.model)),
            **_innovation_stats(events, base.warmup_iters),
            "seconds": seconds,
        }
        rows.append(row)
        tick()
    order = {a: i for i, a in enumerate(ARMS)}
    rows.sort(key=lambda r: order[r["arm"]])
    return rows, results


def run(seeds: int = SEEDS, quick: bool = False, out: str | None = None,
        progress: Callable[[], None] | None = None, base: TrainConfig | None = None,
        window: tuple[int, int, float] | None = None,
        arms: Iterable[str] = tuple(ARMS)) -> list[dict]:
    """Every arm over seeds ``0..seeds-1``; one row per arm and seed (see the module
    docstring). ``quick``: :data:`QUICK`'s shorter run (``base`` and ``window`` override).
    ``out``: write ``lr_window.csv``, ``lr_window_curves.csv`` and ``lr_window.png``."""
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}.")
    if base is None:
        base = TrainConfig(**({"max_iters": QUICK["max_iters"]} if quick else {"max_iters": ITERS}))
    window = window or (QUICK["lr_window"] if quick else WINDOW)
    if not window[1] <= base.max_iters:
        raise ValueError(f"the LR window {window} must end within the run ({base.max_iters} iterations)")
    tick = progress or (lambda: None)
    rows: list[dict] = []
    curves: list[tuple[str, int, list[tuple[int, float, float]]]] = []
    for seed in range(seeds):
        seed_rows, results = run_seed(seed, base, window, arms, tick)
        rows += seed_rows
        curves += [(arm, seed, r.evals) for arm, r in results.items()]
    if out:
        os.makedirs(out, exist_ok=True)
        report.write_csv(os.path.join(out, "lr_window.csv"),
                         {f"{r['arm']}/{r['seed']}": r for r in rows}, "arm/seed")
        _write_curves(os.path.join(out, "lr_window_curves.csv"), curves)
        figure(curves, window, os.path.join(out, "lr_window.png"))
    return rows


#: what :func:`format_table` prints
COLUMNS = ("final_val", "final_ratio", "peak_val", "peak_ratio", "rollbacks", "skips",
           "stopped", "identical_to_bare", "other_stats", "seconds")
INNOVATION_COLUMNS = ("inno_n", "inno_max", "inno_p99", "inno_median", "inno_mad",
                      "inno_rel_max", "threshold_median")


def format_table(rows: list[dict]) -> str:
    """Two fixed-width tables: one line per arm and seed (the outcome and the guard's
    counters), then the probe arms' innovation statistics after warm-up."""
    table = {f"{r['arm']}/{r['seed']}": {c: r[c] for c in COLUMNS} for r in rows}
    text = report.format_table(table, COLUMNS, key="arm/seed")
    probe = {f"{r['arm']}/{r['seed']}": {c: r[c] for c in INNOVATION_COLUMNS}
             for r in rows if r["guard"] == "probe"}
    if probe:
        text += ("\n\nprobe innovation nu = y - yhat on measured steps after warm-up (n steps; "
                 "max, 99th percentile, median, median absolute deviation; largest nu / yhat; "
                 "median threshold in force)\n")
        text += report.format_table(probe, INNOVATION_COLUMNS, key="arm/seed")
    return text


def _write_curves(path: str, curves) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["iter", "arm", "seed", "val_loss", "train_loss"])
        for arm, seed, evals in curves:
            for it, tr, va in evals:
                w.writerow([it, arm, seed, va, tr])


_LOOK = {"bare_clean": ("0.45", "-"), "bare_window": ("tab:red", "-"),
         "guarded_probe_clean": ("tab:green", "--"), "guarded_probe_window": ("tab:green", "--"),
         "guarded_signals_clean": ("tab:purple", ":"), "guarded_signals_window": ("tab:purple", ":")}


def figure(curves, window: tuple[int, int, float], path: str) -> str | None:
    """``lr_window.png``: validation loss vs iteration (mean over seeds), bare vs guarded;
    left with the LR window (shaded; bare_clean for reference), right without it."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    by_arm: dict[str, list] = {}
    for arm, _, evals in curves:
        by_arm.setdefault(arm, []).append(evals)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    last = max(it for runs in by_arm.values() for e in runs for it, _, _ in e)
    late = [v for runs in by_arm.values() for e in runs for it, _, v in e
            if it >= last // 10 and math.isfinite(v)]   # past the first tenth: the start is far above
    panels = ((axes[0], ("bare_clean", "bare_window", "guarded_probe_window",
                         "guarded_signals_window"), f"LR x{window[2]:g} for iterations "
                                                    f"{window[0]}-{window[1] - 1}"),
              (axes[1], ("bare_clean", "guarded_probe_clean", "guarded_signals_clean"), "clean"))
    for ax, arms, title in panels:
        if ax is axes[0]:
            ax.axvspan(window[0], window[1], color="grey", alpha=0.2, label="LR window")
        for arm in arms:
            if arm not in by_arm:
                continue
            runs = by_arm[arm]
            n = min(len(e) for e in runs)   # a stopped run is shorter
            its = [runs[0][i][0] for i in range(n)]
            mean = [statistics.mean(e[i][2] for e in runs) for i in range(n)]
            color, style = _LOOK[arm]
            ax.plot(its, mean, color=color, ls=style, lw=1.5, label=arm)
        ax.set(title=title, xlabel="iteration")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if late:
        axes[0].set_ylim(min(late) - 0.05, max(late) + 0.1)
    seeds = len(next(iter(by_arm.values())))
    axes[0].set_ylabel(f"val loss (mean over {seeds} seed{'s' if seeds > 1 else ''})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
