"""Every rank takes the same decision: real gloo process groups, 2 CPU processes, no mocks.

One spawn of two ranks runs every scenario (starting processes costs more than the
scenarios); each scenario's result, or its traceback, comes back per rank and the tests
below judge them. A fault is injected on ONE rank only, after backward (so DDP's gradient
all_reduce does not spread it): without the guard's reduction the ranks would decide
differently and diverge (shown with ``process_group=None``).
"""

from __future__ import annotations

import datetime
import os
import socket
import time
import traceback

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from guarded_optim import GuardedOptimizer
from guarded_optim.distributed import agree, check_world_size, resolve_group, world_size
from guarded_optim.faults import CorruptWeights, LRSpike, NonFiniteGradients

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not built in this torch")

WORLD = 2
STEPS = 14
NAN_GRAD_AT, LR_SPIKE_AT, NAN_WEIGHT_AT = 4, 7, 10
JOIN_TIMEOUT_S = 240   # a hang fails the test instead of blocking the suite
PG_TIMEOUT_S = 60


# -- what every rank runs --------------------------------------------------------------------

def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))


def _rank_data(rank: int, steps: int = STEPS):
    """Each rank its own batches and its own probe shard (the probe is averaged)."""
    g = torch.Generator().manual_seed(100 + rank)
    w = torch.randn(8, 1, generator=torch.Generator().manual_seed(7))
    xs = [torch.randn(16, 8, generator=g) for _ in range(steps)]
    px = torch.randn(32, 8, generator=g)
    return [(x, x @ w) for x in xs], (px, px @ w)


def _faults():
    return {NAN_GRAD_AT: NonFiniteGradients(NAN_GRAD_AT),
            LR_SPIKE_AT: LRSpike(LR_SPIKE_AT, factor=1e4),
            NAN_WEIGHT_AT: CorruptWeights(NAN_WEIGHT_AT, mode="nan")}


def _ddp_run(rank, guarded=True, faults=None, process_group="auto", steps=STEPS):
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = _mlp()
    ddp = DDP(model)
    batches, (px, py) = _rank_data(rank, steps)
    inner = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    opt = (GuardedOptimizer(inner, probe=lambda: F.mse_loss(model(px), py), module=model,
                            process_group=process_group) if guarded else inner)
    log = []
    for t, (x, y) in enumerate(batches):
        opt.zero_grad()
        F.mse_loss(ddp(x), y).backward()
        fault = (faults or {}).get(t) if rank == 1 else None
        if fault is not None:
            fault.before_step(t, opt)
        opt.step()
        if fault is not None:
            fault.after_step(t, opt)
        if guarded:
            log.append((opt.last_decision, opt.last_event.reason))
    return model, opt, log


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def _scenario_clean(rank, outdir):
    mg, opt, log = _ddp_run(rank, guarded=True)
    mb, _, _ = _ddp_run(rank, guarded=False)
    return {"log": log, "params": _params(mg), "bare": _params(mb), "stats": dict(opt.stats)}


def _scenario_faults(rank, outdir):
    model, opt, log = _ddp_run(rank, faults=_faults())
    sd = opt.state_dict()
    if rank == 0:
        torch.save(sd, os.path.join(outdir, "guard_ddp.pt"))
    guard = sd["guard"]
    return {"log": log, "params": _params(model), "stats": dict(opt.stats), "yhat": opt.yhat,
            "world_size": guard["world_size"], "threshold": guard["threshold"],
            "safe_is_live": guard["safe_is_live"],
            "safe_params": (list(guard["safe"]["params"]) if guard["safe"] is not None
                            else _params(model))}


def _scenario_bare_faults(rank, outdir):
    fault = {NAN_GRAD_AT: NonFiniteGradients(NAN_GRAD_AT)}
    diverged, _, _ = _ddp_run(rank, guarded=False, faults=fault, steps=NAN_GRAD_AT + 1)
    spread, _, _ = _ddp_run(rank, guarded=False, faults=fault)
    return {"diverged": _params(diverged), "spread": _params(spread)}


def _scenario_rank_local(rank, outdir):
    model, opt, log = _ddp_run(rank, faults={NAN_GRAD_AT: NonFiniteGradients(NAN_GRAD_AT)},
                               process_group=None, steps=NAN_GRAD_AT + 1)
    return {"log": log, "params": _params(model)}


