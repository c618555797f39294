"""Quickstart: a protected training run, the README's first script, unchanged.

A small MLP on scikit-learn's bundled digits (nothing is downloaded), a DataLoader loop, a
held-out probe set, an LR scheduler and a checkpoint after every epoch. Stop it at any point
and run it again: it resumes from the last checkpoint, bit for bit as if never stopped.

    python examples/quickstart.py

For the guard against a fault, bare vs guarded, run ``guarded-optim bench --suite protocol``.
"""

import os

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits           # 1,797 8x8 images, shipped with scikit-learn
from torch.utils.data import DataLoader, TensorDataset

from guarded_optim import GuardedOptimizer

torch.manual_seed(0)
X, y = load_digits(return_X_y=True)
X, y = torch.tensor(X, dtype=torch.float32) / 16, torch.tensor(y)
x_probe, y_probe = X[:64], y[:64]                  # the probe set: 64 images never trained on
loader = DataLoader(TensorDataset(X[64:], y[64:]), batch_size=64, shuffle=True)
model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                            torch.nn.Linear(128, 10))

opt = GuardedOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-3),
                       probe=lambda: F.cross_entropy(model(x_probe), y_probe),  # lower is better
                       module=model)               # the probe runs in eval mode (no dropout)
epochs = 10
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * len(loader))

start = 0
if os.path.exists("ckpt.pt"):                      # resume: the model first, then the optimizer
    ckpt = torch.load("ckpt.pt", weights_only=True)
    model.load_state_dict(ckpt["model"])
    opt.load_state_dict(ckpt["opt"])
    sched.load_state_dict(ckpt["sched"])
    opt.restore_rng_state(ckpt["opt"])             # optional: the same shuffles and dropout masks
    start = ckpt["epoch"] + 1

for epoch in range(start, epochs):
    for xb, yb in loader:                          # a plain loop: nothing else changes
        opt.zero_grad()
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step(loss=loss)                        # accepted, skipped or rolled back
        sched.step()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "sched": sched.state_dict(), "epoch": epoch}, "ckpt.pt")
    print(f"epoch {epoch}: probe loss {opt.yhat:.3f} (smoothed)")
print(opt.stats)
