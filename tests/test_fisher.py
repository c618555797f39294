"""Fisher tools (ARC sec. 3.3, 3.6): the EMA's closed form, the pure read-outs, importance-
weighted rollback (exact in the limit), EWC recovery, drift snapshots, state round trips."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

import test_policy
import tiny
from guarded_optim import GuardedOptimizer
from guarded_optim.fisher import (EWCPenalty, FisherDiagonal, FisherDrift,
                                  ImportanceWeightedRollback, ewc_penalty, fisher_effective_rank,
                                  fisher_rao_distance, gradient_snr, restore_weights)

pytestmark = pytest.mark.usefixtures("one_thread")

guard, step = test_policy.guard, test_policy.step


def params_like(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]


SHAPES = [(3, 2), (4,), (1,)]


# -- the EMA -------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(alpha=st.floats(0.01, 1.0), n=st.integers(1, 12), seed=st.integers(0, 2**16))
def test_fisher_ema_equals_its_closed_form(alpha, n, seed):
    params = params_like(SHAPES, seed)
    g = torch.Generator().manual_seed(seed + 1)
    seq = [[torch.randn(p.shape, generator=g, dtype=torch.float64) for p in params]
           for _ in range(n)]
    fisher = FisherDiagonal(alpha=alpha)
    for grads in seq:
        for p, gr in zip(params, grads):
            p.grad = gr
        fisher.update(params)
    for i in range(len(params)):
        expected = (1 - alpha) ** (n - 1) * seq[0][i] ** 2
        expected = expected + sum(alpha * (1 - alpha) ** (n - k) * seq[k - 1][i] ** 2
                                  for k in range(2, n + 1))
        torch.testing.assert_close(fisher.fisher[i], expected, rtol=1e-12, atol=1e-300)
    assert fisher.updates == n


def test_fisher_learns_from_accepted_steps_only():
    m, opt, batches = guard([FisherDiagonal()])
    for b in batches[:5]:
        step(m, opt, b)
    fisher = opt.recovery[0]
    before = [f.clone() for f in fisher.fisher]
    assert step(m, opt, batches[5], spike=1e4) == "rollback"
    assert fisher.updates == 5 and all(torch.equal(a, b) for a, b in zip(before, fisher.fisher))
    step(m, opt, batches[6])
    assert fisher.updates == 6 and not all(torch.equal(a, b) for a, b in zip(before, fisher.fisher))


def test_fisher_on_host_and_every_n():
    m, opt, batches = guard([FisherDiagonal(host=True, every=2, track_mean=True)])
    for b in batches[:6]:
        step(m, opt, b)
    fisher = opt.recovery[0]
    assert fisher.updates == 3 and all(f.device.type == "cpu" for f in fisher.fisher)
    assert float(fisher.snr()) >= 1.0 and float(fisher.effective_rank()) > 1.0


# -- pure read-outs ------------------------------------------------------------------------
@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16), c=st.floats(0.1, 10.0))
def test_fisher_rao_distance_is_the_weighted_euclidean_norm(seed, c):
    a, b, f = params_like(SHAPES, seed), params_like(SHAPES, seed + 1), params_like(SHAPES, seed + 2)
    f = [t.detach().abs() for t in f]
    flat = lambda ts: torch.cat([t.detach().reshape(-1) for t in ts])  # noqa: E731
    expected = ((flat(f) * (flat(a) - flat(b)) ** 2).sum()).sqrt()
    torch.testing.assert_close(fisher_rao_distance(f, a, b), expected, rtol=1e-5, atol=0)
    ones = [torch.ones_like(t) for t in f]
    torch.testing.assert_close(fisher_rao_distance(ones, a, b), (flat(a) - flat(b)).norm(),
                               rtol=1e-5, atol=0)
    scaled = fisher_rao_distance([c * t for t in f], a, b)
    torch.testing.assert_close(scaled, math.sqrt(c) * expected, rtol=1e-5, atol=0)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**16))
def test_effective_rank_is_exp_entropy(seed):
    f = [t.detach().abs() for t in params_like(SHAPES, seed)]
    flat = torch.cat([t.reshape(-1) for t in f])
    expected = torch.distributions.Categorical(probs=flat / flat.sum()).entropy().exp()
    torch.testing.assert_close(fisher_effective_rank(f), expected.double(), rtol=1e-9, atol=0)
    n = flat.numel()
    torch.testing.assert_close(fisher_effective_rank([torch.ones(n)]).float(), torch.tensor(float(n)))
    one_hot = torch.zeros(n)
    one_hot[seed % n] = 3.0
    torch.testing.assert_close(fisher_effective_rank([one_hot]).float(), torch.tensor(1.0))


def test_gradient_snr_bounds():
    g = [torch.randn(5, dtype=torch.float64), torch.randn(3, dtype=torch.float64)]
    assert math.isinf(float(gradient_snr(g, [t * t for t in g])))      # no noise at all
    zero_mean = [torch.zeros(5, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)]
    assert float(gradient_snr(zero_mean, [t * t for t in g])) == 1.0    # pure noise


# -- importance-weighted rollback ----------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(f=st.lists(st.floats(0.0, 1e6), min_size=1, max_size=20),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_restore_weight_is_exactly_one_for_large_lambda(f, dtype):
    fisher = [torch.tensor(f, dtype=dtype)]
    assert torch.all(restore_weights(fisher, 1e4, -0.05)[0] == 1.0)
    beta = restore_weights(fisher, 1.0, -0.05)[0]
    assert torch.all(beta > 0.5) and torch.all(beta <= 1.0)
    order = torch.argsort(fisher[0])
    assert torch.all(beta[order].diff() >= 0)                  # more important, more restored


def test_restore_weight_with_the_papers_centre_keeps_unimportant_values():
    beta = restore_weights([torch.tensor([0.0, 1.0, 10.0])], 1e4, centre=1.0)[0]
    assert beta.tolist() == [0.0, 0.0, 1.0]                    # sigmoid(lam (F - mean F))


def rollback_state(recovery, seed_steps=6):
    m, opt, batches = guard(recovery)
    for b in batches[:seed_steps]:
        step(m, opt, b)
    assert step(m, opt, batches[seed_steps], spike=1e4) == "rollback"
    return m, opt, tiny.full_state(m, opt)


def test_importance_rollback_with_large_lambda_is_exact_rollback_bit_for_bit():
    _, _, exact = rollback_state([FisherDiagonal()])
    _, opt, blended = rollback_state([FisherDiagonal(), ImportanceWeightedRollback(lam=1e4)])
    tiny.assert_same(exact, blended)
    assert opt.recovery[1].blends == 1 and "importance_blend" in opt.last_event.action


def test_importance_rollback_blends_between_snapshot_and_rejected():
    m, opt, batches = guard([FisherDiagonal(), ImportanceWeightedRollback(lam=1.0)])
    for b in batches[:6]:
        step(m, opt, b)
    action = opt.recovery[1]
    rejected = []
    original = action.before_rollback

    def spy(g):
        original(g)
        rejected.extend(t.clone() for t in action._rejected)
    action.before_rollback = spy
    safe = [t.clone() for t in opt.safe_snapshot.state_dict()["params"]]
    assert step(m, opt, batches[6], spike=1e4) == "rollback"
    for p, s, r in zip(m.parameters(), safe, rejected):
        lo, hi = torch.minimum(s, r), torch.maximum(s, r)
        assert torch.all((p >= lo) & (p <= hi))
        assert torch.all((p - s).abs() <= 0.5 * (r - s).abs() + 1e-7)   # beta > 1/2
    assert any(not torch.equal(p.detach(), s) for p, s in zip(m.parameters(), safe))


def test_importance_rollback_is_measured_with_the_next_proposal():
    m, opt, batches = guard([FisherDiagonal(), ImportanceWeightedRollback(lam=0.5)])
    for b in batches[:6]:
        step(m, opt, b)
    safe = [t.clone() for t in opt.safe_snapshot.state_dict()["params"]]
    step(m, opt, batches[6], spike=1e4)
    assert step(m, opt, batches[7], spike=1e4) == "rollback"     # blend + bad proposal
    assert opt.safe_snapshot.step <= 6 and all(
        torch.equal(a, b) for a, b in zip(opt.safe_snapshot.state_dict()["params"], safe))


# -- EWC -----------------------------------------------------------------------------------
def test_ewc_penalty_closed_form_decay_growth_and_switch_off():
    m, opt, batches = guard([FisherDiagonal(), EWCPenalty(lam=2.0, tau=3.0, growth=1.0)])
    assert float(ewc_penalty(opt)) == 0.0
    for b in batches[:5]:
        step(m, opt, b)
    step(m, opt, batches[5], spike=1e4)
    ewc = opt.recovery[1]
    assert ewc.active and ewc.strength() == 2.0 and "ewc_lambda=2" in opt.last_event.action
    fisher = opt.recovery[0].fisher
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.01)
    expected = 0.5 * 2.0 * sum((f * 0.01 ** 2).sum() for f in fisher)
    torch.testing.assert_close(ewc_penalty(opt), expected.float(), rtol=1e-4, atol=0)
    penalty = ewc_penalty(opt)
    penalty.backward()                                            # differentiable
    assert all(p.grad is not None for p in m.parameters())
    with torch.no_grad():
        for p in m.parameters():
            p.sub_(0.01)
    step(m, opt, batches[6])
    assert ewc.healthy == 1 and math.isclose(ewc.strength(), 2.0 * math.exp(-1 / 3))
    step(m, opt, batches[7], spike=1e4)
    assert ewc.recoveries == 2 and ewc.strength() == 4.0           # grows with recoveries
    for b in batches[8:40]:
        step(m, opt, b)
    assert not ewc.active and ewc.recoveries == 0 and float(ewc_penalty(opt)) == 0.0


def test_ewc_layer_patterns():
    m = tiny.model()
    probe_set, _ = tiny.data()
    opt = GuardedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), tiny.probe_for(m, probe_set),
                           module=m, recovery=[FisherDiagonal(), EWCPenalty(layers={"4.*": 0.0,
                                                                                     "0.weight": 3.0})])
    assert opt.recovery[1].layer_scales(opt) == [3.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    opt.recovery[1].layers = {"head.*": 1.0}
    with pytest.raises(ValueError, match="head"):
        opt.recovery[1].layer_scales(opt)
    no_module = GuardedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1),
                                 recovery=[EWCPenalty(layers={"0.*": 2.0})])
    with pytest.raises(ValueError, match="module=model"):
        no_module.recovery[0].layer_scales(no_module)


def test_tools_without_a_fisher_say_how_to_add_it():
    from types import SimpleNamespace
    from guarded_optim.fisher import find_fisher, is_default_fisher
    with pytest.raises(ValueError, match="FisherDiagonal"):
        find_fisher(SimpleNamespace(recovery=[], state={}, param_groups=[]))
    m, opt, batches = guard([EWCPenalty()])
    opt.recovery = [a for a in opt.recovery if not is_default_fisher(a)]   # no Fisher at all
    for b in batches[:3]:
        step(m, opt, b)
    with pytest.raises(ValueError, match="FisherDiagonal"):
        step(m, opt, batches[3], spike=1e4)


@pytest.mark.parametrize("make", [lambda: FisherDiagonal(alpha=0), lambda: FisherDiagonal(every=0),
                                  lambda: FisherDrift(tau=0), lambda: ImportanceWeightedRollback(lam=-1),
                                  lambda: EWCPenalty(lam=0), lambda: EWCPenalty(layers={"x": -1.0})])
def test_bad_arguments_raise(make):
    with pytest.raises(ValueError, match="Invalid"):
        make()


# -- drift snapshots -----------------------------------------------------------------------
def test_fisher_drift_pushes_a_verified_snapshot_when_drift_exceeds_tau():
    results = {}
    for tau in (1e-12, 1e12):
        m, opt, batches = guard([FisherDiagonal(), FisherDrift(tau=tau, check_every=2)],
                                history=50, checkpoint_every=1000)
        for b in batches[:20]:
            step(m, opt, b)
        results[tau] = (len(opt.snapshot_history), opt.recovery[1])
    assert results[1e12][0] == 1                  # only the first (empty ring) push
    assert results[1e-12][0] == results[1e-12][1].triggered == 10
    assert len(results[1e12][1].drift_history) == 9


# -- wired into a guard: clean runs untouched, faults acted on, state round trips ----------
def all_tools():
    return [FisherDiagonal(track_mean=True), FisherDrift(tau=1.0), ImportanceWeightedRollback(),
            EWCPenalty(layers={"0.*": 2.0})]


@pytest.mark.parametrize("seed", range(3))
def test_clean_run_with_every_fisher_tool_is_bit_identical_to_the_plain_guard(seed):
    states = []
    for recovery in ([], all_tools()):
        m, opt, batches = guard(recovery)
        for b in batches[:40]:
            x, y = b

            def closure():
                opt.zero_grad()
                loss = torch.nn.functional.mse_loss(m(x), y) + ewc_penalty(opt)
                loss.backward()
                return loss
            opt.step(closure)
            assert opt.last_decision == "accept"
        states.append(tiny.full_state(m, opt))
    tiny.assert_same(*states)


def test_state_round_trips_weights_only(tmp_path):
    m, opt, batches = guard(all_tools())
    for b in batches[:12]:
        step(m, opt, b)
    step(m, opt, batches[12], spike=1e4)
    assert opt.recovery[3].active and opt.recovery[2].blends == 1
    torch.save(opt.state_dict(), tmp_path / "o.pt")
    m2, opt2, _ = guard(all_tools())
    opt2.load_state_dict(torch.load(tmp_path / "o.pt", weights_only=True))
    assert tiny.same([a.state_dict() for a in opt2.recovery], [a.state_dict() for a in opt.recovery])
    host = FisherDiagonal(host=True)
    host.load_state_dict(opt.recovery[0].state_dict())
    assert tiny.same(host.state_dict(), opt.recovery[0].state_dict())


def test_the_guard_carries_a_fisher_diagonal_at_no_extra_cost_with_adam():
    """The design card's Fisher diagonal: Adam's bias-corrected exp_avg_sq, read in place."""
    m = tiny.model(0)
    probe_set, batches = tiny.data(0, steps=6)
    opt = GuardedOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-2, betas=(0.9, 0.99)),
                           tiny.probe_for(m, probe_set), module=m)
    for x, y in batches:
        opt.step(tiny.closure_for(opt, m, x, y))
    fisher = opt.fisher_diagonal()
    p = next(m.parameters())
    st = opt.state[p]
    assert torch.equal(fisher[0], st["exp_avg_sq"] / (1 - 0.99 ** float(st["step"])))
    sd = opt.state_dict()
    assert sd["guard"]["fisher"] == "state.exp_avg_sq" and opt.safe_snapshot.nbytes() == sum(
        t.numel() * t.element_size() for t in
        opt.safe_snapshot._saved_params + opt.safe_snapshot._saved_state + opt.safe_snapshot._saved_buffers)  # no extra
    # the tools read the same estimate without a FisherDiagonal action
    from guarded_optim.fisher import InnerFisher, find_fisher
    assert isinstance(find_fisher(opt), InnerFisher)
    sgd = GuardedOptimizer(torch.optim.SGD(tiny.model(1).parameters(), lr=0.1))
    # SGD keeps no second moment: nothing to read before a step, and the checkpoint names
    # the default host tracker where the guard adds one (tests/test_fisher_default.py)
    from guarded_optim.fisher import is_default_fisher
    tracked = any(is_default_fisher(a) for a in sgd.recovery)
    assert sgd.fisher_diagonal() is None
    assert sgd.state_dict()["guard"]["fisher"] == ("host" if tracked else None)
