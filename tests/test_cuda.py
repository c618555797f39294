"""CUDA paths: written against torch's stream/event semantics, skipped without a GPU.

Deterministic race tests queue ``torch.cuda._sleep`` on the side stream so that a capture is
still in flight when user code runs; each has a negative control.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from guarded_optim import GuardedOptimizer, NonFinite
from guarded_optim.faults import CorruptWeights

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(),
                                 reason="needs a CUDA device (the CUDA paths are written against "
                                        "torch's stream semantics and run where a GPU is lent)")]

SLEEP_CYCLES = 200_000_000   # ~0.1 s on current GPUs: long enough to race user code


def _setup(channels_last=False):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(),
                      nn.Linear(16 * 6 * 6, 4)).cuda()
    if channels_last:
        m = m.to(memory_format=torch.channels_last)
    x, y = torch.randn(8, 3, 8, 8, device="cuda"), torch.randint(0, 4, (8,), device="cuda")
    opt = GuardedOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-3),
                           lambda: F.cross_entropy(m(x), y), module=m)
    return m, opt, x, y


def _step(m, opt, x, y):
    opt.zero_grad()
    F.cross_entropy(m(x), y).backward()
    opt.step()


def _delay_side_stream(opt):
    """Make the next capture sit behind a sleep on the side stream."""
    snap = opt.safe_snapshot
    stream = snap._transport.side_stream(next(p.device for p in snap._layout.params if p.is_cuda))
    with torch.cuda.stream(stream):
        torch.cuda._sleep(SLEEP_CYCLES)


def test_wait_for_snapshot_orders_user_writes_after_the_capture():
    m, opt, x, y = _setup()
    _step(m, opt, x, y)
    expected = [p.detach().clone() for p in m.parameters()]
    torch.cuda.synchronize()
    _delay_side_stream(opt)
    opt.safe_snapshot.capture(opt.step_state.t)               # in flight behind the sleep
    opt.wait_for_snapshot()
    with torch.no_grad():                   # an in-place write between steps
        for p in m.parameters():
            p.mul_(0)
    opt.safe_snapshot.synchronize()
    assert all(torch.equal(a, b.cuda()) for a, b in zip(expected, opt.safe_snapshot._saved_params))


def test_without_waiting_the_write_races_the_capture():
    """Negative control: the race the test above prevents is real."""
    m, opt, x, y = _setup()
    _step(m, opt, x, y)
    torch.cuda.synchronize()
    _delay_side_stream(opt)
    opt.safe_snapshot.capture(opt.step_state.t)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(0)
    opt.safe_snapshot.synchronize()
    assert all(float(t.abs().sum()) == 0 for t in opt.safe_snapshot._saved_params)


def test_fault_injectors_wait_for_the_capture():
    m, opt, x, y = _setup()
    _step(m, opt, x, y)
    expected = [p.detach().clone() for p in m.parameters()]
    torch.cuda.synchronize()
    _delay_side_stream(opt)
    opt.safe_snapshot.capture(opt.step_state.t)
    CorruptWeights(0, mode="zero").before_step(0, opt)
    opt.safe_snapshot.synchronize()
    assert all(torch.equal(a, b.cuda()) for a, b in zip(expected, opt.safe_snapshot._saved_params))


def test_a_replaced_tensor_is_not_reused_mid_copy():
    m, opt, x, y = _setup()
    _step(m, opt, x, y)
    torch.cuda.synchronize()
    p = next(m.parameters())
    old = opt.state[p]["exp_avg"]
    before = old.clone()
    _delay_side_stream(opt)
    opt.safe_snapshot.capture(opt._t)
    idx = next(i for i, t in enumerate(opt.safe_snapshot._layout.state) if t is old)
    opt.state[p]["exp_avg"] = torch.zeros_like(before)   # the old tensor loses its user refs
    del old
    junk = torch.full_like(before, 7.0)                  # would take the freed block
    opt.safe_snapshot.synchronize()
    assert torch.equal(opt.safe_snapshot._saved_state[idx].cuda(), before)
    del junk


def test_host_snapshot_costs_no_gpu_memory_also_channels_last():
    for channels_last in (False, True):
        m, opt, x, y = _setup(channels_last)
        _step(m, opt, x, y)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        for _ in range(3):
            _step(m, opt, x, y)
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() <= base + 1024
        assert all(s.stride() == p.stride() for s, p in zip(opt.safe_snapshot._saved_params, m.parameters()))
        assert all(s.is_pinned() for s in opt.safe_snapshot._saved_params)


def test_step_inside_cuda_graph_capture_is_a_clear_error():
    m, opt, x, y = _setup()
    _step(m, opt, x, y)
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        with pytest.raises(RuntimeError, match="CUDA-graph capture"):
            with torch.cuda.graph(g):
                opt.step()


def test_unmeasured_step_reads_flags_once():
    m = nn.Linear(64, 64).cuda()
    x = torch.randn(32, 64, device="cuda")
    opt = GuardedOptimizer(torch.optim.AdamW(m.parameters()), signals=[NonFinite()])
    for _ in range(3):
        _step_regression = m(x).square().mean()
        opt.zero_grad()
        _step_regression.backward()
        opt.step()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning) as record:
            loss = m(x).square().mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert len([r for r in record if "synchroniz" in str(r.message)]) <= 1


def test_rollback_is_exact_on_cuda_with_a_host_snapshot():
    m, opt, x, y = _setup()
    for _ in range(3):
        _step(m, opt, x, y)
    torch.cuda.synchronize()
    opt.safe_snapshot.synchronize()
    safe = [t.clone() for t in opt.safe_snapshot._saved_params]
    lr = opt.param_groups[0]["lr"]
    opt.param_groups[0]["lr"] = 1e6
    _step(m, opt, x, y)
    opt.param_groups[0]["lr"] = lr
    assert opt.last_decision in ("rollback", "accept")
    if opt.last_decision == "rollback":
        assert all(torch.equal(a.cuda(), p) for a, p in zip(safe, m.parameters()))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs in one process")
def test_a_model_over_two_gpus_gets_a_stream_and_an_event_per_device():
    torch.manual_seed(0)
    a, b = nn.Linear(16, 16).to("cuda:0"), nn.Linear(16, 1).to("cuda:1")
    params = list(a.parameters()) + list(b.parameters())
    x = torch.randn(8, 16, device="cuda:0")
    opt = GuardedOptimizer(torch.optim.AdamW(params, lr=1e-2),
                           lambda: b(a(x).to("cuda:1")).square().mean())
    for _ in range(3):
        opt.zero_grad()
        b(a(x).to("cuda:1")).square().mean().backward()
        opt.step()
    assert set(opt.safe_snapshot._transport.streams) == {torch.device("cuda:0"), torch.device("cuda:1")}
    opt.safe_snapshot.synchronize()
    assert all(torch.equal(s.to(p.device), p) for s, p in zip(opt.safe_snapshot._saved_params, params))


# -- host syncs per step type (issue 15, item 11; docs/host_syncs.md) ----------------------
# ``torch.cuda.set_sync_debug_mode`` sees stream synchronisations (``.item()``, ``.tolist()``,
# blocking copies) but not ``torch.cuda.synchronize()`` nor ``Event.synchronize()``, so these
# tests count by patching (tests/test_syncs.py's HostReads, cuda=True: reads of device tensors,
# uploads of pageable host tensors, and every synchronize call made from guarded_optim).
def _cuda_reads(monkeypatch):
    from test_syncs import HostReads
    return HostReads(monkeypatch, cuda=True)


def _counted_step(reads, m, opt, x, y, nan_grad=False):
    opt.zero_grad()
    F.cross_entropy(m(x), y).backward()
    if nan_grad:
        next(m.parameters()).grad.view(-1)[0] = float("nan")
    with reads.counting():
        opt.step()
    torch.cuda.synchronize()
    return reads


def _setup_probe(**kw):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(),
                      nn.Linear(16 * 6 * 6, 4)).cuda()
    x, y = torch.randn(8, 3, 8, 8, device="cuda"), torch.randint(0, 4, (8,), device="cuda")
    scale = {"k": 1.0}
    opt = GuardedOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-3),
                           lambda: F.cross_entropy(m(x), y) * scale["k"], module=m, **kw)
    return m, opt, x, y, scale


def test_cuda_host_reads_per_step_type(monkeypatch):
    from test_syncs import FLAGS, MEASURE
    reads = _cuda_reads(monkeypatch)
    sync_kinds = ("cuda.synchronize", "Event.synchronize", "Stream.synchronize")

    # (1)/(2) probe-less: 9 unmeasured steps, then the verification step (its proposal
    # checked, a second FLAGS read, and the host capture issued at once)
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 16, 3), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(),
                      nn.Linear(16 * 6 * 6, 4)).cuda()
    x, y = torch.randn(8, 3, 8, 8, device="cuda"), torch.randint(0, 4, (8,), device="cuda")
    opt = GuardedOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-3), module=m)
    assert opt.safe_snapshot.mode == "host"
    for i in range(opt.probe_every):
        _counted_step(reads, m, opt, x, y)
        device_reads = [r.site for r in reads.calls if r.kind not in ("upload", *sync_kinds)]
        expected = [FLAGS, FLAGS] if i == opt.probe_every - 1 else [FLAGS]
        assert device_reads == expected, reads.calls          # no CPU-only norm repair on CUDA
        assert not any(r.kind in sync_kinds for r in reads.calls), reads.calls
    assert opt.safe_snapshot.step == opt.probe_every                 # the last one verified + captured

    # (3) measured accepted, (4) skip, (5) rollback: no explicit synchronize anywhere
    m, opt, x, y, scale = _setup_probe()
    for nan_grad, k, decision, expected in [(False, 1.0, "accept", [FLAGS, MEASURE]),
                                            (True, 1.0, "skip", [FLAGS]),
                                            (False, 1e6, "rollback", [FLAGS, MEASURE])]:
        scale["k"] = k
        _counted_step(reads, m, opt, x, y, nan_grad=nan_grad)
        assert opt.last_decision == decision
        assert [r.site for r in reads.calls if r.kind not in ("upload", *sync_kinds)] == expected
        assert not any(r.kind in sync_kinds for r in reads.calls), reads.calls


def test_cuda_ring_push_waits_for_the_capture(monkeypatch):
    """``history`` > 0: a push copies the capture still in flight on the side stream, so it
    waits for it on the host: one ``Event.synchronize`` per event of the safe snapshot (the
    side stream's and the module buffers' copy, on one device)."""
    from test_syncs import FLAGS, MEASURE
    reads = _cuda_reads(monkeypatch)
    m, opt, x, y, scale = _setup_probe(history=2, checkpoint_every=1, max_consecutive_rejections=2)
    for _ in range(3):
        _counted_step(reads, m, opt, x, y)
        assert [r.site for r in reads.calls if r.kind != "upload"
                and not r.kind.endswith("synchronize")] == [FLAGS, MEASURE]
        assert [r.kind for r in reads.calls if r.kind.endswith("synchronize")] == \
            ["Event.synchronize"] * 2, reads.calls
    scale["k"] = 1e6
    _counted_step(reads, m, opt, x, y)
    _counted_step(reads, m, opt, x, y)
    assert opt.last_event.action == "escalate,backoff"   # (the healing rung acts too)
    assert all(r.kind == "Event.synchronize" for r in reads.calls if "synchronize" in r.kind)


def test_cuda_unmeasured_step_uploads_nothing(monkeypatch):
    reads = _cuda_reads(monkeypatch)
    m = nn.Linear(64, 64).cuda()
    x = torch.randn(32, 64, device="cuda")
    opt = GuardedOptimizer(torch.optim.AdamW(m.parameters()))
    for _ in range(3):
        opt.zero_grad()
        m(x).square().mean().backward()
        with reads.counting():
            opt.step()
        assert reads.of("upload") == [], reads.calls


# -- staged host copies (issue 15 item 9; guarded_optim/snapshot/transport.py plan_groups) ------------
# Small contiguous tensors go through a bounded device chunk: one gather + one D2H copy per
# round on the side stream. STAGE_BYTES is shrunk here so a capture takes several rounds
# through the same chunk (its reuse is ordered by the side stream alone).

def _small_chunks(monkeypatch, nbytes=4096):
    from guarded_optim import snapshot
    monkeypatch.setattr(snapshot, "STAGE_BYTES", nbytes)
    return snapshot


def test_staged_capture_in_flight_is_ordered_and_exact(monkeypatch):
    _small_chunks(monkeypatch)
    m, opt, x, y = _setup()
    _step(m, opt, x, y)
    snap = opt.safe_snapshot
    assert snap._stage is not None and sum(len(r) for r in snap._stage.rounds.values()) > 1
    expected = [t.detach().clone() for t in list(m.parameters()) + snap._layout.state]
    torch.cuda.synchronize()
    _delay_side_stream(opt)
    snap.capture(opt.step_state.t)                        # several rounds, in flight behind the sleep
    opt.wait_for_snapshot()
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(0)
        for t in snap._layout.state:
            t.zero_()
    snap.synchronize()
    saved = snap._saved_params + snap._saved_state
    assert all(torch.equal(a, b.to(a.device)) for a, b in zip(expected, saved))
    snap.restore()                              # staged H2D + scatter on the current stream
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(expected, list(m.parameters()) + snap._layout.state))


def test_staging_memory_is_bounded_and_transfers_are_one_per_round(monkeypatch):
    snapshot = _small_chunks(monkeypatch)
    m, opt, x, y = _setup()
    _step(m, opt, x, y)
    snap = opt.safe_snapshot
    assert 0 < snap.staging_nbytes() <= 2 * snapshot.STAGE_BYTES
    assert all(t.is_pinned() for t in snap._saved_params + snap._saved_state + snap._saved_buffers)
    calls = {"d2h": 0}
    foreach, copy = torch._foreach_copy_, torch.Tensor.copy_

    def foreach_copy(dst, src, **kw):
        calls["d2h"] += sum(d.device.type == "cpu" and s.is_cuda for d, s in zip(dst, src))
        return foreach(dst, src, **kw)

    def tensor_copy(self, src, *a, **kw):
        calls["d2h"] += self.device.type == "cpu" and src.is_cuda
        return copy(self, src, *a, **kw)

    monkeypatch.setattr(torch, "_foreach_copy_", foreach_copy)
    monkeypatch.setattr(torch.Tensor, "copy_", tensor_copy)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    snap.capture(opt.step_state.t)
    snap.synchronize()
    assert torch.cuda.memory_allocated() == base            # the chunks are reused
    stages = [s for s in (snap._stage, snap._buffer_stage) if s is not None]
    live = list(m.parameters()) + snap._layout.state + snap._layout.buffers
    cuda_rest = sum(1 for s, ts in ((snap._stage, list(m.parameters()) + snap._layout.state),
                                    (snap._buffer_stage, snap._layout.buffers)) if s is not None
                    for i in s.rest if ts[i].is_cuda)
    rounds = sum(len(r) for s in stages for r in s.rounds.values())
    assert calls["d2h"] == rounds + cuda_rest < sum(t.is_cuda for t in live)


# -- drop-in on CUDA: the guarded run equals the bare one ------------------------------------
def _pair_on_cuda(make_inner, probe=True, steps=8, scaler=False, compile_model=False, dropout=0.0):
    """Train a bare and a guarded copy of one model on CUDA; return both final states."""
    finals = []
    for guarded in (False, True):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(dropout), nn.Linear(32, 4)).cuda()
        run = torch.compile(m, mode="reduce-overhead") if compile_model else m
        g = torch.Generator(device="cuda").manual_seed(1)
        xs = torch.randn(steps, 8, 16, device="cuda", generator=g)
        ys = torch.randint(0, 4, (steps, 8), device="cuda", generator=g)
        xp, yp = xs[0], ys[0]
        opt = make_inner(m.parameters())
        if guarded:
            opt = GuardedOptimizer(opt, (lambda: F.cross_entropy(m(xp), yp)) if probe else None)
        amp = torch.amp.GradScaler("cuda") if scaler else None
        torch.manual_seed(2)                     # the dropout masks: the same stream in both
        for x, y in zip(xs, ys):
            opt.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16, enabled=scaler):
                loss = F.cross_entropy(run(x), y)
            if amp is not None:
                amp.scale(loss).backward()
                amp.step(opt)
                amp.update()
            else:
                loss.backward()
                opt.step()
        if guarded:
            assert opt.stats["rollbacks"] == 0 and opt.stats["skipped"] == opt.stats.get(
                "skipped_amp_overflow", 0)
        finals.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*finals):
        assert torch.equal(a, b)


def test_gradscaler_with_fused_adamw_matches_bare():
    _pair_on_cuda(lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True), scaler=True)


def test_capturable_adam_matches_bare():
    _pair_on_cuda(lambda ps: torch.optim.Adam(ps, lr=1e-3, capturable=True))


def test_dropout_without_module_matches_bare_on_cuda():
    """The probe runs on a copy of the RNG streams (CUDA generator included)."""
    _pair_on_cuda(lambda ps: torch.optim.AdamW(ps, lr=1e-3), dropout=0.3)


def test_compiled_model_reduce_overhead_with_a_probe_matches_bare():
    _pair_on_cuda(lambda ps: torch.optim.AdamW(ps, lr=1e-3), compile_model=True)


def test_capturable_adam_rollback_is_exact():
    torch.manual_seed(0)
    m = nn.Linear(16, 4).cuda()
    x, y = torch.randn(8, 16, device="cuda"), torch.randn(8, 4, device="cuda")
    scale = {"k": 1.0}
    opt = GuardedOptimizer(torch.optim.Adam(m.parameters(), lr=1e-3, capturable=True),
                           lambda: F.mse_loss(m(x), y) * scale["k"], module=m)
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(m(x), y).backward()
        opt.step()
    before = [p.detach().clone() for p in m.parameters()]
    state = {k: v.clone() for k, v in opt.state[m.weight].items()}
    scale["k"] = 1e6
    opt.zero_grad()
    F.mse_loss(m(x), y).backward()
    opt.step()
    assert opt.last_decision == "rollback"
    assert all(torch.equal(a, b) for a, b in zip(before, m.parameters()))
    assert all(torch.equal(v, opt.state[m.weight][k]) for k, v in state.items())


# -- NCCL: two GPUs, one process each ---------------------------------------------------------
def _nccl_model(rank, set_device):
    from torch.nn.parallel import DistributedDataParallel as DDP
    if set_device:
        torch.cuda.set_device(rank)
    device = torch.device("cuda", rank)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)).to(device)
    ddp = DDP(model, device_ids=[rank])
    g = torch.Generator().manual_seed(rank)
    xs, ys = torch.randn(6, 4, 8, generator=g).to(device), torch.randn(6, 4, 1, generator=g).to(device)
    return model, ddp, xs, ys


def _nccl_exact(rank, outdir, set_device=True):
    """A LR x1e5 proposal on every rank is rolled back on both, to the same state."""
    model, ddp, xs, ys = _nccl_model(rank, set_device)
    opt = GuardedOptimizer(torch.optim.AdamW(ddp.parameters(), lr=1e-2),
                           lambda: F.mse_loss(model(xs[0]), ys[0]), module=model)
    decisions = []
    for t, (x, y) in enumerate(zip(xs, ys)):
        for g in opt.param_groups:
            g["lr"] = 1e3 if t == 3 else 1e-2
        opt.zero_grad()
        F.mse_loss(ddp(x), y).backward()
        opt.step()
        decisions.append(opt.last_decision)
    return {"decisions": decisions, "params": [p.detach().cpu() for p in model.parameters()]}


def _nccl_exact_no_set_device(rank, outdir):
    return _nccl_exact(rank, outdir, set_device=False)


def _nccl_probe_error(rank, outdir):
    model, ddp, xs, ys = _nccl_model(rank, True)
    calls = {"n": 0}

    def probe():
        calls["n"] += 1
        if rank == 1 and calls["n"] > 2:
            raise RuntimeError("probe failed on rank 1")
        return F.mse_loss(model(xs[0]), ys[0])
    opt = GuardedOptimizer(torch.optim.AdamW(ddp.parameters(), lr=1e-2), probe, module=model)
    raised = None
    for x, y in zip(xs, ys):
        opt.zero_grad()
        F.mse_loss(ddp(x), y).backward()
        try:
            opt.step()
        except Exception as exc:   # every rank raises (none hangs in a collective)
            raised = type(exc).__name__
            break
    return {"raised": raised}


def _fsdp2_cpu_offload(rank, outdir):
    """FSDP2 with CPU offload (parameters and state on the CPU, compute on the GPU), under
    ``init_process_group("cpu:gloo,cuda:nccl")``: the flags reduce over gloo on the CPU; an
    LR x1e5 proposal is rolled back on both ranks, each to its own shard exactly."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard
    torch.cuda.set_device(rank)
    mesh = init_device_mesh("cuda", (2,))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)).cuda()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh, offload_policy=CPUOffloadPolicy())
    fully_shard(model, mesh=mesh, offload_policy=CPUOffloadPolicy())
    g = torch.Generator().manual_seed(rank)
    xs, ys = torch.randn(6, 4, 8, generator=g).cuda(), torch.randn(6, 4, 1, generator=g).cuda()
    opt = GuardedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2),
                           lambda: F.mse_loss(model(xs[0]), ys[0]), module=model)
    params = [p for grp in opt.param_groups for p in grp["params"]]
    decisions, before, after = [], None, None
    for t, (x, y) in enumerate(zip(xs, ys)):
        for grp in opt.param_groups:
            grp["lr"] = 1e3 if t == 3 else 1e-2
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        if t == 3:
            before = [p.to_local().detach().clone() for p in params]
        opt.step()
        if t == 3:
            after = [p.to_local().detach().clone() for p in params]
        decisions.append(opt.last_decision)
    return {"decisions": decisions, "exact": all(torch.equal(a, b) for a, b in zip(before, after)),
            "device": str(params[0].to_local().device)}


