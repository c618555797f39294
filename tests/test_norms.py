"""Global norms never overflow for finite tensors; NaN and Inf always read as non-finite.

Issue 11, item 5 (low-precision norms read as non-finite) and issue 10, item 6 (sparse
gradients): ``global_norm`` sums per tensor without overflow and combines in float64,
measures complex tensors through ``view_as_real`` and sparse ones through their values,
and every default signal handles sparse gradients and float16/bfloat16 parameters and
optimizer state.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

from guarded_optim import GuardedOptimizer
from guarded_optim.signals import (NonFinite, NonFiniteWeights, OptimizerStateHealth,
                                   StepMeasurement, WeightNorm, global_norm)

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.filterwarnings("ignore:Sparse invariant checks"),
              pytest.mark.filterwarnings("ignore:Sparse CSR tensor support")]

LOW = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


def _exact(tensors) -> float:
    """The reference: every element in float64, scaled so that nothing overflows."""
    vals = [torch.view_as_real(t).double() if t.is_complex() else t.double() for t in tensors]
    big = max((float(v.abs().max()) for v in vals if v.numel()), default=0.0)
    if big == 0.0:
        return 0.0
    return big * math.sqrt(sum(float((v / big).square().sum()) for v in vals))


# -- overflow: a finite model never reads as non-finite ------------------------------------
def test_fp16_weights_of_300_do_not_overflow():
    w = torch.full((100_000,), 300.0, dtype=torch.float16)
    assert math.isinf(float(torch.linalg.vector_norm(w)))     # what the old code read
    n = global_norm([w])
    assert n.dtype == torch.float64 and math.isclose(float(n), 300 * math.sqrt(1e5), rel_tol=1e-4)


@pytest.mark.parametrize("dtype,scale", [(torch.float32, 1e20), (torch.float32, 3e38),
                                         (torch.bfloat16, 1e30), (torch.bfloat16, 3e38),
                                         (torch.float16, 65504.0), (torch.float64, 1e150)])
def test_huge_finite_tensors_read_finite_and_exact(dtype, scale):
    ts = [torch.full((1000,), scale, dtype=dtype), torch.ones(7, dtype=dtype),
          torch.full((3, 5), -scale / 7, dtype=dtype)]
    n = float(global_norm(ts))
    assert math.isfinite(n) and math.isclose(n, _exact(ts), rel_tol=1e-3)


def test_float64_bound_is_documented():
    """float64 tensors are summed in float64: finite up to a norm of about 1.3e154."""
    assert math.isfinite(float(global_norm([torch.full((4,), 1e153, dtype=torch.float64)])))
    assert math.isinf(float(global_norm([torch.full((4,), 1e200, dtype=torch.float64)])))


@pytest.mark.parametrize("dtype", LOW + [torch.complex64])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_and_inf_are_always_detected(dtype, bad):
    for scale in (1.0, 1e-30 if dtype != torch.float16 else 1e-7, 1e20 if dtype not in
                  (torch.float16,) else 6e4):
        t = torch.full((257,), scale, dtype=dtype)
        t[100] = complex(bad, 0) if dtype.is_complex else bad
        assert not math.isfinite(float(global_norm([torch.ones(3), t]))), (dtype, scale)


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(LOW), st.floats(-30, 38), st.integers(1, 5000), st.integers(0, 4999),
       st.sampled_from([None, math.nan, math.inf, -math.inf]))
def test_finite_iff_every_element_is_finite(dtype, log10_scale, n, where, bad):
    finfo = torch.finfo(dtype)
    scale = min(10.0 ** log10_scale, finfo.max / 2)
    g = torch.Generator().manual_seed(n)
    t = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1).mul(scale).to(dtype)
    if bad is not None:
        t[where % n] = bad
    norm = float(global_norm([t]))
    assert math.isfinite(norm) == (bad is None)
    if bad is None:
        assert math.isclose(norm, _exact([t]), rel_tol=1e-3, abs_tol=1e-300)


def test_nonfinite_signals_on_huge_finite_and_on_nan_weights():
    """The default signals' reading of a measurement: finite huge values are healthy."""
    p = nn.Parameter(torch.full((100_000,), 300.0, dtype=torch.float16))
    opt = torch.optim.SGD([p], lr=0.0)
    p.grad = torch.full_like(p, 300.0)
    grads = [p.grad]
    m = StepMeasurement(0, global_norm(grads), None, opt)
    assert not bool(NonFinite().measure(m)) and not bool(NonFiniteWeights().measure(m))
    with torch.no_grad():
        p[5] = math.nan
    assert bool(NonFiniteWeights().measure(StepMeasurement(0, global_norm(grads), None, opt)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_model_trains_under_the_default_guard(dtype):
    """A float16 / bfloat16 model (params, grads and Adam state in that dtype) whose weight
    norm is far above 65504 trains without an alarm, and a NaN gradient is still skipped."""
    torch.manual_seed(0)
    model = nn.Linear(64, 1).to(dtype)
    big = nn.Parameter(torch.full((100_000,), 300.0, dtype=dtype))   # norm 9.5e4 > 65504
    # eps=1e-4: AdamW's default 1e-8 is 0 in float16 (0/0 = NaN weights, rightly rolled back)
    opt = GuardedOptimizer(torch.optim.AdamW(list(model.parameters()) + [big], lr=1e-3, eps=1e-4))
    g = torch.Generator().manual_seed(0)
    decisions = []
    for t in range(30):
        x = torch.randn(16, 64, generator=g).to(dtype)
        opt.zero_grad()
        loss = (model(x).float().square().mean() + 1e-6 * big.float().mean())
        loss.backward()
        if t == 25:
            model.weight.grad[0, 0] = math.nan
        opt.step(lambda loss=loss: loss)
        decisions.append(opt.last_decision)
    assert decisions == ["accept"] * 25 + ["skip"] + ["accept"] * 4, decisions
    assert opt.last_event is not None and opt.stats["rollbacks"] == 0


# -- complex and sparse --------------------------------------------------------------------
def test_complex_tensors_are_measured_through_their_real_view():
    c = torch.randn(40, 3, dtype=torch.complex64)
    assert math.isclose(float(global_norm([c])), float(torch.view_as_real(c).double().norm()),
                        rel_tol=1e-6)


def test_complex_parameters_train_under_the_default_guard():
    """Adam keeps complex state for complex parameters: OptimizerStateHealth covers it."""
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(8, dtype=torch.complex64))
    opt = GuardedOptimizer(torch.optim.Adam([w], lr=1e-2))
    target = torch.randn(8, dtype=torch.complex64)
    for _ in range(25):
        opt.zero_grad()
        loss = (w - target).abs().square().sum()
        loss.backward()
        opt.step(lambda loss=loss: loss)
        assert opt.last_decision == "accept"
    health = next(s for s in opt.signals if isinstance(s, OptimizerStateHealth))
    assert health.keys == ("exp_avg", "exp_avg_sq") and health.count > 0


def test_sparse_coo_is_measured_through_its_coalesced_values():
    i = torch.tensor([[0, 1, 1, 4]])
    s = torch.sparse_coo_tensor(i, torch.tensor([3.0, 2.0, 2.0, 0.0]), (6,))
    assert not s.is_coalesced()
    assert math.isclose(float(global_norm([s])), 5.0)          # [3, 4, 0]: repeats summed
    csr = torch.tensor([[0.0, 3.0], [4.0, 0.0]]).to_sparse_csr()
    assert math.isclose(float(global_norm([csr, s])), math.sqrt(50.0))
    bad = torch.sparse_coo_tensor(i, torch.tensor([3.0, math.nan, 2.0, 0.0]), (6,))
    assert math.isnan(float(global_norm([bad])))


def _embedding_run(make_opt, steps=30, fault=None):
    torch.manual_seed(0)
    emb, head = nn.Embedding(50, 8, sparse=True), nn.Linear(8, 1)
    opt = GuardedOptimizer(make_opt(emb, head))
    g = torch.Generator().manual_seed(1)
    out = []
    for t in range(steps):
        idx, y = torch.randint(50, (32,), generator=g), torch.randn(32, 1, generator=g)
        opt.zero_grad()
        loss = F.mse_loss(head(emb(idx)), y)
        loss.backward()
        if fault is not None:
            fault(t, emb.weight.grad, [p.grad for p in (*emb.parameters(), *head.parameters())
                                       if p.grad is not None])
        opt.step(lambda loss=loss: loss)
        out.append((opt.last_decision, opt.last_event.reason))
    return out, opt


OPTIMIZERS = {
    "SparseAdam": lambda emb, head: torch.optim.SparseAdam(list(emb.parameters()), lr=1e-2),
    "SGD": lambda emb, head: torch.optim.SGD([*emb.parameters(), *head.parameters()], lr=0.1),
    # momentum keeps a *sparse* momentum_buffer for sparse gradients
    "SGD-momentum": lambda emb, head: torch.optim.SGD([*emb.parameters(), *head.parameters()],
                                                     lr=0.1, momentum=0.9),
    "Adagrad": lambda emb, head: torch.optim.Adagrad([*emb.parameters(), *head.parameters()],
                                                     lr=0.1),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_sparse_embedding_trains_under_the_default_guard(name):
    decisions, opt = _embedding_run(OPTIMIZERS[name])
    assert decisions == [("accept", None)] * 30, decisions
    assert math.isfinite(opt.last_event.grad_norm) and opt.last_event.grad_norm > 0


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_sparse_gradient_faults_are_caught(name):
    def fault(t, sparse_grad, grads):
        if t == 20:
            sparse_grad._values()[0, 0] = math.nan
        if 24 <= t < 27:
            for g in grads:
                g.mul_(300.0)
    decisions, _ = _embedding_run(OPTIMIZERS[name], fault=fault)
    assert decisions[20] == ("skip", "nonfinite")
    assert decisions[24:27] == [("skip", "grad_spike")] * 3
    assert all(d == ("accept", None) for i, d in enumerate(decisions) if i not in
               (20, 24, 25, 26)), decisions


def test_optimizer_state_health_measures_a_sparse_momentum_buffer():
    """OptimizerStateHealth measures sparse state through its values."""
    torch.manual_seed(0)
    emb = nn.Embedding(20, 4, sparse=True)
    opt = torch.optim.SGD(emb.parameters(), lr=0.1, momentum=0.9)
    emb(torch.tensor([1, 2, 2])).sum().backward()
    opt.step()
    assert opt.state[emb.weight]["momentum_buffer"].is_sparse
    m = StepMeasurement(1, global_norm([emb.weight.grad]), None, opt)
    sig = OptimizerStateHealth()
    assert not bool(sig.measure(m)) and math.isfinite(float(sig._norm[0]))


def test_weight_norm_reads_fp16_model_beyond_65504():
    """WeightNorm compares a float64 norm: no inf/inf = NaN for a float16 model."""
    p = nn.Parameter(torch.full((100_000,), 300.0, dtype=torch.float16))
    opt = torch.optim.SGD([p], lr=0.0)
    sig = WeightNorm()
    for step in range(3):
        m = StepMeasurement(step, torch.zeros((), dtype=torch.float64), None, opt)
        assert not bool(sig.measure(m))
        sig.observe(m, True, False)
    assert math.isclose(float(sig.last), 300 * math.sqrt(1e5), rel_tol=1e-4)


def test_empty_and_meta_free_inputs():
    assert float(global_norm([])) == 0.0
    assert float(global_norm([torch.zeros(0), torch.tensor([3.0, 4.0])])) == 5.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        global_norm([torch.ones(3, dtype=torch.float16), torch.ones(2, dtype=torch.float64)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiny_norms_do_not_underflow_to_zero(dtype):
    """Squares below float32's smallest normal (norms below 1e-19) used to sum to 0 on CPU."""
    for scale in (1e-24, 1e-28, 1e-35):
        t = torch.full((3,), scale, dtype=dtype)
        exact = math.sqrt(3) * float(t[0].double())
        assert math.isclose(float(global_norm([t])), exact, rel_tol=1e-3)
    assert float(global_norm([torch.zeros(5, dtype=dtype)])) == 0.0
