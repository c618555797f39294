"""DDP on CPU (gloo, 2 processes) with a fault on ONE rank: every rank takes the same decision.

Rank 1 alone gets a NaN gradient at step 5 (after DDP's all_reduce, so only its replica
would apply it) and an lr x1e4 update at step 10. The guard reduces its flags and probe
values across ranks (one all_reduce per host transfer), so both ranks skip step 5 and roll
back step 10, and the replicas stay bit-identical.

    python examples/ddp_example.py
"""

import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from guarded_optim import GuardedOptimizer
from guarded_optim.faults import LRSpike, NonFiniteGradients

STEPS = 20


def worker(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
    ddp = DDP(model)
    g = torch.Generator().manual_seed(rank)                 # each rank its own data ...
    w = torch.randn(8, 1, generator=torch.Generator().manual_seed(7))
    probe_x = torch.randn(32, 8, generator=g)               # ... and its own probe shard
    opt = GuardedOptimizer(torch.optim.AdamW(ddp.parameters(), lr=1e-2),
                           probe=lambda: F.mse_loss(model(probe_x), probe_x @ w), module=model)
    faults = {5: NonFiniteGradients(5), 10: LRSpike(10, factor=1e4)} if rank == 1 else {}
    for t in range(STEPS):
        x = torch.randn(16, 8, generator=g)
        opt.zero_grad()
        F.mse_loss(ddp(x), x @ w).backward()
        if t in faults:
            faults[t].before_step(t, opt)
        opt.step()
        if t in faults:
            faults[t].after_step(t, opt)
        if opt.last_decision != "accept":
            print(f"rank {rank} step {t}: {opt.last_decision} ({opt.last_event.reason})", flush=True)
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        same = all(torch.equal(gathered[0], other) for other in gathered[1:])
        print(f"stats {opt.stats}\nreplicas bit-identical: {same}", flush=True)
    dist.destroy_process_group()


def main() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    world = int(os.environ.get("WORLD_SIZE", 2))
    mp.spawn(worker, args=(world, port), nprocs=world, join=True)


if __name__ == "__main__":
    main()
