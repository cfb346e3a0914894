"""Lightning callbacks of the project (added by ``mtssl`` to every run; usable in Python too)."""

from mtssl_lightning.callbacks.dashboard import TrainingDashboard
from mtssl_lightning.callbacks.preemption import PreemptionCheckpoint
from mtssl_lightning.callbacks.validate_first import ValidateBeforeTraining

__all__ = ["PreemptionCheckpoint", "TrainingDashboard", "ValidateBeforeTraining"]
