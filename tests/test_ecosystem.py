"""GuardedOptimizer inside the PyTorch ecosystem.

The guard must be a drop-in ``torch.optim.Optimizer``: schedulers, ``GradScaler``, gradient
accumulation, step hooks, ``add_param_group``, closures and every stock inner optimizer
(LBFGS included) must behave exactly as with the bare optimizer whenever nothing is
rejected, and a rejected step must leave the run exactly as it was before that step.
"""

from __future__ import annotations

import contextlib
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import lr_scheduler
from torch.optim.optimizer import (register_optimizer_step_post_hook,
                                   register_optimizer_step_pre_hook)

from guarded_optim import GuardedOptimizer

# -- fixed data: a noisy linear regression, a 16-sample probe set, 48 training batches --------
_G = torch.Generator().manual_seed(1234)
_W = torch.randn(4, 1, generator=_G)
PROBE_X = torch.randn(16, 4, generator=_G)
PROBE_Y = PROBE_X @ _W
BATCHES = []
for _ in range(48):
    _x = torch.randn(32, 4, generator=_G)
    BATCHES.append((_x, _x @ _W + 0.1 * torch.randn(32, 1, generator=_G)))

SPIKE = 1e4  # an lr x1e4 step: the default RelativeThreshold must reject it


def make_model(seed: int = 0, bn: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    norm = nn.BatchNorm1d(16) if bn else nn.Identity()
    return nn.Sequential(nn.Linear(4, 16), norm, nn.ReLU(), nn.Linear(16, 1))


def make_guard(model: nn.Module, inner: torch.optim.Optimizer, **kwargs) -> GuardedOptimizer:
    return GuardedOptimizer(inner, probe=lambda: F.mse_loss(model(PROBE_X), PROBE_Y),
                            module=model, **kwargs)


def batch_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def make_closure(model, opt, batch, calls=None):
    def closure():
        if calls is not None:
            calls.append(1)
        opt.zero_grad()
        loss = batch_loss(model, batch)
        loss.backward()
        return loss
    return closure


def train_step(model, opt, batch, closure: bool = False):
    """One optimizer step; returns what ``opt.step`` returned."""
    if closure:
        return opt.step(make_closure(model, opt, batch))
    opt.zero_grad()
    batch_loss(model, batch).backward()
    return opt.step()


@contextlib.contextmanager
def lr_spike(opt, factor: float = SPIKE, groups=None):
    """Multiply the lr of ``groups`` (default: all) by ``factor`` for the block, then put it back."""
    groups = list(range(len(opt.param_groups))) if groups is None else groups
    saved = {i: opt.param_groups[i]["lr"] for i in groups}
    for i in groups:
        opt.param_groups[i]["lr"] = saved[i] * factor
    try:
        yield
    finally:
        for i in groups:
            opt.param_groups[i]["lr"] = saved[i]


def _clone(v):
    if isinstance(v, torch.Tensor):
        return v.detach().clone()
    if isinstance(v, (list, tuple)):
        return type(v)(_clone(x) for x in v)
    return copy.deepcopy(v)


def full_state(model: nn.Module, opt) -> dict:
    """Everything a rollback must restore: params, buffers, optimizer state, CPU RNG."""
    out = {f"param.{k}": _clone(v) for k, v in model.named_parameters()}
    out.update({f"buffer.{k}": _clone(v) for k, v in model.named_buffers()})
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        for k, v in opt.state.get(p, {}).items():
            out[f"state.{i}.{k}"] = _clone(v)
    out["rng"] = torch.get_rng_state()
    return out


def _bit_equal(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
                and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b))
    if isinstance(a, (list, tuple)):
        return (isinstance(b, (list, tuple)) and len(a) == len(b)
                and all(_bit_equal(x, y) for x, y in zip(a, b)))
    return a == b


def assert_bit_equal(a: dict, b: dict, ignore=("rng",)) -> None:
    a = {k: v for k, v in a.items() if k not in ignore}
    b = {k: v for k, v in b.items() if k not in ignore}
    assert a.keys() == b.keys(), sorted(a.keys() ^ b.keys())
    bad = [k for k in a if not _bit_equal(a[k], b[k])]
    assert not bad, f"not bit-identical: {bad}"


def assert_same_model(m1: nn.Module, m2: nn.Module) -> None:
    for (n, p), (_, q) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(p, q), n


INNERS = {
    "sgd_momentum": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.05),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.01),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=0.005),
    "adagrad": lambda ps: torch.optim.Adagrad(ps, lr=0.05),
    "lbfgs": lambda ps: torch.optim.LBFGS(ps, lr=0.5, max_iter=4, history_size=5),
}
NEEDS_CLOSURE = {"lbfgs"}


