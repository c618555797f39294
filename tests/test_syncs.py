"""Host synchronisations of one ``GuardedOptimizer.step()``, per step type (issue 15, item 11).

The contract documented in ``docs/host_syncs.md``. On CPU nothing really synchronises, but
every point that *would* block the host on CUDA is a read of a tensor's value on the host
(``tolist``, ``item``, ``bool``/``float``/``int``/``__index__``, ``nonzero``, ``torch.equal``),
a device-to-host copy (``.cpu()``, ``.to("cpu")`` of a device tensor), an upload from
pageable host memory (``.to(cuda)`` without ``non_blocking`` runs ``memcpy_and_sync``), or an
explicit ``torch.cuda.synchronize`` / ``Event.synchronize`` / ``Stream.synchronize``.
:class:`HostReads` patches those entry points (``monkeypatch``) and records each call made
*from guarded_optim's own code* (the caller frame's file is under ``guarded_optim/``): the
user's code and torch's internals (the single-tensor Adam path calls ``.item()`` on its
``step`` tensors) do not count. ``tests/test_cuda.py`` runs the same counter on a GPU.

Sites are named ``file:function`` (not lines: guard.py moves), e.g. ``FLAGS`` is the one
``.tolist()`` of the packed flag vector read by ``GuardedOptimizer._read``. Every transfer
goes through one readout path (``GuardedOptimizer._readout``): its reads are named by the
reading that called it.
"""

from __future__ import annotations

import contextlib
import copy
import os
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import tiny
from guarded_optim import GuardedOptimizer
from guarded_optim.guard import VERIFY_EVERY
from guarded_optim.ladder import Ladder
from guarded_optim.policy import Escape, ReduceLR, TightenClip
from guarded_optim.signals import CurvatureSpike, EffectiveRank, StepCounters, default_signals
from guarded_optim.signals.probe import probe_value

#: the step's one transfer: pre-step flags (+ the live state's post-step flags when it is
#: verified), the gradient norm and GradScaler's overflow, packed, read with one ``tolist``
FLAGS = "guard.py:_read"
#: a measured step's second transfer: the probe value and the proposal's post-step flags
MEASURE = "guard.py:_measure_proposal"
#: one probe value read on its own (``float(out.item())``): the reference y(theta_0) and the
#: re-measurement before a re-baseline
PROBE = "signals/probe.py:probe_value"
#: the re-run rung (ladder): the two training losses and the re-run's gradient norm
#: ``state_dict()`` of a probe-less guard with unverified steps verifies the live state
SETTLE = "guard.py:_read"   # the same reading of the post-step flags, at save time
#: the weights' fingerprint (per-tensor sum and sum of squares) saved by ``state_dict()`` and
#: compared at the first step after a load: one read each time
FPRINT = "checkpoint.py:fingerprint"
#: a pre-step alarm on a verified live state compares it with the snapshot, value for value
LIVE_CHECK = "snapshot/core.py:matches_live_params"
#: GradientSpike's state is host-side: its ``state_dict`` builds CPU tensors, and loading
#: them (at construction too: every guard starts from its signals' initial state) reads
#: them back, no sync on CUDA either
HOST_STATE = {"signals/gradients.py:load_state_dict", "signals/gradients.py:_finite",
              "signals/gradients.py:from_ring"}
#: ``load_state_dict`` validates what it is given before changing anything: a finite check
#: per floating tensor (a sync each when the loaded tensors are on the GPU), once per load
LOAD_CHECKS = {"validation.py:optimizer_state", "validation.py:tensors_finite",
               "checkpoint.py:walk"}
#: reads of CPU tensors only: the float32 overflow/underflow repair of the norms, a branch
#: taken for CPU tensors (on CUDA the norms are summed in float64 in one pass). No sync.
CPU_ONLY = {"signals/gradients.py:_group_norms"}

