"""Lightning callbacks, installed as ``lightning_unlearn.callbacks``."""

from lightning_unlearn.callbacks.evaluation import UnlearningEvaluation
from lightning_unlearn.callbacks.export import ExportModel

__all__ = ["ExportModel", "UnlearningEvaluation"]
