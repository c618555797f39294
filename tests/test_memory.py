"""What the guard holds and saves beyond the bare optimizer (issue 12, item 6).

Fast and deterministic; no timing is asserted. The figures come from
:mod:`guarded_optim.bench.memory`, the same functions the ``memory`` suite reports with.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from guarded_optim import GuardedOptimizer
from guarded_optim.bench import memory
from guarded_optim.bench.models import MLP

#: bytes a guard may hold or save beyond the per-parameter cost whatever the model's size:
#: scalar step counters, signal references, RNG states, counters
CONSTANT = 16 * 1024


def _problem(seed: int = 0, dtype: torch.dtype = torch.float32, inputs: int = 256,
             hidden: int = 256):
    """An MLP (134k parameters by default) with fixed batches and a fixed probe set."""
    torch.manual_seed(seed)
    model = MLP(inputs=inputs, hidden=hidden, classes=10, depth=2).to(dtype)
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(5, 32, inputs, generator=g).to(dtype)
    ys = torch.randint(0, 10, (5, 32), generator=g)
    xp, yp = torch.randn(16, inputs, generator=g).to(dtype), torch.randint(0, 10, (16,), generator=g)
    return model, list(zip(xs, ys)), lambda: F.cross_entropy(model(xp).float(), yp)


def _step(opt, model, x, y) -> None:
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x).float(), y).backward()
    opt.step()


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _state_tensors(opt) -> list[torch.Tensor]:
    return [v for st in opt.state.values() for v in st.values() if isinstance(v, torch.Tensor)]


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("probed", [False, True], ids=["no_probe", "probe"])
def test_defaults_hold_one_copy_of_params_and_state(probed):
    """Defaults on fp32 AdamW: one snapshot (params + state, 12 B/param), no history."""
    model, batches, probe = _problem()
    opt = GuardedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3),
                           probe if probed else None, module=model)
    for x, y in batches * 3:   # 15 steps: past the first probe-less verification (step 10)
        _step(opt, model, x, y)
    n = sum(p.numel() for p in model.parameters())
    held = memory.held_bytes(opt)
    assert held["ring"] == 0 and len(opt.snapshot_history) == 0
    assert held["snapshot"] == _nbytes(model.parameters()) + _nbytes(_state_tensors(opt.inner))
    assert sum(held.values()) <= 12 * n + CONSTANT, sum(held.values()) / n


@pytest.mark.parametrize("probed", [False, True], ids=["no_probe", "probe"])
def test_checkpoint_within_10_percent_of_bare(probed):
    """After a verified step the guard's checkpoint records the snapshot instead of copying it."""
    model, batches, probe = _problem()
    bare_model, _, _ = _problem()
    bare = torch.optim.AdamW(bare_model.parameters(), lr=1e-3)
    opt = GuardedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3),
                           probe if probed else None, module=model, probe_every=1)
    for x, y in batches:
        _step(bare, bare_model, x, y)
        _step(opt, model, x, y)
    assert opt.last_decision == "accept"
    assert opt.stats["rollbacks"] == opt.stats["skipped"] == 0
    if probed:
        assert opt.stats["measured"] == len(batches)   # every step verified by the probe
    guarded, plain = memory.checkpoint_bytes(opt), memory.checkpoint_bytes(bare)
    assert guarded <= 1.1 * plain, guarded / plain
    n = sum(p.numel() for p in model.parameters())
    assert guarded - plain <= CONSTANT, (guarded - plain) / n


