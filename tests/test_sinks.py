"""Framework sinks: the guard's numbers where users already look (Lightning, the HF Trainer,
W&B, MLflow), read back from each framework. Lightning and transformers are tested for real;
W&B and MLflow for real when installed, and their call contract on a stand-in module always."""

from __future__ import annotations

import collections
import csv
import math
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from guarded_optim import GuardedOptimizer
from guarded_optim.events import (DECISION_CODES, HFTrainerSink, LightningSink, MLflowSink,
                                  StepEvent, WandbSink, event_scalars)
from test_telemetry import NAN_AT, SPIKE_AT, STEPS, _run

os.environ.setdefault("HF_HUB_OFFLINE", "1")
pytestmark = pytest.mark.usefixtures("one_thread")


def _regression_data(n=64):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(4, 1, generator=g)
    xs = torch.randn(n, 4, generator=g)
    return w, xs, xs @ w, torch.randn(16, 4, generator=g)


# --- Lightning --------------------------------------------------------------------------------

def test_lightning_sink_logs_through_the_module_into_the_trainers_logger(tmp_path):
    L = pytest.importorskip("lightning", reason="lightning is not installed (extra: integrations)")
    from lightning.pytorch.loggers import CSVLogger
    w, xs, ys, px = _regression_data()

    class Regression(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))

        def training_step(self, batch, batch_idx):
            loss = F.mse_loss(self.net(batch[0]), batch[1])
            return loss * float("nan") if self.global_step == NAN_AT else loss

        def configure_optimizers(self):
            self.events = []
            self.guard = GuardedOptimizer(
                torch.optim.AdamW(self.parameters(), lr=0.01), module=self,
                probe=lambda: F.mse_loss(self.net(px), px @ w),
                callbacks=[LightningSink(self), self.events.append])
            return self.guard

    model = Regression()
    trainer = L.Trainer(accelerator="cpu", max_steps=8, log_every_n_steps=1,
                        logger=CSVLogger(str(tmp_path), name="run"), enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, ys),
                                                   batch_size=8))
    assert model.guard.stats["skipped"] == 1
    assert trainer.callback_metrics["guard/decision"] == 0          # the last step was accepted
    rows = list(csv.DictReader(open(Path(trainer.logger.log_dir) / "metrics.csv")))
    decisions = [float(r["guard/decision"]) for r in rows if r.get("guard/decision")]
    assert decisions == [DECISION_CODES[e.decision] for e in model.events]
    assert decisions[NAN_AT] == DECISION_CODES["skip"]
    ys_logged = [r["guard/y"] for r in rows if r.get("guard/decision")]
    assert math.isnan(float(ys_logged[NAN_AT]))          # not measured: NaN, not a stale value
    assert float(ys_logged[0]) == pytest.approx(model.events[0].y)


def test_lightning_sink_on_a_logger_and_on_a_trainer(tmp_path):
    pytest.importorskip("lightning", reason="lightning is not installed (extra: integrations)")
    from lightning.pytorch.loggers import CSVLogger
    logger = CSVLogger(str(tmp_path), name="plain")
    sink = LightningSink(logger)
    _, events = _run([sink])
    sink.close()
    rows = list(csv.DictReader(open(Path(logger.log_dir) / "metrics.csv")))
    assert {int(r["step"]): float(r["guard/decision"]) for r in rows} == {
        e.step: DECISION_CODES[e.decision] for e in events}
    assert float(rows[SPIKE_AT]["guard/decision"]) == DECISION_CODES["rollback"]

    class Trainer:        # what the sink uses of a Trainer: its loggers
        loggers = [types.SimpleNamespace(log_metrics=lambda metrics, step: seen.append(
            (step, metrics)))]

    seen: list = []
    LightningSink(Trainer(), prefix="g/")(StepEvent(4, "skip", signals={"nonfinite": True}))
    assert seen == [(4, {"g/decision": 1, "g/signal/nonfinite": 1})]
    with pytest.raises(TypeError, match="LightningModule"):
        LightningSink(object())
    with pytest.raises(ValueError, match="closed"):
        sink(StepEvent(0, "accept"))


# --- Hugging Face Trainer -----------------------------------------------------------------------

