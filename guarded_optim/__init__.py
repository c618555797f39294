"""guarded_optim: PyTorch training that recovers by itself from the update that wrecks a run.

Replace ``torch.optim.AdamW(...)`` with ``GuardedOptimizer(torch.optim.AdamW(...), probe=...)``
and change nothing else.
"""

from . import distributed
from .events import CSVSink, StepEvent, TensorBoardSink
from .guard import GuardedOptimizer
from .innovation import FixedThreshold, RelativeThreshold, accepts, ewma, innovation
from .policy import Decision, Escape, RecoveryAction, ReduceLR, TightenClip, arc_recovery
from .signals import (GradientSpike, LossSpike, NonFinite, NonFiniteWeights,
                      OptimizerStateHealth, ProbeError, Verdict, WeightNorm, default_signals)
from .snapshot import Snapshot, SnapshotRing

__version__ = "0.1.0"

__all__ = [
    "GuardedOptimizer", "Decision", "StepEvent", "CSVSink", "TensorBoardSink", "distributed", "Snapshot", "SnapshotRing",
    "FixedThreshold", "RelativeThreshold", "innovation", "ewma", "accepts",
    "GradientSpike", "NonFinite", "LossSpike", "NonFiniteWeights", "WeightNorm",
    "OptimizerStateHealth", "Verdict", "ProbeError", "default_signals",
    "RecoveryAction", "ReduceLR", "TightenClip", "Escape", "arc_recovery", "__version__",
]
