"""Hugging Face ``Trainer(optimizers=(guard, scheduler))`` on a tiny GPT-2 built from a config.

No hub download: the model is built from ``GPT2Config`` and the data is random tokens. The
guard's CSV telemetry (one row per step) goes to ``guard_steps.csv``.

    pip install -e ".[integrations]"
    HF_HUB_OFFLINE=1 python examples/hf_trainer_example.py
"""

import os
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments  # noqa: E402

from guarded_optim import GuardedOptimizer  # noqa: E402
from guarded_optim.events import CSVSink  # noqa: E402

torch.manual_seed(0)
model = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_positions=32, n_embd=64, n_layer=2, n_head=2))
g = torch.Generator().manual_seed(0)
motif = torch.randint(128, (8,), generator=g)
train = [{"input_ids": s, "labels": s} for s in (motif.repeat(4).roll(int(i)) for i in range(256))]
probe_ids = torch.stack([motif.repeat(4).roll(i) for i in range(0, 8, 2)])

with CSVSink("guard_steps.csv") as sink:
    guard = GuardedOptimizer(torch.optim.AdamW(model.parameters(), lr=3e-3),
                             probe=lambda: model(input_ids=probe_ids, labels=probe_ids).loss,
                             module=model, callbacks=[sink])
    sched = torch.optim.lr_scheduler.LinearLR(guard, start_factor=1.0, end_factor=0.1, total_iters=40)
    args = TrainingArguments(output_dir=tempfile.mkdtemp(), max_steps=40, per_device_train_batch_size=8,
                             report_to=[], save_strategy="no", logging_steps=10, use_cpu=True,
                             disable_tqdm=True)
    Trainer(model=model, args=args, train_dataset=train, optimizers=(guard, sched)).train()
print("guard stats:", guard.stats, "| rows in guard_steps.csv:", sink.rows)
