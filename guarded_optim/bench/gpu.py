"""The GPU suite (issue 24): what the guard costs on a CUDA device, measured there.

:func:`run` (``guarded-optim bench --suite gpu --out DIR``), on one CUDA device, within
:data:`BUDGET_S` seconds of wall time:

1. **tests**: ``tests/test_cuda.py`` in a ``pytest`` subprocess (``--junitxml``), the
   outcome of each test (``gpu_tests.csv``);
2. **a GPT-2-small-sized model** (:data:`GPT2_SMALL`: :class:`.models.CharTransformer`,
   12 pre-LN layers, width 768, vocabulary 50257, context 1024, tied head, 124M parameters),
   bf16 autocast, fused AdamW, fresh synthetic tokens every step, in the arms of
   :data:`.overhead.ARMS` (bare, the guard without a probe, with a probe every 10 steps and
   every step), all four built once and kept on the device:

   * **host syncs** per step type, counted over the first :data:`SYNC_STEPS` steps after
     construction and compared with ``docs/host_syncs.md`` (:data:`EXPECTED_SYNCS`): on CUDA
     with ``torch.cuda.set_sync_debug_mode("warn")`` (its warnings name the Python line that
     synchronised) plus ``Event``/``Stream``/device ``synchronize``, which that mode does not
     flag; on CPU (dry run), where nothing synchronises, the host reads of tensor values
     made from ``guarded_optim`` (as ``tests/test_syncs.py`` counts them);
   * **peak device memory** of each arm: ``torch.cuda.max_memory_allocated`` since a reset
     just before the arm was built, less what was allocated then (the arms built before,
     idle); **pinned host bytes** of the snapshots (:func:`.memory.pinned_bytes`: exact and
     after the caching host allocator's power-of-two rounding) and, where torch reports it,
     the growth of the host allocator's active (checked-out) bytes;
   * **step time**: paired, interleaved repetitions (the order rotates), each arm a block of
     one untimed lead-in step and :data:`BLOCK_STEPS` timed steps between CUDA events
     (``torch.cuda.Event(enable_timing=True)``); per repetition the block's time per step
     over bare's, the median over repetitions (the number of repetitions shrinks to fit the
     time budget);

3. a **profiler trace** (``gpu_trace.json.gz``, Chrome trace format) of a few steps of the
   guard with a probe every step, and one line read from it (:func:`trace_overlap`): how
   much of the snapshot's device-to-host copies (``Memcpy DtoH`` on a stream other than
   the compute stream) ran while the compute stream executed kernels, and whether the
   compute stream then sat idle until a copy ended (waited on it);
4. ``gpu.md`` (summary), ``gpu.csv`` (one row per arm), ``gpu_syncs.csv`` (per arm and step
   type) and ``gpu_tests.csv``: five files.

``dry_run=True`` runs the same code on the CPU at a tiny size (:data:`DRY`): CPU clocks
instead of CUDA events, the profiler on the CPU, the CUDA tests run with no device visible
(so skipped); it writes the same files with the timing cells empty and makes no timing
claims.
"""

from __future__ import annotations

import contextlib
import gc
import gzip
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import memory, models, report
from .overhead import ARMS

__all__ = ["run", "trace_overlap", "parse_junit", "parse_verbose", "GPT2_SMALL", "DRY",
           "EXPECTED_SYNCS", "BUDGET_S", "FILES"]

#: the model of the real run: GPT-2 small's shape (124M parameters with the tied head)
GPT2_SMALL = {"vocab": 50257, "d_model": 768, "heads": 12, "layers": 12, "seq_len": 1024,
              "batch_size": 8}
#: the dry run's model: the same code at a size that runs in a second on a CPU
DRY = {"vocab": 96, "d_model": 32, "heads": 2, "layers": 1, "seq_len": 16, "batch_size": 4}
LR = 3e-4
#: steps counted for host syncs, from construction (two verifications at a cadence of 10)
SYNC_STEPS = 20
#: timed steps per arm per repetition (a multiple of 10: every block holds as many
#: verification steps of the every-10 arms), and in the dry run
BLOCK_STEPS, DRY_BLOCK_STEPS = 20, 10
#: steps in the profiler trace (the first has no capture in flight when it starts)
TRACE_STEPS = 4
#: wall-time budget of the whole suite (the issue's limit is 8 minutes on one H100)
BUDGET_S = 450.0
#: at most this long for the CUDA tests, and what the rest of the suite keeps back for itself
TESTS_TIMEOUT_S, RESERVE_S = 200.0, 150.0
FILES = ("gpu.md", "gpu.csv", "gpu_syncs.csv", "gpu_tests.csv", "gpu_trace.json.gz")

