"""Recovery actions (ARC, sec. 3.2): LR reduction that lifts back, escape, the verified ring."""

import pytest
import torch
import torch.nn.functional as F

import tiny
from guarded_optim.ladder import Ladder
from guarded_optim import Escape, GuardedOptimizer, ReduceLR, TightenClip, arc_recovery

pytestmark = pytest.mark.usefixtures("one_thread")


def guard(recovery, lr=0.1, **kw):
    m = tiny.model()
    probe_set, batches = tiny.data(steps=80)
    kw.setdefault("ladder", Ladder(rerun=None, on_exhausted="rebaseline"))  # the rollback rungs alone
    opt = GuardedOptimizer(torch.optim.SGD(m.parameters(), lr=lr), tiny.probe_for(m, probe_set),
                           module=m, recovery=recovery, **kw)
    return m, opt, batches


def step(m, opt, batch, spike=1.0):
    for g in opt.param_groups:
        g["lr"] *= spike
    opt.step(tiny.closure_for(opt, m, *batch))
    for g in opt.param_groups:
        g["lr"] /= spike
    return opt.last_decision


def test_reduce_lr_scales_the_proposal_not_the_group_lr_and_lifts_back():
    m, opt, batches = guard([ReduceLR(factor=0.5, patience=3)])
    for b in batches[:5]:
        step(m, opt, b)
    assert step(m, opt, batches[5], spike=1e4) == "rollback"
    assert "lr_scale=0.5" in opt.last_event.action
    before = [p.detach().clone() for p in m.parameters()]
    x, y = batches[6]
    opt.step(tiny.closure_for(opt, m, x, y))
    assert opt.param_groups[0]["lr"] == 0.1                    # what schedulers see
    grads = [p.grad for p in m.parameters()]
    for b, p, g in zip(before, m.parameters(), grads):         # SGD: delta = -lr * scale * g
        torch.testing.assert_close(p.detach(), b - 0.05 * g, rtol=0, atol=1e-7)
    action = opt.recovery[0]
    assert action.scale == 0.5
    for b in batches[7:9]:
        step(m, opt, b)
    assert action.scale == 1.0                                 # 3 healthy steps: lifted back


def test_escape_after_repeated_rollbacks_perturbs_and_asks_to_skip_ahead():
    m, opt, batches = guard([Escape(after=3, scale=1e-3, skip_batches=5)])
    for b in batches[:5]:
        step(m, opt, b)
    safe = [p.detach().clone() for p in m.parameters()]
    rng = torch.get_rng_state()
    events = []
    opt.callbacks.append(events.append)
    for b in batches[5:8]:
        assert step(m, opt, b, spike=1e4) == "rollback"
    assert [e.action for e in events] == [None, "backoff", "backoff,escape"]
    assert events[-1].skip_batches == 5 and opt.stats["escapes"] == 1
    moved = [(p.detach() - s).norm() / s.norm() for p, s in zip(m.parameters(), safe)]
    assert all(0 < float(r) < 1e-2 for r in moved)                # small, but everywhere
    # the guard's own noise generator leaves the global RNG as the rollback restored it
    assert torch.equal(torch.get_rng_state(), rng)


def test_escape_is_reproducible():
    finals = []
    for _ in range(2):
        m, opt, batches = guard([Escape(after=1, scale=1e-2)])
        for b in batches[:3]:
            step(m, opt, b)
        step(m, opt, batches[3], spike=1e4)
        finals.append([p.detach().clone() for p in m.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*finals))


def test_ring_holds_only_verified_states():
    m, opt, batches = guard([], history=2, checkpoint_every=5)
    verified = {}
    for t, b in enumerate(batches[:30]):
        step(m, opt, b, spike=1e4 if t in (7, 13) else 1.0)
        if opt.last_decision == "accept":
            verified[opt.safe_snapshot.step] = [p.detach().clone() for p in m.parameters()]
    assert [s.step for s in opt.snapshot_history] and len(opt.snapshot_history) == 2
    for snap in opt.snapshot_history:
        saved = snap.state_dict()["params"]
        assert all(torch.equal(a, b) for a, b in zip(saved, verified[snap.step]))


def test_recovery_state_round_trips(tmp_path):
    m, opt, batches = guard(arc_recovery())
    for b in batches[:4]:
        step(m, opt, b)
    step(m, opt, batches[4], spike=1e4)
    torch.save(opt.state_dict(), tmp_path / "o.pt")
    m2, opt2, _ = guard(arc_recovery())
    opt2.load_state_dict(torch.load(tmp_path / "o.pt", weights_only=True))
    assert tiny.same([a.state_dict() for a in opt2.recovery], [a.state_dict() for a in opt.recovery])
    assert opt2.recovery[0].scale == 0.5
    m3, opt3, _ = guard([])
    with pytest.raises(ValueError, match="recovery"):
        opt3.load_state_dict(torch.load(tmp_path / "o.pt", weights_only=True))


@pytest.mark.parametrize("kwargs", [dict(factor=1.0), dict(factor=0.0), dict(min_scale=0), dict(patience=0)])
def test_reduce_lr_validates(kwargs):
    with pytest.raises(ValueError):
        ReduceLR(**kwargs)


def test_tighten_clip_clips_only_inside_its_window():
    m, opt, batches = guard([TightenClip(factor=0.5, duration=2)])
    for b in batches[:5]:
        step(m, opt, b)
    action = opt.recovery[0]
    assert action.clipped == 0                                 # no clipping before a rollback
    assert step(m, opt, batches[5], spike=1e4) == "rollback"
    reference = action.reference.clone()
    x, y = batches[6]
    opt.zero_grad()
    F.mse_loss(m(x), y).backward()
    raw = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in m.parameters()]))
    opt.step()
    clipped = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in m.parameters()]))
    torch.testing.assert_close(clipped, torch.minimum(raw, 0.5 * reference))
    step(m, opt, batches[7])
    step(m, opt, batches[8])
    assert action.clipped == 2 and action.left == 0            # the window has closed
