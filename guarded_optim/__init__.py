"""guarded_optim: PyTorch training that recovers by itself from the update that wrecks a run.

Replace ``torch.optim.AdamW(...)`` with ``GuardedOptimizer(torch.optim.AdamW(...), probe=...)``
and change nothing else.
"""

from . import distributed
from .events import (CSVSink, HFTrainerSink, LightningSink, MLflowSink, StepEvent,
                     TensorBoardSink, WandbSink)
from .conformal import ConformalForecast, ConformalStateSets, ConformalThreshold
from .fisher import (EWCPenalty, FisherDiagonal, FisherDrift, ImportanceWeightedRollback,
                     ewc_penalty, fisher_effective_rank, fisher_rao_distance, gradient_snr)
from .guard import GuardedOptimizer
from .innovation import FixedThreshold, RelativeThreshold, accepts, ewma, innovation
from .badbatch import BadBatch
from .drift import DriftDetector, Rewind, skip_ahead
from .ladder import (BackOff, GuardStopped, Ladder, Quarantine, QuarantineSampler, RaiseEps, ReRun,
                     ResetMoments)
from .policy import Decision, Escape, RecoveryAction, ReduceLR, TightenClip, arc_recovery
from .signals import (CurvatureSpike, GradientSpike, LossSpike, Lyapunov, NonFinite,
                      NonFiniteWeights, OptimizerStateHealth, ProbeError, Verdict, WeightNorm,
                      default_signals, hessian_lambda_max, hutchinson_trace, sam_sharpness)
from .snapshot import Snapshot, SnapshotRing

__version__ = "0.1.0"

__all__ = [
    "GuardedOptimizer", "Decision", "StepEvent", "CSVSink", "TensorBoardSink", "distributed", "Snapshot", "SnapshotRing",
    "FixedThreshold", "RelativeThreshold", "innovation", "ewma", "accepts",
    "GradientSpike", "NonFinite", "LossSpike", "NonFiniteWeights", "WeightNorm",
    "OptimizerStateHealth", "Verdict", "ProbeError", "default_signals",
    "RecoveryAction", "ReduceLR", "TightenClip", "Escape", "arc_recovery", "__version__",
    "ConformalThreshold", "ConformalForecast", "ConformalStateSets", "FisherDiagonal",
    "FisherDrift", "ImportanceWeightedRollback", "EWCPenalty", "ewc_penalty",
    "fisher_rao_distance", "fisher_effective_rank", "gradient_snr", "Lyapunov",
    "CurvatureSpike", "hutchinson_trace", "hessian_lambda_max", "sam_sharpness",
    "LightningSink", "HFTrainerSink", "WandbSink", "MLflowSink",
    "Ladder", "GuardStopped", "ReRun", "Quarantine", "QuarantineSampler", "ResetMoments",
    "BackOff", "RaiseEps", "Rewind", "DriftDetector", "skip_ahead", "BadBatch",
]
