"""Lightning callbacks, installed as ``lightning_unlearn.callbacks``.

The names are imported on first use (PEP 562): importing one callback module, as every objective
does for ``NonFiniteGuard``, must not import the Evaluator and its metric dependencies (rouge-score),
which a training-only environment such as the GPU benchmark's may lack.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_unlearn.callbacks.evaluation import UnlearningEvaluation
    from lightning_unlearn.callbacks.export import ExportModel
    from lightning_unlearn.callbacks.nonfinite import NonFiniteGuard, NonFiniteLoss
    from lightning_unlearn.callbacks.sequential import ForgetRequest, SequentialForgetting

_WHERE = {
    "ExportModel": "export",
    "ForgetRequest": "sequential",
    "NonFiniteGuard": "nonfinite",
    "NonFiniteLoss": "nonfinite",
    "SequentialForgetting": "sequential",
    "UnlearningEvaluation": "evaluation",
}
__all__ = [
    "ExportModel",
    "ForgetRequest",
    "NonFiniteGuard",
    "NonFiniteLoss",
    "SequentialForgetting",
    "UnlearningEvaluation",
]


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
