"""The default Fisher estimate (issue 12, item 3): which inner optimizers already keep one
(``keeps_second_moment``), the host tracker the others get (``default_fisher``,
``HostFisher``): updated on verified steps only, exact EMA, state round trips, the guard's
checkpoint with and without it, and training with it bit-identical to bare SGD."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import tiny
from guarded_optim import GuardedOptimizer, ReduceLR
from guarded_optim.fisher import (SECOND_MOMENT_OPTIMIZERS, FisherDiagonal, HostFisher,
                                  InnerFisher, default_fisher, find_fisher, is_default_fisher,
                                  keeps_second_moment)

pytestmark = pytest.mark.usefixtures("one_thread")

EXPECTED_SECOND_MOMENT = {"Adam", "AdamW", "NAdam", "RAdam", "SparseAdam"}
TORCH_OPTIMIZERS = sorted(
    name for name in dir(torch.optim)
    if isinstance(getattr(torch.optim, name), type)
    and issubclass(getattr(torch.optim, name), torch.optim.Optimizer)
    and getattr(torch.optim, name) is not torch.optim.Optimizer)


def stepped(name):
    """``torch.optim.<name>`` on a small problem it accepts, with its state after one step."""
    torch.manual_seed(0)
    cls = getattr(torch.optim, name)
    if name == "SparseAdam":
        emb = nn.Embedding(6, 3, sparse=True)
        opt = cls(emb.parameters(), lr=0.1)
        before = keeps_second_moment(opt)
        emb(torch.tensor([0, 2])).sum().backward()
        opt.step()
        return opt, before
    w = nn.Parameter(torch.randn(3, 4))      # 2-d: Muon takes matrices only
    opt = cls([w], lr=0.01)
    before = keeps_second_moment(opt)

    def closure():
        opt.zero_grad()
        loss = (w ** 2).sum()
        loss.backward()
        return loss
    opt.step(closure)
    return opt, before


def test_every_torch_optimizer_is_covered():
    assert {"SGD", "Adam", "AdamW", "Adagrad", "RMSprop", "Adamax"} <= set(TORCH_OPTIMIZERS)
    assert {c.__name__ for c in SECOND_MOMENT_OPTIMIZERS} == EXPECTED_SECOND_MOMENT


@pytest.mark.parametrize("name", TORCH_OPTIMIZERS)
def test_keeps_second_moment_matches_the_state_each_torch_optimizer_keeps(name):
    opt, before = stepped(name)
    has = any("exp_avg_sq" in st for st in opt.state.values())
    assert before == (name in EXPECTED_SECOND_MOMENT)   # decided without a step
    assert has == before                                # and it is what the step then keeps
    assert keeps_second_moment(opt) == has
    assert (default_fisher(opt) is None) == has


def test_a_custom_adam_like_optimizer_counts_once_it_has_state():
    class AdamLike(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {"lr": 0.1, "betas": (0.9, 0.99)})

        @torch.no_grad()
        def step(self, closure=None):
            for g in self.param_groups:
                for p in g["params"]:
                    st = self.state[p]
                    st.setdefault("step", 0)
                    st.setdefault("exp_avg_sq", torch.zeros_like(p))
                    st["step"] += 1
                    st["exp_avg_sq"].mul_(0.99).addcmul_(p.grad, p.grad, value=0.01)
                    p.sub_(0.1 * p.grad)

    w = nn.Parameter(torch.ones(3))
    opt = AdamLike([w])
    assert not keeps_second_moment(opt) and isinstance(default_fisher(opt), HostFisher)
    w.grad = torch.ones(3)
    opt.step()
    assert keeps_second_moment(opt) and default_fisher(opt) is None


@pytest.mark.parametrize("cls", [torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam,
                                 torch.optim.RAdam])
def test_default_fisher_is_none_for_the_adam_family(cls):
    opt = cls(tiny.model().parameters(), lr=1e-3)
    assert default_fisher(opt) is None
    assert default_fisher(GuardedOptimizer(opt)) is None      # looked through to the inner


def test_default_fisher_for_sgd_is_a_fresh_host_tracker():
    opt = torch.optim.SGD(tiny.model().parameters(), lr=0.1, momentum=0.9)
    a, b = default_fisher(opt), default_fisher(opt)
    assert isinstance(a, HostFisher) and isinstance(a, FisherDiagonal) and a is not b
    assert a.host and a.default is True and is_default_fisher(a) and a.every == 1
    assert not is_default_fisher(FisherDiagonal(host=True))
    assert a.fisher is None and not a.ready and a.nbytes() == 0


# -- which steps teach it ------------------------------------------------------------------
def fake_guard(params, probe, probe_every):
    return SimpleNamespace(param_groups=[{"params": params}], probe=probe,
                           probe_every=probe_every,
                           step_state=SimpleNamespace(unverified=0))


@pytest.mark.parametrize("k", [1, 3])
def test_with_a_probe_only_measured_and_accepted_steps_count(k):
    g = fake_guard([], probe=lambda: 0.0, probe_every=k)
    for u in range(k):
        g.step_state.unverified = u
        assert HostFisher.verified_step(g) == (u == 0)


@pytest.mark.parametrize("k", [1, 4, 10])
def test_without_a_probe_the_first_proposal_from_a_verified_state_counts(k):
    g = fake_guard([], probe=None, probe_every=k)
    # a verifying guard keeps 1 <= _unverified <= k at on_healthy: only 1 counts
    assert [HostFisher.verified_step(SimpleNamespace(**{**vars(g), "step_state": SimpleNamespace(unverified=u)}))
            for u in range(1, k + 1)] == [True] + [False] * (k - 1)
    # a guard that never verifies counts up: one update per k applied steps
    seen = [u for u in range(1, 5 * k + 1)
            if HostFisher.verified_step(SimpleNamespace(**{**vars(g), "step_state": SimpleNamespace(unverified=u)}))]
    assert seen == list(range(1, 5 * k + 1, k))


def by_hand(seq, alpha):
    """``F = g_1^2``, then ``F <- (1 - alpha) F + alpha g^2``, in float32, op for op."""
    out = None
    for grads in seq:
        g32 = [g.float() for g in grads]
        out = ([g * g for g in g32] if out is None else
               [f.mul(1.0 - alpha).addcmul_(g, g, value=alpha) for f, g in zip(out, g32)])
    return out


@pytest.mark.parametrize("seed", range(3))
def test_estimate_after_n_verified_updates_is_the_ema_by_hand(seed):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).requires_grad_()
              for s in [(3, 2), (4,), (1,)]]
    k, alpha = 4, 0.1
    guard = fake_guard(params, probe=None, probe_every=k)
    tracker = HostFisher(alpha=alpha)
    taught = []
    for step in range(23):
        guard.step_state.unverified = step % k + 1          # a probe-less guard verifying every k
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
        for p, gr in zip(params, grads):
            p.grad = gr
        tracker.on_healthy(guard)
        if step % k == 0:
            taught.append(grads)
    n = len(taught)
    assert n == 6 and tracker.updates == tracker.verified == n and tracker.healthy == 23
    assert all(f.dtype == torch.float32 and f.device.type == "cpu" for f in tracker.fisher)
    assert tiny.same(tracker.fisher, by_hand(taught, alpha))          # bit for bit
    for i in range(len(params)):                                   # and the closed form
        closed = (1 - alpha) ** (n - 1) * taught[0][i] ** 2 + sum(
            alpha * (1 - alpha) ** (n - j) * taught[j - 1][i] ** 2 for j in range(2, n + 1))
        torch.testing.assert_close(tracker.fisher[i].double(), closed, rtol=1e-6, atol=0)
    assert tracker.nbytes() == 4 * sum(p.numel() for p in params)


def test_every_keeps_every_nth_verified_update():
    params = [torch.zeros(2, requires_grad=True)]
    guard = fake_guard(params, probe=lambda: 0.0, probe_every=2)
    tracker = HostFisher(every=3)
    for step in range(12):
        guard.step_state.unverified = step % 2              # measured (0) every other step
        params[0].grad = torch.full((2,), float(step))
        tracker.on_healthy(guard)
    # verified steps 0, 2, 4, 6, 8, 10; every 3rd of them: steps 0 and 6
    assert tracker.verified == 6 and tracker.updates == 2
    assert tiny.same(tracker.fisher, by_hand([[torch.zeros(2)], [torch.full((2,), 6.0)]], 0.01))


def test_state_round_trips_through_torch_load_weights_only(tmp_path):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(5, 3, generator=gen).requires_grad_(), torch.randn(3, generator=gen)
              .requires_grad_()]
    tracker = HostFisher(alpha=0.2)
    for _ in range(3):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        tracker.update(params)
    torch.save(tracker.state_dict(), tmp_path / "f.pt")
    loaded = torch.load(tmp_path / "f.pt", weights_only=True)
    assert loaded["default"] is True and loaded["verified"] == 0 and loaded["updates"] == 3
    other = HostFisher(alpha=0.2)
    other.load_state_dict(loaded)
    assert tiny.same(other.state_dict(), tracker.state_dict())
    assert all(a is not b for a, b in zip(other.fisher, tracker.fisher))   # its own copies
    for p in params:                                                      # and it goes on alike
        p.grad = torch.randn(p.shape, generator=gen)
    tracker.update(params)
    other.update(params)
    assert tiny.same(other.state_dict(), tracker.state_dict())
    # a plain FisherDiagonal's state loads into the tracker (as float32) and back
    plain = FisherDiagonal()
    plain.update([torch.ones(2, dtype=torch.float64, requires_grad=True)])
    plain.fisher[0].zero_()
    host = HostFisher()
    host.load_state_dict(plain.state_dict())
    assert host.fisher[0].dtype == torch.float32 and host.verified == 0


# -- in a guard ----------------------------------------------------------------------------
def run(recovery=None, steps=30, bare=False, **kw):
    m = tiny.model(0)
    _, batches = tiny.data(0, steps=steps)
    inner = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    opt = inner if bare else GuardedOptimizer(
        inner, module=m, recovery=[default_fisher(inner)] if recovery is None else recovery, **kw)
    for x, y in batches:
        opt.step(tiny.closure_for(opt, m, x, y))
    return m, opt


def test_a_guard_with_the_default_tracker_trains_bit_identically_to_bare_sgd():
    m0, bare = run(bare=True)
    m1, opt = run()
    assert opt.stats["accepted"] == 30 and opt.stats["rollbacks"] == opt.stats["skipped"] == 0
    tiny.assert_same(tiny.full_state(m0, bare), tiny.full_state(m1, opt))
    tracker = opt.recovery[0]
    assert isinstance(tracker, HostFisher) and find_fisher(opt) is tracker
    assert tracker.healthy == 30 and tracker.updates == 3   # steps 1, 11, 21 (VERIFY_EVERY=10)
    fisher = opt.fisher_diagonal()
    assert fisher is not None and tiny.same(fisher, tracker.fisher)
    assert all(f.dtype == torch.float32 and f.device.type == "cpu" for f in fisher)
    assert opt.state_dict()["guard"]["fisher"] == "host"


def test_with_a_probe_it_learns_from_measured_accepted_steps_only():
    m = tiny.model(0)
    probe_set, batches = tiny.data(0, steps=12)
    inner = torch.optim.SGD(m.parameters(), lr=0.05)
    opt = GuardedOptimizer(inner, tiny.probe_for(m, probe_set), module=m, probe_every=3,
                           recovery=[default_fisher(inner)])
    taught = []
    for x, y in batches:
        opt.step(tiny.closure_for(opt, m, x, y))
        if opt.step_state.unverified == 0:
            taught.append([p.grad.clone() for p in m.parameters()])
    tracker = opt.recovery[0]
    assert opt.stats["measured"] == len(taught) == tracker.updates == 4
    assert tiny.same(tracker.fisher, by_hand(taught, tracker.alpha))


def test_a_rejected_proposal_does_not_teach_it():
    m = tiny.model(0)
    probe_set, batches = tiny.data(0, steps=8)
    inner = torch.optim.SGD(m.parameters(), lr=0.05)
    opt = GuardedOptimizer(inner, tiny.probe_for(m, probe_set), module=m,
                           recovery=[default_fisher(inner)])
    for x, y in batches[:4]:
        opt.step(tiny.closure_for(opt, m, x, y))
    tracker = opt.recovery[0]
    before = [f.clone() for f in tracker.fisher]
    for g in opt.param_groups:
        g["lr"] *= 1e4
    opt.step(tiny.closure_for(opt, m, *batches[4]))
    for g in opt.param_groups:
        g["lr"] /= 1e4
    assert opt.last_decision == "rollback" and tracker.updates == 4
    assert tiny.same(tracker.fisher, before)


# -- the guard's checkpoint with and without the tracker -----------------------------------
def saved(recovery, tmp_path, name):
    _, opt = run(recovery, steps=12)
    torch.save(opt.state_dict(), tmp_path / name)
    return opt, torch.load(tmp_path / name, weights_only=True)


def test_checkpoint_round_trip_keeps_the_estimate(tmp_path):
    src, sd = saved(None, tmp_path, "a.pt")
    assert sd["guard"]["fisher"] == "host" and sd["guard"]["recovery"][-1]["default"] is True
    _, dst = run(None, steps=1)
    dst.load_state_dict(sd)
    assert tiny.same(dst.recovery[0].state_dict(), src.recovery[0].state_dict())


def test_a_checkpoint_without_the_tracker_loads_into_a_guard_with_one(tmp_path):
    """Saved by the release before the default tracker (its checkpoint is this one less the
    tracker's entry): the guard's own tracker starts empty (its estimate belonged to the
    trajectory the load replaces)."""
    src, sd = saved([ReduceLR(), HostFisher()], tmp_path, "old.pt")
    sd["guard"]["recovery"].pop()
    sd["guard"]["fisher"] = None
    _, opt = run([ReduceLR(), HostFisher()], steps=12)
    assert opt.recovery[1].ready
    opt.load_state_dict(sd)
    assert tiny.same(opt.recovery[0].state_dict(), src.recovery[0].state_dict())
    assert isinstance(opt.recovery[1], HostFisher) and not opt.recovery[1].ready
    assert opt.fisher_diagonal() is None and opt.state_dict()["guard"]["fisher"] == "host"


class AdamLike(torch.optim.Optimizer):
    """An optimizer torch does not know that keeps ``exp_avg_sq`` once it has stepped."""

    def __init__(self, params):
        super().__init__(params, {"lr": 0.01, "betas": (0.9, 0.99)})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                st.setdefault("step", torch.zeros(()))
                st.setdefault("exp_avg_sq", torch.zeros_like(p))
                st["step"] += 1
                st["exp_avg_sq"].mul_(0.99).addcmul_(p.grad, p.grad, value=0.01)
                p.sub_(g["lr"] * p.grad)
        return loss


def test_a_checkpoint_with_the_tracker_loads_into_a_guard_without_one(tmp_path):
    """Saved where the inner optimizer had no second moment yet (a custom optimizer before
    its first step: the default tracker), loaded into a guard built on the same optimizer
    after it has stepped (it reads exp_avg_sq instead): the tracker's entry is dropped."""
    _, batches = tiny.data(0, steps=6)
    m = tiny.model(0)
    src = GuardedOptimizer(AdamLike(m.parameters()), module=m,
                           recovery=[ReduceLR(), HostFisher()])
    for x, y in batches:
        src.step(tiny.closure_for(src, m, x, y))
    torch.save(src.state_dict(), tmp_path / "new.pt")
    sd = torch.load(tmp_path / "new.pt", weights_only=True)
    assert sd["guard"]["fisher"] == "host" and len(sd["guard"]["recovery"]) == 2
    m2 = tiny.model(1)
    inner = AdamLike(m2.parameters())
    x, y = batches[0]
    inner.step(tiny.closure_for(inner, m2, x, y))
    assert keeps_second_moment(inner) and default_fisher(inner) is None
    opt = GuardedOptimizer(inner, module=m2, recovery=[ReduceLR()])
    assert len(opt.recovery) == 1
    opt.load_state_dict(sd)
    assert len(opt.recovery) == 1 and tiny.same(opt.recovery[0].state_dict(),
                                           src.recovery[0].state_dict())
    assert opt.state_dict()["guard"]["fisher"] == "state.exp_avg_sq"


def test_other_recovery_mismatches_still_fail_before_anything_changes(tmp_path):
    _, sd = saved([ReduceLR(), HostFisher()], tmp_path, "two.pt")
    _, opt = run([HostFisher()], steps=3)
    before = opt.recovery[0].state_dict()
    with pytest.raises(ValueError, match="recovery actions"):
        opt.load_state_dict(sd)
    assert tiny.same(opt.recovery[0].state_dict(), before)
    _, opt2 = run([ReduceLR(), ReduceLR(), HostFisher()], steps=1)
    with pytest.raises(ValueError, match="recovery actions"):
        opt2.load_state_dict(sd)


def test_adam_has_no_tracker_and_reads_its_own_second_moment():
    m = tiny.model(0)
    inner = torch.optim.Adam(m.parameters(), lr=1e-3)
    assert default_fisher(inner) is None
    opt = GuardedOptimizer(inner, module=m)
    _, batches = tiny.data(0, steps=2)
    for x, y in batches:
        opt.step(tiny.closure_for(opt, m, x, y))
    assert isinstance(find_fisher(opt), InnerFisher)
    assert opt.state_dict()["guard"]["fisher"] == "state.exp_avg_sq"


def test_sparse_and_complex_gradients_fold_in_as_their_dense_squared_magnitude():
    emb = nn.Embedding(5, 3, sparse=True)
    emb(torch.tensor([1, 3, 3])).sum().backward()
    z = torch.zeros(2, dtype=torch.complex64, requires_grad=True)
    z.grad = torch.tensor([3 + 4j, 1j], dtype=torch.complex64)
    tracker = HostFisher()
    tracker.update([emb.weight, z])
    assert emb.weight.grad.is_sparse
    assert tiny.same(tracker.fisher[0], emb.weight.grad.to_dense().square())
    assert tiny.same(tracker.fisher[1], torch.tensor([25.0, 1.0]))


def test_a_guard_over_a_sparse_embedding_with_the_tracker_steps_like_bare_sgd():
    results = []
    for recovery in (None, "bare"):
        torch.manual_seed(0)
        emb = nn.Embedding(10, 4, sparse=True)
        inner = torch.optim.SGD(emb.parameters(), lr=0.1)
        opt = inner if recovery == "bare" else GuardedOptimizer(
            inner, recovery=[default_fisher(inner)])
        for i in range(12):
            opt.zero_grad()
            emb(torch.tensor([i % 10, (3 * i) % 10])).square().sum().backward()
            opt.step()
        results.append(emb.weight.detach().clone())
        if recovery is None:
            assert opt.recovery[0].updates == 2 and opt.fisher_diagonal() is not None
    assert torch.equal(*results)
