"""Signals: small objects that measure a step and state a verdict.

* :mod:`.probe` -- the validation probe loss (the primary, external measurement).
* :mod:`.loss` -- :class:`NonFinite` loss or gradients.
* :mod:`.gradients` -- :class:`GradientSpike`, the global gradient norm against its median.
"""

from .base import PreStepSignal, StepMeasurement
from .gradients import GradientSpike, global_grad_norm
from .loss import NonFinite
from .probe import ProbeError, measure_probe

__all__ = ["PreStepSignal", "StepMeasurement", "GradientSpike", "global_grad_norm",
           "NonFinite", "ProbeError", "measure_probe", "default_signals"]


def default_signals() -> list:
    """The pre-step signals a guard uses unless told otherwise."""
    return [NonFinite(), GradientSpike()]