_PKG = os.sep + "guarded_optim" + os.sep
_VALUE_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__format__",
                "__contains__", "nonzero", "is_nonzero", "numpy", "__array__")


@dataclass(frozen=True)
class Read:
    kind: str    # the method patched: "tolist", "item", "cpu", "upload", "Event.synchronize", ...
    site: str    # "file:function" under guarded_optim/
    line: int

    def __repr__(self) -> str:
        return f"{self.kind}@{self.site.split(':')[0]}:{self.line}"


class HostReads:
    """Counts the host reads and synchronisations made from guarded_optim's code.

    ``cuda=False`` (CPU): a value read of any tensor counts (on CUDA it would be a device
    tensor). ``cuda=True``: only reads of non-CPU tensors count (reading a host tensor is
    no sync), plus uploads of pageable host tensors to CUDA without ``non_blocking``.
    Counting is on only inside ``with reads.counting():``.
    """

    def __init__(self, monkeypatch, cuda: bool = False):
        self.cuda = cuda
        self.calls: list[Read] = []
        self._on = False
        for name in _VALUE_READS:
            if hasattr(torch.Tensor, name):
                monkeypatch.setattr(torch.Tensor, name, self._value_read(name, getattr(torch.Tensor, name)))
        monkeypatch.setattr(torch.Tensor, "cpu", self._download(torch.Tensor.cpu))
        monkeypatch.setattr(torch.Tensor, "to", self._to(torch.Tensor.to))
        monkeypatch.setattr(torch.Tensor, "cuda", self._upload(torch.Tensor.cuda))
        for name in ("equal", "allclose"):
            monkeypatch.setattr(torch, name, self._call(f"torch.{name}", getattr(torch, name)))
        monkeypatch.setattr(torch.cuda, "synchronize",
                            self._call("cuda.synchronize", torch.cuda.synchronize))
        for cls in (torch.cuda.Event, torch.cuda.Stream):
            monkeypatch.setattr(cls, "synchronize",
                                self._call(f"{cls.__name__}.synchronize", cls.synchronize))

    @contextlib.contextmanager
    def counting(self):
        """Record the calls made inside the block (``self.calls`` is reset first)."""
        self.calls = []
        self._on = True
        try:
            yield self
        finally:
            self._on = False

    # -- what a block did ------------------------------------------------------------------
    @property
    def syncs(self) -> list[str]:
        """The sites, in order, of the reads that would block the host on CUDA."""
        return [r.site for r in self.calls if r.site not in CPU_ONLY]

    @property
    def cpu_only(self) -> list[Read]:
        return [r for r in self.calls if r.site in CPU_ONLY]

    def of(self, kind: str) -> list[Read]:
        return [r for r in self.calls if r.kind == kind]

    # -- the patches ---------------------------------------------------------------------------
    def _record(self, kind: str) -> None:
        frame = sys._getframe(2)          # the caller of the patched method
        if frame.f_code.co_name == "_readout":   # the one readout path: name the reading
            frame = frame.f_back
        filename = frame.f_code.co_filename
        if _PKG not in filename:
            return
        site = f"{filename.rsplit(_PKG, 1)[1].replace(os.sep, '/')}:{frame.f_code.co_name}"
        self.calls.append(Read(kind, site, frame.f_lineno))

    def _value_read(self, name, orig):
        def read(t, *args, **kwargs):
            if self._on and (not self.cuda or t.device.type != "cpu"):
                self._record(name)
            return orig(t, *args, **kwargs)
        return read

    def _download(self, orig):
        def cpu(t, *args, **kwargs):
            if self._on and t.device.type != "cpu":
                self._record("cpu")
            return orig(t, *args, **kwargs)
        return cpu

    def _to(self, orig):
        def to(t, *args, **kwargs):
            if self._on:
                try:
                    device, _, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
                except (TypeError, RuntimeError):   # .to(other_tensor) and the like
                    device, non_blocking = None, False
                if device is not None and device.type == "cpu" and t.device.type != "cpu":
                    self._record("cpu")
                elif (device is not None and device.type == "cuda" and t.device.type == "cpu"
                      and not (non_blocking and t.is_pinned())):
                    self._record("upload")
            return orig(t, *args, **kwargs)
        return to

    def _upload(self, orig):
        def cuda(t, *args, **kwargs):
            if self._on and t.device.type == "cpu" and not (kwargs.get("non_blocking") and t.is_pinned()):
                self._record("upload")
            return orig(t, *args, **kwargs)
        return cuda

    def _call(self, kind, orig):
        def call(*args, **kwargs):
            if self._on:
                self._record(kind)
            return orig(*args, **kwargs)
        return call