#: docs/host_syncs.md, "Per step type": host syncs of one step, per arm and step type
#: (``(count, the table's row)``); bare AdamW is not in the table and should make none
EXPECTED_SYNCS: dict[str, dict[str, tuple[int, str]]] = {
    "bare": {"step": (0, "bare AdamW: none")},
    "guard_no_probe": {"between verifications": (1, "(1)"), "verification": (2, "(2)")},
    "guard_probe_every_10": {"unmeasured": (1, "(1')"), "measured": (2, "(3)")},
    "guard_probe_every_1": {"measured": (2, "(3)")},
}
#: reads of CPU tensors only (docs/host_syncs.md, "Not counted as syncs"): no sync on CUDA,
#: so the dry run's counter leaves them out
CPU_ONLY_SITES = {"signals/gradients.py:_group_norms"}
SYNC_MESSAGE = "called a synchronizing CUDA operation"
_BENCH = os.path.dirname(os.path.abspath(__file__)) + os.sep
_PKG = os.path.dirname(_BENCH.rstrip(os.sep)) + os.sep    # .../guarded_optim/


def _noop(_msg: str) -> None:
    pass


# -- the workload ---------------------------------------------------------------------------
@dataclass
class _Arm:
    """One arm: its own model (same init), optimizer and token stream."""

    name: str
    model: torch.nn.Module
    opt: Any
    guard: Any
    gen: torch.Generator
    cfg: dict
    device: torch.device
    x_probe: torch.Tensor
    y_probe: torch.Tensor
    steps: int = 0   # since construction
    decisions: list = field(default_factory=list)

    def probe(self) -> torch.Tensor:   # the guard calls it under no_grad, in eval mode
        with _autocast(self.device):
            return _loss(self.model(self.x_probe), self.y_probe)

    @property
    def cadence(self) -> int | None:
        return None if self.guard is None else self.guard.probe_every

    def step_type(self, n: int) -> str:
        """The docs' step type of step ``n`` (1-based, from construction), by the cadence."""
        if self.guard is None:
            return "step"
        verifying = n % self.cadence == 0
        if self.guard.probe is None:
            return "verification" if verifying else "between verifications"
        return "measured" if verifying else "unmeasured"

    def step(self) -> None:
        b, s, v = self.cfg["batch_size"], self.cfg["seq_len"], self.cfg["vocab"]
        tokens = torch.randint(v, (b, s + 1), device=self.device, generator=self.gen)
        self.opt.zero_grad(set_to_none=True)
        with _autocast(self.device):
            loss = _loss(self.model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        self.opt.step()
        self.steps += 1
        if self.guard is not None:
            self.decisions.append(self.guard.last_decision)


def _autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(out.reshape(-1, out.shape[-1]).float(), y.reshape(-1))


def _build(name: str, cfg: dict, device: torch.device, seed: int = 0) -> _Arm:
    torch.manual_seed(seed)
    model = models.CharTransformer(cfg["vocab"], cfg["d_model"], cfg["heads"], cfg["layers"],
                                   cfg["seq_len"], tie=True).to(device)
    probe_gen = torch.Generator(device=device).manual_seed(seed + 1)
    probe = torch.randint(cfg["vocab"], (max(1, cfg["batch_size"] // 4), cfg["seq_len"] + 1),
                          device=device, generator=probe_gen)
    gen = torch.Generator(device=device).manual_seed(seed)
    inner = torch.optim.AdamW(model.parameters(), lr=LR, fused=True)
    arm = _Arm(name, model, inner, None, gen, cfg, device, probe[:, :-1], probe[:, 1:])
    wrap = ARMS[name]
    if wrap is not None:
        arm.opt = arm.guard = wrap(arm, inner)
    return arm


# -- host syncs -----------------------------------------------------------------------------
def _site(frame) -> str:
    """``file:function`` of ``frame``; the guard's one readout path (``_readout``) is named
    by the reading that called it."""
    if frame.f_code.co_name == "_readout" and frame.f_back is not None:
        frame = frame.f_back
    name = os.path.abspath(frame.f_code.co_filename)
    name = name[len(_PKG):].replace(os.sep, "/") if name.startswith(_PKG) else os.path.basename(name)
    return f"{name}:{frame.f_code.co_name}"


class _SyncCounter:
    """The host syncs of each step, as ``file:function`` sites (``docs/host_syncs.md``)."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.steps: list[list[str]] = []
        self._now: list[str] | None = None

    @contextlib.contextmanager
    def step(self):
        self._now = []
        try:
            yield
        finally:
            self.steps.append(self._now)
            self._now = None

    def _add(self, site: str) -> None:
        if self._now is not None:
            self._now.append(site)

    @contextlib.contextmanager
    def counting(self):
        patched = []

        def patch(owner, name, wrapper):
            patched.append((owner, name, getattr(owner, name)))
            setattr(owner, name, wrapper(getattr(owner, name)))

        def counted(orig, cpu_reads=False):
            def call(*args, **kwargs):
                caller = sys._getframe(1)
                site = _site(caller)
                if not cpu_reads:
                    self._add(site)
                else:   # guarded_optim's own reads, not the benchmark's
                    path = os.path.abspath(caller.f_code.co_filename)
                    if path.startswith(_PKG) and not path.startswith(_BENCH) \
                            and site not in CPU_ONLY_SITES:
                        self._add(site)
                return orig(*args, **kwargs)
            return call

        for owner in (torch.cuda.Event, torch.cuda.Stream):   # not flagged by the debug mode
            patch(owner, "synchronize", counted)
        patch(torch.cuda, "synchronize", counted)
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            if self.cuda:
                previous = torch.cuda.get_sync_debug_mode()
                shown = warnings.showwarning
                warnings.showwarning = self._on_warning(shown)
                torch.cuda.set_sync_debug_mode("warn")
            else:   # nothing synchronises on a CPU: count the reads that would on CUDA
                for name in ("tolist", "item", "__bool__", "__float__", "__int__"):
                    patch(torch.Tensor, name, lambda f: counted(f, cpu_reads=True))
            try:
                yield self
            finally:
                if self.cuda:
                    torch.cuda.set_sync_debug_mode(previous)
                    warnings.showwarning = shown
                for owner, name, orig in reversed(patched):
                    setattr(owner, name, orig)

    def _on_warning(self, shown: Callable) -> Callable:
        def on_warning(message, category, filename, lineno, file=None, line=None):
            if SYNC_MESSAGE not in str(message):
                return shown(message, category, filename, lineno, file, line)
            frame = sys._getframe(1)   # the Python frame that called into torch
            while frame is not None and not (frame.f_code.co_filename == filename
                                             and frame.f_lineno == lineno):
                frame = frame.f_back
            self._add(_site(frame) if frame is not None
                      else f"{os.path.basename(filename)}:{lineno}")
        return on_warning


def _sync_rows(arm: _Arm, counted: list[list[str]]) -> dict[str, dict]:
    """Per step type: steps, syncs observed per step, expected (the docs), sites."""
    by_type: dict[str, list[list[str]]] = {}
    for n, sites in enumerate(counted, 1):
        decision = arm.decisions[n - 1] if arm.decisions else "accept"
        kind = arm.step_type(n) if decision == "accept" else f"{decision} (unplanned)"
        by_type.setdefault(kind, []).append(sites)
    rows = {}
    for kind, steps in by_type.items():
        counts = sorted({len(s) for s in steps})
        expected, row = EXPECTED_SYNCS[arm.name].get(kind, (None, "-"))
        rows[f"{arm.name}/{kind}"] = {
            "steps": len(steps), "syncs_per_step": "/".join(map(str, counts)),
            "expected": "" if expected is None else expected, "docs_row": row,
            "match": "n/a" if expected is None else "yes" if counts == [expected] else "NO",
            "sites": " ".join(sorted({x for s in steps for x in s})) or "-"}
    return rows


# -- timing ---------------------------------------------------------------------------------
class _Clock:
    """CUDA events on the current stream (on the device's timeline), else the CPU clock."""

    def __init__(self, cuda: bool):
        self.cuda = cuda

    def mark(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def ms(self, a, b) -> float:
        return a.elapsed_time(b) if self.cuda else 1e3 * (b - a)


def _time(arms: dict[str, _Arm], clock: _Clock, steps: int, reps: int, deadline: float,
          say: Callable[[str], None]) -> tuple[dict[str, dict], int]:
    """Paired, interleaved repetitions until ``reps`` or the deadline (at least one)."""
    names = list(arms)
    per_rep: dict[str, list[float]] = {a: [] for a in names}
    verify: dict[str, list[float]] = {a: [] for a in names}
    other: dict[str, list[float]] = {a: [] for a in names}
    done, began = 0, time.perf_counter()
    while done < reps:
        order = names[done % len(names):] + names[:done % len(names)]
        for name in order:
            arm = arms[name]
            arm.step()          # lead-in: a capture in flight as in the steady state
            marks = [clock.mark()]
            for _ in range(steps):
                arm.step()
                marks.append(clock.mark())
            clock.sync()        # untimed: the next arm starts with nothing in flight
            times = [clock.ms(a, b) for a, b in zip(marks, marks[1:])]
            per_rep[name].append(clock.ms(marks[0], marks[-1]) / steps)
            for n, t in zip(range(arm.steps - steps + 1, arm.steps + 1), times):
                (verify if arm.cadence and n % arm.cadence == 0 else other)[name].append(t)
        done += 1
        spent = time.perf_counter() - began
        left = deadline - time.perf_counter()
        say(f"timing: repetition {done}/{reps} ({spent / done:.1f} s each)")
        if done < reps and left < spent / done:
            say(f"timing: stopping after {done} repetitions to stay within the time budget")
            break
    out = {}
    for name in names:
        ratios = [t / b for t, b in zip(per_rep[name], per_rep["bare"])]
        out[name] = {"ms_per_step": statistics.median(per_rep[name]),
                     "ratio": statistics.median(ratios), "ratio_min": min(ratios),
                     "ratio_max": max(ratios), "ms_verify_steps": _median(verify[name]),
                     "ms_other_steps": _median(other[name])}
    return out, done


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else math.nan


# -- the CUDA tests -------------------------------------------------------------------------
def parse_junit(path: str) -> list[dict]:
    """One row per test case of a pytest ``--junitxml`` file: test, outcome (passed, failed,
    error, skipped), seconds, message (the first line of the failure or skip reason)."""
    rows = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                message = (node.get("message") or node.text or "").strip().splitlines()
                message = message[0][:200] if message else ""
                break
        rows.append({"test": case.get("name", "?"), "outcome": outcome,
                     "seconds": float(case.get("time") or 0.0), "message": message})
    return rows


_VERBOSE = re.compile(r"^\S+::(\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")


def parse_verbose(text: str) -> list[dict]:
    """The tests ``pytest -v`` reported as finished in ``text`` (what a run that was killed
    had printed): one row each, as :func:`parse_junit`'s, without seconds or message."""
    rows = []
    for line in text.splitlines():
        m = _VERBOSE.match(line.strip())
        if m:
            rows.append({"test": m.group(1), "outcome": m.group(2).lower(),
                         "seconds": math.nan, "message": ""})
    return rows


def _cuda_tests(dry_run: bool, timeout: float) -> tuple[list[dict], str]:
    """Run tests/test_cuda.py in a subprocess; rows per test and a one-line note."""
    root = Path(__file__).resolve().parents[2]
    path = root / "tests" / "test_cuda.py"
    if not path.is_file():
        return [{"test": "tests/test_cuda.py", "outcome": "not found", "seconds": 0.0,
                 "message": f"no {path}: run from a source checkout"}], "tests not found"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(root)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    if dry_run:
        env["CUDA_VISIBLE_DEVICES"] = ""   # the dry run claims nothing: every CUDA test skips
    with tempfile.TemporaryDirectory() as tmp:
        xml = os.path.join(tmp, "junit.xml")
        cmd = [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", str(path),
               f"--junitxml={xml}"]
        try:
            done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired as exc:   # keep what finished before the kill
            text = exc.stdout or ""
            rows = parse_verbose(text.decode(errors="replace") if isinstance(text, bytes) else text)
            rest = {"test": "(the rest of tests/test_cuda.py)", "outcome": "timeout",
                    "seconds": timeout, "message": f"killed after {timeout:.0f} s"}
            return rows + [rest], f"killed after {timeout:.0f} s, {len(rows)} tests finished"
        if not os.path.exists(xml):
            tail = (done.stdout + done.stderr).strip().splitlines()[-1:] or ["no output"]
            return [{"test": "tests/test_cuda.py", "outcome": "error", "seconds": 0.0,
                     "message": tail[0][:200]}], f"pytest exited {done.returncode}"
        return parse_junit(xml), f"pytest exited {done.returncode}"


# -- the profiler trace ---------------------------------------------------------------------
GPU_CATEGORIES = ("kernel", "gpu_memcpy", "gpu_memset")
#: side-stream copies closer than this (microseconds) belong to one capture
BURST_GAP_US = 500.0
#: a compute kernel starting within this of a copy's end, after an idle gap: it waited on it
WAIT_SLACK_US = 50.0


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[list[float]] = []
    for a, b in sorted(intervals):
        if merged and a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    return [(a, b) for a, b in merged]


def _length(intervals) -> float:
    return sum(b - a for a, b in intervals)


def _intersection(xs, ys) -> float:
    """Total length of the intersection of two sorted, disjoint interval lists."""
    i = j = 0
    total = 0.0
    while i < len(xs) and j < len(ys):
        a, b = max(xs[i][0], ys[j][0]), min(xs[i][1], ys[j][1])
        total += max(0.0, b - a)
        if xs[i][1] < ys[j][1]:
            i += 1
        else:
            j += 1
    return total


def _stream(e: dict) -> tuple:
    args = e.get("args") or {}
    return (args.get("device", e.get("pid")), args.get("stream", e.get("tid")))


def trace_overlap(events: list[dict]) -> dict:
    """Read a Chrome trace's events: do the snapshot's device-to-host copies overlap compute?

    The compute stream is the one with the most kernel time; the snapshot's copies are the
    ``Memcpy DtoH`` events on other streams, grouped into captures (gaps under
    :data:`BURST_GAP_US`). A capture after which the compute stream runs nothing more is
    left out (nothing follows it in the trace to overlap). Per capture: how much of its copy
    time intersects the compute stream's kernels, and whether the compute stream waited on
    it (idle at the copy's end, its next kernel starting within :data:`WAIT_SLACK_US` of
    that end). Returns the figures and ``reading``, one line.
    """
    gpu = [e for e in events if e.get("ph") == "X" and e.get("cat") in GPU_CATEGORIES
           and "ts" in e and "dur" in e]
    out = {"captures": 0, "copy_ms": 0.0, "overlap_fraction": math.nan, "waited": 0,
           "wait_ms": 0.0, "compute_stream": "", "copy_stream": ""}
    if not gpu:
        out["reading"] = "no device activity in the trace (no CUDA): nothing to read"
        return out
    busy: dict[tuple, float] = {}
    for e in gpu:
        if e["cat"] == "kernel":
            busy[_stream(e)] = busy.get(_stream(e), 0.0) + float(e["dur"])
    compute = max(busy, key=busy.get) if busy else _stream(gpu[0])
    kernels = _union([(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in gpu
                      if e["cat"] == "kernel" and _stream(e) == compute])
    copies = [e for e in gpu if e["cat"] == "gpu_memcpy" and "DtoH" in e.get("name", "")
              and _stream(e) != compute]
    out["compute_stream"] = str(compute[1])
    if not copies:
        on_compute = sum(1 for e in gpu if e["cat"] == "gpu_memcpy" and "DtoH" in e.get("name", ""))
        out["reading"] = (f"no device-to-host copy off the compute stream ({on_compute} on it): "
                          "no snapshot copy on a side stream in these steps")
        return out
    out["copy_stream"] = " ".join(sorted({str(_stream(e)[1]) for e in copies}))
    bursts: list[list[tuple[float, float]]] = []
    for a, b in _union([(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in copies]):
        if bursts and a - bursts[-1][-1][1] < BURST_GAP_US:
            bursts[-1].append((a, b))
        else:
            bursts.append([(a, b)])
    last_kernel = kernels[-1][1] if kernels else -math.inf
    bursts = [b for b in bursts if b[-1][1] < last_kernel]   # compute follows the capture
    copy_us = overlap_us = wait_us = 0.0
    waited = 0
    for burst in bursts:
        start, end = burst[0][0], burst[-1][1]
        copy_us += _length(burst)
        overlap_us += _intersection(burst, kernels)
        if any(a <= end < b for a, b in kernels):
            continue                      # the compute stream is busy as the copy ends
        before = [b for a, b in kernels if b <= end]
        after = [a for a, b in kernels if a >= end]
        if after and after[0] - end <= WAIT_SLACK_US:
            waited += 1
            wait_us += end - max(before[-1] if before else start, start)
    n = len(bursts)
    fraction = overlap_us / copy_us if copy_us else math.nan
    out.update(captures=n, copy_ms=copy_us / 1e3, overlap_fraction=fraction, waited=waited,
               wait_ms=wait_us / 1e3)
    if not n:
        out["reading"] = "no snapshot copy with compute after it in the trace"
        return out
    if waited == 0:
        verdict = ("the copy overlaps the next forward/backward and the compute stream never "
                   "waited on it" if fraction >= 0.5 else
                   "the copy ran mostly while the compute stream was idle (host-bound), and "
                   "the compute stream never waited on it")
    elif fraction >= 0.05:
        verdict = ("the copy overlaps the next forward/backward only in part: the compute "
                   "stream waits for its end")
    else:
        verdict = "the copy does not overlap compute: the compute stream waits on it"
    out["reading"] = (f"{verdict} ({n} captures on stream {out['copy_stream']}: "
                      f"{out['copy_ms']:.2f} ms of device-to-host copies, "
                      f"{100 * fraction:.0f}% of it under compute-stream kernels; the compute "
                      f"stream (stream {out['compute_stream']}) waited on {waited} of {n}, "
                      f"idle {out['wait_ms']:.2f} ms until the copies ended)")
    return out


def _trace(arm: _Arm, path: str, cuda: bool, steps: int = TRACE_STEPS) -> dict:
    """Profile ``steps`` steps of ``arm`` into ``path`` (gzipped Chrome trace); read it."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()   # the first traced step starts with no capture in flight
    with profile(activities=activities) as prof:
        for _ in range(steps):
            arm.step()
        if cuda:
            torch.cuda.synchronize()   # the last capture's copies end inside the trace
    with tempfile.TemporaryDirectory() as tmp:
        raw = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(raw)
        with open(raw) as f:
            trace = json.load(f)
    events = trace.get("traceEvents", []) if isinstance(trace, dict) else trace
    reading = trace_overlap(events)
    with gzip.open(path, "wt") as f:
        json.dump(trace, f)
    if os.path.getsize(path) > 12 << 20:   # keep it far under 16 MiB: device events only
        keep = [e for e in events if e.get("cat") in GPU_CATEGORIES or e.get("ph") == "M"]
        with gzip.open(path, "wt") as f:
            json.dump({**trace, "traceEvents": keep} if isinstance(trace, dict) else keep, f)
    return reading


# -- the suite ------------------------------------------------------------------------------
def _free(cuda: bool) -> None:
    gc.collect()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _host_allocated() -> float:
    """Bytes of pinned blocks checked out of the CUDA caching host allocator (its
    ``active_bytes.current``, power-of-two rounded), where torch reports it."""
    try:
        return float(torch.cuda.host_memory_stats().get("active_bytes.current", math.nan))
    except (AttributeError, RuntimeError, TypeError):
        return math.nan


def _measure(name: str, cfg: dict, device: torch.device) -> tuple[_Arm, dict, dict]:
    """Build arm ``name`` (the arms built before stay resident, idle) and run its first
    :data:`SYNC_STEPS` steps: its host syncs per step type, peak device memory, pinned and
    staging bytes."""
    cuda = device.type == "cuda"
    _free(cuda)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    host = _host_allocated() if cuda else math.nan
    arm = _build(name, cfg, device)
    counter = _SyncCounter(cuda)
    with counter.counting():
        for _ in range(SYNC_STEPS):
            with counter.step():
                arm.step()
    if cuda:
        torch.cuda.synchronize()
    pinned, staging = {"exact": 0, "reserved": 0}, 0
    if arm.guard is not None:
        pinned = memory.pinned_bytes(arm.guard)
        staging = sum(s.staging_nbytes()   # device staging chunks
                      for s in (arm.guard.safe_snapshot, *arm.guard.snapshot_history))
    peak = torch.cuda.max_memory_allocated() - base if cuda else math.nan
    row = {"params": sum(p.numel() for p in arm.model.parameters()),
           "peak_device_MiB": peak / 2**20,
           "pinned_exact_MiB": pinned["exact"] / 2**20,
           "pinned_reserved_MiB": pinned["reserved"] / 2**20,
           "pinned_measured_MiB": (_host_allocated() - host) / 2**20 if cuda else math.nan,
           "staging_MiB": staging / 2**20,
           "syncs_per_step": sum(map(len, counter.steps)) / len(counter.steps)}
    return arm, row, _sync_rows(arm, counter.steps)


def run(out: str, dry_run: bool = False, reps: int = 9, budget_s: float = BUDGET_S,
        say: Callable[[str], None] = _noop) -> str:
    """Run the GPU suite into ``out`` (see the module docstring); returns the markdown summary.

    Needs CUDA unless ``dry_run``. ``reps``: the most paired timing repetitions (fewer when
    the budget runs short); ``budget_s``: the wall-time budget; ``say``: progress lines.
    """
    cuda = not dry_run
    if cuda and not torch.cuda.is_available():
        raise RuntimeError("the GPU suite needs a CUDA device (or dry_run=True)")
    if isinstance(reps, bool) or not isinstance(reps, int) or reps < 1:
        raise ValueError(f"Invalid reps: {reps!r}; need an int >= 1.")
    os.makedirs(out, exist_ok=True)
    began = time.perf_counter()
    deadline = began + budget_s
    device = torch.device("cuda" if cuda else "cpu")
    cfg = DRY if dry_run else GPT2_SMALL
    steps = DRY_BLOCK_STEPS if dry_run else BLOCK_STEPS
    reps = min(reps, 2) if dry_run else reps

    timeout = min(TESTS_TIMEOUT_S, max(30.0, budget_s - RESERVE_S))
    say(f"tests: tests/test_cuda.py in a subprocess (at most {timeout:.0f} s)")
    tests, tests_note = _cuda_tests(dry_run, timeout)
    say(f"tests: {_tally(tests)} ({time.perf_counter() - began:.0f} s)")

    arms: dict[str, _Arm] = {}
    rows: dict[str, dict] = {}
    syncs: dict[str, dict] = {}
    for name in ARMS:
        arms[name], rows[name], mine = _measure(name, cfg, device)
        syncs.update(mine)
        say(f"{name}: {SYNC_STEPS} steps, host syncs and memory read "
            f"({time.perf_counter() - began:.0f} s)")

    clock = _Clock(cuda)
    trace_reserve = 0.0 if dry_run else 30.0
    timing, done = _time(arms, clock, steps, reps, deadline - trace_reserve, say)
    say(f"trace: {TRACE_STEPS} steps of guard_probe_every_1 under torch.profiler")
    trace = _trace(arms["guard_probe_every_1"], os.path.join(out, "gpu_trace.json.gz"), cuda)
    for name, arm in arms.items():
        rows[name].update({k: ("" if dry_run else v) for k, v in timing[name].items()})
        rows[name].update(reps=done, steps_per_rep=steps,
                          rollbacks=arm.guard.stats["rollbacks"] if arm.guard is not None else 0,
                          skips=arm.guard.stats["skipped"] if arm.guard is not None else 0)
    wall = time.perf_counter() - began
    env = {"device": torch.cuda.get_device_name(0) if cuda else "CPU (dry run)",
           "torch": torch.__version__, "wall_s": wall, "cfg": cfg, "tests_note": tests_note,
           "budget_s": budget_s, "reps_asked": reps}
    report.write_csv(os.path.join(out, "gpu.csv"), rows, "arm")
    report.write_csv(os.path.join(out, "gpu_syncs.csv"), syncs, "arm/step_type")
    report.write_csv(os.path.join(out, "gpu_tests.csv"),
                     {r["test"]: {k: v for k, v in r.items() if k != "test"} for r in tests}, "test")
    text = _markdown(rows, syncs, tests, trace, env, dry_run)
    with open(os.path.join(out, "gpu.md"), "w") as f:
        f.write(text)
    del arms
    _free(cuda)
    return text


def _tally(tests: list[dict]) -> str:
    counts: dict[str, int] = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    return ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "none"


def _fmt(v: Any, digits: int = 2) -> str:
    if isinstance(v, float):
        return "-" if not math.isfinite(v) else f"{v:.{digits}f}"
    return "-" if v == "" else str(v)


def _markdown(rows, syncs, tests, trace, env, dry_run) -> str:
    cfg = env["cfg"]
    params = next(iter(rows.values()))["params"]
    lines = ["# guarded-optim bench --suite gpu", ""]
    if dry_run:
        lines += ["**dry run: no timing claims.** The same code on the CPU at a tiny size; "
                  "CUDA tests run with no device visible (skipped); times are left empty.", ""]
    lines += [f"Device: {env['device']}; torch {env['torch']}; wall time {env['wall_s']:.0f} s "
              f"(budget {env['budget_s']:.0f} s).", "",
              f"Model: CharTransformer, {cfg['layers']} pre-LN layer"
              f"{'s' if cfg['layers'] > 1 else ''}, width {cfg['d_model']}, "
              f"{cfg['heads']} heads, vocabulary {cfg['vocab']}, context {cfg['seq_len']}, tied "
              f"head: {params:,} parameters; batch {cfg['batch_size']} x {cfg['seq_len']} "
              f"synthetic tokens, bf16 autocast, AdamW(fused=True, lr={LR}).", ""]
    first = next(iter(rows.values()))
    lines += ["## Step time and memory", "",
              f"Time per step: {first['reps']} paired, interleaved repetitions of "
              f"{first['steps_per_rep']} steps per arm (after one lead-in step), between "
              f"{'CUDA events' if not dry_run else 'CPU clock reads'}; x bare = the median over "
              "repetitions of the block's time / bare's (min-max in brackets). Peak = "
              "max_memory_allocated of the arm (reset before it was built, less the arms "
              "already resident). Pinned = the snapshot's host buffers, exact / after the "
              "caching host allocator's power-of-two rounding / the growth of the "
              "allocator's own checked-out bytes (torch.cuda.host_memory_stats). Staging = "
              "the snapshot's device staging chunks. ms verify / other steps: the median "
              "single step at the guard's verification cadence / off it.", "",
              "| arm | ms/step | x bare | ms verify steps | ms other steps | peak MiB | "
              "pinned MiB (exact / rounded / allocator) | staging MiB | rollbacks / skips |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, r in rows.items():
        ratio = (f"{_fmt(r['ratio'])} ({_fmt(r['ratio_min'])}-{_fmt(r['ratio_max'])})"
                 if r["ratio"] != "" else "-")
        lines.append(f"| {name} | {_fmt(r['ms_per_step'])} | {ratio} | "
                     f"{_fmt(r['ms_verify_steps'])} | {_fmt(r['ms_other_steps'])} | "
                     f"{_fmt(r['peak_device_MiB'], 0)} | {_fmt(r['pinned_exact_MiB'], 1)} / "
                     f"{_fmt(r['pinned_reserved_MiB'], 1)} / {_fmt(r['pinned_measured_MiB'], 1)} | "
                     f"{_fmt(r['staging_MiB'], 1)} | {r['rollbacks']} / {r['skips']} |")
    how = ("torch.cuda.set_sync_debug_mode('warn') plus Event/Stream/device synchronize"
           if not dry_run else "host reads of tensor values from guarded_optim (nothing "
           "synchronises on a CPU; as tests/test_syncs.py counts)")
    lines += ["", "## Host syncs per step type", "",
              f"The first {SYNC_STEPS} steps after construction, counted with {how}; expected: "
              "docs/host_syncs.md, the row named.", "",
              "| arm / step type | steps | syncs per step | expected (row) | match | sites |",
              "| --- | --- | --- | --- | --- | --- |"]
    for key, r in syncs.items():
        lines.append(f"| {key} | {r['steps']} | {r['syncs_per_step']} | {_fmt(r['expected'])} "
                     f"{r['docs_row']} | {r['match']} | {r['sites']} |")
    lines += ["", "## CUDA tests", "",
              f"tests/test_cuda.py: {_tally(tests)} ({env['tests_note']}); per test in gpu_tests.csv."]
    bad = [t for t in tests if t["outcome"] not in ("passed", "skipped")]
    lines += [f"- {t['test']}: {t['outcome']}: {t['message']}" for t in bad]
    reasons: dict[str, int] = {}
    for t in tests:
        if t["outcome"] == "skipped":
            reasons[t["message"]] = reasons.get(t["message"], 0) + 1
    lines += [f"- skipped ({n}): {m}" for m, n in reasons.items()]
    lines += ["", "## Profiler trace", "",
              f"gpu_trace.json.gz: {TRACE_STEPS} steps of guard_probe_every_1 (open in "
              "Perfetto or chrome://tracing). Read from its events:", "", trace["reading"], ""]
    return "\n".join(lines)
