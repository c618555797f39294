"""Frameworks that own the training loop: the guard is the optimizer they are given.

Optional: each test skips with its reason when the framework is not installed
(``pip install -e ".[integrations]"``). No hub downloads: models are built from configs.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from guarded_optim import GuardedOptimizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

NAN_AT = 3


def test_lightning_configure_optimizers_returns_the_guard_with_a_scheduler(tmp_path, one_thread):
    L = pytest.importorskip("lightning", reason="lightning is not installed (extra: integrations)")

    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 1, generator=g)
    xs = torch.randn(64, 4, generator=g)
    data = torch.utils.data.TensorDataset(xs, xs @ w)
    probe_x = torch.randn(16, 4, generator=g)

    class Regression(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
            self.lrs = []

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.mse_loss(self.net(x), y)
            if self.global_step == NAN_AT:
                loss = loss * float("nan")   # a broken batch: the guard skips it
            return loss

        def on_train_batch_end(self, *args):
            self.lrs.append(self.trainer.optimizers[0].param_groups[0]["lr"])

        def configure_optimizers(self):
            inner = torch.optim.AdamW(self.parameters(), lr=0.01)
            self.guard = GuardedOptimizer(
                inner, probe=lambda: F.mse_loss(self.net(probe_x), probe_x @ w), module=self)
            sched = torch.optim.lr_scheduler.StepLR(self.guard, step_size=2, gamma=0.5)
            return {"optimizer": self.guard, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    model = Regression()
    trainer = L.Trainer(accelerator="cpu", max_steps=8, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(tmp_path))
    trainer.fit(model, torch.utils.data.DataLoader(data, batch_size=8))
    stats = model.guard.stats
    assert stats["steps"] == 8 and stats["skipped"] == stats["skipped_nonfinite"] == 1
    assert stats["accepted"] == stats["measured"] == 7 and stats["rollbacks"] == 0
    assert model.lrs[0] == 0.01 and model.lrs[-1] < 0.01      # the scheduler drove the guard
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_hf_trainer_with_the_guard_and_a_scheduler(tmp_path, one_thread):
    transformers = pytest.importorskip("transformers",
                                       reason="transformers is not installed (extra: integrations)")
    pytest.importorskip("accelerate", reason="accelerate is not installed (extra: integrations)")

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(64, (16,), generator=g) for _ in range(32)]
    train = [{"input_ids": s, "labels": s} for s in seqs]
    probe_ids = torch.randint(64, (4, 16), generator=g)

    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    guard = GuardedOptimizer(inner, probe=lambda: model(input_ids=probe_ids, labels=probe_ids).loss,
                             module=model)
    sched = torch.optim.lr_scheduler.LambdaLR(guard, lambda step: 1.0 / (1 + step))
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, report_to=[],
        save_strategy="no", logging_strategy="no", use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=train,
                                   optimizers=(guard, sched))
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train()
    assert guard.stats["steps"] == 6 and guard.stats["accepted"] == guard.stats["measured"] == 6
    assert guard.stats["rollbacks"] == guard.stats["skipped"] == 0
    assert guard.param_groups[0]["lr"] == pytest.approx(1e-3 / 7)   # the scheduler stepped 6 times
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