@pytest.fixture
def reads(monkeypatch):
    return HostReads(monkeypatch)


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


# -- the problem ---------------------------------------------------------------------------
class Probe:
    """The tiny model's probe, multiplied by ``scale`` (1e6 rejects every proposal); ``nan``
    calls return NaN first."""

    def __init__(self, m, probe_set):
        self.inner, self.scale, self.nan = tiny.probe_for(m, probe_set), 1.0, 0

    def __call__(self):
        if self.nan:
            self.nan -= 1
            return torch.tensor(float("nan"))
        return self.inner() * self.scale


def _problem(probe: bool = False, **kw):
    m = tiny.model(0)
    probe_set, batches = tiny.data(0, steps=40)
    p = Probe(m, probe_set) if probe else None
    opt = GuardedOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-3), p, module=m, **kw)
    return m, opt, batches, p


def _backward(m, opt, batch, nan_grad: bool = False) -> None:
    x, y = batch
    opt.zero_grad()
    F.mse_loss(m(x), y).backward()
    if nan_grad:
        next(m.parameters()).grad[0, 0] = float("nan")


def _step(reads, m, opt, batch, nan_grad: bool = False, closure: bool = False) -> list[str]:
    """One ``opt.step()``: the sites of the host reads it made, in order."""
    if closure:
        c = tiny.closure_for(opt, m, *batch)
    else:
        _backward(m, opt, batch, nan_grad)
        c = None
    with reads.counting():
        opt.step(c)
    return reads.syncs


def _train(reads, m, opt, batches) -> list[list[str]]:
    return [_step(reads, m, opt, b) for b in batches]


# -- the harness ---------------------------------------------------------------------------
def test_counter_sees_guarded_optim_reads_only(reads):
    t = torch.tensor(2.0)
    with reads.counting():
        t.item()                       # the user's own read: not the guard's
        float(t)
        probe_value(t)                 # a read in guarded_optim's code
    assert [repr(r) for r in reads.calls] == [f"item@signals/probe.py:{reads.calls[0].line}"]
    assert reads.syncs == [PROBE]


def test_torch_internal_reads_do_not_count(reads):
    """Single-tensor Adam reads its ``step`` tensors with ``.item()`` (torch's frames)."""
    w = torch.nn.Parameter(torch.ones(3))
    inner = torch.optim.Adam([w], foreach=False)
    w.grad = torch.ones(3)
    with reads.counting():
        inner.step()
    assert reads.calls == []


# -- (1) accepted steps between verifications ----------------------------------------------
def test_unmeasured_accepted_step_reads_one_value_batch(reads):
    """The default probe-less guard: steps between verifications read the flag vector once;
    the k-th reads the post-step flags a second time, after its proposal (_check_live)."""
    m, opt, batches, _ = _problem()
    assert opt.probe_every == VERIFY_EVERY == 10
    per_step = _train(reads, m, opt, batches[:VERIFY_EVERY])
    assert per_step == [[FLAGS]] * (VERIFY_EVERY - 1) + [[FLAGS, FLAGS]]
    assert opt.stats["accepted"] == VERIFY_EVERY and opt.step_state.unverified == 0


