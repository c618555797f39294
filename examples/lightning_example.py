"""PyTorch Lightning: return the guard (and a scheduler) from ``configure_optimizers``.

Lightning calls ``optimizer.step(closure=...)``; the guard evaluates the closure once,
measures, and accepts, skips or rolls back. A NaN batch at step 5 is skipped.

    pip install -e ".[integrations]"
    python examples/lightning_example.py
"""

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from guarded_optim import GuardedOptimizer

g = torch.Generator().manual_seed(0)
W = torch.randn(4, 1, generator=g)
X = torch.randn(512, 4, generator=g)
PROBE_X = torch.randn(64, 4, generator=g)


class Regression(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.mse_loss(self.net(x), y)
        return loss * float("nan") if self.global_step == 5 else loss

    def configure_optimizers(self):
        self.guard = GuardedOptimizer(torch.optim.AdamW(self.parameters(), lr=1e-2),
                                      probe=lambda: F.mse_loss(self.net(PROBE_X), PROBE_X @ W),
                                      module=self)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(self.guard, T_max=60)
        return {"optimizer": self.guard, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


if __name__ == "__main__":
    model = Regression()
    trainer = L.Trainer(accelerator="cpu", max_steps=60, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, DataLoader(TensorDataset(X, X @ W), batch_size=32, shuffle=True))
    print("guard stats:", model.guard.stats)
    print("probe loss: %.4f (reference yhat %.4f)" % (
        F.mse_loss(model.net(PROBE_X), PROBE_X @ W).item(), model.guard.yhat))