class _Regression(nn.Module):
    """A model the HF Trainer can train: ``forward(x, labels) -> {"loss": ...}``; the training
    forward number ``nan_at`` returns a NaN loss (a broken batch: the guard skips it)."""

    def __init__(self, nan_at: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
        self.calls, self.nan_at = 0, nan_at

    def forward(self, x, labels=None):
        out = self.net(x)
        loss = F.mse_loss(out, labels)
        if self.training:
            loss = loss * float("nan") if self.calls == self.nan_at else loss
            self.calls += 1
        return {"loss": loss, "logits": out}


def test_hf_trainer_sink_logs_into_log_history_and_the_reporting_callbacks(tmp_path):
    transformers = pytest.importorskip("transformers",
                                       reason="transformers is not installed (extra: integrations)")
    pytest.importorskip("accelerate", reason="accelerate is not installed (extra: integrations)")
    w, xs, ys, px = _regression_data()
    torch.manual_seed(0)
    model = _Regression(nan_at=NAN_AT)
    guard = GuardedOptimizer(torch.optim.AdamW(model.parameters(), lr=0.01), module=model,
                             probe=lambda: F.mse_loss(model.net(px), px @ w))
    events: list[StepEvent] = []
    guard.callbacks.append(events.append)

    class Reporter(transformers.TrainerCallback):   # stands for report_to=["wandb", ...]
        logs: list = []

        def on_log(self, args, state, control, logs=None, **kwargs):
            self.logs.append((state.global_step, dict(logs)))

    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=8, per_device_train_batch_size=8, report_to=[],
        logging_steps=3, save_strategy="no", use_cpu=True, dataloader_num_workers=0,
        disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, callbacks=[Reporter()],
                                   train_dataset=[{"x": x, "labels": y} for x, y in zip(xs, ys)],
                                   optimizers=(guard, torch.optim.lr_scheduler.LambdaLR(
                                       guard, lambda step: 1.0)))
    sink = HFTrainerSink(trainer)
    guard.callbacks.append(sink)
    trainer.train()
    sink.close()
    sink.close()   # idempotent

    assert guard.stats["skipped"] == 1 and len(events) == 8
    logged = {h["step"]: h for h in trainer.state.log_history if "guard/decision" in h}
    # the Trainer's cadence (logging_steps=3: global steps 3 and 6) and the skip, which the
    # Trainer counts as global step NAN_AT + 1 = 4 (it ends optimizer step NAN_AT)
    assert sorted(logged) == [3, NAN_AT + 1, 6]
    assert logged[NAN_AT + 1]["guard/decision"] == DECISION_CODES["skip"]
    assert logged[NAN_AT + 1]["guard/signal/nonfinite"] == 1
    assert logged[6]["guard/y"] == pytest.approx(events[5].y)
    assert sink.logged == len(logged)
    reported = [s for s, logs in Reporter.logs if "guard/decision" in logs]
    assert sorted(reported) == sorted(logged)            # integrations see what log_history has
    losses = [s for s, logs in Reporter.logs if "loss" in logs]
    assert losses == [3, 6]                          # the Trainer's own logs are not displaced
    assert not any(isinstance(cb, type(sink.callback)) for cb in trainer.callback_handler.callbacks)
    with pytest.raises(ValueError, match="closed"):
        sink(StepEvent(0, "accept"))


def test_hf_trainer_sink_every_and_bad_arguments():
    pytest.importorskip("transformers",
                        reason="transformers is not installed (extra: integrations)")

    class Trainer:   # what the sink uses of a Trainer
        def __init__(self):
            self.logs, self.callbacks = [], []

        def log(self, logs):
            self.logs.append(logs)

        def add_callback(self, cb):
            self.callbacks.append(cb)

    trainer = Trainer()
    sink = HFTrainerSink(trainer, every=2, prefix="")
    assert trainer.callbacks == [sink.callback]
    for step, decision in enumerate(["accept", "accept", "rollback", "accept", "accept"]):
        sink(StepEvent(step, decision, y=float(step)))
        sink.callback.on_step_end(None, types.SimpleNamespace(global_step=step + 1), None)
    assert [(d["y"], d["decision"]) for d in trainer.logs] == [(1.0, 0), (2.0, 2), (3.0, 0)]
    with pytest.raises(ValueError, match="every"):
        HFTrainerSink(Trainer(), every=0)
    with pytest.raises(TypeError, match="Trainer"):
        HFTrainerSink(object())


# --- Weights & Biases ---------------------------------------------------------------------------