def test_unmeasured_steps_of_a_probed_guard_read_once(reads):
    """With ``probe_every=3`` the two steps between measurements read the flags only."""
    m, opt, batches, _ = _problem(probe=True, probe_every=3)
    assert _train(reads, m, opt, batches[:6]) == [[FLAGS], [FLAGS], [FLAGS, MEASURE]] * 2
    assert opt.stats["measured"] == 2


# -- (2) the probe-less verification step ----------------------------------------------------
def test_probe_less_verification_step_checks_after_its_proposal_and_captures(reads):
    """The k-th step checks the live state right after its proposal (one more read, every k
    steps) and issues the capture at once, to overlap the next forward and backward."""
    m, opt, batches, _ = _problem()
    _train(reads, m, opt, batches[:VERIFY_EVERY - 1])
    assert opt.safe_snapshot.step == 0
    assert _step(reads, m, opt, batches[VERIFY_EVERY - 1]) == [FLAGS, FLAGS]
    assert opt.safe_snapshot.step == VERIFY_EVERY          # captured: the live state was verified
    assert {s.name for s in opt._post} <= set(opt.last_event.signals)   # checked in that read
    # the next stretch costs the same again
    per_step = _train(reads, m, opt, batches[VERIFY_EVERY:2 * VERIFY_EVERY])
    assert per_step == [[FLAGS]] * (VERIFY_EVERY - 1) + [[FLAGS, FLAGS]]
    assert opt.safe_snapshot.step == 2 * VERIFY_EVERY


def test_cpu_only_norm_repair_reads_are_cpu_tensors(reads):
    """The reads left out of the count: the CPU float32 norm repair (no sync anywhere)."""
    m, opt, batches, _ = _problem()
    with reads.counting():
        _backward(m, opt, batches[0])
        opt.step()
    assert reads.cpu_only and all(r.kind == "tolist" for r in reads.cpu_only)   # min and max
    assert next(m.parameters()).device.type == "cpu"


# -- (3) accepted steps with a probe -------------------------------------------------------
def test_measured_accepted_step_reads_twice(reads):
    m, opt, batches, _ = _problem(probe=True)
    assert opt.probe_every == 1
    assert _train(reads, m, opt, batches[:5]) == [[FLAGS, MEASURE]] * 5
    assert opt.stats["accepted"] == 5


# -- (4) skips -------------------------------------------------------------------------------
def test_skip_on_a_verified_state_reads_once(reads):
    m, opt, batches, _ = _problem(probe=True)
    _train(reads, m, opt, batches[:2])
    # the alarm fired on a verified state: is it still the verified one? (one read)
    assert _step(reads, m, opt, batches[2], nan_grad=True) == [FLAGS, LIVE_CHECK]
    assert opt.last_decision == "skip"


def test_skip_with_unverified_steps_reads_the_post_step_flags_too(reads):
    """Without a probe a pre-step signal firing while steps are unverified has the post-step
    signals check the live state at once: a second transfer."""
    m, opt, batches, _ = _problem()
    _train(reads, m, opt, batches[:3])
    assert _step(reads, m, opt, batches[3], nan_grad=True) == [FLAGS, FLAGS]
    assert opt.last_decision == "skip" and opt.step_state.unverified == 3   # checked, not captured


def test_skip_at_a_verification_step_reads_once(reads):
    m, opt, batches, _ = _problem()
    _train(reads, m, opt, batches[:VERIFY_EVERY])
    assert _step(reads, m, opt, batches[VERIFY_EVERY], nan_grad=True) == [FLAGS, LIVE_CHECK]
    assert opt.last_decision == "skip" and opt.safe_snapshot.step == VERIFY_EVERY