class AdamWFp32State(torch.optim.Optimizer):
    """AdamW for low-precision parameters with fp32 moments: the update is computed in fp32
    and rounded into the parameter (torch's AdamW keeps its state in the parameter's dtype)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                st["step"] += 1
                t = float(st["step"])
                grad = p.grad.float()
                st["exp_avg"].lerp_(grad, 1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
                master = p.float().mul_(1 - group["lr"] * group["weight_decay"])
                denom = (st["exp_avg_sq"] / (1 - b2 ** t)).sqrt_().add_(group["eps"])
                master.addcdiv_(st["exp_avg"], denom, value=-group["lr"] / (1 - b1 ** t))
                p.copy_(master)
        return loss


def test_bf16_params_fp32_state_snapshot_sized_by_real_dtypes_and_rollback_is_exact():
    model, batches, probe = _problem(dtype=torch.bfloat16, inputs=64, hidden=64)
    inner = AdamWFp32State(model.parameters(), lr=1e-3)
    opt = GuardedOptimizer(inner, probe, module=model, probe_every=1)
    for x, y in batches[:3]:
        _step(opt, model, x, y)
    assert opt.stats["accepted"] == 3 and opt.stats["measured"] == 3

    params = list(model.parameters())
    state = _state_tensors(inner)
    assert all(p.dtype == torch.bfloat16 for p in params)
    assert {k: v.dtype for k, v in inner.state[params[0]].items()} == {
        "step": torch.float32, "exp_avg": torch.float32, "exp_avg_sq": torch.float32}
    n = sum(p.numel() for p in params)
    # the snapshot: 2 B per bf16 parameter element, the fp32 state at 4 B per element
    assert opt.safe_snapshot.nbytes() == 2 * n + _nbytes(state)
    assert _nbytes(state) == 8 * n + 4 * len(params)
    assert memory.held_bytes(opt)["snapshot"] <= 10 * n + CONSTANT

    before_params = [p.detach().clone() for p in params]
    before_state = {i: {k: v.clone() for k, v in inner.state[p].items()} for i, p in enumerate(params)}
    for g in opt.param_groups:
        g["lr"] = 1e6                       # a step that wrecks the weights
    x, y = batches[3]
    _step(opt, model, x, y)
    assert opt.last_decision == "rollback"
    for p, b in zip(params, before_params):
        assert p.dtype == torch.bfloat16 and torch.equal(p.view(torch.int16), b.view(torch.int16))
    for i, p in enumerate(params):
        live = inner.state[p]
        assert live.keys() == before_state[i].keys()
        for k, v in before_state[i].items():
            assert live[k].dtype == v.dtype and torch.equal(live[k], v), (i, k)


def test_memory_suite_smoke(tmp_path):
    """One tiny model, one repetition: every row and column is there and finite."""
    rows = memory.run(sizes=(2_000,), quick=True, reps=1, out=str(tmp_path))
    assert [r["guard"] for r in rows] == list(memory.GUARDS)
    for r in rows:
        assert r["model"] == "mlp_2k" and r["params"] > 1_000
        assert 12.0 <= r["held_B_per_param"] <= 12.0 + CONSTANT / r["params"]
        assert r["ckpt_ratio"] >= 1.0
        for key in ("ckpt_bare_B_per_param", "ckpt_guard_B_per_param", "step_ms_bare",
                    "step_ms_guard", "step_ratio", "full_ratio"):
            assert math.isfinite(r[key]) and r[key] > 0, key
    table = memory.format_table(rows)
    assert "mlp_2k/no_probe" in table and "mlp_2k/probe" in table
    assert (tmp_path / "memory.csv").read_text().startswith("model/guard,")
    if memory.figure(rows, str(tmp_path / "again.png")) is not None:
        assert (tmp_path / "memory.png").stat().st_size > 0


def test_gpt_reference_size():
    task = memory.gpt_task()
    assert sum(p.numel() for p in task.model.parameters()) == 429_151
    assert task.batch_size == 32 and task.split.x_train.shape[1] == 64
    assert memory._gpt_width(1_000_000) % 4 == 0


# -- pinned host memory (issue 15, item 12) --------------------------------------------------
@pytest.mark.parametrize("nbytes, reserved", [(0, 0), (1, 1), (2, 2), (3, 4), (4, 4), (5, 8),
                                              (4095, 4096), (4096, 4096), (4097, 8192),
                                              (5_000_000, 8 * 2**20), (2**30 + 1, 2**31)])
def test_pinned_reserved_rounds_up_to_a_power_of_two(nbytes, reserved):
    assert memory.pinned_reserved(nbytes) == reserved


def test_pinned_reserved_rejects_what_is_not_a_size():
    for bad in (-1, 1.5, True, "8"):
        with pytest.raises(ValueError, match="nbytes"):
            memory.pinned_reserved(bad)


def test_pinned_bytes_of_a_host_snapshot_with_history():
    """Every buffer of the safe snapshot and of the ring is one pinned allocation, rounded
    up on its own; the exact bytes are held_bytes' snapshot and ring."""
    model, batches, probe = _problem(inputs=100, hidden=60)
    opt = GuardedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-3), probe, module=model,
                           snapshot="host", history=2, checkpoint_every=1)
    for x, y in batches[:3]:
        _step(opt, model, x, y)
    assert opt.safe_snapshot.mode == "host" and len(opt.snapshot_history) == 2
    pinned = memory.pinned_bytes(opt)
    held = memory.held_bytes(opt)
    assert pinned["exact"] == held["snapshot"] + held["ring"] == 3 * opt.safe_snapshot.nbytes()
    sizes = [t.numel() * t.element_size() for t in
             opt.safe_snapshot._saved_params + opt.safe_snapshot._saved_state + opt.safe_snapshot._saved_buffers]
    assert pinned["reserved"] == 3 * sum(1 << (n - 1).bit_length() for n in sizes if n)
    assert pinned["exact"] <= pinned["reserved"] < 2 * pinned["exact"]
    # the 100x60 weight (24,000 B) takes 32 KiB; its two Adam moments the same
    w = next(model.parameters())
    assert w.shape == (60, 100) and memory.pinned_reserved(w.numel() * 4) == 32 * 1024


def test_memory_suite_reports_pinned_bytes(tmp_path):
    rows = memory.run(sizes=(2_000,), quick=True, reps=1, out=str(tmp_path))
    for r in rows:
        assert r["pinned_ratio"] >= 1.0 and r["pinned_ratio"] < 2.0
        assert r["pinned_B_per_param"] == pytest.approx(r["pinned_ratio"] * (
            r["snapshot_B_per_param"] + r["ring_B_per_param"]))
    header = (tmp_path / "memory.csv").read_text().splitlines()[0].split(",")
    assert {"pinned_B_per_param", "pinned_ratio", "held_B_per_param"} <= set(header)
    assert "pinned B/p" in memory.format_table(rows)


def test_pinned_bytes_counts_a_staged_flat_buffer_once():
    """Staged tensors (snapshot.plan_groups) are slices of one flat host buffer: one
    allocation, rounded once, not once per slice."""
    from types import SimpleNamespace
    flat = torch.zeros(300)                       # 1200 bytes -> 2048 reserved
    snap = SimpleNamespace(_saved_params=[flat[:100], flat[100:250]], _saved_state=[flat[250:]],
                           _saved_buffers=[])
    out = memory.pinned_bytes(SimpleNamespace(safe_snapshot=snap, snapshot_history=[]))
    assert out == {"exact": 1200, "reserved": 2048}
