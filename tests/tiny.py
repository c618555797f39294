"""A tiny regression problem used across unit and property tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def model(seed: int = 0, dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Dropout(dropout),
                         nn.Linear(16, 1))


def data(seed: int = 0, steps: int = 50, batch: int = 32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 1, generator=g)
    xp = torch.randn(16, 4, generator=g)
    probe_set = (xp, xp @ w)
    batches = []
    for _ in range(steps):
        x = torch.randn(batch, 4, generator=g)
        batches.append((x, x @ w + 0.1 * torch.randn(batch, 1, generator=g)))
    return probe_set, batches


def probe_for(m: nn.Module, probe_set):
    xp, yp = probe_set
    return lambda: F.mse_loss(m(xp), yp)


def closure_for(opt, m, x, y):
    def closure():
        opt.zero_grad()
        loss = F.mse_loss(m(x), y)
        loss.backward()
        return loss
    return closure


def full_state(m: nn.Module, opt) -> dict:
    """Every tensor that a rollback must restore, cloned, keyed for comparison.

    Not the RNG states: a rollback moves the model back, never the data stream."""
    out = {f"param.{k}": v.detach().clone() for k, v in m.named_parameters()}
    out.update({f"buffer.{k}": v.detach().clone() for k, v in m.named_buffers()})
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        for k, v in opt.state.get(p, {}).items():
            out[f"state.{i}.{k}"] = v.detach().clone() if isinstance(v, torch.Tensor) else v
    return out


def same(a, b) -> bool:
    """Recursive equality of plain data with tensors compared bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys(), (sorted(a.keys() ^ b.keys()))
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k