# -- (5) rollbacks ---------------------------------------------------------------------------
def test_probe_rejection_rolls_back_without_another_read(reads):
    m, opt, batches, probe = _problem(probe=True)
    _train(reads, m, opt, batches[:2])
    probe.scale = 1e6
    assert _train(reads, m, opt, batches[2:4]) == [[FLAGS, MEASURE]] * 2
    # the second rejection in a row backs the LR off (the healing rung): no read either
    assert opt.stats["rollbacks"] == 2 and opt.last_event.action == "backoff"


def test_damaged_weights_between_steps_cost_a_second_read_when_unverified(reads):
    """NaN weights: the NaN gradient fires the pre-step check, the post-step flags are read
    in a second transfer, the guard rolls back."""
    m, opt, batches, _ = _problem()
    _train(reads, m, opt, batches[:3])
    with torch.no_grad():
        next(m.parameters())[0, 0] = float("nan")
    assert _step(reads, m, opt, batches[3]) == [FLAGS, FLAGS]
    assert opt.last_decision == "rollback"


def test_damaged_weights_at_a_verification_step_cost_two_reads(reads):
    """NaN written before the k-th step: its gradients are NaN, the alarm has the post-step
    signals check the live state at once (the second read), and it rolls back."""
    m, opt, batches, _ = _problem()
    _train(reads, m, opt, batches[:VERIFY_EVERY - 1])
    with torch.no_grad():
        next(m.parameters())[0, 0] = float("nan")
    assert _step(reads, m, opt, batches[VERIFY_EVERY - 1]) == [FLAGS, FLAGS]
    assert opt.last_decision == "rollback"


def test_rerun_rung_reads_nothing_but_the_measurement_of_its_proposal(reads):
    """With a closure a rejected step is re-run (ladder rung 2) and its proposal measured:
    one more read, the measurement's own."""
    m, opt, batches, probe = _problem(probe=True)
    for b in batches[:2]:
        _step(reads, m, opt, b, closure=True)
    probe.scale = 1e6
    syncs = _step(reads, m, opt, batches[2], closure=True)
    assert opt.last_event.action.startswith("rerun:")
    assert syncs == [FLAGS, MEASURE, MEASURE]


# -- (6) escalation and the ring ------------------------------------------------------------
def test_ring_push_and_escalation_add_no_read_on_cpu(reads):
    """``history=2, checkpoint_every=1``: every accepted step pushes a ring entry; two
    rejections in a row escalate to an older entry. On CPU neither reads a value (on CUDA a
    push waits for the capture in flight: ``Event.synchronize``, see test_cuda.py)."""
    m, opt, batches, probe = _problem(probe=True, history=2, checkpoint_every=1,
                                      max_consecutive_rejections=2)
    assert _train(reads, m, opt, batches[:4]) == [[FLAGS, MEASURE]] * 4
    assert len(opt.snapshot_history) == 2
    probe.scale = 1e6
    assert _train(reads, m, opt, batches[4:6]) == [[FLAGS, MEASURE]] * 2
    assert opt.last_event.action == "escalate,backoff" and opt.stats["escalations"] == 1


def test_rebaseline_after_a_non_finite_probe_reads_the_probe_again(reads):
    """Nowhere older to go and the last probe value non-finite: it is measured once more."""
    m, opt, batches, probe = _problem(probe=True, max_consecutive_rejections=1,
                                      ladder=Ladder(rerun=None, on_exhausted="rebaseline"))
    _train(reads, m, opt, batches[:2])
    probe.nan = 1
    assert _step(reads, m, opt, batches[2]) == [FLAGS, MEASURE, PROBE]
    assert opt.last_event.action == "rebaseline"


# -- (7) the first step after construction and after load_state_dict ---------------------
@pytest.mark.parametrize("probed", [False, True], ids=["no_probe", "probe"])
def test_construction_and_first_step(reads, probed):
    """Construction reads the reference y(theta_0) (with a probe); the first step then costs
    what any step costs. GradientSpike loads its initial state at construction: host-side
    lists read back from CPU tensors (no sync on CUDA either)."""
    with reads.counting():
        m, opt, batches, _ = _problem(probe=probed)
    # the post-step signals take their references from theta_0: one reading
    assert [s for s in reads.syncs if s not in HOST_STATE] == ([PROBE, FLAGS] if probed else [FLAGS])
    steady = [FLAGS, MEASURE] if probed else [FLAGS]
    assert _step(reads, m, opt, batches[0]) == steady


