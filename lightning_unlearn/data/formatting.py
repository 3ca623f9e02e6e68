"""Prompt formatting and tokenization with label masking.

Labels are -100 on the prompt; the answer and an appended EOS are scored. Where the answer starts
is decided by ``label_boundary``: ``"offsets"`` (default) labels every token whose character span
overlaps the answer, so the first answer word is scored even when a BPE tokenizer merges the
prompt's trailing space into it; ``"prompt_length"`` reproduces open-unlearning exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from lightning_unlearn.errors import UserError
from lightning_unlearn.losses import IGNORE_INDEX


@dataclass(frozen=True)
class PromptFormat:
    """How a question becomes a prompt. ``kind``: "plain" or "chat" (the tokenizer's chat template)."""

    kind: str = "plain"
    system_prompt: str | None = None
    label_boundary: str = "offsets"

    def __post_init__(self) -> None:
        if self.kind not in ("plain", "chat"):
            raise UserError(f"prompt_format.kind must be 'plain' or 'chat', got {self.kind!r}")
        if self.label_boundary not in ("offsets", "prompt_length"):
            raise UserError(
                f"prompt_format.label_boundary must be 'offsets' or 'prompt_length', got {self.label_boundary!r}"
            )

    def prompt(self, question: str, tokenizer: PreTrainedTokenizerBase) -> str:
        """The text before the answer, exactly as used for training."""
        if self.kind == "plain":
            return "Question: " + question + "\n" + "Answer: "
        messages = [{"role": "user", "content": question}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def generation_prompt(self, question: str, tokenizer: PreTrainedTokenizerBase) -> str:
        """The prompt for generation: with ``offsets`` the model writes the first word's own space."""
        prompt = self.prompt(question, tokenizer)
        return prompt.rstrip(" ") if self.label_boundary == "offsets" else prompt

    def add_special_tokens(self) -> bool:
        # A chat template already contains its special tokens.
        return self.kind == "plain"


PLAIN = PromptFormat()


def encode(
    question: str,
    answer: str,
    tokenizer: PreTrainedTokenizerBase,
    prompt_format: PromptFormat,
    max_length: int,
    where: str = "record",
) -> dict[str, list[int]]:
    """Token ids and labels of prompt + answer + EOS; raises UserError if the prompt leaves no room."""
    prompt = prompt_format.prompt(question, tokenizer)
    full = prompt + answer
    special = prompt_format.add_special_tokens()
    enc = tokenizer(
        full, add_special_tokens=special, return_offsets_mapping=prompt_format.label_boundary == "offsets"
    )
    ids = list(enc["input_ids"])
    if prompt_format.label_boundary == "offsets":
        start = len(prompt)
        labels = [
            tok if (end > start and end > begin) else IGNORE_INDEX
            for tok, (begin, end) in zip(ids, enc["offset_mapping"], strict=True)
        ]
        n_prompt = next((i for i, lab in enumerate(labels) if lab != IGNORE_INDEX), len(ids))
    else:
        n_prompt = len(tokenizer(prompt, add_special_tokens=special)["input_ids"])
        labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
    eos = tokenizer.eos_token_id
    if eos is not None and (not ids or ids[-1] != eos):
        ids.append(eos)
        labels.append(eos)
    if n_prompt >= max_length:
        raise UserError(
            f"{where}: prompt is {n_prompt} tokens, no room for the answer within max_length={max_length}"
        )
    return {"input_ids": ids[:max_length], "labels": labels[:max_length]}


def encode_prompt(
    question: str,
    tokenizer: PreTrainedTokenizerBase,
    prompt_format: PromptFormat,
    max_length: int,
    where: str = "record",
) -> list[int]:
    """Token ids of the generation prompt."""
    text = prompt_format.generation_prompt(question, tokenizer)
    ids = tokenizer(text, add_special_tokens=prompt_format.add_special_tokens())["input_ids"]
    if len(ids) >= max_length:
        raise UserError(
            f"{where}: prompt is {len(ids)} tokens, no room to generate within max_length={max_length}"
        )
    return list(ids)
