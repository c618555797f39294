"""Snapshot: exact capture/restore of params, optimizer state, buffers and RNG."""

import pytest
import torch
import torch.nn.functional as F

import tiny
from guarded_optim import snapshot
from guarded_optim.snapshot import Snapshot, SnapshotRing, plan_groups

cuda = pytest.mark.skipif(not torch.cuda.is_available(),
                          reason="needs a CUDA device: pinned host snapshots and side streams")


def train_steps(m, opt, batches):
    for x, y in batches:
        tiny.closure_for(opt, m, x, y)()
        m(x)  # an extra forward moves the BatchNorm statistics too
        opt.step()


@pytest.mark.parametrize("mode", ["device", "host", "auto"])
@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.AdamW(p, lr=1e-2),
    lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
    lambda p: torch.optim.SGD(p, lr=1e-2),
    lambda p: torch.optim.RMSprop(p, lr=1e-3),
])
def test_restore_is_bit_exact(mode, make_opt):
    m = tiny.model()
    opt = make_opt(m.parameters())
    _, batches = tiny.data(steps=10)
    train_steps(m, opt, batches[:3])
    snap = Snapshot(opt, m, mode=mode)
    snap.capture(step=3)
    before = tiny.full_state(m, opt)
    torch.rand(5)  # move the RNG
    train_steps(m, opt, batches[3:])
    assert not torch.equal(before["param.0.weight"], m[0].weight)
    snap.restore()
    tiny.assert_same(before, tiny.full_state(m, opt))


def test_lazy_state_is_dropped_on_restore():
    m = tiny.model()
    opt = torch.optim.Adam(m.parameters())
    snap = Snapshot(opt, m)
    snap.capture()                       # before Adam has any state
    before = tiny.full_state(m, opt)
    _, batches = tiny.data(steps=2)
    train_steps(m, opt, batches)
    assert len(opt.state) > 0
    snap.restore()
    assert len(opt.state) == 0
    tiny.assert_same(before, tiny.full_state(m, opt))
    train_steps(m, opt, batches)         # and training goes on from there
    snap.capture()
    assert snap.nbytes() > 0


def test_sgd_momentum_buffer_that_appears_later_is_snapshotted():
    m = tiny.model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    _, batches = tiny.data(steps=4)
    snap = Snapshot(opt, m)
    snap.capture()
    train_steps(m, opt, batches[:2])
    snap.capture()                       # now momentum buffers exist
    before = tiny.full_state(m, opt)
    train_steps(m, opt, batches[2:])
    snap.restore()
    tiny.assert_same(before, tiny.full_state(m, opt))


def test_param_group_added_after_capture():
    m = tiny.model()
    extra = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.Adam(m.parameters(), lr=0.1)
    _, batches = tiny.data(steps=4)
    train_steps(m, opt, batches[:1])
    snap = Snapshot(opt, m)
    snap.capture()
    before = tiny.full_state(m, opt)
    opt.add_param_group({"params": [extra]})
    for x, y in batches[1:]:
        opt.zero_grad()
        (F.mse_loss(m(x), y) + extra.sum()).backward()
        opt.step()
    snap.restore()
    assert extra not in opt.state        # state that did not exist at capture is dropped
    tiny.assert_same(before, tiny.full_state(m, opt))   # extra's state is gone, not restored
    snap.capture()                       # rebuilds for the new layout
    assert len(snap._saved_params) == len(list(m.parameters())) + 1


def test_state_dict_round_trip_weights_only(tmp_path):
    m = tiny.model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    _, batches = tiny.data(steps=6)
    train_steps(m, opt, batches[:3])
    snap = Snapshot(opt, m)
    snap.capture(step=3, yhat=0.5)
    before = tiny.full_state(m, opt)
    torch.save(snap.state_dict(), tmp_path / "snap.pt")
    loaded = Snapshot(opt, m)
    sd = torch.load(tmp_path / "snap.pt", weights_only=True)
    loaded.check_state_dict(sd)
    loaded.load_state_dict(sd)
    assert loaded.step == 3 and loaded.meta == {"yhat": 0.5}
    train_steps(m, opt, batches[3:])
    loaded.restore()
    tiny.assert_same(before, tiny.full_state(m, opt))


