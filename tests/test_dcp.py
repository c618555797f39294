"""torch.distributed.checkpoint (DCP) of a guarded optimizer under FSDP2: 2 gloo ranks on CPU.

Each rank: an FSDP2 (``fully_shard``) MLP, AdamW wrapped in the guard (no probe, and with
a probe), its own batches. It trains ``BEFORE`` steps, saves model and optimizer with
``get_model_state_dict`` / ``get_optimizer_state_dict`` + ``dcp.save``, and continues
``AFTER`` steps (run A). Then a NEW model and a NEW guard (as in a restarted job) load the
checkpoint with ``dcp.load`` + ``set_model_state_dict`` / ``set_optimizer_state_dict``
and take the same ``AFTER`` steps (run B). Checked: B equals A bit for bit on each rank
(shards and optimizer state), every step of both is accepted, and the gathered full
parameters are identical on both ranks. The same scenario with the bare AdamW validates
the harness (it must pass whatever the guard does).

One spawn of two processes runs every scenario (``spawn`` below, after test_distributed's);
a hang fails the test after ``JOIN_TIMEOUT_S`` instead of blocking the suite.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from guarded_optim import GuardedOptimizer
from test_distributed import WORLD, _get, _mlp, _rank_data, spawn

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not built in this torch")

BEFORE, AFTER = 3, 3


def _sharded_model(mesh) -> nn.Module:
    from torch.distributed.fsdp import fully_shard
    model = _mlp()                        # the same initial weights on every rank
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _optimizer(model, kind: str, probe_data):
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    if kind == "bare":
        return inner
    if kind == "guard":
        return GuardedOptimizer(inner)
    px, py = probe_data
    return GuardedOptimizer(inner, probe=lambda: F.mse_loss(model(px), py), module=model)


def _train(model, opt, batches) -> list:
    decisions = []
    for x, y in batches:
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        opt.step()
        decisions.append(getattr(opt, "last_decision", "accept"))
    return decisions


def _local(model, opt) -> dict:
    """This rank's shards and optimizer state, cloned."""
    params = [p for g in opt.param_groups for p in g["params"]]
    out = {}
    for name, p in model.named_parameters():
        out[f"param.{name}"] = p.to_local().detach().clone()
    for i, p in enumerate(params):
        for k, v in sorted(opt.state.get(p, {}).items()):
            v = v.to_local() if hasattr(v, "to_local") else v
            out[f"state.{i}.{k}"] = v.detach().clone() if isinstance(v, torch.Tensor) else v
    return out


def _full(model) -> list[torch.Tensor]:
    return [p.full_tensor().detach().clone() for p in model.parameters()]   # a collective


def _dcp_scenario(kind: str):
    def run(rank, outdir):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                             get_optimizer_state_dict,
                                                             set_model_state_dict,
                                                             set_optimizer_state_dict)
        from torch.distributed.device_mesh import init_device_mesh
        mesh = init_device_mesh("cpu", (WORLD,))
        batches, probe_data = _rank_data(rank, BEFORE + AFTER)
        path = os.path.join(outdir, f"ckpt_{kind}")

        model = _sharded_model(mesh)
        opt = _optimizer(model, kind, probe_data)
        log = _train(model, opt, batches[:BEFORE])
        dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)},
                 checkpoint_id=path)
        log += _train(model, opt, batches[BEFORE:])
        a, full_a = _local(model, opt), _full(model)

        model2 = _sharded_model(mesh)        # a restarted job: new model, new optimizer
        opt2 = _optimizer(model2, kind, probe_data)
        state = {"model": get_model_state_dict(model2), "optim": get_optimizer_state_dict(model2, opt2)}
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(model2, state["model"])
        set_optimizer_state_dict(model2, opt2, state["optim"])
        log2 = _train(model2, opt2, batches[BEFORE:])
        b, full_b = _local(model2, opt2), _full(model2)
        return {"a": a, "b": b, "full_a": full_a, "full_b": full_b, "log": log, "log2": log2,
                "types": sorted({type(p).__name__ for p in model2.parameters()})}
    return run


SCENARIOS = {kind: _dcp_scenario(kind) for kind in ("bare", "guard_probe", "guard")}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("dcp")
    return outdir, spawn(outdir, list(SCENARIOS), module="test_dcp")


def _assert_same(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: keys differ: {sorted(a.keys() ^ b.keys())}"
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, f"{what}: {k}"
            assert torch.equal(a[k], b[k]), f"{what}: {k} differs"
        else:
            assert a[k] == b[k], f"{what}: {k}: {a[k]!r} vs {b[k]!r}"


@pytest.mark.parametrize("kind", list(SCENARIOS))
def test_dcp_resume_under_fsdp2_continues_identically_on_both_ranks(ranks, kind):
    r0, r1 = _get(ranks, kind)
    assert r0["types"] == ["DTensor"]
    for rank, r in enumerate((r0, r1)):
        assert r["log"] == ["accept"] * (BEFORE + AFTER), f"rank {rank}: {r['log']}"
        assert r["log2"] == ["accept"] * AFTER, f"rank {rank}, resumed: {r['log2']}"
        _assert_same(r["a"], r["b"], f"rank {rank}: resumed from DCP vs uninterrupted")
    for x, y in zip(r0["full_a"] + r0["full_b"], r1["full_a"] + r1["full_b"]):
        assert torch.equal(x, y), "the ranks' full parameters differ"
    for x, y in zip(r0["full_a"], r0["full_b"]):
        assert torch.equal(x, y)