# =============================================================================================
# 1. wrapper basics
# =============================================================================================

def test_guard_is_an_optimizer_sharing_the_inner_attributes():
    m = make_model()
    inner = torch.optim.Adam(m.parameters(), lr=0.01, weight_decay=1e-4)
    opt = make_guard(m, inner)
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups
    assert opt.state is inner.state
    assert opt.defaults == inner.defaults and opt.defaults["weight_decay"] == 1e-4

    for b in BATCHES[:3]:
        train_step(m, opt, b)
    assert opt.last_decision == "accept" and opt.stats["accepted"] == 3
    assert len(inner.state) == len(list(m.parameters()))  # Adam's state lives in the inner

    before = opt.param_groups
    opt.load_state_dict(opt.state_dict())
    assert opt.param_groups is opt.inner.param_groups and opt.state is opt.inner.state
    assert before is not opt.param_groups  # torch replaced the list: the guard follows it

    plain = torch.optim.Adam(make_model().parameters(), lr=0.01, weight_decay=1e-4)
    plain.load_state_dict(inner.state_dict())
    before = opt.param_groups
    opt.inner.load_state_dict(plain.state_dict())
    assert opt.param_groups is opt.inner.param_groups and opt.state is opt.inner.state
    assert before is not opt.param_groups

    # a group setting written through the guard is the inner optimizer's setting
    opt.param_groups[0]["lr"] = 0.002
    assert inner.param_groups[0]["lr"] == 0.002
    train_step(m, opt, BATCHES[3])
    assert opt.last_decision == "accept"
    assert all(int(s["step"]) == 4 for s in inner.state.values())


def test_rollback_after_reloading_state_dicts_restores_exactly():
    m = make_model()
    opt = make_guard(m, torch.optim.Adam(m.parameters(), lr=0.01))
    for b in BATCHES[:3]:
        train_step(m, opt, b)
    opt.load_state_dict(opt.state_dict())
    train_step(m, opt, BATCHES[3])
    opt.inner.load_state_dict(copy.deepcopy(opt.inner.state_dict()))  # new state tensors
    before = full_state(m, opt)
    with lr_spike(opt):
        train_step(m, opt, BATCHES[4])
    assert opt.last_decision == "rollback"
    assert_bit_equal(before, full_state(m, opt), ignore=())
    train_step(m, opt, BATCHES[5])
    assert opt.last_decision == "accept"
    assert all(int(s["step"]) == 5 for s in opt.state.values())


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_acts_on_the_gradients(set_to_none):
    m = make_model()
    opt = make_guard(m, torch.optim.SGD(m.parameters(), lr=0.05))
    batch_loss(m, BATCHES[0]).backward()
    grads = {p: p.grad for p in m.parameters()}
    assert all(g is not None and g.abs().sum() > 0 for g in grads.values())
    opt.zero_grad(set_to_none=set_to_none)
    for p in m.parameters():
        if set_to_none:
            assert p.grad is None
        else:
            assert p.grad is grads[p] and torch.count_nonzero(p.grad) == 0


def _model_with_late_head():
    m = make_model()
    head = nn.Linear(4, 1)
    head.requires_grad_(False)  # not trained until its group is added

    def loss_fn(batch):
        x, y = batch
        return F.mse_loss(m(x) + head(x), y)

    probe = lambda: F.mse_loss(m(PROBE_X) + head(PROBE_X), PROBE_Y)  # noqa: E731
    return m, head, loss_fn, probe


def _step_with(opt, loss_fn, batch):
    opt.zero_grad()
    loss_fn(batch).backward()
    opt.step()
    return opt.last_decision


def test_add_param_group_through_the_guard_trains_the_new_params():
    m, head, loss_fn, probe = _model_with_late_head()
    inner = torch.optim.Adam(m.parameters(), lr=0.01)
    opt = GuardedOptimizer(inner, probe=probe, module=m)
    for b in BATCHES[:3]:
        assert _step_with(opt, loss_fn, b) == "accept"
    head.requires_grad_(True)
    opt.add_param_group({"params": list(head.parameters()), "lr": 0.02})
    assert len(inner.param_groups) == 2 and opt.param_groups is inner.param_groups
    assert inner.param_groups[1]["params"] == list(head.parameters())
    assert inner.param_groups[1]["lr"] == 0.02
    assert inner.param_groups[1]["betas"] == inner.defaults["betas"]  # defaults were filled in

    start = [p.detach().clone() for p in head.parameters()]
    for b in BATCHES[3:7]:
        assert _step_with(opt, loss_fn, b) == "accept"
    assert all(not torch.equal(a, p) for a, p in zip(start, head.parameters()))
    assert all(int(inner.state[p]["step"]) == 4 for p in head.parameters())
    assert all(int(inner.state[p]["step"]) == 7 for p in m.parameters())

    # the snapshot grew with the group: a rollback now restores the new params too
    _assert_rollback_restores_head(opt, m, head, loss_fn, BATCHES[7])


