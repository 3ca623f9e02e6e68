"""Lightning callbacks, installed as ``lightning_unlearn.callbacks``."""

from lightning_unlearn.callbacks.evaluation import UnlearningEvaluation
from lightning_unlearn.callbacks.export import ExportModel
from lightning_unlearn.callbacks.sequential import ForgetRequest, SequentialForgetting

__all__ = ["ExportModel", "ForgetRequest", "SequentialForgetting", "UnlearningEvaluation"]
