"""lightning_unlearn: make a fine-tuned LLM forget chosen training data, and measure how well it forgot."""

from lightning_unlearn.errors import UserError

__all__ = ["UserError"]
__version__ = "0.1.0"
