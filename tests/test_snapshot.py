"""Snapshot: exact capture/restore of params, optimizer state, buffers and RNG."""

import pytest
import torch
import torch.nn.functional as F

import tiny
from guarded_optim.snapshot import Snapshot, SnapshotRing

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
    assert snap.mode == "host" and snap._stream is not None
    allocated = torch.cuda.memory_allocated()
    snap.capture(step=2)
    assert torch.cuda.memory_allocated() == allocated          # no GPU memory
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
