"""Signals: small objects that measure a step and state a verdict.

* :mod:`.probe` -- the validation probe loss (the primary, external measurement).
* :mod:`.loss` -- :class:`NonFinite` loss or gradients (SKIP), :class:`LossSpike` (FAILURE).
* :mod:`.gradients` -- :class:`GradientSpike`, the global gradient norm against its median;
  :class:`GradientAgreement`, :class:`LayerwiseCV`, :class:`GradientEntropy` (SKIP).
* :mod:`.weights` -- post-step :class:`NonFiniteWeights`, :class:`WeightNorm`,
  :class:`OptimizerStateHealth`, :class:`Sparsity`, :class:`EffectiveRank`,
  :class:`StepCounters` (FAILURE: roll back to the last verified state).
"""

from .base import PreStepSignal, Signal, StepMeasurement, Verdict
from .gradients import (GradientAgreement, GradientEntropy, GradientSpike, LayerwiseCV,
                        global_grad_norm, global_norm)
from .loss import LossSpike, NonFinite
from .probe import ProbeError, measure_probe
from .weights import (EffectiveRank, NonFiniteWeights, OptimizerStateHealth, Sparsity,
                      StepCounters, WeightHealth, WeightNorm)

__all__ = ["Signal", "PreStepSignal", "StepMeasurement", "Verdict", "GradientSpike",
           "global_grad_norm", "global_norm", "NonFinite", "LossSpike", "NonFiniteWeights", "WeightNorm", "WeightHealth",
           "OptimizerStateHealth", "ProbeError", "measure_probe", "default_signals",
           "GradientAgreement", "LayerwiseCV", "GradientEntropy", "Sparsity", "EffectiveRank",
           "StepCounters"]


def default_signals() -> list:
    """The pre-step signals a guard uses unless told otherwise."""
    return [NonFinite(), GradientSpike()]