def _assert_rollback_restores_head(opt, m, head, loss_fn, batch):
    """A rejected step restores the late head's params together with everything else."""
    before = full_state(m, opt)
    before.update({f"head.{k}": v.detach().clone() for k, v in head.named_parameters()})
    with lr_spike(opt):
        assert _step_with(opt, loss_fn, batch) == "rollback"
    after = full_state(m, opt)
    after.update({f"head.{k}": v.detach().clone() for k, v in head.named_parameters()})
    assert_bit_equal(before, after, ignore=())


@pytest.mark.parametrize("inner_name", ["adam", "sgd"])
def test_rollback_right_after_add_param_group_drops_state_that_did_not_exist(inner_name):
    m, head, loss_fn, probe = _model_with_late_head()
    inner = INNERS[inner_name](m.parameters())
    stateful = inner_name == "adam"
    opt = GuardedOptimizer(inner, probe=probe, module=m)
    for b in BATCHES[:3]:
        _step_with(opt, loss_fn, b)
    old = full_state(m, opt)
    head.requires_grad_(True)
    opt.add_param_group({"params": list(head.parameters()), "lr": 0.01})

    # the rejected step creates Adam state for the new params; the snapshot predates them.
    # Only the old group is spiked, so the rejection is caused by the old params.
    with lr_spike(opt, groups=[0]):
        assert _step_with(opt, loss_fn, BATCHES[3]) == "rollback"
    assert opt.stats["rollbacks"] == 1
    assert all(not inner.state.get(p) for p in head.parameters())  # state dropped
    assert set(k for k, v in inner.state.items() if v) == (set(m.parameters()) if stateful else set())
    assert_bit_equal(old, full_state(m, opt), ignore=())  # old params/state/buffers exact
    assert len(inner.param_groups) == 2  # the group itself stays

    # consistent afterwards: the new params get fresh state and train, the old ones resume
    head_before = [p.detach().clone() for p in head.parameters()]
    for b in BATCHES[4:7]:
        assert _step_with(opt, loss_fn, b) == "accept"
    if stateful:
        assert all(int(inner.state[p]["step"]) == 3 for p in head.parameters())
        assert all(int(inner.state[p]["step"]) == 6 for p in m.parameters())
    assert all(not torch.equal(a, p) for a, p in zip(head_before, head.parameters()))

    # the snapshot now covers the new params: a later rollback restores them too
    _assert_rollback_restores_head(opt, m, head, loss_fn, BATCHES[7])


@pytest.mark.parametrize("inner_name", ["sgd", "adam"])
def test_rollback_right_after_add_param_group_restores_the_new_params(inner_name):
    """Rollback means 'the step never happened', for params added since the last capture too."""
    m, head, loss_fn, probe = _model_with_late_head()
    inner = INNERS[inner_name](m.parameters())
    opt = GuardedOptimizer(inner, probe=probe, module=m)
    for b in BATCHES[:3]:
        _step_with(opt, loss_fn, b)
    head.requires_grad_(True)
    opt.add_param_group({"params": list(head.parameters())})
    head_before = [p.detach().clone() for p in head.parameters()]
    with lr_spike(opt):
        assert _step_with(opt, loss_fn, BATCHES[3]) == "rollback"
    assert all(torch.equal(a, p) for a, p in zip(head_before, head.parameters())), \
        "the rejected update is still applied to the newly added params"
    # and the run is not stuck behind the damage
    assert _step_with(opt, loss_fn, BATCHES[4]) == "accept"


def test_step_hooks_pre_on_every_call_post_only_on_accept():
    m = make_model()
    opt = make_guard(m, torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9))
    pre, post = [], []
    h_pre = opt.register_step_pre_hook(lambda o, args, kwargs: pre.append(o))
    h_post = opt.register_step_post_hook(lambda o, args, kwargs: post.append(o.last_decision))

    train_step(m, opt, BATCHES[0])
    train_step(m, opt, BATCHES[1])
    assert (len(pre), post) == (2, ["accept", "accept"])

    with lr_spike(opt):  # rejected by the probe
        train_step(m, opt, BATCHES[2])
    assert opt.last_decision == "rollback"
    assert (len(pre), len(post)) == (3, 2)

    opt.zero_grad()  # a NaN gradient: skipped before proposing
    batch_loss(m, BATCHES[3]).backward()
    m[0].weight.grad[0, 0] = float("nan")
    before = full_state(m, opt)
    opt.step()
    assert opt.last_decision == "skip" and opt.stats["skipped_nonfinite"] == 1
    assert_bit_equal(before, full_state(m, opt), ignore=())  # nothing applied
    assert (len(pre), len(post)) == (4, 2)

    train_step(m, opt, BATCHES[4], closure=True)
    assert (len(pre), post) == (5, ["accept"] * 3)
    assert all(o is opt for o in pre)
    assert opt.stats["steps"] == 5 and opt.stats["accepted"] == 3
    assert opt.stats["rollbacks"] == 1 and opt.stats["skipped"] == 1

    h_pre.remove()
    h_post.remove()
    train_step(m, opt, BATCHES[5])
    assert (len(pre), len(post)) == (5, 3)


