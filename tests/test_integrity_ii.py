"""Integrity II (issue 21): damage written between steps heals at once, a loaded checkpoint
checks the weights it belongs to, interventions are visible with no logging configured, and
an adopted bare checkpoint keeps the run's step numbers."""

from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tiny
from guarded_optim import GuardedOptimizer


def mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))


def stream(seed: int, steps: int):
    g = torch.Generator().manual_seed(1000 + seed)
    w = torch.randn(6, 1, generator=g)
    out = []
    for _ in range(steps):
        x = torch.randn(32, 6, generator=g)
        out.append((x, torch.tanh(x @ w)))
    return out


def train(m, opt, batches):
    """The ordinary loop: backward, then ``opt.step()`` (no closure)."""
    decisions = []
    for x, y in batches:
        opt.zero_grad()
        F.mse_loss(m(x), y).backward()
        opt.step()
        decisions.append(getattr(opt, "last_decision", None))
    return decisions


def params(m):
    return [p.detach().clone() for p in m.parameters()]


# -- 1. weights damaged between steps -----------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("write", ["inplace", "data"])
def test_damage_between_steps_on_a_verified_state_heals_within_one_step(seed, write):
    m = mlp(seed)
    opt = GuardedOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-3))
    batches = stream(seed, 60)
    assert train(m, opt, batches[:40]) == ["accept"] * 40
    assert opt.step_state.unverified == 0 and opt.safe_snapshot.step == 40   # verified
    verified = params(m)
    with torch.no_grad():
        for p in m.parameters():
            (p if write == "inplace" else p.data).mul_(1e3)   # a stray write between steps
    decisions = train(m, opt, batches[40:41])
    assert decisions == ["rollback"]                      # healed at the very next step
    assert all(torch.equal(a, b) for a, b in zip(params(m), verified))
    assert opt.stats["skipped"] == 0 and opt.stats["failures_weight_norm"] == 1
    assert train(m, opt, batches[41:60]) == ["accept"] * 19


def test_damage_in_the_first_steps_is_caught_before_any_verification():
    """The post-step signals take their references when the guard is built."""
    m = mlp(0)
    opt = GuardedOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-3))
    initial = params(m)
    batches = stream(0, 20)
    assert train(m, opt, batches[:3]) == ["accept"] * 3
    assert opt.step_state.unverified == 3
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(1e3)
    decisions = train(m, opt, batches[3:10])               # the first verification: step 10
    assert decisions[-1] == "rollback" and "rollback" not in decisions[:-1]
    assert all(torch.equal(a, b) for a, b in zip(params(m), initial))
    assert train(m, opt, batches[10:20]) == ["accept"] * 10


def test_a_clean_guard_builds_the_same_references_as_before_stepping():
    """Taking the references at construction changes nothing on a clean run: bit-identical
    to bare."""
    m1, m2 = mlp(3), mlp(3)
    bare = torch.optim.AdamW(m1.parameters(), lr=1e-3)
    opt = GuardedOptimizer(torch.optim.AdamW(m2.parameters(), lr=1e-3))
    batches = stream(3, 50)
    train(m1, bare, batches)
    assert train(m2, opt, batches) == ["accept"] * 50
    assert all(torch.equal(a, b) for a, b in zip(m1.parameters(), m2.parameters()))


# -- 2. a loaded checkpoint checks the weights it belongs to ------------------------------------
def _trained(probe: bool, seed: int = 0):
    m = mlp(seed)
    xv, yv = stream(seed + 50, 1)[0]
    opt = GuardedOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-3),
                           probe=(lambda: F.mse_loss(m(xv), yv)) if probe else None)
    train(m, opt, stream(seed, 30))
    return m, opt


@pytest.mark.parametrize("probe", [False, True])
def test_damage_to_a_copy_before_its_first_step_is_not_adopted_as_verified(probe):
    m, opt = _trained(probe)
    m2, opt2 = copy.deepcopy((m, opt)) if not probe else (mlp(0), None)
    if probe:   # a probe that evaluates the copy
        xv, yv = stream(50, 1)[0]
        m2.load_state_dict(m.state_dict())
        opt2 = GuardedOptimizer(torch.optim.AdamW(m2.parameters(), lr=1e-3),
                                probe=lambda: F.mse_loss(m2(xv), yv))
    opt2.load_state_dict(opt.state_dict())
    with torch.no_grad():
        for p in m2.parameters():
            p.mul_(1e3)
    before = tiny.full_state(m2, opt2)
    x, y = stream(0, 31)[30]
    opt2.zero_grad()
    F.mse_loss(m2(x), y).backward()
    with pytest.raises(ValueError, match="load the model's state_dict") as info:
        opt2.step()
    assert "weight_norm" in str(info.value)
    tiny.assert_same(tiny.full_state(m2, opt2), before)   # nothing changed


