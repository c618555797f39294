"""Fault injection: silent outside the window, exactly the claimed damage inside, seeded."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from guarded_optim import GuardedOptimizer
from guarded_optim.faults import (
    FAULTS, CorruptOptimizerState, CorruptWeights, Fault, FaultSchedule, LRSpike,
    NonFiniteGradients, NonFiniteLoss, RankCollapse, ScaleGradients, SlowDrift,
    SparsityInjection, make_fault,
)

START, LENGTH = 5, 2


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make(seed=0, opt_cls=torch.optim.Adam, warm=2):
    """Linear-BatchNorm1d-Linear with ``warm`` Adam steps taken (so state exists)."""
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3))
    opt = opt_cls(m.parameters(), lr=1e-2)
    x, y = torch.randn(16, 4), torch.randn(16, 3)
    for _ in range(warm):
        opt.zero_grad()
        F.mse_loss(m(x), y).backward()
        opt.step()
    return m, opt, x, y


def backward(m, opt, x, y, fault=None, t=0):
    opt.zero_grad()
    loss = F.mse_loss(m(x), y)
    if fault is not None:
        loss = fault.loss(t, loss)
    loss.backward()
    return loss


def params(opt):
    return [p for g in opt.param_groups for p in g["params"]]


def snapshot(m, opt):
    """Everything a fault could touch, cloned."""
    return {
        "params": [p.detach().clone() for p in params(opt)],
        "grads": [p.grad.clone() if p.grad is not None else None for p in params(opt)],
        "state": [{k: (v.clone() if torch.is_tensor(v) else v) for k, v in opt.state[p].items()}
                  for p in params(opt)],
        "lr": [g["lr"] for g in opt.param_groups],
        "buffers": [b.clone() for b in m.buffers()],
    }


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t


def same(a, b) -> bool:
    """Bit-identical nested snapshots."""
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(bits(a), bits(b))
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def all_faults():
    """One instance of every fault class and mode, window [START, START + LENGTH)."""
    kw = dict(start=START, length=LENGTH, seed=3)
    return [
        ScaleGradients(**kw), NonFiniteGradients(**kw), NonFiniteLoss(**kw), LRSpike(**kw),
        *[CorruptWeights(mode=mode, **kw) for mode in ("zero", "scale", "nan", "inf", "bitflip", "noise")],
        CorruptWeights(mode="zero", fraction=0.5, **kw),
        *[CorruptOptimizerState(mode=mode, **kw) for mode in ("scale", "nan", "zero")],
        SlowDrift(**kw), SparsityInjection(**kw), RankCollapse(**kw),
    ] + [make_fault(name, START, LENGTH, seed=3) for name in FAULTS]


def full_step(m, opt, x, y, fault, t):
    backward(m, opt, x, y, fault, t)
    if fault is not None:
        fault.before_step(t, opt)
    opt.step()
    if fault is not None:
        fault.after_step(t, opt)


@pytest.mark.parametrize("t", [START - 1, START + LENGTH, 0, 100])
@pytest.mark.parametrize("fault", all_faults(), ids=lambda f: repr(f)[:60])
def test_silent_outside_window(fault, t):
    a, b = make(), make()
    assert not fault.active(t)
    full_step(*a, fault, t)
    full_step(*b, None, t)
    sa, sb = snapshot(a[0], a[1]), snapshot(b[0], b[1])
    assert same(sa, sb)
    assert all(torch.isfinite(p).all() for p in sa["params"])
    # and the hook returns the loss object unchanged
    loss = torch.tensor(1.5)
    assert fault.loss(t, loss) is loss


def test_windows():
    f = Fault(START, LENGTH)
    assert [t for t in range(20) if f.active(t)] == [START, START + 1]
    assert f.name == "Fault" and ScaleGradients(0).name == "ScaleGradients"
    assert ScaleGradients(3).length == 1 and ScaleGradients(3).factor == 300.0


# ---------------------------------------------------------------- gradients and loss


def test_scale_gradients_exact():
    m, opt, x, y = make()
    backward(m, opt, x, y)
    before = [p.grad.clone() for p in params(opt)]
    ScaleGradients(START, LENGTH, factor=300.0).before_step(START, opt)
    for g0, p in zip(before, params(opt)):
        assert torch.equal(p.grad, g0 * 300.0)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_gradients_one_element(value):
    m, opt, x, y = make()
    backward(m, opt, x, y)
    before = [p.grad.clone() for p in params(opt)]
    NonFiniteGradients(START, LENGTH, value=value).before_step(START + 1, opt)
    bad = torch.cat([(~torch.isfinite(p.grad)).reshape(-1) for p in params(opt)])
    assert int(bad.sum()) == 1
    flat = torch.cat([p.grad.reshape(-1) for p in params(opt)])
    assert torch.equal(flat[~bad], torch.cat([g.reshape(-1) for g in before])[~bad])
    v = flat[bad][0]
    assert math.isnan(v) if math.isnan(value) else v == value


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_loss_via_hook(value):
    m, opt, x, y = make()
    f = NonFiniteLoss(START, LENGTH, value=value)
    loss = backward(m, opt, x, y, FaultSchedule([f]), START)
    assert not torch.isfinite(loss)
    v = float(loss.detach())
    assert math.isnan(v) if math.isnan(value) else v == value
    for p in params(opt):  # the gradients are non-finite too
        assert not torch.isfinite(p.grad).any()
    # before_step/after_step do nothing
    snap = snapshot(m, opt)
    f.before_step(START, opt), f.after_step(START, opt)
    assert same(snap, snapshot(m, opt))


# ---------------------------------------------------------------- learning rate


def test_lr_spike_multiplies_then_restores():
    m, opt, x, y = make()
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(2))], "lr": 3e-3})
    lrs = [g["lr"] for g in opt.param_groups]
    f = LRSpike(START, LENGTH, factor=1000.0)
    for t in (START, START + 1):
        f.before_step(t, opt)
        assert [g["lr"] for g in opt.param_groups] == [lr * 1000.0 for lr in lrs]
        f.after_step(t, opt)
        assert [g["lr"] for g in opt.param_groups] == lrs


def test_lr_spike_restores_saved_value_even_if_changed_in_between():
    m, opt, x, y = make()
    f = LRSpike(START, 1, factor=50.0)
    f.before_step(START, opt)
    opt.param_groups[0]["lr"] = 123.0  # e.g. a scheduler stepped in between
    f.after_step(START, opt)
    assert opt.param_groups[0]["lr"] == 1e-2


def test_lr_spike_changes_the_update():
    # Adam's update is ~lr per element: a x1000 spike moves the weights ~1000x further
    flat = lambda opt: torch.cat([p.detach().reshape(-1) for p in params(opt)])
    ref = flat(make()[1])
    a, b = make(), make()
    full_step(*a, LRSpike(START, 1, factor=1000.0), START)
    full_step(*b, None, START)
    assert (flat(a[1]) - ref).norm() > 100 * (flat(b[1]) - ref).norm()
    assert a[1].param_groups[0]["lr"] == b[1].param_groups[0]["lr"] == 1e-2


# ---------------------------------------------------------------- weights


def test_weights_zero_all_and_fraction():
    m, opt, x, y = make()
    backward(m, opt, x, y)
    CorruptWeights(START, mode="zero").before_step(START, opt)
    assert all((p == 0).all() for p in params(opt))

    m, opt, x, y = make()
    before = [p.detach().clone() for p in params(opt)]
    CorruptWeights(START, mode="zero", fraction=0.5).before_step(START, opt)
    for p0, p in zip(before, params(opt)):
        k = round(0.5 * p.numel())
        changed = p0 != p
        assert int(changed.sum()) == k and (p[changed] == 0).all()  # (init weights are nonzero)


def test_weights_scale():
    m, opt, x, y = make()
    before = [p.detach().clone() for p in params(opt)]
    CorruptWeights(START, mode="scale", factor=1e4).before_step(START, opt)
    for p0, p in zip(before, params(opt)):
        assert torch.equal(p, p0 * 1e4)


@pytest.mark.parametrize("mode", ["nan", "inf"])
def test_weights_one_nonfinite(mode):
    m, opt, x, y = make()
    CorruptWeights(START, mode=mode, seed=1).before_step(START, opt)
    flat = torch.cat([p.detach().reshape(-1) for p in params(opt)])
    bad = ~torch.isfinite(flat)
    assert int(bad.sum()) == 1
    assert torch.isnan(flat[bad]).all() if mode == "nan" else (flat[bad] == float("inf")).all()


def popcount(x: torch.Tensor) -> int:
    return sum(bin(int(v) & 0xFFFFFFFF).count("1") for v in x.reshape(-1))


@pytest.mark.parametrize("n_bits,bit", [(1, None), (5, None), (1, 30), (3, 30), (2, 31), (4, 0)])
def test_bitflip_changes_exactly_bits(n_bits, bit):
    for seed in range(4):
        m, opt, x, y = make()
        before = [bits(p.detach().clone()) for p in params(opt)]
        CorruptWeights(START, mode="bitflip", bits=n_bits, bit=bit, seed=seed).before_step(START, opt)
        diff = torch.cat([(bits(p.detach()) ^ b0).reshape(-1) for b0, p in zip(before, params(opt))])
        assert popcount(diff) == n_bits
        if bit is not None:  # only that bit position ever changes
            assert ((diff & ~((1 << bit) if bit < 31 else -(1 << 31))) == 0).all()


def test_bitflip_exponent_bit_is_catastrophic():
    m, opt, x, y = make()
    CorruptWeights(START, mode="bitflip", bit=30).before_step(START, opt)
    # |w| < 2 for these inits: setting bit 30 multiplies by 2**128 -> >1e30 or inf
    assert max(p.detach().abs().max() for p in params(opt)) > 1e30


def test_weights_noise():
    m, opt, x, y = make()
    before = [p.detach().clone() for p in params(opt)]
    CorruptWeights(START, mode="noise", scale=0.5).before_step(START, opt)
    d = torch.cat([(p.detach() - p0).reshape(-1) for p0, p in zip(before, params(opt))])
    assert (d != 0).all() and 0.3 < float(d.std()) < 0.7


def test_bad_modes_rejected():
    with pytest.raises(ValueError):
        CorruptWeights(0, mode="melt")
    with pytest.raises(ValueError):
        CorruptWeights(0, mode="bitflip", bit=32)
    with pytest.raises(ValueError):
        CorruptOptimizerState(0, mode="melt")
    with pytest.raises(ValueError):
        make_fault("no_such_fault", 0, 1)


# ---------------------------------------------------------------- optimizer state


@pytest.mark.parametrize("mode", ["scale", "nan", "zero"])
def test_optimizer_state_corrupted(mode):
    m, opt, x, y = make()
    before = [opt.state[p]["exp_avg_sq"].clone() for p in params(opt)]
    avg = [opt.state[p]["exp_avg"].clone() for p in params(opt)]
    CorruptOptimizerState(START, mode=mode, factor=1e6).before_step(START, opt)
    for v0, a0, p in zip(before, avg, params(opt)):
        v = opt.state[p]["exp_avg_sq"]
        if mode == "scale":
            assert torch.equal(v, v0 * 1e6)
        elif mode == "nan":
            assert torch.isnan(v).all()
        else:
            assert (v == 0).all()
        assert torch.equal(opt.state[p]["exp_avg"], a0)  # other keys untouched


def test_optimizer_state_skips_without_state():
    m, opt, x, y = make(warm=0)
    backward(m, opt, x, y)
    f = CorruptOptimizerState(START)
    f.before_step(START, opt)
    assert len(opt.state) == 0  # no entries created
    m, opt, x, y = make(opt_cls=torch.optim.SGD)  # SGD: no exp_avg_sq
    snap = snapshot(m, opt)
    f.before_step(START, opt)
    assert same(snap, snapshot(m, opt))


def test_works_through_guarded_optimizer():
    m, inner, x, y = make()
    opt = GuardedOptimizer(inner, None, module=m)
    before = [inner.state[p]["exp_avg_sq"].clone() for p in params(inner)]
    CorruptOptimizerState(START, factor=10.0).before_step(START, opt)
    assert all(torch.equal(inner.state[p]["exp_avg_sq"], v * 10.0) for v, p in zip(before, params(inner)))
    f = LRSpike(START, factor=7.0)
    f.before_step(START, opt)
    assert inner.param_groups[0]["lr"] == 1e-2 * 7.0
    f.after_step(START, opt)
    assert inner.param_groups[0]["lr"] == 1e-2


# ---------------------------------------------------------------- drift, sparsity, rank


def test_slow_drift_small_change_every_param():
    m, opt, x, y = make()
    snaps = [[p.detach().clone() for p in params(opt)]]
    f = SlowDrift(START, LENGTH, scale=1e-3)
    for t in (START, START + 1):
        f.before_step(t, opt)
        snaps.append([p.detach().clone() for p in params(opt)])
    for prev, cur in zip(snaps, snaps[1:]):
        for p0, p in zip(prev, cur):
            d = (p - p0).abs()
            assert (d > 0).all()  # every element of every param moves...
            assert d.max() < 1e-2 * max(float(p0.abs().max()), 1.0)  # ...by a small amount


@pytest.mark.parametrize("fraction", [0.9, 0.5, 0.33])
def test_sparsity(fraction):
    m, opt, x, y = make()
    before = [p.detach().clone() for p in params(opt)]
    SparsityInjection(START, fraction=fraction).before_step(START, opt)
    for p0, p in zip(before, params(opt)):
        if p.dim() != 2:
            assert torch.equal(p, p0)
            continue
        zero = p == 0
        assert zero.float().mean() >= fraction
        # the survivors are untouched and at least as large as every zeroed weight
        assert torch.equal(p[~zero], p0[~zero])
        assert p0[~zero].abs().min() >= p0[zero].abs().max()


@pytest.mark.parametrize("rank", [1, 2])
def test_rank_collapse(rank):
    m, opt, x, y = make()
    before = [p.detach().clone() for p in params(opt)]
    RankCollapse(START, rank=rank).before_step(START, opt)
    n2 = 0
    for p0, p in zip(before, params(opt)):
        if p.dim() != 2:
            assert torch.equal(p, p0)
            continue
        n2 += 1
        assert int(torch.linalg.matrix_rank(p.detach())) == rank
        assert torch.allclose(torch.linalg.matrix_norm(p.detach()), torch.linalg.matrix_norm(p0), rtol=1e-5)
        assert not torch.allclose(p, p0)
    assert n2 == 2


# ---------------------------------------------------------------- seeds, schedule, registry


SEEDED = [
    lambda s: NonFiniteGradients(START, seed=s),
    lambda s: CorruptWeights(START, mode="nan", seed=s),
    lambda s: CorruptWeights(START, mode="zero", fraction=0.5, seed=s),
    lambda s: CorruptWeights(START, mode="bitflip", bits=3, seed=s),
    lambda s: CorruptWeights(START, mode="noise", seed=s),
    lambda s: SlowDrift(START, seed=s),
]


def corrupted(fault):
    m, opt, x, y = make()
    backward(m, opt, x, y)
    fault.before_step(START, opt)
    return snapshot(m, opt)


@pytest.mark.parametrize("build", SEEDED, ids=lambda b: repr(b(0))[:50])
def test_seed_reproducible_and_distinct(build):
    a, b, c = corrupted(build(0)), corrupted(build(0)), corrupted(build(1))
    assert same(a, b)
    assert not same(a, c)


def test_seed_and_step_both_matter():
    # seed + t: the same fault differs between the steps of its window
    f = CorruptWeights(START, length=2, mode="noise", seed=0)
    m, opt, x, y = make()
    p0 = params(opt)[0].detach().clone()
    f.before_step(START, opt)
    p1 = params(opt)[0].detach().clone()
    f.before_step(START + 1, opt)
    p2 = params(opt)[0].detach().clone()
    assert not torch.equal(p1 - p0, p2 - p1)


@pytest.mark.parametrize("build", [
    lambda s: ScaleGradients(START, seed=s), lambda s: SparsityInjection(START, seed=s),
    lambda s: RankCollapse(START, seed=s), lambda s: CorruptOptimizerState(START, seed=s),
    lambda s: CorruptWeights(START, mode="scale", seed=s),
])
def test_deterministic_faults_ignore_seed(build):
    a, b = corrupted(build(0)), corrupted(build(1))
    assert same(a, b)
    assert not same(a, corrupted(Fault(START)))  # and they did change something


def test_schedule_applies_in_order():
    m, opt, x, y = make()
    backward(m, opt, x, y)
    before = [p.detach().clone() for p in params(opt)]
    grads = [p.grad.clone() for p in params(opt)]
    sched = FaultSchedule([
        CorruptWeights(START, mode="scale", factor=2.0),
        SparsityInjection(START, fraction=0.5),
        ScaleGradients(START, factor=3.0),
        LRSpike(START, factor=10.0),
        LRSpike(START, factor=5.0),
    ])
    sched.before_step(START, opt)
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 50.0)
    for p0, g0, p in zip(before, grads, params(opt)):
        assert torch.equal(p.grad, g0 * 3.0)
        if p.dim() == 2:  # sparsity after scaling: the zeros are exactly the smallest 2*|w|
            exp = p0 * 2.0
            k = math.ceil(0.5 * p.numel())
            idx = torch.topk(exp.abs().reshape(-1), k, largest=False).indices
            exp.view(-1)[idx] = 0
            assert torch.equal(p, exp)
        else:
            assert torch.equal(p, p0 * 2.0)
    sched.after_step(START, opt)
    assert opt.param_groups[0]["lr"] == 1e-2  # nested spikes undone in reverse order

    # order matters: noise then zero leaves zeros; zero then noise does not
    a = corrupted(FaultSchedule([CorruptWeights(START, mode="noise"), CorruptWeights(START, mode="zero")]))
    b = corrupted(FaultSchedule([CorruptWeights(START, mode="zero"), CorruptWeights(START, mode="noise")]))
    assert all((p == 0).all() for p in a["params"]) and not all((p == 0).all() for p in b["params"])


def test_schedule_loss_chain():
    sched = FaultSchedule([Fault(0), NonFiniteLoss(START, value=float("inf"))])
    loss = torch.tensor(2.0)
    assert sched.loss(START - 1, loss) is loss
    assert sched.loss(START, loss) == float("inf")
    assert FaultSchedule().loss(START, loss) is loss


def test_make_fault_covers_every_name():
    required = {"grad_x300", "nan_grad", "inf_grad", "nan_loss", "lr_x50", "lr_x1000",
                "lr_x100000", "weights_zero", "weights_x1e4", "bitflip", "adam_state_x1e6",
                "adam_state_nan", "slow_drift", "sparsity_90", "rank_collapse"}
    assert required <= set(FAULTS) and len(set(FAULTS)) == len(FAULTS)
    for name in FAULTS:
        f = make_fault(name, START, LENGTH, seed=4)
        assert isinstance(f, Fault)
        assert (f.start, f.length, f.seed) == (START, LENGTH, 4)
        # each named fault does something inside its window (through the full loop protocol)
        a, b = make(), make()
        full_step(*a, f, START)
        full_step(*b, None, START)
        assert not same(snapshot(a[0], a[1]), snapshot(b[0], b[1])), name
    assert make_fault("lr_x50", 0, 1).factor == 50.0
    assert make_fault("grad_x300", 0, 1, factor=7.0).factor == 7.0  # kw overrides
    assert make_fault("bitflip", 0, 1).bit == 30
