"""Unlearning objectives, one LightningModule per family."""

from lightning_unlearn.objectives.base import UnlearningObjective
from lightning_unlearn.objectives.ce_u import CEU
from lightning_unlearn.objectives.finetune import FineTune
from lightning_unlearn.objectives.grad_ascent import GradAscent, GradDiff
from lightning_unlearn.objectives.idk import IdkAP, IdkDPO, IdkNLL
from lightning_unlearn.objectives.influence import InfluenceStep
from lightning_unlearn.objectives.kl_teacher import KLTeacher
from lightning_unlearn.objectives.max_entropy import MaxEntropy
from lightning_unlearn.objectives.npo import NPO, SimNPO
from lightning_unlearn.objectives.reweighted import WGA, SatImp
from lightning_unlearn.objectives.rmu import RMU
from lightning_unlearn.objectives.undial import UNDIAL

__all__ = [
    "CEU",
    "NPO",
    "RMU",
    "UNDIAL",
    "WGA",
    "FineTune",
    "GradAscent",
    "GradDiff",
    "IdkAP",
    "IdkDPO",
    "IdkNLL",
    "InfluenceStep",
    "KLTeacher",
    "MaxEntropy",
    "SatImp",
    "SimNPO",
    "UnlearningObjective",
]
