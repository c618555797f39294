"""Telemetry sinks: every StepEvent as a CSV row or TensorBoard scalars, read back."""

from __future__ import annotations

import csv
import io
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from guarded_optim import GuardedOptimizer
from guarded_optim.events import DECISION_CODES, CSVSink, StepEvent, TensorBoardSink, event_scalars

NAN_AT, SPIKE_AT, STEPS = 3, 6, 10


def _run(callbacks, steps=STEPS, **kw):
    """A small regression with a NaN gradient (skip) and an lr x1e4 step (rollback)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 1, generator=g)
    px = torch.randn(16, 4, generator=g)
    opt = GuardedOptimizer(torch.optim.Adam(model.parameters(), lr=0.01),
                           probe=lambda: F.mse_loss(model(px), px @ w), module=model,
                           callbacks=callbacks, **kw)
    events = []
    opt.callbacks.append(events.append)
    for t in range(steps):
        x = torch.randn(32, 4, generator=g)
        opt.zero_grad()
        F.mse_loss(model(x), x @ w).backward()
        if t == NAN_AT:
            model[0].weight.grad[0, 0] = float("nan")
        lr = opt.param_groups[0]["lr"]
        if t == SPIKE_AT:
            opt.param_groups[0]["lr"] = lr * 1e4
        opt.step()
        opt.param_groups[0]["lr"] = lr
    return opt, events


def _num(cell: str):
    return None if cell == "" else float(cell)


def test_csv_sink_rows_parse_back_to_the_events(tmp_path):
    path = tmp_path / "guard.csv"
    sink = CSVSink(path)
    opt, events = _run([sink])
    sink.close()
    sink.close()  # idempotent
    rows = list(csv.DictReader(open(path, newline="")))
    assert len(rows) == STEPS == len(events)
    codes = [int(r["decision_code"]) for r in rows]
    assert codes[NAN_AT] == DECISION_CODES["skip"] == 1
    assert codes[SPIKE_AT] == DECISION_CODES["rollback"] == 2
    assert codes.count(0) == STEPS - 2
    assert rows[SPIKE_AT]["reason"] and "probe" in rows[SPIKE_AT]["reason"]
    assert rows[NAN_AT]["reason"] == "nonfinite"
    for row, ev in zip(rows, events):
        assert int(row["step"]) == ev.step and row["decision"] == ev.decision
        for k in ("grad_norm", "y", "yhat", "innovation", "threshold"):
            value = getattr(ev, k)
            assert _num(row[k]) == (None if value is None else pytest.approx(value, rel=1e-12, nan_ok=True)), k
        for name, fired in ev.signals.items():
            assert int(row[f"signal/{name}"]) == int(fired)
    # every signal of the guard has a column (post-step ones are measured on step 0)
    assert {f"signal/{s.name}" for s in opt.signals} <= set(rows[0])
    assert rows[NAN_AT]["signal/nonfinite"] == "1" and rows[NAN_AT]["y"] == ""
    assert rows[SPIKE_AT]["signal/weight_norm"] in ("0", "1")


def test_csv_sink_on_an_open_file_flushes_and_leaves_it_open():
    buf = io.StringIO()
    sink = CSVSink(buf, signals=["nonfinite"])
    _run([sink], steps=4)
    sink.close()
    assert not buf.closed
    rows = list(csv.DictReader(io.StringIO(buf.getvalue())))
    assert [r["signal/nonfinite"] for r in rows] == ["0", "0", "0", "1"]
    assert not any(k.startswith("signal/") and k != "signal/nonfinite" for k in rows[0])
    with pytest.raises(ValueError, match="closed"):
        sink(StepEvent(0, "accept"))


def test_csv_sink_warns_once_about_a_signal_without_a_column():
    buf = io.StringIO()
    sink = CSVSink(buf)
    sink(StepEvent(0, "accept", signals={"a": False}))
    with pytest.warns(UserWarning, match=r"signals=\["):
        sink(StepEvent(1, "skip", signals={"a": True, "b": True}))
    sink(StepEvent(2, "accept", signals={"a": False, "b": False}))  # no second warning
    rows = list(csv.DictReader(io.StringIO(buf.getvalue())))
    assert [r["signal/a"] for r in rows] == ["0", "1", "0"] and "signal/b" not in rows[0]


def test_csv_sink_rejects_bad_arguments():
    with pytest.raises(TypeError, match="path_or_file"):
        CSVSink(42)
    with pytest.raises(ValueError, match="flush_every"):
        CSVSink(io.StringIO(), flush_every=0)


def test_event_scalars_leave_out_what_was_not_measured():
    ev = StepEvent(5, "skip", grad_norm=float("inf"), signals={"nonfinite": True})
    assert event_scalars(ev) == {"grad_norm": float("inf"), "decision": 1, "signal/nonfinite": 1}


def test_tensorboard_sink_writes_scalars_read_back_by_event_accumulator(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    sink = TensorBoardSink(tmp_path)
    _, events = _run([sink])
    sink.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"guard/decision", "guard/y", "guard/yhat", "guard/innovation", "guard/threshold",
            "guard/grad_norm", "guard/signal/nonfinite"} <= tags
    decisions = {e.step: e.value for e in acc.Scalars("guard/decision")}
    assert decisions == {ev.step: DECISION_CODES[ev.decision] for ev in events}
    y = {e.step: e.value for e in acc.Scalars("guard/y")}
    assert NAN_AT not in y and len(y) == STEPS - 1   # the skipped step measured no probe
    assert y[0] == pytest.approx(events[0].y, rel=1e-6)
    assert {e.step: e.value for e in acc.Scalars("guard/signal/nonfinite")}[NAN_AT] == 1.0


def test_tensorboard_sink_with_a_users_writer_flushes_but_does_not_close():
    class Writer:
        def __init__(self):
            self.scalars, self.flushed, self.closed = [], 0, False

        def add_scalar(self, tag, value, global_step=None):
            self.scalars.append((tag, value, global_step))

        def flush(self):
            self.flushed += 1

        def close(self):
            self.closed = True

    w = Writer()
    sink = TensorBoardSink(w, prefix="g/")
    sink(StepEvent(2, "rollback", y=1.5, yhat=1.0, innovation=0.5, threshold=0.2))
    sink.close()
    assert ("g/decision", 2, 2) in w.scalars and ("g/innovation", 0.5, 2) in w.scalars
    assert w.flushed == 1 and not w.closed
    with pytest.raises(TypeError, match="writer_or_logdir"):
        TensorBoardSink(3)


def test_core_import_does_not_import_tensorboard():
    code = ("import sys, guarded_optim, guarded_optim.events; "
            "bad = [m for m in sys.modules if 'tensorboard' in m]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=str(__import__("pathlib").Path(__file__).parents[1]))
