"""What the guard holds and costs as the model grows: memory, checkpoint size and step time.

For each model (the reference GPT-style char model and MLPs of 0.1M to 10M parameters;
100M with ``full=True``) and each guard configuration (the defaults without a probe, and
with a probe every step) :func:`run` measures, nothing typed in:

* **held beyond bare**, per parameter: the guard's own tensors -- the safe snapshot
  (``guard.safe_snapshot.nbytes()``), the older snapshots of ``history`` (``guard.snapshot_history``) and the
  tensors in the signals' state -- counted by walking them (and apart, ``rewind_host_B_per_param``:
  the slow-damage rung's older verified states, in host memory, :class:`~guarded_optim.drift.Rewind`);
  and the same growth read from
  the process's resident memory (``VmRSS`` before and after wrapping a trained bare AdamW
  in the guard and stepping it), with the peak RSS of the bare and the guarded phase;
* **pinned** host memory per parameter (``pinned_B_per_param``, ``pinned_ratio``): what the
  snapshots' buffers would reserve as pinned host memory on CUDA (``snapshot="host"``, the
  default for CUDA parameters), where the caching host allocator rounds every allocation up
  to a power of two (:func:`pinned_reserved`); on CPU nothing is pinned and the figure is
  that of the same buffers on a CUDA machine;
* **checkpoint** bytes per parameter: ``torch.save(opt.state_dict())`` into memory for bare
  AdamW and for the guard, after verified steps;
* **time**: ``opt.step()`` alone and a full training step (forward, backward, step), as
  guard / bare ratios, paired and interleaved in this process by
  :func:`.overhead.overhead` (the median over ``reps`` repetitions).

Resident memory is only as exact as the allocator lets it be: below about 1M parameters the
guard's few megabytes are within its noise, so read the tensor count there. Peak RSS is
reset between phases through ``/proc/self/clear_refs`` where the kernel allows it; otherwise
it is the process's peak so far.
"""

from __future__ import annotations

import functools
import gc
import io
import math
import os
import statistics
import time
from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from ..guard import GuardedOptimizer
from . import data, models, report
from .overhead import ARMS as OVERHEAD_ARMS, overhead
from .tasks import Task, scaling_task

__all__ = ["run", "format_table", "figure", "gpt_task", "held_bytes", "checkpoint_bytes",
           "pinned_reserved", "pinned_bytes",
           "rss_bytes", "peak_rss_bytes", "reset_peak_rss", "GUARDS", "DEFAULT_SIZES",
           "FULL_SIZES", "QUICK_SIZES", "REFERENCE_GPT"]

#: the reference model of issue 12: a GPT-style char model, pre-LN, about 0.43M parameters
REFERENCE_GPT = {"d_model": 128, "heads": 4, "layers": 2, "seq_len": 64, "batch_size": 32}
#: model sizes: ``"gpt"`` is :data:`REFERENCE_GPT`, ``"gpt:N"`` a wider one of about N
#: parameters, an int an MLP of about that many (:func:`.tasks.scaling_task`)
DEFAULT_SIZES: tuple[int | str, ...] = ("gpt", 100_000, 1_000_000, 10_000_000)
FULL_SIZES: tuple[int | str, ...] = DEFAULT_SIZES + (100_000_000,)
QUICK_SIZES: tuple[int | str, ...] = (10_000, 100_000)
#: the guard configurations measured (those of :data:`.overhead.ARMS`, under short names)
GUARDS: dict[str, Callable] = {"no_probe": OVERHEAD_ARMS["guard_no_probe"],
                               "probe": OVERHEAD_ARMS["guard_probe_every_1"]}


# -- models ---------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _corpus(seq_len: int, seed: int) -> tuple[data.Split, int]:
    return data.char_corpus(seq_len=seq_len, seed=seed)


def _token_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))


def gpt_task(seed: int = 0, d_model: int = 128, heads: int = 4, layers: int = 2,
             seq_len: int = 64, batch_size: int = 32, lr: float = 5e-4) -> Task:
    """A causal pre-LN char Transformer (:class:`.models.CharTransformer`) on the Python
    docstring corpus; the defaults are :data:`REFERENCE_GPT` (429,151 parameters)."""
    split, vocab = _corpus(seq_len, seed)
    torch.manual_seed(seed)
    model = models.CharTransformer(vocab, d_model, heads, layers, seq_len)
    return Task(f"gpt_d{d_model}", model, split, _token_ce, batch_size, lr, seed)


