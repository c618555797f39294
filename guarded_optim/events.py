"""Decision records and the callbacks that receive them: telemetry sinks.

Every ``step()`` emits one :class:`StepEvent` to each callable in ``callbacks=[...]``. The
sinks below are such callables; each lands the guard's numbers (:func:`event_scalars`) where
users already look:

* :class:`CSVSink` -- one CSV row per step (measurements, the decision as an int, one 0/1
  column per signal);
* :class:`TensorBoardSink` -- the same as scalars of a ``SummaryWriter``;
* :class:`LightningSink` -- through a ``LightningModule``'s ``log_dict`` (inside the
  Trainer's loop, at its ``log_every_n_steps``) or a Lightning logger's ``log_metrics``;
* :class:`HFTrainerSink` -- into a ``transformers.Trainer``'s ``trainer.log`` (its
  ``log_history`` and every ``report_to`` integration), at its ``logging_steps``;
* :class:`WandbSink` -- ``wandb.log`` on the active Weights & Biases run;
* :class:`MLflowSink` -- ``mlflow.log_metrics`` on the active (or a given) MLflow run.

Every framework is imported only when its sink is built: the core needs torch and numpy only.
Under DDP every rank sees the same event (the decision is agreed); attach sinks on rank 0.
"""

from __future__ import annotations

import csv
import io
import math
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

from .outcome import DECISION_CODES

__all__ = ["StepEvent", "DECISION_CODES", "event_scalars", "CSVSink", "TensorBoardSink",
           "LightningSink", "HFTrainerSink", "WandbSink", "MLflowSink"]


_MEASURED = ("y", "yhat", "innovation", "threshold", "grad_norm")


@dataclass
class StepEvent:
    """One ``step()`` as the guard saw it. Measurements not taken on this step are ``None``.

    ``reason`` names what fired, comma-separated: signal names, ``"probe"`` (the innovation
    test), ``"amp_overflow"`` (GradScaler), ``"quarantined"`` (the batch is quarantined).

    ``action`` names what the guard did beyond the decision itself, comma-separated, in the
    order of the escalation ladder (:mod:`.ladder`): ``"rerun:transient"`` (the step was
    re-run in place and its re-run applied), ``"rerun:persistent"`` (the re-run reproduced
    the rejection), ``"quarantine"`` (the batch, ``batch_id``, was quarantined),
    ``"escalate"`` (rolled back to an older verified snapshot), ``"stop"`` (the budget is
    spent: ``step()`` raises ``GuardStopped``), ``"rebaseline"`` (the references re-based, when
    opted in), and what recovery actions did (``"lr_scale=0.5"``, ``"escape"``,
    ``"reset_moments"``); ``None`` when nothing else happened.
    """

    step: int
    decision: str
    reason: str | None = None
    grad_norm: float | None = None
    y: float | None = None
    yhat: float | None = None
    innovation: float | None = None
    threshold: float | None = None
    action: str | None = None
    signals: dict[str, bool] = field(default_factory=dict)
    skip_batches: int = 0   #: set by an escape: advance the data iterator by this many
    batch_id: Any = None    #: the ``batch_id`` passed to ``step()``, if any
    #: the guard's LR multiplier after this step (the healing rung's backoff and recovery
    #: actions, applied around ``inner.step()``: the groups' ``lr`` is the schedule's)
    lr_scale: float = 1.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def event_scalars(event: StepEvent) -> dict[str, float]:
    """The numbers of one event: the measurements taken on this step (``None`` ones are
    left out), ``lr_scale`` while the guard scales the LR (not 1), ``decision`` as an int
    (:data:`DECISION_CODES`), ``signal/<name>`` as 0/1."""
    out = {k: float(getattr(event, k)) for k in _MEASURED if getattr(event, k) is not None}
    if event.lr_scale != 1.0:
        out["lr_scale"] = float(event.lr_scale)
    out["decision"] = DECISION_CODES[event.decision]
    out.update({f"signal/{name}": int(bool(f)) for name, f in event.signals.items()})
    return out