def test_global_step_hooks_see_the_guard_accept_only_for_post():
    m = make_model()
    opt = make_guard(m, torch.optim.Adam(m.parameters(), lr=0.01))
    pre, post = [], []
    h1 = register_optimizer_step_pre_hook(lambda o, a, k: pre.append(o) if o is opt else None)
    h2 = register_optimizer_step_post_hook(
        lambda o, a, k: post.append(o.last_decision) if o is opt else None)
    try:
        train_step(m, opt, BATCHES[0])
        with lr_spike(opt):
            train_step(m, opt, BATCHES[1])
        opt.zero_grad()
        batch_loss(m, BATCHES[2]).backward()
        m[3].bias.grad.fill_(float("inf"))
        opt.step()
        train_step(m, opt, BATCHES[3])
    finally:
        h1.remove()
        h2.remove()
    assert [opt.stats[k] for k in ("accepted", "rollbacks", "skipped")] == [2, 1, 1]
    assert len(pre) == 4 and post == ["accept", "accept"]


# =============================================================================================
# 2. LR schedulers
# =============================================================================================

N_SCHED = 16
PLATEAU_METRICS = [1.0, 0.9, 0.9, 0.95, 0.8, 0.85, 0.85, 0.7, 0.75, 0.75, 0.6, 0.65, 0.65,
                   0.5, 0.55, 0.55]

SCHEDULERS = {
    "steplr": ("adam", lambda o: lr_scheduler.StepLR(o, step_size=4, gamma=0.5)),
    "onecycle": ("sgd_momentum",
                 lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=N_SCHED + 1)),
    "lambdalr": ("adam", lambda o: lr_scheduler.LambdaLR(o, lambda e: 0.9 ** e)),
    "plateau": ("adam", lambda o: lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0)),
}

_ORDER_WARNINGS = ("lr_scheduler.step()", "optimizer.step()")


def _order_warnings(records):
    return [str(w.message) for w in records if any(s in str(w.message) for s in _ORDER_WARNINGS)]


def _run_scheduled(sched_name, guarded, spike_at=None, skip_batch=None, metric_fn=None):
    """Train N_SCHED steps with a scheduler; returns (model, opt, lrs, momenta, decisions)."""
    inner_name, make_sched = SCHEDULERS[sched_name]
    m = make_model()
    inner = INNERS[inner_name](m.parameters())
    opt = make_guard(m, inner) if guarded else inner
    sched = make_sched(opt)
    lrs, momenta, decisions = [], [], []
    for i in range(N_SCHED):
        metric = PLATEAU_METRICS[i]
        if i != skip_batch:
            opt.zero_grad()
            loss = batch_loss(m, BATCHES[i])
            loss.backward()
            if metric_fn is not None:
                metric = metric_fn(loss)
            if i == spike_at:
                lr = opt.param_groups[0]["lr"]
                initial = opt.param_groups[0].get("initial_lr")
                with lr_spike(opt):
                    opt.step()
                    assert opt.last_decision == "rollback"
                    # the rollback restored neither lr nor initial_lr
                    assert opt.param_groups[0]["lr"] == lr * SPIKE
                    assert opt.param_groups[0].get("initial_lr") == initial
            else:
                opt.step()
            if guarded:
                decisions.append(opt.last_decision)
        if sched_name == "plateau":
            sched.step(metric)
        else:
            sched.step()
            assert sched.get_last_lr() == [g["lr"] for g in opt.param_groups]
        lrs.append([g["lr"] for g in opt.param_groups])
        momenta.append([g.get("momentum", g.get("betas")) for g in opt.param_groups])
    return m, opt, lrs, momenta, decisions


@pytest.mark.parametrize("sched_name", list(SCHEDULERS))
def test_scheduler_through_guard_matches_bare(sched_name):
    metric_fn = lambda loss: loss.item()  # noqa: E731  (identical runs give identical metrics)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        mg, opt, lrs_g, mom_g, decisions = _run_scheduled(sched_name, True, metric_fn=metric_fn)
    assert not _order_warnings(rec), _order_warnings(rec)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        mb, _, lrs_b, mom_b, _ = _run_scheduled(sched_name, False, metric_fn=metric_fn)
    assert not _order_warnings(rec), _order_warnings(rec)

    assert decisions == ["accept"] * N_SCHED
    assert lrs_g == lrs_b
    assert mom_g == mom_b  # OneCycleLR also cycles momentum / betas in the same group dicts
    assert len({lr[0] for lr in lrs_g}) > 1, "the schedule never changed the lr"
    assert_same_model(mg, mb)


