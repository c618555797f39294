"""Decision records and the callbacks that receive them: telemetry sinks.

Every ``step()`` emits one :class:`StepEvent` to each callable in ``callbacks=[...]``. Two
sinks turn them into files, both usable as such callables:

* :class:`CSVSink` -- one CSV row per step (measurements, the decision as an int, one 0/1
  column per signal);
* :class:`TensorBoardSink` -- the same as scalars of a ``SummaryWriter``. TensorBoard is
  imported only when the sink is built from a log directory: the core needs torch and
  numpy only.

Under DDP every rank sees the same event (the decision is agreed); attach sinks on rank 0.
"""

from __future__ import annotations

import csv
import io
import os
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable

__all__ = ["StepEvent", "DECISION_CODES", "event_scalars", "CSVSink", "TensorBoardSink"]

#: the decision as an int, larger is worse (as :class:`~guarded_optim.signals.Verdict`)
DECISION_CODES = {"accept": 0, "skip": 1, "rollback": 2}

_MEASURED = ("y", "yhat", "innovation", "threshold", "grad_norm")


@dataclass
class StepEvent:
    """One ``step()`` as the guard saw it. Measurements not taken on this step are ``None``.

    ``action`` names what the guard did beyond the decision itself, comma-separated:
    ``"escalate"`` (rolled back to an older verified snapshot), ``"rebaseline"`` (reset the
    references after ``max_consecutive_rejections``), and what recovery actions did
    (``"lr_scale=0.5"``, ``"escape"``); ``None`` when nothing else happened.
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

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def event_scalars(event: StepEvent) -> dict[str, float]:
    """The numbers of one event: the measurements taken on this step (``None`` ones are
    left out), ``decision`` as an int (:data:`DECISION_CODES`), ``signal/<name>`` as 0/1."""
    out = {k: float(getattr(event, k)) for k in _MEASURED if getattr(event, k) is not None}
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
                    "yhat", "innovation", "threshold", "skip_batches")

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