def _gpt_width(params: int, heads: int = 4, layers: int = 2, seq_len: int = 64,
               vocab: int = 95) -> int:
    """The width ``d`` (a multiple of ``heads``) whose GPT has about ``params`` parameters:
    ``12 d^2`` per layer plus ``(2 vocab + seq_len) d`` for embedding, positions and head."""
    b = 2 * vocab + seq_len + 13 * layers
    d = (-b + math.sqrt(b * b + 48 * layers * params)) / (24 * layers)
    return max(heads, heads * round(d / heads))


def _model(spec: int | str) -> tuple[str, Callable[[int], Task]]:
    """``(label, seed -> Task)`` for one entry of ``sizes``."""
    if isinstance(spec, str) and spec.startswith("gpt"):
        if spec == "gpt":
            cfg = dict(REFERENCE_GPT)
        else:
            cfg = {**REFERENCE_GPT, "d_model": _gpt_width(int(float(spec.split(":", 1)[1])))}
        return f"gpt_d{cfg['d_model']}", functools.partial(gpt_task, **cfg)
    size = int(float(spec))
    if size < 1:
        raise ValueError(f"Invalid model size {spec!r}: need a positive parameter count.")
    return f"mlp_{_short(size)}", functools.partial(scaling_task, size)


def _short(n: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:g}{unit}"
    return f"{n:g}"


def _schedule(params: int, quick: bool) -> tuple[int, int]:
    """(timed steps, warmup steps) per repetition: few on big models (2 CPU cores)."""
    if quick:
        return 3, 1
    if params <= 2_000_000:
        return 20, 3
    if params <= 20_000_000:
        return 5, 2
    return 2, 1


# -- measuring ------------------------------------------------------------------------------
def _tensors(obj: Any) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def held_bytes(guard: GuardedOptimizer) -> dict[str, int]:
    """Bytes of the tensors the guard holds beyond the bare optimizer: the safe snapshot, the
    older snapshots of ``history``, the tensors in the signals' state (each counted once),
    and, apart (``"rewind"``: always host memory), the slow-damage rung's history
    (:class:`~guarded_optim.drift.Rewind`, kept with a probe)."""
    seen: set[int] = set()
    signals = 0
    for s in guard.signals:
        for t in _tensors(s.state_dict()):
            if id(t) not in seen:
                seen.add(id(t))
                signals += t.numel() * t.element_size()
    rewind = guard.ladder.rewind
    return {"snapshot": guard.safe_snapshot.nbytes(), "ring": sum(s.nbytes() for s in guard.snapshot_history),
            "signals": signals,
            "rewind": sum(s.nbytes() for s in (rewind.ring or ())) if rewind is not None else 0}


def pinned_reserved(nbytes: int) -> int:
    """Bytes the CUDA caching host allocator reserves for a pinned allocation of ``nbytes``.

    ``CachingHostAllocator::allocate`` (``ATen/core/CachingHostAllocator.h``) rounds each
    request up to the next power of two (``c10::llvm::PowerOf2Ceil``) "to improve reuse",
    the sizes its free lists are indexed by; requests above ``pinned_max_round_threshold``
    or ``pinned_max_cached_size`` (``PYTORCH_CUDA_ALLOC_CONF``; both unlimited by default)
    are taken as they are. So a 5 MB buffer holds 8 MiB of page-locked memory: up to 2x,
    on average about 1.4x for sizes spread evenly in log scale. 0 bytes allocate nothing.
    """
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"Invalid nbytes: {nbytes!r}; need an int >= 0.")
    return 0 if nbytes == 0 else 1 << (nbytes - 1).bit_length()


def _snapshot_buffers(snapshot) -> list[torch.Tensor]:
    return list(snapshot._saved_params) + list(snapshot._saved_state) + list(snapshot._saved_buffers)


def pinned_bytes(guard: GuardedOptimizer) -> dict[str, int]:
    """The safe snapshot's and the ring's buffers as host buffers: ``"exact"``, the bytes they
    hold (what :func:`held_bytes` counts for them), and ``"reserved"``, what pinning each of
    them costs through the CUDA caching host allocator (:func:`pinned_reserved`: one
    allocation per storage, as ``snapshot="host"`` makes them: a buffer of its own, or the
    flat buffer that staged tensors are slices of, :func:`~guarded_optim.snapshot.plan_groups`). Computed
    from the buffers' sizes whatever the mode and device: on CPU, what the same snapshot
    would pin on a CUDA machine."""
    buffers = [t for snap in (guard.safe_snapshot, *guard.snapshot_history) for t in _snapshot_buffers(snap)]
    storages = {}   # one allocation per storage: staged buffers are slices of a flat one
    for t in buffers:
        st = t.untyped_storage()
        storages[st.data_ptr()] = st.nbytes()
    return {"exact": sum(t.numel() * t.element_size() for t in buffers),
            "reserved": sum(pinned_reserved(n) for n in storages.values())}