def test_scheduler_before_first_step_still_warns_through_the_guard():
    """The order check is live through the guard (so 'no warning' above means something)."""
    m = make_model()
    opt = make_guard(m, torch.optim.SGD(m.parameters(), lr=0.05))
    sched = lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    with pytest.warns(UserWarning, match=r"lr_scheduler\.step\(\)` before `optimizer\.step\(\)"):
        sched.step()


@pytest.mark.parametrize("sched_name", list(SCHEDULERS))
def test_rollback_never_restores_the_schedulers_lr(sched_name):
    k = 5
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        mg, opt, lrs_g, mom_g, decisions = _run_scheduled(sched_name, True, spike_at=k)
    assert not _order_warnings(rec), _order_warnings(rec)
    # the bare run never sees batch k; everything else (scheduler steps included) is the same
    mb, _, lrs_b, mom_b, _ = _run_scheduled(sched_name, False, skip_batch=k)

    assert decisions == ["accept"] * k + ["rollback"] + ["accept"] * (N_SCHED - k - 1)
    assert opt.stats["rollbacks"] == 1
    assert lrs_g == lrs_b and mom_g == mom_b
    assert len({lr[0] for lr in lrs_g}) > 1
    assert_same_model(mg, mb)


def test_scheduler_initial_lr_survives_rollbacks():
    m = make_model()
    opt = make_guard(m, torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9))
    sched = lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    assert opt.param_groups[0]["initial_lr"] == 0.05
    expected = 0.05
    for i in range(8):
        if i in (2, 5):
            with lr_spike(opt):
                train_step(m, opt, BATCHES[i])
            assert opt.last_decision == "rollback"
        else:
            train_step(m, opt, BATCHES[i])
            assert opt.last_decision == "accept"
        sched.step()
        if (i + 1) % 2 == 0:
            expected *= 0.5
        assert opt.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-12)
        assert opt.param_groups[0]["initial_lr"] == 0.05
        assert sched.base_lrs == [0.05]


# =============================================================================================
# 3. torch.amp.GradScaler on CPU
# =============================================================================================

def _amp_run(guarded: bool, clip: float | None, steps: int = 10):
    m = make_model()
    inner = torch.optim.Adam(m.parameters(), lr=0.01)
    opt = make_guard(m, inner) if guarded else inner
    scaler = torch.amp.GradScaler("cpu")
    clipped = []
    for b in BATCHES[:steps]:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = batch_loss(m, b)
        scaler.scale(loss).backward()
        scale = scaler.get_scale()
        assert scale > 1.0  # the scaler is really scaling on CPU
        if clip is None:
            expected = [p.grad / scale for p in m.parameters()]  # exact: scale is 2**k
        else:
            scaler.unscale_(opt)
            norm = torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
            clipped.append(bool(norm > clip))
            expected = [p.grad.clone() for p in m.parameters()]
        scaler.step(opt)
        scaler.update()
        if guarded:
            assert opt.last_decision == "accept"
        # grads were unscaled exactly once, and not touched again by step()
        assert all(torch.equal(e, p.grad) for e, p in zip(expected, m.parameters()))
    return m, opt, clipped


def test_grad_scaler_cpu_step_matches_bare():
    mg, opt, _ = _amp_run(True, None)
    mb, _, _ = _amp_run(False, None)
    assert opt.stats["steps"] == opt.stats["accepted"] == 10
    assert_same_model(mg, mb)


def test_grad_scaler_cpu_unscale_clip_step_matches_bare():
    mg, opt, clipped_g = _amp_run(True, 0.5)
    mb, _, clipped_b = _amp_run(False, 0.5)
    assert clipped_g == clipped_b and any(clipped_g), "clipping never engaged"
    assert opt.stats["steps"] == opt.stats["accepted"] == 10
    assert_same_model(mg, mb)


def _amp_inf_run(guarded: bool, inner_fn=None, steps: int = 6, inf_at=(2,)):
    """GradScaler steps with an inf written into the scaled grads at ``inf_at``."""
    m = make_model()
    inner = (inner_fn or (lambda ps: torch.optim.Adam(ps, lr=0.01)))(m.parameters())
    opt = make_guard(m, inner) if guarded else inner
    scaler = torch.amp.GradScaler("cpu")
    decisions, unchanged, scales = [], [], []
    for i, b in enumerate(BATCHES[:steps]):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = batch_loss(m, b)
        scaler.scale(loss).backward()
        if i in inf_at:
            m[0].weight.grad[0, 0] = float("inf")
        before = full_state(m, opt)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
        if i in inf_at:
            unchanged.append(_states_equal(before, full_state(m, opt)))
        if guarded:
            decisions.append(opt.last_decision)
    return m, opt, decisions, unchanged, scales