def test_weights_written_before_the_first_step_are_measured_again(reads):
    m, opt, batches, _ = _problem(probe=True)
    with torch.no_grad():
        for p, q in zip(m.parameters(), tiny.model(1).parameters()):
            p.copy_(q)
    # the references are taken anew (the signals' initial state reloaded: host-side lists)
    assert [s for s in _step(reads, m, opt, batches[0]) if s not in HOST_STATE] == [
        PROBE, FLAGS, FLAGS, MEASURE]


@pytest.mark.parametrize("probed", [False, True], ids=["no_probe", "probe"])
def test_first_step_after_load_state_dict(reads, probed):
    m, opt, batches, _ = _problem(probe=probed)
    _train(reads, m, opt, batches[:3])
    sd, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(m.state_dict())
    _train(reads, m, opt, batches[3:5])
    m.load_state_dict(weights)            # a resume loads the model with the optimizer
    with reads.counting():
        opt.load_state_dict(sd)
    # a load checks every tensor it is given (finite, exp_avg_sq >= 0): one read each, once
    assert set(reads.syncs) <= LOAD_CHECKS | HOST_STATE
    assert reads.syncs.count("validation.py:optimizer_state") >= len(opt.state)
    steady = [FLAGS, MEASURE] if probed else [FLAGS]
    # the first step compares the live weights with the checkpoint's fingerprint (one read)
    assert _train(reads, m, opt, batches[5:7]) == [[FPRINT] + steady, steady]


def test_state_dict_verifies_unverified_steps_with_one_read(reads):
    m, opt, batches, _ = _problem()
    _train(reads, m, opt, batches[:3])
    with reads.counting():
        opt.state_dict()
    assert reads.syncs == [SETTLE, FPRINT]
    with reads.counting():
        opt.state_dict()                  # now verified: only the fingerprint is read
    assert reads.syncs == [FPRINT]


# -- opt-in signals and recovery actions -----------------------------------------------------
def _opt_in(name, m, probe_set):
    if name == "step_counters":
        return {"signals": default_signals(False) + [StepCounters()]}
    if name == "effective_rank":
        return {"signals": default_signals(False) + [EffectiveRank(every=1)]}
    if name == "curvature":
        return {"signals": default_signals(True) + [CurvatureSpike(tiny.probe_for(m, probe_set),
                                                                   module=m, every=1)]}
    return {"recovery": [ReduceLR(), TightenClip(), Escape(after=1)]}


@pytest.mark.parametrize("name", ["step_counters", "effective_rank", "curvature", "recovery"])
def test_opt_in_signals_and_actions_read_nothing_more_on_cpu(reads, name):
    """Their values stay on the device; their CUDA-only costs (uploads from host memory,
    cuSOLVER's check in ``svdvals``) are listed in docs/host_syncs.md."""
    m = tiny.model(0)
    probe_set, batches = tiny.data(0, steps=8)
    probed = name in ("curvature", "recovery")
    probe = Probe(m, probe_set) if probed else None
    opt = GuardedOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-3), probe, module=m,
                           probe_every=1, **_opt_in(name, m, probe_set))
    steady = [FLAGS, MEASURE] if probed else [FLAGS]
    assert _train(reads, m, opt, batches[:4]) == [steady] * 4
    if name == "recovery":
        probe.scale = 1e6          # a rollback: ReduceLR, TightenClip and Escape all act
        assert _step(reads, m, opt, batches[4]) == steady
        assert "escape" in opt.last_event.action