def _scenario_agree(rank, outdir):
    """The pure reduction on a real group: any-rank flags, mean measurements, NaN spreads."""
    group = resolve_group("auto")
    flags = agree(torch.tensor([float(rank == 1), 0.0, 2.0 + rank]), [2], group).tolist()
    nan = agree(torch.tensor([float("nan") if rank == 0 else 1.0]), [0], group).tolist()
    return {"flags": flags, "nan": nan, "world": world_size(group),
            "none": resolve_group(None), "false": resolve_group(False)}


def _scenario_fsdp(rank, outdir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh("cpu", (WORLD,))
    model = _mlp()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    batches, (px, py) = _rank_data(rank, 6)
    opt = GuardedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2),
                           probe=lambda: F.mse_loss(model(px), py), module=model)
    params = [p for g in opt.param_groups for p in g["params"]]

    def local_state():
        out = [p.to_local().detach().clone() for p in params]
        for p in params:
            for k, v in sorted(opt.state[p].items()):
                out.append((v.to_local() if hasattr(v, "to_local") else v).detach().clone())
        return out

    log, spike, before = [], LRSpike(4, factor=1e4), None
    for t, (x, y) in enumerate(batches):
        opt.zero_grad()
        F.mse_loss(model(x), y).backward()
        if t == 4:
            before = local_state()
            if rank == 1:          # only rank 1's shard gets the wrecking update
                spike.before_step(t, opt)
        opt.step()
        if t == 4:
            if rank == 1:
                spike.after_step(t, opt)
            after = local_state()
        log.append((opt.last_decision, opt.last_event.reason))
    sd = opt.state_dict()
    sd["guard"]["world_size"] = 2 * WORLD
    try:
        opt.load_state_dict(sd)
        mismatch = None
    except ValueError as exc:
        mismatch = str(exc)
    return {"log": log, "exact": len(before) == len(after) and all(
                a.shape == b.shape and torch.equal(a, b) for a, b in zip(before, after)),
            "local_shapes": [tuple(p.to_local().shape) for p in params],
            "snapshot_shapes": [tuple(t.shape) for t in opt.safe_snapshot._saved_params],
            "types": sorted({type(p).__name__ for p in params}), "mismatch": mismatch}


def _scenario_probe_error(rank, outdir):
    """The probe raises on rank 1 only: at construction, then at step 5. Every rank raises
    together (no rank left waiting in the step's all_reduce) and holds the verified state."""
    from guarded_optim import ProbeError
    from torch.nn.parallel import DistributedDataParallel as DDP
    model = _mlp()
    ddp = DDP(model)
    batches, (px, py) = _rank_data(rank)
    state = {"raise": rank == 1}

    def probe():
        if state["raise"]:
            raise RuntimeError(f"probe data missing on rank {rank}")
        return F.mse_loss(model(px), py)

    errors = []
    try:
        GuardedOptimizer(torch.optim.AdamW(ddp.parameters(), lr=1e-2), probe=probe, module=model)
    except ProbeError as exc:
        errors.append(str(exc))
    state["raise"] = False
    opt = GuardedOptimizer(torch.optim.AdamW(ddp.parameters(), lr=1e-2), probe=probe, module=model)
    for t, (x, y) in enumerate(batches[:8]):
        opt.zero_grad()
        F.mse_loss(ddp(x), y).backward()
        state["raise"] = rank == 1 and t == 5
        try:
            opt.step()
        except ProbeError as exc:
            errors.append(str(exc))
            verified = _params(model)
        state["raise"] = False
    return {"errors": errors, "steps": opt.stats["steps"], "params": _params(model),
            "verified": verified}


def _scenario_rng(rank, outdir):
    """Per-rank RNG contract: every rank saves its own streams; loading rank 0's file (the
    common practice) keeps each rank's streams; restoring is explicit and rank-checked."""
    model, opt, _ = _ddp_run(rank, steps=3)
    torch.manual_seed(1000 + rank)             # each rank its own stream (dropout, sampling)
    sd = opt.state_dict()
    torch.save(sd, os.path.join(outdir, f"rng_rank{rank}.pt"))
    torch.distributed.barrier()
    rank0 = torch.load(os.path.join(outdir, "rng_rank0.pt"), weights_only=True)
    opt.load_state_dict(rank0)
    draw_after_load = torch.randint(0, 10**6, (4,))
    refused = None
    try:
        opt.restore_rng_state(rank0)
    except ValueError as exc:
        refused = str(exc)
    own = torch.load(os.path.join(outdir, f"rng_rank{rank}.pt"), weights_only=True)
    opt.restore_rng_state(own)
    return {"saved_rank": sd["guard"]["rng"]["rank"], "draw_after_load": draw_after_load,
            "refused": refused, "restored": torch.get_rng_state(), "own": own["guard"]["rng"]["cpu"]}