def test_optimizer_checkpoint_loaded_onto_other_weights_says_so(caplog):
    m, opt = _trained(False)
    sd = opt.state_dict()
    m3 = mlp(7)                                            # another model's (fresh) weights
    opt3 = GuardedOptimizer(torch.optim.AdamW(m3.parameters(), lr=1e-3))
    opt3.load_state_dict(sd)
    caplog.set_level(logging.WARNING, logger="guarded_optim")
    train(m3, opt3, stream(0, 2))
    text = caplog.text
    assert "was saved with other weights" in text and "load the model's state_dict" in text
    assert opt3.stats["checkpoint_mismatches"] == 1


def test_the_model_and_optimizer_loaded_together_in_either_order_say_nothing(caplog):
    m, opt = _trained(True)
    ckpt = {"model": copy.deepcopy(m.state_dict()), "optimizer": opt.state_dict()}
    m2 = mlp(9)
    xv, yv = stream(50, 1)[0]
    opt2 = GuardedOptimizer(torch.optim.AdamW(m2.parameters(), lr=1e-3),
                            probe=lambda: F.mse_loss(m2(xv), yv))
    opt2.load_state_dict(ckpt["optimizer"])                # optimizer first, then the model
    m2.load_state_dict(ckpt["model"])
    caplog.set_level(logging.WARNING, logger="guarded_optim")
    train(m2, opt2, stream(0, 3))
    assert caplog.text == "" and opt2.stats["checkpoint_mismatches"] == 0


def test_the_fingerprint_is_a_few_bytes_per_tensor():
    m, opt = _trained(False)
    fp = opt.state_dict()["guard"]["fingerprint"]
    assert len(fp) == len(list(m.parameters())) and all(len(v) == 2 for v in fp)


def test_a_checkpoint_without_a_fingerprint_still_loads():
    m, opt = _trained(False)
    sd = opt.state_dict()
    del sd["guard"]["fingerprint"]
    m2 = copy.deepcopy(m)
    opt2 = GuardedOptimizer(torch.optim.AdamW(m2.parameters(), lr=1e-3))
    opt2.load_state_dict(sd)
    assert train(m2, opt2, stream(0, 2)) == ["accept"] * 2


# -- 3. visible without configuring logging; step numbers ----------------------------------------
SCRIPT = textwrap.dedent("""
    import torch, torch.nn.functional as F
    from torch import nn
    from guarded_optim import GuardedOptimizer
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
    xv, yv = torch.randn(16, 6), torch.randn(16, 1)
    opt = GuardedOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-3),
                           probe=lambda: F.mse_loss(m(xv), yv))
    class Stop(Exception):
        pass
    for it in range(300):
        x, y = torch.randn(32, 6), torch.randn(32, 1)
        bad = it % 15 == 7                        # 20 damaging updates in 300 steps
        for g in opt.param_groups:
            g["lr"] = 50.0 if bad else 1e-3
        opt.zero_grad()
        F.mse_loss(m(x), y).backward()
        opt.step()
    print("stats", opt.stats["rollbacks"], opt.stats["skipped"])
""")


def test_interventions_are_visible_with_no_logging_configured():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         env=env, timeout=600)
    assert out.returncode == 0, out.stderr
    rollbacks = int(out.stdout.split()[1])
    assert rollbacks >= 10
    lines = [l for l in out.stderr.splitlines() if l.strip()]
    assert lines, "nothing printed: the interventions were invisible"
    assert "step" in lines[0] and "rejected" in lines[0] and "guarded_optim" in lines[0]
    assert len(lines) <= 6, lines                          # seen, not flooded


def test_an_adopted_bare_checkpoint_keeps_the_runs_step_count():
    m = mlp(0)
    bare = torch.optim.AdamW(m.parameters(), lr=1e-3)
    train(m, bare, stream(0, 25))
    sd = copy.deepcopy(bare.state_dict())   # torch shares the loaded step tensors otherwise
    m2 = copy.deepcopy(m)
    events = []
    opt = GuardedOptimizer(torch.optim.AdamW(m2.parameters(), lr=1e-3), callbacks=[events.append])
    opt.load_state_dict(sd)
    train(m2, opt, stream(1, 2))
    assert [e.step for e in events] == [25, 26]
    wrapped = GuardedOptimizer(bare)                       # wrapping a bare optimizer mid-run
    assert wrapped.step_state.t == 25


def test_a_step_that_raises_after_the_reference_was_retaken_keeps_it():
    """Weights written after construction make the first step measure the reference again;
    if that step's closure then raises, the new reference stays (it is its own transaction),
    and the next step is not judged against the stale one."""
    m = mlp(0)
    xv, yv = stream(50, 1)[0]
    opt = GuardedOptimizer(torch.optim.AdamW(m.parameters(), lr=1e-3),
                           probe=lambda: F.mse_loss(m(xv), yv))
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(10.0)                                  # "a checkpoint loaded after construction"
    retaken = float(F.mse_loss(m(xv), yv))

    def boom():
        raise RuntimeError("data loader failed")

    with pytest.raises(RuntimeError, match="data loader"):
        opt.step(boom)
    assert opt.yhat == pytest.approx(retaken)
    assert train(m, opt, stream(0, 5)) == ["accept"] * 5