def test_check_state_dict_rejects_other_layout():
    m, other = tiny.model(), torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(m.parameters())
    snap = Snapshot(opt, m)
    snap.capture()
    foreign = Snapshot(torch.optim.AdamW(other.parameters()), other)
    foreign.capture()
    with pytest.raises(ValueError, match="parameters"):
        snap.check_state_dict(foreign.state_dict())


def test_ring_keeps_newest_and_drops_descendants():
    m = tiny.model()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    src = Snapshot(opt, m)
    ring = SnapshotRing(2, lambda: Snapshot(opt, m))
    values = []
    for step in (10, 20, 30):
        with torch.no_grad():
            m[0].weight.fill_(step)
        src.capture(step=step)
        ring.push(src)
        values.append(step)
    assert [s.step for s in ring] == [20, 30]           # capacity 2: the oldest went
    assert ring.newest_before(30).step == 20
    assert ring.newest_before(20) is None
    ring.newest_before(30).restore()
    assert torch.all(m[0].weight == 20)
    ring.drop_from(25)
    assert [s.step for s in ring] == [20]


def test_invalid_mode():
    m = tiny.model()
    with pytest.raises(ValueError, match="mode"):
        Snapshot(torch.optim.SGD(m.parameters(), lr=0.1), m, mode="gpu")


def test_restore_before_capture_is_an_error():
    m = tiny.model()
    with pytest.raises(RuntimeError, match="capture"):
        Snapshot(torch.optim.SGD(m.parameters(), lr=0.1), m).restore()