def checkpoint_bytes(optimizer: torch.optim.Optimizer) -> int:
    """The size of ``torch.save(optimizer.state_dict())``, written to memory."""
    buf = io.BytesIO()
    torch.save(optimizer.state_dict(), buf)
    return buf.tell()


def _proc_status(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024   # reported in kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def rss_bytes() -> int | None:
    """This process's resident memory now (``VmRSS``); ``None`` where /proc is missing."""
    return _proc_status("VmRSS")


def peak_rss_bytes() -> int | None:
    """Peak resident memory (``VmHWM``, else ``getrusage``'s ``ru_maxrss``)."""
    peak = _proc_status("VmHWM")
    if peak is not None:
        return peak
    try:
        import resource
        import sys
        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return maxrss if sys.platform == "darwin" else maxrss * 1024
    except (ImportError, OSError):
        return None


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current RSS (Linux: ``5`` into ``/proc/self/clear_refs``).
    Returns whether it could."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _settle() -> None:
    """Collect garbage and hand freed heap back to the OS (glibc ``malloc_trim``), so that
    RSS growth after this point is new memory, not a reuse of what an earlier row freed."""
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc: RSS deltas are noisier
        pass


def _mib(n: int | None) -> float:
    return math.nan if n is None else n / 2**20


def _train(opt, task: Task, batches) -> None:
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        task.loss_fn(task.model(x), y).backward()
        opt.step()


def _fill_rewind_history(guard: GuardedOptimizer) -> None:
    """Fill the slow-damage rung's history to capacity (it pushes one verified state every
    ``Rewind.every`` steps; this suite's phases are shorter), so its full cost is counted."""
    rewind = guard.ladder.rewind
    if rewind is not None and rewind.ring is not None:
        while len(rewind.ring) < rewind.keep:
            rewind.ring.push(guard.safe_snapshot)


def _memory(factory: Callable[[int], Task], wrap: Callable, steps: int, seed: int = 0) -> dict:
    """Train bare AdamW ``steps`` steps, wrap it in the guard, train ``steps`` more: the
    guard's tensors, the RSS growth and peaks of the two phases, both checkpoints."""
    task = factory(seed)
    params = sum(p.numel() for p in task.model.parameters())
    inner = torch.optim.AdamW(task.model.parameters(), lr=task.lr)
    batches = list(task.batches(2 * steps))
    _settle()
    resettable = reset_peak_rss()
    _train(inner, task, batches[:steps])
    _settle()
    rss_bare, peak_bare = rss_bytes(), peak_rss_bytes()
    reset_peak_rss()
    guard = wrap(task, inner)
    _train(guard, task, batches[steps:])
    _settle()
    rss_guard, peak_guard = rss_bytes(), peak_rss_bytes()
    _fill_rewind_history(guard)
    held = held_bytes(guard)
    pinned = pinned_bytes(guard)
    ckpt_guard = checkpoint_bytes(guard)
    ckpt_bare = checkpoint_bytes(inner)   # the same AdamW's own state_dict, same step
    total = held["snapshot"] + held["ring"] + held["signals"]   # the rewind history apart
    rss = math.nan if rss_bare is None or rss_guard is None else (rss_guard - rss_bare) / params
    row = {
        "params": params,
        "held_B_per_param": total / params,
        "snapshot_B_per_param": held["snapshot"] / params,
        "ring_B_per_param": held["ring"] / params,
        "rewind_host_B_per_param": held["rewind"] / params,
        "signals_bytes": held["signals"],
        "rss_B_per_param": rss,
        "peak_rss_bare_MiB": _mib(peak_bare),
        "peak_rss_guard_MiB": _mib(peak_guard),
        "peak_rss_reset": resettable,
        "pinned_B_per_param": pinned["reserved"] / params,
        "pinned_ratio": pinned["reserved"] / pinned["exact"] if pinned["exact"] else math.nan,
        "ckpt_bare_B_per_param": ckpt_bare / params,
        "ckpt_guard_B_per_param": ckpt_guard / params,
        "ckpt_ratio": ckpt_guard / ckpt_bare,
        "stats": dict(guard.stats),
    }
    del guard, inner, task, batches
    _settle()
    return row


class _StepClock:
    """An optimizer whose ``step()`` is timed into ``times``; everything else is the optimizer's."""

    def __init__(self, optimizer, times: list[float]):
        self.optimizer, self.times = optimizer, times

    def step(self, closure=None):
        start = time.perf_counter()
        loss = self.optimizer.step(closure)
        self.times.append(time.perf_counter() - start)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def __getattr__(self, name: str):
        return getattr(self.optimizer, name)


def _timing(factory: Callable[[int], Task], guards: dict[str, Callable], steps: int, warmup: int,
            reps: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """Full-step and ``opt.step()``-alone times of bare AdamW and each guard, from the same
    paired, interleaved repetitions of :func:`.overhead.overhead`."""
    arms = {"bare": None, **guards}
    clocks: dict[str, list[float]] = {a: [] for a in arms}
    step_s: dict[str, list[float]] = {a: [] for a in arms}

    def clocked(arm: str, wrap: Callable | None) -> Callable:
        def make(task, inner):
            return _StepClock(inner if wrap is None else wrap(task, inner), clocks[arm])
        return make

    def collect(_rep: int) -> None:   # after each repetition: its timed steps only
        for arm, times in clocks.items():
            step_s[arm].append(sum(times[-steps:]))
            times.clear()

    full = overhead(factory, {a: clocked(a, w) for a, w in arms.items()}, steps=steps,
                    repeats=reps, seed=seed, warmup=warmup, progress=collect)
    out = {}
    for arm in arms:
        ratios = [t / b for t, b in zip(step_s[arm], step_s["bare"])]
        out[arm] = {"step_ms": 1e3 * statistics.median(step_s[arm]) / steps,
                    "step_ratio": statistics.median(ratios),
                    "step_ratio_min": min(ratios), "step_ratio_max": max(ratios),
                    "full_ms": full[arm]["ms_per_step"], "full_ratio": full[arm]["ratio"],
                    "full_ratio_min": full[arm]["ratio_min"], "full_ratio_max": full[arm]["ratio_max"]}
    return out


# -- the suite ------------------------------------------------------------------------------
def run(sizes: Sequence[int | str] | None = None, full: bool = False, quick: bool = False,
        reps: int = 7, out: str | None = None,
        tick: Callable[[], None] | None = None) -> list[dict]:
    """Measure memory, checkpoint size and time of the guard against bare AdamW per model.

    Args:
        sizes: models to measure: ``"gpt"`` (:data:`REFERENCE_GPT`), ``"gpt:N"`` (a wider GPT
            of about N parameters) or an int (an MLP of about that many parameters). Default
            :data:`DEFAULT_SIZES`; :data:`FULL_SIZES` (adds 100M) with ``full``;
            :data:`QUICK_SIZES` with ``quick``.
        full: add the 100M-parameter row (about 3 GB of RAM, minutes on 2 cores).
        quick: two small models, few steps, at most 3 repetitions (a CI smoke run).
        reps: paired repetitions of the timing (the median is reported); 7 or more for
            figures worth quoting.
        out: a directory to write ``memory.csv`` and ``memory.png`` (with matplotlib) into.
        tick: called after each model (progress bars).

    Returns one row (a dict) per model and guard configuration of :data:`GUARDS`: ``model``,
    ``guard``, ``params``, the memory and checkpoint figures of the module docstring
    (``*_B_per_param``, ``peak_rss_*_MiB``; ``pinned_B_per_param`` and ``pinned_ratio``: the
    snapshots' pinned host memory on CUDA after the caching host allocator's power-of-two
    rounding, per parameter and over the exact bytes, :func:`pinned_bytes`; on CPU nothing
    is pinned, so it is what the same snapshot would cost on CUDA), and ``step_ms_bare``/``step_ms_guard``/
    ``step_ratio`` (``opt.step()`` alone), ``full_ms_bare``/``full_ms_guard``/``full_ratio``
    (forward, backward and step), ``reps``, ``steps``. Prints nothing and leaves the torch
    thread count alone.
    """
    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise ValueError(f"Invalid reps: {reps!r}; need an int >= 1.")
    if sizes is None:
        sizes = QUICK_SIZES if quick else FULL_SIZES if full else DEFAULT_SIZES
    reps = min(reps, 3) if quick else reps
    rows: list[dict] = []
    for spec in sizes:
        label, factory = _model(spec)
        memory = {name: _memory(factory, wrap, 2 if quick else 3) for name, wrap in GUARDS.items()}
        steps, warmup = _schedule(next(iter(memory.values()))["params"], quick)
        timing = _timing(factory, GUARDS, steps, warmup, reps)
        bare = timing["bare"]
        for name in GUARDS:
            t = timing[name]
            rows.append({"model": label, "guard": name, **memory[name],
                         "step_ms_bare": bare["step_ms"], "step_ms_guard": t["step_ms"],
                         "step_ratio": t["step_ratio"], "step_ratio_min": t["step_ratio_min"],
                         "step_ratio_max": t["step_ratio_max"],
                         "full_ms_bare": bare["full_ms"], "full_ms_guard": t["full_ms"],
                         "full_ratio": t["full_ratio"], "full_ratio_min": t["full_ratio_min"],
                         "full_ratio_max": t["full_ratio_max"], "reps": reps, "steps": steps})
        if tick is not None:
            tick()
    if out:
        os.makedirs(out, exist_ok=True)
        report.write_csv(os.path.join(out, "memory.csv"),
                         {f"{r['model']}/{r['guard']}": _flat(r) for r in rows}, "model/guard")
        figure(rows, os.path.join(out, "memory.png"))
    return rows


def _flat(row: dict) -> dict:
    return {k: v for k, v in row.items() if not isinstance(v, dict)}


#: what :func:`format_table` shows, and its column names
TABLE_COLUMNS = {
    "params": "params",
    "held_B_per_param": "held B/p",
    "rewind_host_B_per_param": "rewind host B/p",
    "rss_B_per_param": "RSS B/p",
    "peak_rss_guard_MiB": "peak MiB",
    "pinned_B_per_param": "pinned B/p",
    "ckpt_bare_B_per_param": "ckpt bare B/p",
    "ckpt_guard_B_per_param": "ckpt guard B/p",
    "step_ms_bare": "step ms bare",
    "step_ms_guard": "step ms guard",
    "step_ratio": "step x",
    "full_ratio": "full-step x",
}


def format_table(rows: Sequence[dict]) -> str:
    """A fixed-width text table of :func:`run`'s rows, one line per model and guard.

    ``held B/p``: bytes per parameter the guard's tensors hold beyond bare AdamW; ``RSS B/p``:
    the resident-memory growth per parameter; ``peak MiB``: the guarded phase's peak RSS;
    ``pinned B/p``: the snapshots' pinned host memory on CUDA per parameter, power-of-two
    rounded (on CPU: what it would be on CUDA);
    ``ckpt``: checkpoint bytes per parameter; ``step``: ``opt.step()`` alone; ``x``: guard /
    bare time, median of paired repetitions (``full-step``: forward, backward and step)."""
    table = {}
    for r in rows:
        cells = {}
        for key, name in TABLE_COLUMNS.items():
            v = r.get(key, math.nan)
            cells[name] = f"{v:,}" if key == "params" else (
                f"{v:.2f}" if isinstance(v, float) and math.isfinite(v) and key.endswith("ratio") else v)
        table[f"{r['model']}/{r['guard']}"] = cells
    return report.format_table(table, key="model/guard")


def figure(rows: Sequence[dict], path: str) -> str | None:
    """A PNG of bytes per parameter held beyond bare (tensors and RSS) and of the guard / bare
    time ratios (full step, ``opt.step()``) against the parameter count, log-x. Returns
    ``path``, or ``None`` without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (mem, tim) = plt.subplots(1, 2, figsize=(11, 4.2))
    for guard, look in zip(dict.fromkeys(r["guard"] for r in rows), ("o", "s", "^", "D")):
        mine = sorted((r for r in rows if r["guard"] == guard), key=lambda r: r["params"])
        n = [r["params"] for r in mine]
        mem.plot(n, [r["held_B_per_param"] for r in mine], f"-{look}", label=f"{guard}: tensors")
        mem.plot(n, [r["rss_B_per_param"] for r in mine], f":{look}", label=f"{guard}: RSS growth")
        mem.plot(n, [r["ckpt_guard_B_per_param"] - r["ckpt_bare_B_per_param"] for r in mine],
                 f"--{look}", label=f"{guard}: checkpoint extra")
        tim.plot(n, [r["full_ratio"] for r in mine], f"-{look}", label=f"{guard}: full step")
        tim.plot(n, [r["step_ratio"] for r in mine], f"--{look}", label=f"{guard}: opt.step()")
    for ax in (mem, tim):
        ax.set_xscale("log")
        ax.set_xlabel("parameters")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    mem.set_ylabel("bytes / parameter beyond bare AdamW")
    mem.set_title("memory held by the guard")
    tim.axhline(1.0, color="grey", lw=0.8)
    tim.set_ylabel("time guard / bare (median of paired reps)")
    tim.set_title("time")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
