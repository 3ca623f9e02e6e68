"""Lightning callbacks, installed as ``lightning_unlearn.callbacks``."""

from lightning_unlearn.callbacks.evaluation import UnlearningEvaluation
from lightning_unlearn.callbacks.export import ExportModel
from lightning_unlearn.callbacks.nonfinite import NonFiniteGuard, NonFiniteLoss
from lightning_unlearn.callbacks.sequential import ForgetRequest, SequentialForgetting

__all__ = [
    "ExportModel",
    "ForgetRequest",
    "NonFiniteGuard",
    "NonFiniteLoss",
    "SequentialForgetting",
    "UnlearningEvaluation",
]