def _states_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(_bit_equal(a[k], b[k]) for k in a)


def test_grad_scaler_overflow_is_counted_as_a_skip_not_a_rollback():
    m, opt, decisions, unchanged, scales = _amp_inf_run(True, inf_at=(2, 4))
    assert decisions == ["accept", "accept", "skip", "accept", "skip", "accept"]
    assert unchanged == [True, True]   # nothing applied, nothing restored (RNG included)
    assert opt.stats["steps"] == 6 and opt.stats["accepted"] == 4
    assert opt.stats["skipped"] == opt.stats["skipped_amp_overflow"] == 2
    assert opt.stats["rollbacks"] == 0 and opt.stats["measured"] == 4
    assert opt.stats["skipped_nonfinite"] == 0  # the scaler's skip, not the signal's
    assert scales == [2.0 ** 16] * 2 + [2.0 ** 15] * 2 + [2.0 ** 14] * 2  # scaler backed off


def test_grad_scaler_overflow_run_matches_bare_scaler_run():
    mg, opt, _, _, scales_g = _amp_inf_run(True, inf_at=(2,))
    mb, bare, _, _, scales_b = _amp_inf_run(False, inf_at=(2,))
    assert scales_g == scales_b
    assert_bit_equal(full_state(mb, bare), full_state(mg, opt))


def test_grad_scaler_state_is_clean_after_the_guarded_step():
    """GradScaler's attributes are the scaler's business: they are gone after its step."""
    m, opt, _, _, _ = _amp_inf_run(True, steps=3, inf_at=(2,))
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")
    assert GuardedOptimizer._step_supports_amp_scaling


def test_guard_step_without_scaler_is_untouched_by_amp_support():
    m = make_model()
    opt = make_guard(m, torch.optim.Adam(m.parameters(), lr=0.01))
    train_step(m, opt, BATCHES[0])
    assert opt.last_decision == "accept" and opt.stats["skipped_amp_overflow"] == 0


@pytest.mark.parametrize("fused", [False, True])
def test_grad_scaler_with_fused_or_foreach_inner_matches_bare(fused):
    """A fused inner AdamW (its own sync-free AMP path when bare) gives the same run guarded."""
    if fused and not torch.optim.AdamW([torch.zeros(1, requires_grad=True)], fused=True).defaults["fused"]:
        pytest.skip("fused AdamW is not available on this build's CPU")
    inner_fn = lambda ps: torch.optim.AdamW(ps, lr=0.01, fused=fused or None,  # noqa: E731
                                            foreach=None if fused else True)
    mg, opt, decisions, _, scales_g = _amp_inf_run(True, inner_fn, inf_at=(3,))
    mb, bare, _, _, scales_b = _amp_inf_run(False, inner_fn, inf_at=(3,))
    assert decisions.count("skip") == opt.stats["skipped_amp_overflow"] == 1
    assert scales_g == scales_b
    assert_bit_equal(full_state(mb, bare), full_state(mg, opt))


def test_amp_unscale_matches_grad_scaler_unscale_bit_for_bit():
    from guarded_optim.guard import amp_unscale
    g = torch.Generator().manual_seed(3)
    grads = [torch.randn(5, 3, generator=g) * 65536, torch.randn(7, generator=g).bfloat16() * 65536]
    ref = [x.clone() for x in grads]
    scale = torch.full((), 65536.0)
    found = amp_unscale(grads, scale)
    ref_found = torch.zeros(())
    for x in ref:  # GradScaler.unscale_ groups per dtype; this is one group each
        torch._amp_foreach_non_finite_check_and_unscale_([x], ref_found, scale.double().reciprocal().float())
    assert all(torch.equal(a, b) for a, b in zip(grads, ref)) and found.item() == 0.0
    grads[1][2] = float("nan")
    assert amp_unscale(grads, scale).item() == 1.0


# =============================================================================================
# 4. gradient accumulation
# =============================================================================================

