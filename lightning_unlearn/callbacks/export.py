"""ExportModel: save the unlearned model (peft adapter or merged weights) when ``fit`` ends."""

from __future__ import annotations

from lightning import Callback, LightningModule, Trainer


class ExportModel(Callback):
    """Write ``pl_module.export(dirpath, merge)`` at the end of fit, with the tokenizer: every rank
    takes part (a sharded model is gathered), global rank 0 writes (``lightning_unlearn.export``
    decides the directory's layout).

    Args:
        dirpath: output directory, replaced atomically.
        merge: merge a LoRA adapter into the weights (a plain HF model directory); False saves the
            peft adapter alone.
        tokenizer: tokenizer to save beside the model (defaults to the model's own).
    """

    def __init__(self, dirpath: str, merge: bool = False, tokenizer: str | None = None) -> None:
        self.dirpath, self.merge, self.tokenizer = dirpath, merge, tokenizer

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pl_module.export(self.dirpath, merge=self.merge, tokenizer=self.tokenizer)