def _scenario_gates(rank, outdir):
    """Rank-local decisions that gate a collective are agreed: a recovery action that wants a
    ring push on rank 1 only, and weights written after construction on rank 1 only."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    from guarded_optim import RecoveryAction

    class PushOnRank1(RecoveryAction):
        def wants_checkpoint(self, guard):
            return rank == 1 and guard.step_state.t % 3 == 0

    model = _mlp()
    ddp = DDP(model)
    batches, (px, py) = _rank_data(rank)
    opt = GuardedOptimizer(torch.optim.AdamW(ddp.parameters(), lr=1e-2),
                           probe=lambda: F.mse_loss(model(px), py), module=model, history=8,
                           recovery=[PushOnRank1()])
    if rank == 1:   # e.g. rank 1 alone re-loads its weights after building the guard
        with torch.no_grad():
            next(model.parameters()).add_(0.0)
    for x, y in batches[:8]:
        opt.zero_grad()
        F.mse_loss(ddp(x), y).backward()
        opt.step()
    return {"ring": [snap.step for snap in opt.snapshot_history], "params": _params(model)}


SCENARIOS = {"gates": _scenario_gates, "rng": _scenario_rng, "probe_error": _scenario_probe_error, "clean": _scenario_clean, "faults": _scenario_faults,
             "bare_faults": _scenario_bare_faults, "rank_local": _scenario_rank_local,
             "agree": _scenario_agree, "fsdp": _scenario_fsdp}


def _worker(rank, world, port, outdir, backend, scenarios, module="test_distributed"):
    import importlib

    import torch.distributed as dist
    torch.set_num_threads(1)
    registry = importlib.import_module(module).SCENARIOS
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    results = {}
    try:
        for name in scenarios:
            try:
                results[name] = registry[name](rank, outdir)
            except Exception:
                results[name] = {"error": traceback.format_exc()}
                break   # a failed collective may leave the group unusable: stop here
            dist.barrier()
    finally:
        torch.save(results, os.path.join(outdir, f"rank{rank}.pt"))
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(outdir, scenarios, world=WORLD, backend="gloo", module="test_distributed") -> list[dict]:
    """Run ``scenarios`` (names in ``module``'s ``SCENARIOS``) on ``world`` fresh processes;
    a hang past the timeout fails."""
    ctx = mp.start_processes(_worker, args=(world, _free_port(), str(outdir), backend, scenarios,
                                            module),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"distributed run did not finish within {JOIN_TIMEOUT_S}s (hang)")
    return [torch.load(os.path.join(outdir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    outdir = tmp_path_factory.mktemp("dist")
    results = spawn(outdir, list(SCENARIOS))
    return outdir, results


def _get(ranks, name):
    outdir, results = ranks
    out = []
    for r, res in enumerate(results):
        assert name in res, f"scenario {name!r} did not run on rank {r} (an earlier one failed)"
        assert "error" not in res[name], f"rank {r}:\n{res[name]['error']}"
        out.append(res[name])
    return out


def _same(a, b) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))


# -- the tests ---------------------------------------------------------------------------------

def test_reduction_any_rank_flags_mean_measurements_nan_spreads(ranks):
    r0, r1 = _get(ranks, "agree")
    assert r0["world"] == r1["world"] == WORLD
    assert r0["flags"] == r1["flags"] == [1.0, 0.0, 2.5]   # rank 1's flag fires for both
    assert all(v != v for v in r0["nan"] + r1["nan"])       # NaN on rank 0 reaches rank 1
    assert r0["none"] is None and r0["false"] is None


def test_clean_guarded_ddp_is_bit_identical_to_bare_ddp(ranks):
    r0, r1 = _get(ranks, "clean")
    for r in (r0, r1):
        assert r["log"] == [("accept", None)] * STEPS
        assert r["stats"]["accepted"] == r["stats"]["measured"] == STEPS
        assert _same(r["params"], r["bare"])
    assert _same(r0["params"], r1["params"])


def test_fault_on_one_rank_gives_the_same_decision_on_every_rank(ranks):
    r0, r1 = _get(ranks, "faults")
    assert r0["log"] == r1["log"]
    log = r0["log"]
    assert log[NAN_GRAD_AT] == ("skip", "nonfinite")
    assert log[LR_SPIKE_AT][0] == "rollback" and "probe" in log[LR_SPIKE_AT][1]
    assert log[NAN_WEIGHT_AT][0] == "rollback" and "nonfinite_weights" in log[NAN_WEIGHT_AT][1]
    faulty = {NAN_GRAD_AT, LR_SPIKE_AT, NAN_WEIGHT_AT}
    assert all(d == ("accept", None) for t, d in enumerate(log) if t not in faulty)
    assert r0["stats"] == r1["stats"]
    assert (r0["stats"]["skipped"], r0["stats"]["rollbacks"]) == (1, 2)
    assert _same(r0["params"], r1["params"]), "replicas diverged"
    assert all(torch.isfinite(p).all() for p in r0["params"])


def test_every_rank_saves_the_same_guard_state_and_it_loads_on_one_rank(ranks):
    r0, r1 = _get(ranks, "faults")
    assert r0["world_size"] == r1["world_size"] == WORLD
    assert r0["yhat"] == r1["yhat"] and r0["threshold"] == r1["threshold"]
    assert _same(r0["safe_params"], r1["safe_params"])
    # replicated (DDP) state loads on another world size: here a single process
    sd = torch.load(os.path.join(ranks[0], "guard_ddp.pt"), weights_only=True)
    model = _mlp()
    batches, (px, py) = _rank_data(0)
    opt = GuardedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2),
                           probe=lambda: F.mse_loss(model(px), py), module=model)
    with torch.no_grad():   # resume order: the model's weights first, then the optimizer
        for p, v in zip(model.parameters(), r0["params"]):
            p.copy_(v)
    opt.load_state_dict(sd)
    assert opt.yhat == r0["yhat"] and opt.stats == r0["stats"]
    if r0["safe_is_live"]:   # the last step was verified: the snapshot is the live state
        assert sd["guard"]["safe"] is None and _same(r0["safe_params"], r0["params"])
    else:
        opt.safe_snapshot.restore()
        assert _same(_params(model), r0["safe_params"])
    opt.zero_grad()
    F.mse_loss(model(batches[0][0]), batches[0][1]).backward()
    opt.step()
    assert opt.last_decision == "accept"


def test_rank_local_gates_of_collectives_are_agreed(ranks):
    r0, r1 = _get(ranks, "gates")
    assert r0["ring"] == r1["ring"] and len(r0["ring"]) >= 2   # pushed on every rank alike
    assert _same(r0["params"], r1["params"])


def test_each_rank_keeps_its_own_rng_streams_through_a_shared_checkpoint(ranks):
    r0, r1 = _get(ranks, "rng")
    assert (r0["saved_rank"], r1["saved_rank"]) == (0, 1)
    # rank 1 loaded rank 0's file: its stream was not replaced by rank 0's
    assert not torch.equal(r0["draw_after_load"], r1["draw_after_load"])
    assert r0["refused"] is None and "saved by rank 0, this is rank 1" in r1["refused"]
    assert torch.equal(r0["restored"], r0["own"]) and torch.equal(r1["restored"], r1["own"])


def test_a_probe_error_on_one_rank_raises_on_every_rank_instead_of_hanging(ranks):
    r0, r1 = _get(ranks, "probe_error")
    assert len(r0["errors"]) == len(r1["errors"]) == 2       # at construction and at step 5
    assert "another rank" in r0["errors"][0] and "probe data missing" in r1["errors"][0]
    assert r0["steps"] == r1["steps"] == 7                    # the failed call is not a step
    assert _same(r0["verified"], r1["verified"]) and _same(r0["params"], r1["params"])


def test_without_the_guard_the_one_rank_fault_diverges_the_replicas(ranks):
    """Why the guard exists here: bare, rank 1 alone applies the NaN (the replicas diverge),
    and the next gradient all_reduce spreads it to rank 0."""
    r0, r1 = _get(ranks, "bare_faults")
    finite = lambda ps: all(torch.isfinite(p).all() for p in ps)  # noqa: E731
    assert finite(r0["diverged"]) and not finite(r1["diverged"])
    assert not finite(r0["spread"]) and not finite(r1["spread"])


def test_rank_local_decisions_when_process_group_is_none(ranks):
    r0, r1 = _get(ranks, "rank_local")
    assert r0["log"][NAN_GRAD_AT] == ("accept", None)
    assert r1["log"][NAN_GRAD_AT] == ("skip", "nonfinite")
    assert not _same(r0["params"], r1["params"])


def test_fsdp2_each_rank_snapshots_its_shard_and_rollback_is_exact(ranks):
    r0, r1 = _get(ranks, "fsdp")
    assert r0["types"] == ["DTensor"]
    assert r0["log"] == r1["log"]
    assert r0["log"][4][0] == "rollback" and r0["log"][4][1]   # weight_norm and/or probe
    assert all(d[0] == "accept" for t, d in enumerate(r0["log"]) if t != 4)
    for r in (r0, r1):
        assert r["exact"], "a rank's shard or optimizer state differs after the rollback"
        assert r["snapshot_shapes"] == r["local_shapes"]   # its own shard, not the full tensor
    assert r0["local_shapes"] != r1["local_shapes"]          # the shards really differ
    for r in (r0, r1):
        assert r["mismatch"] is not None and "world size 4" in r["mismatch"]


def test_check_world_size_accepts_replicated_state_on_any_world_size():
    params = list(_mlp().parameters())
    check_world_size(2, 1, params)
    check_world_size(None, 3, params)
    check_world_size(4, 4, params)


def test_invalid_process_group_names_the_argument():
    m = _mlp()
    with pytest.raises(TypeError, match="process_group"):
        GuardedOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), process_group="world")


def test_single_process_auto_group_changes_nothing():
    assert resolve_group("auto") is None or torch.distributed.is_initialized()
    assert world_size(None) == 1
    v = torch.tensor([1.0, 2.0])
    assert agree(v, [1], None) is v and v.tolist() == [1.0, 2.0]


def _gpu_fsdp_worker(rank, world, port, outdir, backend, scenarios):
    import torch.distributed as dist
    torch.cuda.set_device(rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=PG_TIMEOUT_S))
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        mesh = init_device_mesh("cuda", (world,))
        model = _mlp().cuda()
        fully_shard(model, mesh=mesh)
        batches, (px, py) = _rank_data(rank, 5)
        px, py = px.cuda(), py.cuda()
        opt = GuardedOptimizer(torch.optim.AdamW(model.parameters(), lr=1e-2),
                               probe=lambda: F.mse_loss(model(px), py), module=model)
        params = [p for g in opt.param_groups for p in g["params"]]
        log = []
        for t, (x, y) in enumerate(batches):
            opt.zero_grad()
            F.mse_loss(model(x.cuda()), y.cuda()).backward()
            before = [p.to_local().detach().clone() for p in params]
            if t == 3:
                with torch.no_grad():
                    for g in opt.param_groups:
                        g["lr"] *= 1e4
            opt.step()
            if t == 3:
                for g in opt.param_groups:
                    g["lr"] /= 1e4
                exact = all(torch.equal(a, p.to_local()) for a, p in zip(before, params))
            log.append(opt.last_decision)
        torch.save({"log": log, "exact": exact, "mode": opt.safe_snapshot.mode},
                   os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FSDP2 on CUDA needs a CUDA device")
def test_fsdp2_on_cuda_rollback_is_exact_with_host_snapshots(tmp_path):
    world = min(2, torch.cuda.device_count())
    backend = "nccl" if torch.distributed.is_nccl_available() else "gloo"
    ctx = mp.start_processes(_gpu_fsdp_worker, args=(world, _free_port(), str(tmp_path), backend, []),
                             nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + JOIN_TIMEOUT_S
    while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("CUDA FSDP2 run hung")
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for r in results:
        assert r["log"][3] == "rollback" and r["exact"] and r["mode"] == "host"
        assert r["log"] == results[0]["log"]


@pytest.mark.parametrize("backend,tensor,accel,expected", [
    ("gloo", "cpu", None, "cpu"),
    ("gloo", "cuda:1", "cuda:1", "cuda:1"),
    ("nccl", "cuda:1", "cuda:1", "cuda:1"),
    ("nccl", "cpu", "cuda:1", "cuda:1"),          # flags of a step with no gradient / CPU offload
    ("cpu:gloo,cuda:nccl", "cpu", "cuda:1", "cpu"),
    ("cpu:gloo,cuda:nccl", "cuda:1", "cuda:1", "cuda:1"),
])
def test_the_collective_runs_where_the_backend_can_reduce(backend, tensor, accel, expected):
    from guarded_optim.distributed import collective_device
    got = collective_device(backend, torch.device(tensor), None if accel is None else torch.device(accel))
    assert got == torch.device(expected)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_nccl_with_cpu_tensors_and_no_accelerator_is_a_clear_error():
    from guarded_optim.distributed import collective_device
    with pytest.raises(RuntimeError, match="cpu:gloo,cuda:nccl"):
        collective_device("nccl", torch.device("cpu"), None)