@pytest.mark.parametrize("probe_every", [1, 2])
def test_gradient_accumulation_counts_only_optimizer_steps(probe_every):
    accum, micro = 4, 40

    def run(guarded):
        m = make_model()
        inner = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
        probe_calls = []

        def probe():
            probe_calls.append(1)
            return F.mse_loss(m(PROBE_X), PROBE_Y)

        opt = (GuardedOptimizer(inner, probe=probe, module=m, probe_every=probe_every)
               if guarded else inner)
        pre = []
        opt.register_step_pre_hook(lambda o, a, k: pre.append(1))
        opt.zero_grad()
        for i in range(micro):
            (batch_loss(m, BATCHES[i]) / accum).backward()
            if (i + 1) % accum == 0:
                opt.step()
                opt.zero_grad()
        return m, opt, len(probe_calls), len(pre)

    mg, opt, probes, pre_g = run(True)
    mb, _, _, pre_b = run(False)
    steps = micro // accum
    assert pre_g == pre_b == steps
    assert opt.stats["steps"] == opt.stats["accepted"] == steps
    assert opt.stats["measured"] == steps // probe_every
    assert probes == 1 + steps // probe_every  # the initial reference + one per measurement
    assert opt.stats["rollbacks"] == opt.stats["skipped"] == 0
    assert_same_model(mg, mb)


# =============================================================================================
# 5. other inner optimizers
# =============================================================================================

def _train(name, model, opt, batches, calls=None):
    out = []
    for b in batches:
        if name in NEEDS_CLOSURE:
            out.append(opt.step(make_closure(model, opt, b, calls)))
        else:
            opt.zero_grad()
            batch_loss(model, b).backward()
            out.append(opt.step())
        if isinstance(opt, GuardedOptimizer):
            assert opt.last_decision == "accept"
    return out


@pytest.mark.parametrize("name", list(INNERS))
def test_inner_optimizer_guarded_matches_bare(name):
    mg, mb = make_model(), make_model()
    opt = make_guard(mg, INNERS[name](mg.parameters()))
    bare = INNERS[name](mb.parameters())
    calls_g, calls_b = [], []
    out_g = _train(name, mg, opt, BATCHES[:20], calls_g)
    out_b = _train(name, mb, bare, BATCHES[:20], calls_b)
    assert opt.stats["steps"] == opt.stats["accepted"] == opt.stats["measured"] == 20
    assert_bit_equal(full_state(mb, bare), full_state(mg, opt))
    assert len(opt.state) > 0 or name == "sgd"
    if name in NEEDS_CLOSURE:
        assert len(calls_g) == len(calls_b) > 20  # LBFGS re-evaluates; the guard adds none
        assert all(torch.equal(a, b) for a, b in zip(out_g, out_b))
    # training did something
    assert batch_loss(mg.eval(), (PROBE_X, PROBE_Y)) < batch_loss(make_model().eval(),
                                                                  (PROBE_X, PROBE_Y))


@pytest.mark.parametrize("name", list(INNERS))
def test_inner_optimizer_rollback_restores_exactly(name):
    k = 6
    mg, mb = make_model(), make_model()
    opt = make_guard(mg, INNERS[name](mg.parameters()))
    bare = INNERS[name](mb.parameters())
    _train(name, mg, opt, BATCHES[:k])
    before = full_state(mg, opt)
    with lr_spike(opt):
        if name in NEEDS_CLOSURE:
            opt.step(make_closure(mg, opt, BATCHES[k]))
        else:
            opt.zero_grad()
            batch_loss(mg, BATCHES[k]).backward()
            opt.step()
    assert opt.last_decision == "rollback" and opt.stats["rollbacks"] == 1
    assert_bit_equal(before, full_state(mg, opt), ignore=())  # step counters included

    if name in NEEDS_CLOSURE:
        # stochastic LBFGS on these batches makes a genuinely destabilising step next (the
        # bare run's probe loss jumps from ~0.65 to ~12.9); the guard must reject exactly it
        _train(name, mb, bare, BATCHES[:k] + BATCHES[k + 1:k + 2])
        jumped = batch_loss(mb.eval(), (PROBE_X, PROBE_Y)).item()
        opt.step(make_closure(mg, opt, BATCHES[k + 1]))
        assert jumped > 5 * opt.yhat and opt.last_decision == "rollback"
        assert_bit_equal(before, full_state(mg, opt), ignore=())
        return
    # and the run continues as a bare run that never saw batch k
    _train(name, mg, opt, BATCHES[k + 1:k + 7])
    _train(name, mb, bare, BATCHES[:k] + BATCHES[k + 1:k + 7])
    assert_bit_equal(full_state(mb, bare), full_state(mg, opt))


@pytest.mark.parametrize("name", ["sgd_momentum", "adam", "rmsprop"])
def test_rollback_of_the_first_step_drops_lazy_state(name):
    mg, mb = make_model(bn=False), make_model(bn=False)
    opt = make_guard(mg, INNERS[name](mg.parameters()))
    bare = INNERS[name](mb.parameters())
    assert not any(opt.state.values())
    with lr_spike(opt):
        train_step(mg, opt, BATCHES[0])
    assert opt.last_decision == "rollback"
    assert not any(opt.state.values()), "state created by the rejected first step survived"
    assert_same_model(mg, mb)
    _train(name, mg, opt, BATCHES[1:6])
    _train(name, mb, bare, BATCHES[1:6])
    assert_bit_equal(full_state(mb, bare), full_state(mg, opt))


