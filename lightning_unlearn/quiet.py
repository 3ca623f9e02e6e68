"""A quiet console for the multi-stage commands: the protocol trains and evaluates a dozen
models, and Lightning repeats its hardware lines, tips and the same harmless notices for each
(tens of lines a stage), which buries the protocol's own stage lines and any warning that
matters. Only those known messages are silenced; every other warning still shows."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

# Loggers whose INFO lines repeat per Trainer (hardware availability, "Tip:" adverts, CUDA ranks).
INFO_LOGGERS = (
    "lightning.fabric.utilities.rank_zero",
    "lightning.pytorch.utilities.rank_zero",
    "lightning_utilities.core.rank_zero",
    "lightning.pytorch.accelerators.cuda",
)

# Warnings that are expected in the protocol's own use of Lightning, with why each is harmless:
NOISE = (
    r".*validation_step.* but have no .val_dataloader",  # the protocol evaluates with its Evaluator
    r".*configure_optimizers. returned .None",  # InfluenceStep's update is a solve, not an optimizer step
    r".*does not have many workers",  # in-memory token batches; workers would only copy them
    r".*isinstance\(treespec, LeafSpec\). is deprecated",  # inside Lightning, about a torch API
    r".*Checkpoint directory .* exists and is not empty",  # a resumed run's own checkpoints
    r"InfluenceStep: no out_dir set",  # the protocol exports the edited model itself, after fit
)


@contextmanager
def quiet_libraries() -> Iterator[None]:
    """Silence ``NOISE`` warnings, the INFO lines of ``INFO_LOGGERS`` and transformers' per-load
    progress bars (GGUF de-quantisation, weight loading: a model is loaded at every stage) for
    the block."""
    from transformers.utils import logging as hf_logging

    loggers = [logging.getLogger(name) for name in INFO_LOGGERS]
    levels = [log.level for log in loggers]
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    with warnings.catch_warnings():
        for pattern in NOISE:
            warnings.filterwarnings("ignore", message=pattern)
        for log in loggers:
            log.setLevel(logging.WARNING)
        try:
            yield
        finally:
            for log, level in zip(loggers, levels, strict=True):
                log.setLevel(level)
            if bars:
                hf_logging.enable_progress_bar()