NCCL_SCENARIOS = ["exact", "exact_no_set_device", "probe_error"]   # each spawn runs a subset
SCENARIOS = {"exact": _nccl_exact, "exact_no_set_device": _nccl_exact_no_set_device,
             "probe_error": _nccl_probe_error, "fsdp2_cpu_offload": _fsdp2_cpu_offload}


@pytest.mark.skipif(torch.cuda.device_count() < 2 or not torch.distributed.is_nccl_available(),
                    reason="needs two CUDA devices and NCCL")
def test_nccl_ddp_decisions_state_and_probe_errors_agree_across_ranks(tmp_path):
    from test_distributed import _get, spawn
    results = spawn(tmp_path, NCCL_SCENARIOS, world=2, backend="nccl", module="test_cuda")
    ranks = (tmp_path, results)
    for name in ("exact", "exact_no_set_device"):
        a, b = _get(ranks, name)
        assert a["decisions"] == b["decisions"] and a["decisions"][3] == "rollback", name
        assert all(torch.equal(x, y) for x, y in zip(a["params"], b["params"])), name
    assert [r["raised"] for r in _get(ranks, "probe_error")] == ["ProbeError"] * 2


@pytest.mark.skipif(torch.cuda.device_count() < 2 or not torch.distributed.is_nccl_available(),
                    reason="needs two CUDA devices and NCCL")
def test_fsdp2_cpu_offload_rolls_back_each_shard_over_a_gloo_and_nccl_group(tmp_path):
    from test_distributed import _get, spawn
    results = spawn(tmp_path, ["fsdp2_cpu_offload"], world=2, backend="cpu:gloo,cuda:nccl",
                    module="test_cuda")
    for r in _get((tmp_path, results), "fsdp2_cpu_offload"):
        assert r["decisions"][3] == "rollback" and r["exact"] and r["device"] == "cpu"
