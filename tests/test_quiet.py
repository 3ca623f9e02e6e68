"""quiet_libraries silences Lightning's per-Trainer noise and nothing else."""

import logging
import warnings

import lightning as L
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from transformers.utils import logging as hf_logging

from lightning_unlearn.quiet import quiet_libraries


def _trainer_lines(caplog) -> str:
    caplog.clear()
    with caplog.at_level(logging.INFO):
        L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False)
    return caplog.text


def test_hardware_lines_are_silenced_inside_and_restored_after(caplog):
    assert "GPU available" in _trainer_lines(caplog)  # the noise exists, so the check below can fail
    assert hf_logging.is_progress_bar_enabled()
    with quiet_libraries():
        assert "GPU available" not in _trainer_lines(caplog)
        assert not hf_logging.is_progress_bar_enabled()  # per-load GGUF / weight-loading bars
    assert "GPU available" in _trainer_lines(caplog) and hf_logging.is_progress_bar_enabled()


def test_known_notices_are_dropped_and_real_warnings_kept():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_libraries():
            rank_zero_warn("You defined a `validation_step` but have no `val_dataloader`. Skipping val loop.")
            rank_zero_warn(
                "`LightningModule.configure_optimizers` returned `None`, this fit will run with no optimizer"
            )
            rank_zero_warn(
                "InfluenceStep: no out_dir set, so the edited adapter is only in memory (export it)"
            )
            rank_zero_warn("The loss is NaN at step 3")
            warnings.warn("a user's own warning", UserWarning, stacklevel=1)
        rank_zero_warn("You defined a `validation_step` but have no `val_dataloader`. Skipping val loop.")
    messages = [str(w.message) for w in caught]
    assert messages == [
        "The loss is NaN at step 3",
        "a user's own warning",
        "You defined a `validation_step` but have no `val_dataloader`. Skipping val loop.",
    ]