def test_rollback_of_the_first_step_restores_batchnorm_buffers():
    m = make_model()
    opt = make_guard(m, torch.optim.SGD(m.parameters(), lr=0.05))
    before = full_state(m, opt)
    with lr_spike(opt):
        train_step(m, opt, BATCHES[0])
    assert opt.last_decision == "rollback"
    assert_bit_equal(before, full_state(m, opt), ignore=())


# =============================================================================================
# 6. closure vs no closure
# =============================================================================================

@pytest.mark.parametrize("name", ["sgd_momentum", "adam"])
def test_closure_and_plain_forms_give_identical_trajectories(name):
    mc, mp = make_model(), make_model()
    oc = make_guard(mc, INNERS[name](mc.parameters()))
    op = make_guard(mp, INNERS[name](mp.parameters()))
    for b in BATCHES[:12]:
        returned = []

        def closure():
            oc.zero_grad()
            loss = batch_loss(mc, b)
            loss.backward()
            returned.append(loss)
            return loss

        out = oc.step(closure)
        assert len(returned) == 1 and out is returned[0]  # the closure's own loss, once
        op.zero_grad()
        loss_p = batch_loss(mp, b)
        loss_p.backward()
        assert op.step() is None
        assert torch.equal(out, loss_p)
        assert oc.last_decision == op.last_decision == "accept"
    assert oc.stats == op.stats
    assert oc.yhat == op.yhat
    assert_bit_equal(full_state(mp, op), full_state(mc, oc))


def test_step_with_closure_returns_the_loss_on_rollback_and_skip():
    m = make_model()
    opt = make_guard(m, torch.optim.SGD(m.parameters(), lr=0.05))
    with lr_spike(opt):
        out = opt.step(make_closure(m, opt, BATCHES[0]))
    assert opt.last_decision == "rollback"
    assert torch.equal(out, batch_loss(make_model(), BATCHES[0]))

    def nan_closure():
        opt.zero_grad()
        loss = batch_loss(m, BATCHES[1]) * float("nan")
        loss.backward()
        return loss

    out = opt.step(nan_closure)
    assert opt.last_decision == "skip" and torch.isnan(out)


# =============================================================================================
# 7. torch.compile (inductor on CPU) and foreach inner kernels
# =============================================================================================

def _compiled_run(guarded: bool, variant: str, spike_at: int | None = None, steps: int = 6):
    """Train through ``torch.compile(model)``; the probe runs through the compiled module too.

    ``variant``: ``"compiled_step"`` compiles the inner optimizer's step (the guard's own
    step stays eager: it reads flags on the host), ``"foreach"`` uses Adam's foreach kernels.
    """
    m = make_model(bn=False)
    cm = torch.compile(m)  # inductor
    inner = torch.optim.Adam(m.parameters(), lr=0.01, foreach=True)
    if variant == "compiled_step":
        inner.step = torch.compile(inner.step)
    probe_calls = []

    def probe():
        probe_calls.append(1)
        return F.mse_loss(cm(PROBE_X), PROBE_Y)

    opt = GuardedOptimizer(inner, probe=probe, module=m) if guarded else inner
    decisions, exact = [], None
    for i, (x, y) in enumerate(BATCHES[:steps]):
        opt.zero_grad()
        F.mse_loss(cm(x), y).backward()
        if i == spike_at:
            before = full_state(m, opt)
            with lr_spike(opt):
                opt.step()
            exact = _states_equal(before, full_state(m, opt))
        else:
            opt.step()
        if guarded:
            decisions.append(opt.last_decision)
    return m, opt, decisions, exact, len(probe_calls)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["compiled_step", "foreach"])
def test_compiled_model_trains_under_the_guard_and_rolls_back_exactly(variant, one_thread):
    mg, opt, decisions, exact, probes = _compiled_run(True, variant, spike_at=3)
    assert decisions == ["accept"] * 3 + ["rollback"] + ["accept"] * 2
    assert exact, "the rollback did not restore the compiled model's state bit for bit"
    assert probes == 1 + 6 and opt.stats["measured"] == 6
    # clean: the guarded compiled run is the bare compiled run
    mg, opt, decisions, _, _ = _compiled_run(True, variant)
    mb, _, _, _, _ = _compiled_run(False, variant)
    assert decisions == ["accept"] * 6
    assert_same_model(mg, mb)