class _ClosingSink:
    """``with Sink(...) as sink:`` closes the sink (what it opened) on exit."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CSVSink(_ClosingSink):
    """Write one CSV row per :class:`StepEvent`: ``callbacks=[CSVSink("guard.csv")]``.

    Columns: ``step``, ``decision`` (text), ``decision_code`` (:data:`DECISION_CODES`),
    ``reason``, ``action``, the measurements (``grad_norm, y, yhat, innovation, threshold``;
    empty when not taken on that step), ``skip_batches``, and ``signal/<name>`` (0/1; empty
    when that signal did not measure this step).

    Args:
        path_or_file: a path (opened, truncated, and closed by :meth:`close`) or an open
            text file (written to and flushed; the caller closes it).
        signals: the signal columns. ``None``: the signals of the first event; a signal
            that first appears later (a post-step signal on a run whose first step was
            not measured) is then left out, with one warning naming the fix: pass
            ``signals=[s.name for s in guard.signals]``. A list: exactly those columns.
        flush_every: flush the file every this many rows (1: every row).
    """

    base_columns = ("step", "decision", "decision_code", "reason", "action", "grad_norm", "y",
                    "yhat", "innovation", "threshold", "skip_batches", "lr_scale")

    def __init__(self, path_or_file: str | os.PathLike | io.TextIOBase,
                 signals: Iterable[str] | None = None, flush_every: int = 1):
        if isinstance(flush_every, bool) or not isinstance(flush_every, int) or flush_every < 1:
            raise ValueError(f"Invalid flush_every: {flush_every!r}; it must be an int >= 1.")
        if isinstance(path_or_file, (str, os.PathLike)):
            self._file, self._owned = open(path_or_file, "w", newline=""), True
        elif hasattr(path_or_file, "write"):
            self._file, self._owned = path_or_file, False
        else:
            raise TypeError(f"path_or_file must be a path or an open text file, got "
                            f"{type(path_or_file).__name__}.")
        self.signals = None if signals is None else list(signals)
        self.flush_every, self.rows = flush_every, 0
        self._writer: csv.DictWriter | None = None
        self._warned = signals is not None   # columns chosen by the caller: no warning

    def __call__(self, event: StepEvent) -> None:
        if self._file is None:
            raise ValueError("CSVSink is closed; build a new one to keep writing.")
        if self._writer is None:
            if self.signals is None:
                self.signals = list(event.signals)
            self._writer = csv.DictWriter(
                self._file, [*self.base_columns, *(f"signal/{n}" for n in self.signals)])
            self._writer.writeheader()
        unknown = set(event.signals) - set(self.signals)
        if unknown and not self._warned:
            self._warned = True
            warnings.warn(f"CSVSink: signals {sorted(unknown)} have no column and are left out; "
                          "pass signals=[s.name for s in guard.signals].", stacklevel=2)
        row: dict[str, Any] = {k: getattr(event, k) for k in self.base_columns
                               if k != "decision_code"}
        row["decision_code"] = DECISION_CODES[event.decision]
        row.update({f"signal/{n}": int(bool(event.signals[n]))
                    for n in self.signals if n in event.signals})
        self._writer.writerow(row)
        self.rows += 1
        if self.rows % self.flush_every == 0:
            self._file.flush()

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        """Flush; close the file if this sink opened it. Idempotent."""
        if self._file is None:
            return
        self._file.flush()
        if self._owned:
            self._file.close()
        self._file = None


class TensorBoardSink(_ClosingSink):
    """Log each :class:`StepEvent` as TensorBoard scalars: ``callbacks=[TensorBoardSink("runs/x")]``.

    Tags are ``<prefix>innovation``, ``threshold``, ``y``, ``yhat``, ``grad_norm`` (on the
    steps that measured them), ``decision`` (:data:`DECISION_CODES`) and
    ``signal/<name>`` (0/1), at ``global_step = event.step``.

    Args:
        writer_or_logdir: a ``SummaryWriter`` (or anything with ``add_scalar``; flushed by
            :meth:`close`, left open for its owner), or a log directory, for which a
            ``torch.utils.tensorboard.SummaryWriter`` is built here (the ``tensorboard``
            package is imported only then) and closed by :meth:`close`.
        prefix: prepended to every tag (default ``"guard/"``).
    """

    def __init__(self, writer_or_logdir: Any, prefix: str = "guard/"):
        if isinstance(writer_or_logdir, (str, os.PathLike)):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise ImportError("TensorBoardSink(logdir) needs the tensorboard package: "
                                  "pip install tensorboard (or pass your own SummaryWriter).") from exc
            self.writer, self._owned = SummaryWriter(log_dir=os.fspath(writer_or_logdir)), True
        elif hasattr(writer_or_logdir, "add_scalar"):
            self.writer, self._owned = writer_or_logdir, False
        else:
            raise TypeError(f"writer_or_logdir must be a SummaryWriter or a log directory, got "
                            f"{type(writer_or_logdir).__name__}.")
        self.prefix = prefix

    def __call__(self, event: StepEvent) -> None:
        if self.writer is None:
            raise ValueError("TensorBoardSink is closed; build a new one to keep logging.")
        for tag, value in event_scalars(event).items():
            self.writer.add_scalar(self.prefix + tag, value, global_step=event.step)

    def flush(self) -> None:
        if self.writer is not None and hasattr(self.writer, "flush"):
            self.writer.flush()

    def close(self) -> None:
        """Flush; close the writer if this sink built it. Idempotent."""
        if self.writer is None:
            return
        self.flush()
        if self._owned:
            self.writer.close()
        self.writer = None


def _prefixed(event: StepEvent, prefix: str) -> dict[str, float]:
    return {prefix + k: v for k, v in event_scalars(event).items()}


class LightningSink(_ClosingSink):
    """Log each :class:`StepEvent` where a Lightning run logs: ``<prefix><name>`` of
    :func:`event_scalars`.

    In ``configure_optimizers``::

        guard = GuardedOptimizer(inner, probe, module=self, callbacks=[LightningSink(self)])

    Args:
        target: one of
            * a ``LightningModule``: ``target.log_dict(..., on_step=True, on_epoch=False)``,
              so the numbers follow the Trainer's ``log_every_n_steps`` to all its loggers
              and land in ``trainer.callback_metrics`` (valid while the Trainer runs the
              module's optimizer step, the only place the guard steps). Measurements not
              taken on a step are logged as NaN: Lightning would repeat their last value;
            * a ``Trainer``: ``log_metrics(..., step=event.step)`` on each of ``trainer.loggers``;
            * a Lightning logger (anything with ``log_metrics``): its ``log_metrics``.
        prefix: prepended to every name (default ``"guard/"``).
        prog_bar: with a module, also show the numbers in the progress bar.

    Nothing is closed: the loggers and the module belong to the Trainer. :meth:`close` calls
    ``save()`` on the loggers it writes to directly and stops the sink.
    """

    def __init__(self, target: Any, prefix: str = "guard/", prog_bar: bool = False):
        if hasattr(target, "log_dict") and hasattr(target, "configure_optimizers"):
            self.module, self._loggers = target, None
        elif hasattr(target, "loggers"):
            self.module, self._loggers = None, lambda: list(target.loggers)
        elif hasattr(target, "log_metrics"):
            self.module, self._loggers = None, lambda: [target]
        else:
            raise TypeError(f"target must be a LightningModule, a Trainer or a logger with "
                            f"log_metrics, got {type(target).__name__}.")
        self.prefix, self.prog_bar, self._closed = prefix, prog_bar, False

    def __call__(self, event: StepEvent) -> None:
        if self._closed:
            raise ValueError("LightningSink is closed; build a new one to keep logging.")
        metrics = _prefixed(event, self.prefix)
        if self.module is not None:   # Lightning repeats a name's last value on steps that do
            metrics = {**{self.prefix + k: math.nan for k in _MEASURED}, **metrics}  # not log it
            self.module.log_dict(metrics, on_step=True, on_epoch=False, prog_bar=self.prog_bar)
        else:
            for logger in self._loggers():
                logger.log_metrics(metrics, step=event.step)

    def flush(self) -> None:
        if not self._closed and self._loggers is not None:
            for logger in self._loggers():
                if hasattr(logger, "save"):
                    logger.save()

    def close(self) -> None:
        """Save the loggers written to directly; idempotent."""
        self.flush()
        self._closed = True


class HFTrainerSink(_ClosingSink):
    """The guard's numbers in a ``transformers.Trainer``'s logs, through ``trainer.log``: they
    reach ``trainer.state.log_history`` and every ``report_to`` integration (TensorBoard,
    W&B, MLflow, ...) like the Trainer's own loss::

        trainer = Trainer(model=model, args=args, optimizers=(guard, scheduler), ...)
        guard.callbacks.append(HFTrainerSink(trainer))
        trainer.train()

    Building the sink adds a ``TrainerCallback`` to the trainer (``trainer.add_callback``).
    The guard's events are held until the Trainer ends the optimizer step (``on_step_end``,
    after ``state.global_step`` moved), then the last one is logged as
    ``<prefix><name>`` of :func:`event_scalars` on the steps the Trainer logs
    (``logging_steps``; or every ``every`` steps), and on every step the guard skipped or
    rolled back, so no intervention goes unlogged.

    Args:
        trainer: a ``transformers.Trainer`` (anything with ``log`` and ``add_callback``).
        prefix: prepended to every name (default ``"guard/"``).
        every: log every this many optimizer steps instead of at the Trainer's cadence.
    """

    def __init__(self, trainer: Any, prefix: str = "guard/", every: int | None = None):
        if not (hasattr(trainer, "log") and hasattr(trainer, "add_callback")):
            raise TypeError(f"trainer must be a transformers.Trainer, got "
                            f"{type(trainer).__name__}.")
        if every is not None and (isinstance(every, bool) or not isinstance(every, int)
                                  or every < 1):
            raise ValueError(f"Invalid every: {every!r}; it must be None or an int >= 1.")
        self.trainer, self.prefix, self.every = trainer, prefix, every
        self.logged = 0                    #: how many times this sink called ``trainer.log``
        self._pending: StepEvent | None = None
        self._intervened = False
        self.callback = _hf_callback(self)
        trainer.add_callback(self.callback)

    def __call__(self, event: StepEvent) -> None:
        if self.trainer is None:
            raise ValueError("HFTrainerSink is closed; build a new one to keep logging.")
        self._pending = event
        self._intervened |= event.decision != "accept"

    def _on_step_end(self, state: Any, control: Any) -> None:
        event, self._pending = self._pending, None
        if event is None or self.trainer is None:
            return
        due = (state.global_step % self.every == 0 if self.every is not None
               else bool(getattr(control, "should_log", False)))
        if due or self._intervened:
            # trainer.log clears control.should_log (its on_log does): keep the Trainer's own
            # log of this step (the loss) coming
            should_log = getattr(control, "should_log", False)
            self.trainer.log(_prefixed(event, self.prefix))
            for c in {id(control): control, id(getattr(self.trainer, "control", None)):
                      getattr(self.trainer, "control", None)}.values():
                if c is not None:
                    c.should_log = should_log
            self.logged += 1
        self._intervened = False

    def close(self) -> None:
        """Stop logging and take the callback off the trainer; idempotent."""
        if self.trainer is None:
            return
        if hasattr(self.trainer, "remove_callback"):
            self.trainer.remove_callback(self.callback)
        self.trainer = None


def _hf_callback(sink: HFTrainerSink) -> Any:
    """A ``transformers.TrainerCallback`` forwarding ``on_step_end`` to ``sink`` (transformers
    is imported here, when an :class:`HFTrainerSink` is built)."""
    try:
        from transformers import TrainerCallback
    except ImportError as exc:
        raise ImportError("HFTrainerSink needs transformers: pip install transformers.") from exc

    class GuardLogCallback(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            sink._on_step_end(state, control)

    return GuardLogCallback()


class WandbSink(_ClosingSink):
    """Log each :class:`StepEvent` to Weights & Biases with ``wandb.log``:
    ``callbacks=[WandbSink()]`` after ``wandb.init(...)``.

    Keys are ``<prefix><name>`` of :func:`event_scalars` plus ``<prefix>step`` (the guard's
    step), declared the x-axis of ``<prefix>*`` with ``define_metric`` so the charts line up
    with training steps whatever else the run logs.

    Args:
        run: a ``wandb`` run (``wandb.init()``'s return value), or ``None`` for the ``wandb``
            module's active run (``wandb`` is imported only then).
        prefix: prepended to every key (default ``"guard/"``).
        commit: passed to ``log``: ``None`` (W&B's default) commits each call as a step of its
            own; ``False`` adds the numbers to the step your next ``wandb.log`` commits.

    The run belongs to the caller: :meth:`close` only stops the sink (``run.finish()`` is yours).
    """

    def __init__(self, run: Any = None, prefix: str = "guard/", commit: bool | None = None):
        if run is None:
            try:
                import wandb
            except ImportError as exc:
                raise ImportError("WandbSink needs wandb: pip install wandb (or pass a "
                                  "run).") from exc
            if getattr(wandb, "run", None) is None:
                raise ValueError("WandbSink: no active W&B run; call wandb.init(...) first.")
            run = wandb
        elif not hasattr(run, "log"):
            raise TypeError(f"run must be a wandb run, got {type(run).__name__}.")
        self.run, self.prefix, self.commit = run, prefix, commit
        self.step_key = f"{prefix}step"
        if hasattr(run, "define_metric"):
            run.define_metric(self.step_key)
            run.define_metric(f"{prefix}*", step_metric=self.step_key)

    def __call__(self, event: StepEvent) -> None:
        if self.run is None:
            raise ValueError("WandbSink is closed; build a new one to keep logging.")
        self.run.log({**_prefixed(event, self.prefix), self.step_key: event.step},
                     commit=self.commit)

    def close(self) -> None:
        """Stop the sink (the run stays open); idempotent."""
        self.run = None


class MLflowSink(_ClosingSink):
    """Log each :class:`StepEvent` to MLflow: ``mlflow.log_metrics(..., step=event.step)``
    with keys ``<prefix><name>`` of :func:`event_scalars`; ``mlflow`` is imported when the
    sink is built. ``callbacks=[MLflowSink()]`` inside ``with mlflow.start_run():``.

    Args:
        run_id: log to this run instead of the active one, through ``client.log_batch``
            (with no active run and no ``run_id``, MLflow starts a run, as
            ``mlflow.log_metrics`` always does).
        prefix: prepended to every key (default ``"guard/"``; MLflow allows ``/`` in names).
        client: the ``mlflow.MlflowClient`` to log through with ``run_id`` (default: one for
            the current tracking URI).

    The run belongs to the caller: :meth:`close` only stops the sink.
    """

    def __init__(self, run_id: str | None = None, prefix: str = "guard/", client: Any = None):
        try:
            import mlflow
        except ImportError as exc:
            raise ImportError("MLflowSink needs mlflow: pip install mlflow.") from exc
        if client is not None and run_id is None:
            raise ValueError("MLflowSink(client=...) needs the run_id to log to.")
        if run_id is not None and client is None:
            client = mlflow.MlflowClient()
        self._mlflow, self.client, self.run_id, self.prefix = mlflow, client, run_id, prefix
        self._closed = False

    def __call__(self, event: StepEvent) -> None:
        if self._closed:
            raise ValueError("MLflowSink is closed; build a new one to keep logging.")
        metrics = _prefixed(event, self.prefix)
        if self.client is None:
            self._mlflow.log_metrics(metrics, step=event.step)
            return
        import time

        from mlflow.entities import Metric
        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, event.step)
                                                    for k, v in metrics.items()])

    def close(self) -> None:
        """Stop the sink (the run stays open); idempotent."""
        self._closed = True