def test_wandb_sink_offline_run(tmp_path, monkeypatch):
    wandb = pytest.importorskip(
        "wandb", reason="wandb is not installed (pip install wandb); its call contract is "
                        "tested with a stand-in below")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = wandb.init(mode="offline", dir=str(tmp_path), project="guarded-optim-test")
    try:
        sink = WandbSink()
        _, events = _run([sink])
        sink.close()
        assert run.summary["guard/decision"] == DECISION_CODES[events[-1].decision]
        assert run.summary["guard/step"] == STEPS - 1
    finally:
        run.finish()


def _stand_in(name: str, **attrs) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def test_wandb_sink_calls_wandb_log_and_define_metric(monkeypatch):
    calls: list = []
    fake = _stand_in("wandb", run=object(),
                     log=lambda data, step=None, commit=None: calls.append(("log", data, commit)),
                     define_metric=lambda name, step_metric=None: calls.append(
                         ("define_metric", name, step_metric)))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    sink = WandbSink(commit=False)
    ev = StepEvent(7, "rollback", y=2.0, yhat=1.0, innovation=1.0, threshold=0.5,
                   signals={"probe_error": True})
    sink(ev)
    assert calls == [("define_metric", "guard/step", None),
                     ("define_metric", "guard/*", "guard/step"),
                     ("log", {**{f"guard/{k}": v for k, v in event_scalars(ev).items()},
                              "guard/step": 7}, False)]
    sink.close()
    with pytest.raises(ValueError, match="closed"):
        sink(ev)
    fake.run = None
    with pytest.raises(ValueError, match="wandb.init"):
        WandbSink()
    with pytest.raises(TypeError, match="wandb run"):
        WandbSink(run=3)


# --- MLflow -------------------------------------------------------------------------------------

def test_mlflow_sink_real_run(tmp_path, monkeypatch):
    mlflow = pytest.importorskip(
        "mlflow", reason="mlflow is not installed (pip install mlflow); its call contract is "
                         "tested with a stand-in below")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tmp_path.as_uri())
    with mlflow.start_run() as run:
        sink = MLflowSink()
        _, events = _run([sink])
        sink.close()
    other = mlflow.MlflowClient().create_run(run.info.experiment_id).info.run_id
    sink = MLflowSink(run_id=other, prefix="g/")         # a given run, through the client
    sink(StepEvent(4, "rollback", y=2.0))
    client = mlflow.MlflowClient()
    history = client.get_metric_history(run.info.run_id, "guard/decision")
    assert {m.step: m.value for m in history} == {e.step: DECISION_CODES[e.decision]
                                                   for e in events}
    assert [(m.step, m.value) for m in client.get_metric_history(other, "g/y")] == [(4, 2.0)]


def test_mlflow_sink_calls_log_metrics_with_the_step(monkeypatch):
    calls: list = []
    Metric = collections.namedtuple("Metric", "key value timestamp step")

    class Client:
        def log_batch(self, run_id, metrics=()):
            calls.append((run_id, [(m.key, m.value, m.step) for m in metrics]))

    fake = _stand_in("mlflow", MlflowClient=Client, log_metrics=lambda metrics, step=None:
                     calls.append((metrics, step)))
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    monkeypatch.setitem(sys.modules, "mlflow.entities", _stand_in("mlflow.entities", Metric=Metric))
    ev = StepEvent(3, "skip", grad_norm=math.inf, signals={"nonfinite": True})
    MLflowSink()(ev)
    MLflowSink(run_id="abc", prefix="g.")(ev)
    assert calls == [({"guard/grad_norm": math.inf, "guard/decision": 1,
                       "guard/signal/nonfinite": 1}, 3),
                     ("abc", [("g.grad_norm", math.inf, 3), ("g.decision", 1.0, 3),
                              ("g.signal/nonfinite", 1.0, 3)])]
    with pytest.raises(ValueError, match="run_id"):
        MLflowSink(client=Client())


# --- the core stays light -----------------------------------------------------------------------

def test_core_import_does_not_import_any_framework():
    frameworks = ("lightning", "pytorch_lightning", "transformers", "wandb", "mlflow",
                  "tensorboard")
    code = ("import sys, guarded_optim, guarded_optim.events; "
            f"bad = [m for m in sys.modules if m.split('.')[0] in {frameworks!r}]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(Path(__file__).parents[1]))


def test_missing_frameworks_name_the_package(monkeypatch):
    for name in ("wandb", "mlflow"):
        monkeypatch.setitem(sys.modules, name, None)     # import raises ImportError
    with pytest.raises(ImportError, match="pip install wandb"):
        WandbSink()
    with pytest.raises(ImportError, match="pip install mlflow"):
        MLflowSink()