@cuda
def test_cuda_host_snapshot_is_pinned_async_and_exact():
    m = tiny.model().cuda()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    _, batches = tiny.data(steps=6)
    batches = [(x.cuda(), y.cuda()) for x, y in batches]
    train_steps(m, opt, batches[:2])
    snap = Snapshot(opt, m, mode="auto")
    assert snap.mode == "host"
    allocated = torch.cuda.memory_allocated()
    snap.capture(step=2)
    assert snap._transport.streams                            # a side stream per device
    # GPU memory: the staging chunks only, each at most STAGE_BYTES (512-byte blocks)
    chunks = list(snap._transport.chunks.values())
    assert chunks and all(c.numel() <= snapshot.STAGE_BYTES for c in chunks)
    assert torch.cuda.memory_allocated() - allocated == sum(-(-c.numel() // 512) * 512 for c in chunks)
    assert all(t.is_pinned() for t in snap._saved_params + snap._saved_state)
    snap.wait()                                                # ordered, no host sync
    before = tiny.full_state(m, opt)
    train_steps(m, opt, batches[2:])
    snap.restore()
    torch.cuda.synchronize()
    tiny.assert_same(before, tiny.full_state(m, opt))


@cuda
def test_cuda_capture_overlaps_and_next_step_waits():
    m = tiny.model().cuda()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    _, batches = tiny.data(steps=3)
    batches = [(x.cuda(), y.cuda()) for x, y in batches]
    train_steps(m, opt, batches[:1])
    snap = Snapshot(opt, m, mode="host")
    snap.capture(step=1)
    expected = [p.detach().cpu().clone() for p in m.parameters()]
    snap.wait()          # the next inner.step() would be ordered after the copy
    train_steps(m, opt, batches[1:])
    snap.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(expected, snap._saved_params))


# -- staged host copies (issue 15 item 9) ---------------------------------------------------
# plan_groups reads only metadata, so CUDA layouts are planned here with CPU tensors and
# devices given; the staged copy path itself runs on CPU once "cpu" is a staged device type.

CUDA0, CUDA1 = torch.device("cuda", 0), torch.device("cuda", 1)


def test_plan_groups_by_device_and_dtype_in_bounded_rounds():
    ts = [torch.zeros(10), torch.zeros(10, dtype=torch.bfloat16), torch.zeros(30), torch.zeros(4, 5),
          torch.zeros(10, dtype=torch.bfloat16), torch.zeros(10), torch.zeros(3)]
    devices = [CUDA0, CUDA0, CUDA0, CUDA0, CUDA0, CUDA1, CUDA1]
    groups, rest = plan_groups(ts, devices, chunk_bytes=160, max_tensor_bytes=160)
    assert rest == []
    assert [(d, dt, n) for d, dt, n, _ in groups] == [
        (CUDA0, torch.float32, 60), (CUDA0, torch.bfloat16, 20), (CUDA1, torch.float32, 13)]
    # float32 on cuda:0: 40 + 120 bytes fill the 160-byte chunk, the 4x5 goes to a second round
    assert groups[0][3] == [[(0, 0, 10), (2, 10, 30)], [(3, 40, 20)]]
    assert groups[1][3] == [[(1, 0, 10), (4, 10, 10)]]
    assert groups[2][3] == [[(5, 0, 10), (6, 10, 3)]]
    for _, dtype, numel, rounds in groups:   # consecutive slices, each round within the chunk
        flat = [m for r in rounds for m in r]
        assert all(a[1] + a[2] == b[1] for a, b in zip(flat, flat[1:]))
        assert flat[-1][1] + flat[-1][2] == numel
        assert all(sum(n for _, _, n in r) * ts[r[0][0]].element_size() <= 160 for r in rounds)


def test_plan_groups_leaves_odd_tensors_to_the_per_tensor_path():
    big, small = torch.zeros(100), torch.zeros(4)
    strided = torch.zeros(4, 4).t()                                   # not contiguous
    cl = torch.zeros(2, 3, 2, 2).to(memory_format=torch.channels_last)
    sparse = torch.zeros(4, 4).to_sparse()
    ts = [big, small, strided, cl, sparse, torch.zeros(0), torch.zeros(4), torch.zeros(4, dtype=torch.int64)]
    groups, rest = plan_groups(ts, [CUDA0] * len(ts), chunk_bytes=1024, max_tensor_bytes=64)
    assert [m[0] for m in groups[0][3][0]] == [1, 6] and len(groups) == 1
    assert rest == [0, 2, 3, 4, 5, 7]           # the lone int64 tensor has nothing to batch with
    assert plan_groups([small, small])[0] == []  # CPU tensors: not staged by default
    assert plan_groups([small, small], device_types=("cpu",))[0] != []


@pytest.fixture
def staged_on_cpu(monkeypatch):
    """Run the staged path on CPU (host mode) with tiny chunks: several rounds per group."""
    monkeypatch.setattr(snapshot, "_STAGE_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(snapshot, "STAGE_BYTES", 256)
    monkeypatch.setattr(snapshot, "STAGE_TENSOR_BYTES", 128)


def _many_small(n_layers=20, width=6):
    torch.manual_seed(0)
    layers = []
    for _ in range(n_layers):
        layers += [torch.nn.Linear(width, width), torch.nn.BatchNorm1d(width), torch.nn.Tanh()]
    big = torch.nn.Linear(width, 64)          # 1.5 KiB weight: above STAGE_TENSOR_BYTES here
    return torch.nn.Sequential(*layers, big, torch.nn.Linear(64, 1))


def _train(m, opt, n, seed=1):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(16, 6, generator=g)
        opt.zero_grad()
        m(x).square().mean().backward()
        opt.step()


@pytest.mark.parametrize("make_opt", [
    lambda p: torch.optim.AdamW(p, lr=1e-2),
    lambda p: torch.optim.SGD(p, lr=1e-2, momentum=0.9),
    lambda p: torch.optim.Adam(p, lr=1e-2, foreach=False),
])
def test_staged_host_restore_is_bit_exact(staged_on_cpu, make_opt):
    m = _many_small()
    opt = make_opt(m.parameters())
    _train(m, opt, 2)
    snap = Snapshot(opt, m, mode="host")
    snap.capture(step=2)
    stage = snap._stage
    assert stage is not None and snap._buffer_stage is not None
    assert sum(len(r) for r in stage.rounds.values()) > 1             # several rounds
    assert len(stage.views) > 100 and stage.rest                     # staged and per-tensor
    saved = snap._saved_params + snap._saved_state
    assert all(saved[i] is v for i, v in stage.views.items())          # host copies are the views
    assert snap.staging_nbytes() <= 2 * snapshot.STAGE_BYTES
    before = tiny.full_state(m, opt)
    _train(m, opt, 3, seed=2)
    assert not torch.equal(before["param.0.weight"], m[0].weight)
    snap.restore()
    tiny.assert_same(before, tiny.full_state(m, opt))
    _train(m, opt, 1, seed=3)                 # captures again after a restore
    snap.capture(step=3)
    again = tiny.full_state(m, opt)
    _train(m, opt, 2, seed=4)
    snap.restore()
    tiny.assert_same(again, tiny.full_state(m, opt))


def test_staged_mixed_dtypes_and_relayout(staged_on_cpu):
    m = _many_small(n_layers=6)
    m[0].to(torch.bfloat16)
    m[3].double()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    snap = Snapshot(opt, m, mode="host")
    snap.capture()
    assert {dt for r in snap._stage.rounds.values() for dt, *_ in r} >= {torch.float32, torch.float64}
    before = tiny.full_state(m, opt)
    opt.state.clear()                          # state re-laid out from the snapshot
    with torch.no_grad():
        for p in m.parameters():
            p.add_(1)
    snap.restore()
    tiny.assert_same(before, tiny.full_state(m, opt))


def _copy_counter(monkeypatch, snap):
    """Count the copies into host buffers (device -> host transfers on CUDA) per call kind,
    and the gathers into a staging chunk (device-side)."""
    counts = {"transfers": 0, "gathers": 0, "calls": 0}

    def is_chunk(t):
        return any(t.untyped_storage().data_ptr() == c.untyped_storage().data_ptr()
                   for c in snap._transport.chunks.values())

    def note(dst):
        if is_chunk(dst):
            counts["gathers"] += 1
        else:
            counts["transfers"] += 1

    foreach, copy = torch._foreach_copy_, torch.Tensor.copy_

    def foreach_copy(dst, src, **kw):
        counts["calls"] += 1
        for d in dst:
            note(d)
        return foreach(dst, src, **kw)

    def tensor_copy(self, src, *a, **kw):
        counts["calls"] += 1
        note(self)
        return copy(self, src, *a, **kw)

    monkeypatch.setattr(torch, "_foreach_copy_", foreach_copy)
    monkeypatch.setattr(torch.Tensor, "copy_", tensor_copy)
    return counts


@pytest.mark.parametrize("staged", [False, True])
def test_staging_turns_per_tensor_transfers_into_one_per_round(monkeypatch, staged):
    if staged:
        monkeypatch.setattr(snapshot, "_STAGE_DEVICE_TYPES", ("cuda", "cpu"))
    m = _many_small(n_layers=30)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    _train(m, opt, 1)
    snap = Snapshot(opt, m, mode="host")
    snap.capture()                               # layout built outside the count
    n = len(snap._saved_params + snap._saved_state + snap._saved_buffers)
    counts = _copy_counter(monkeypatch, snap)
    snap.capture()
    if not staged:
        assert snap._stage is None and counts == {"transfers": n, "gathers": 0, "calls": 2}
        return
    stages = [snap._stage, snap._buffer_stage]
    rounds = sum(len(r) for s in stages for r in s.rounds.values())
    rest = sum(len(s.rest) for s in stages)
    assert counts["transfers"] == rest + rounds < n / 10
    assert counts["gathers"] == sum(len(s.views) for s in stages) == n - rest


def test_staged_ring_copy_state_dict_and_added_params(staged_on_cpu, tmp_path):
    import copy
    import pickle
    m = _many_small(n_layers=5)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    _train(m, opt, 2)
    snap = Snapshot(opt, m, mode="host")
    ring = SnapshotRing(1, lambda: Snapshot(opt, m, mode="host"))
    snap.capture(step=2)
    ring.push(snap)
    slot = ring.newest_before(3)
    assert slot._stage is not None and slot._stage.plan == snap._stage.plan
    before = tiny.full_state(m, opt)
    torch.save(snap.state_dict(), tmp_path / "snap.pt")
    clones = [copy.deepcopy(snap), pickle.loads(pickle.dumps(snap))]
    _train(m, opt, 2, seed=5)
    snap.capture(step=4)
    _train(m, opt, 1, seed=6)
    slot.restore()                               # the ring entry: staged restore
    tiny.assert_same(before, tiny.full_state(m, opt))
    for clone in clones:                         # independent copies, views re-shared
        _train(m, opt, 1, seed=7)
        clone.optimizer, clone.module = opt, m   # same structure, rebound to the live objects
        clone._layout.params, clone._layout.buffers = snapshot._flat_params(opt), list(m.buffers())
        clone.restore()
        tiny.assert_same(before, tiny.full_state(m, opt))
    loaded = Snapshot(opt, m, mode="host")
    sd = torch.load(tmp_path / "snap.pt", weights_only=True)
    loaded.check_state_dict(sd)
    loaded.load_state_dict(sd)
    _train(m, opt, 1, seed=8)
    loaded.restore()
    tiny.assert_same(before, tiny.full_state(m, opt))
    extra = torch.nn.Parameter(torch.ones(3))
    snap.capture(step=5)
    at5 = tiny.full_state(m, opt)
    opt.add_param_group({"params": [extra]})
    snap.add_params([extra])                     # indices shift: per-tensor until re-planned
    assert snap._stage is None
    _train(m, opt, 1, seed=9)
    snap.restore()
    tiny.assert_same(at5, tiny.full_state(m, opt))
    snap.capture(step=6)
    assert snap._stage is not None


def test_host_mode_keeps_lbfgs_history_on_the_host_and_restores_it_exactly():
    """LBFGS's direction history (not a tensor per parameter) is copied to the host in host
    mode (issue 15 item 8: it was cloned on the device at every capture) and put back where
    it lived, bit for bit."""
    from guarded_optim.snapshot import Snapshot
    torch.manual_seed(0)
    m = torch.nn.Linear(6, 2)
    opt = torch.optim.LBFGS(m.parameters(), lr=0.5, history_size=3)
    x, y = torch.randn(16, 6), torch.randn(16, 2)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(m(x), y)
        loss.backward()
        return loss
    for _ in range(3):
        opt.step(closure)
    snap = Snapshot(opt, m, mode="host")
    snap.capture(3)
    state = opt.state[next(iter(opt.state))]
    before = {k: ([t.clone() for t in v] if isinstance(v, list) else
                  v.clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
    saved = snap._others[0]
    assert saved["old_dirs"] and all(t.device.type == "cpu" for t in saved["old_dirs"])
    assert saved["old_dirs"][0].data_ptr() != state["old_dirs"][0].data_ptr()   # a copy
    opt.step(closure)
    snap.restore()
    after = opt.state[next(iter(opt.state))]
    for k, v in before.items():
        if isinstance(v, list):
            assert len(after[k]) == len(v) and all(torch.equal(a, b) for a, b in zip(after[k], v)), k
        elif isinstance(v, torch.Tensor):
            assert torch.equal(after[k], v) and after[k].device == v.device, k
        else:
            assert after[k] == v, k
