"""Logits only where a loss scores them.

A causal LM's output layer maps every position to the whole vocabulary: on a TOFU batch of
SmolLM2 (8 sequences x 128 positions x 49,152 tokens) that is 50M values per copy, and training
keeps several copies (half-precision logits, their float32 upcast, the log-softmax saved for
backward, their gradients). Most of those positions are prompt or padding that no loss reads.

A ``Logits`` source is a lazy stand-in for a ``[B, T, V]`` logits tensor. A loss asks it for
``values(positions, fn, *args)``: ``fn`` maps logit rows ``[n, V]`` (and the matching rows of
``args``) to one value per row, and the result is a ``[B, T]`` tensor holding those values at
``positions`` and 0 elsewhere. ``HeadLogits`` gathers the decoder's hidden states at the scored
positions and runs the output layer on them in chunks of rows, each chunk under activation
checkpointing, so the logits of only one chunk exist at a time, forward or backward (the chunk's
projection is recomputed during backward: one extra matmul over the scored rows only).
``DenseLogits`` wraps logits the model already computed (models whose output layer cannot be run
on its own, FSDP2-sharded ones, and callers that hold logits). Both apply the same ``fn`` to the
same rows, so every loss has one definition and the two paths agree to float rounding.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lightning_unlearn.architecture import base_model
from lightning_unlearn.sharding import is_sharded

# Logit elements per chunk (rows x vocabulary): 8M float32 values, 32 MiB, whatever the vocabulary.
CHUNK_ELEMENTS = 1 << 23

RowFn = Callable[..., Tensor]


def decoder_and_head(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """The transformer body and output layer of a Hugging Face causal LM (through peft), or
    ``(None, None)`` where logits are not simply ``head(body(x))``: FSDP2-sharded models (their
    embeddings, final norm and head are gathered only by a forward of the whole model) and
    architectures that rescale logits after the head (Granite's ``logits_scaling``, Cohere's
    ``logit_scale``). Gemma-2's soft-capping is applied by ``HeadLogits`` itself."""
    if is_sharded(model):
        return None, None
    base = base_model(model)
    config = getattr(base, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in ("logits_scaling", "logit_scale")):
        return None, None
    get_decoder = getattr(base, "get_decoder", None)
    decoder = get_decoder() if callable(get_decoder) else None
    head = base.get_output_embeddings() if decoder is not None else None
    return (decoder, head) if head is not None else (None, None)


def softcap(model: nn.Module) -> float | None:
    """The model's final logit soft-capping (Gemma-2), or None."""
    return getattr(getattr(base_model(model), "config", None), "final_logit_softcapping", None) or None


def soft_capped(model: nn.Module, logits: Tensor) -> Tensor:
    """``logits`` with the model's final soft-capping (Gemma-2: ``tanh(z / cap) * cap``), if any."""
    cap = softcap(model)
    return torch.tanh(logits / cap) * cap if cap else logits


class Logits:
    """A ``[B, T, V]`` logits tensor that is only ever read at chosen positions."""

    shape: tuple[int, int]  # (B, T)

    def rows(self, positions: Tensor) -> Callable[[int, int], Tensor]:
        """A function ``(start, end) -> logits [end - start, V]`` of the rows at ``positions``
        (row-major order)."""
        raise NotImplementedError

    def values(self, positions: Tensor, fn: RowFn, *args: Tensor, teacher: Logits | None = None) -> Tensor:
        """``fn(rows, [teacher_rows,] *arg_rows)`` at ``positions`` (``[B, T]`` bool), scattered into
        a ``[B, T]`` tensor that is 0 elsewhere. ``args`` are ``[B, T, ...]`` tensors aligned with
        the positions (e.g. the label each position predicts); ``teacher`` supplies frozen logits
        at the same positions (a distillation target: never differentiated)."""
        raise NotImplementedError

    def dense(self) -> Tensor:
        """The full ``[B, T, V]`` logits (tests and callers that need them all)."""
        raise NotImplementedError


def as_logits(logits: Tensor | Logits) -> Logits:
    """A ``Logits`` source for a tensor or a source."""
    return logits if isinstance(logits, Logits) else DenseLogits(logits)


def _scatter(positions: Tensor, rows: Tensor) -> Tensor:
    return rows.new_zeros(positions.shape).masked_scatter(positions, rows)


class DenseLogits(Logits):
    """Logits the model already computed in full."""

    def __init__(self, logits: Tensor) -> None:
        self.logits = logits
        self.shape = tuple(logits.shape[:2])

    def rows(self, positions: Tensor) -> Callable[[int, int], Tensor]:
        selected = self.logits[positions]
        return lambda start, end: selected[start:end]

    def values(self, positions: Tensor, fn: RowFn, *args: Tensor, teacher: Logits | None = None) -> Tensor:
        inputs = [self.logits[positions]]
        if teacher is not None:
            with torch.no_grad():
                inputs.append(teacher.rows(positions)(0, int(positions.sum())))
        return _scatter(positions, fn(*inputs, *(a[positions] for a in args)))

    def dense(self) -> Tensor:
        return self.logits


class HeadLogits(Logits):
    """Logits computed from final hidden states by the output layer, at scored positions only.

    Args:
        hidden: the decoder's final hidden states ``[B, T, D]``.
        head: the output layer.
        cap: final logit soft-capping (``tanh(z / cap) * cap``), or None.
        chunk_rows: rows per chunk; None sizes chunks to ``CHUNK_ELEMENTS`` logits.
    """

    def __init__(
        self, hidden: Tensor, head: nn.Module, cap: float | None = None, chunk_rows: int | None = None
    ):
        self.hidden, self.head, self.cap = hidden, head, cap
        self.shape = tuple(hidden.shape[:2])
        vocab = head.weight.shape[0] if hasattr(head, "weight") else head.out_features
        self.chunk_rows = chunk_rows or max(1, CHUNK_ELEMENTS // vocab)

    def project(self, hidden_rows: Tensor) -> Tensor:
        logits = self.head(hidden_rows)
        return logits if self.cap is None else torch.tanh(logits / self.cap) * self.cap

    def rows(self, positions: Tensor) -> Callable[[int, int], Tensor]:
        selected = self.hidden[positions]
        return lambda start, end: self.project(selected[start:end])

    def values(self, positions: Tensor, fn: RowFn, *args: Tensor, teacher: Logits | None = None) -> Tensor:
        hidden = self.hidden[positions]
        arg_rows = [a[positions] for a in args]
        teacher_rows = teacher.rows(positions) if teacher is not None else None

        def chunk(start: int, hidden_chunk: Tensor, *arg_chunk: Tensor) -> Tensor:
            inputs = [self.project(hidden_chunk)]
            if teacher_rows is not None:
                with torch.no_grad():
                    inputs.append(teacher_rows(start, start + hidden_chunk.shape[0]))
            return fn(*inputs, *arg_chunk)

        grad = torch.is_grad_enabled() and (
            hidden.requires_grad or any(p.requires_grad for p in self.head.parameters())
        )
        out = []
        for start in range(0, hidden.shape[0], self.chunk_rows):
            end = start + self.chunk_rows
            parts = (start, hidden[start:end], *(a[start:end] for a in arg_rows))
            # Checkpointed, a chunk's logits are freed after its forward and rebuilt in backward.
            out.append(checkpoint(chunk, *parts, use_reentrant=False) if grad else chunk(*parts))
        if not out:  # no scored position: zeros, still attached to the graph
            dtype = torch.promote_types(self.hidden.dtype, torch.float32)
            return self.hidden.new_zeros(positions.shape, dtype=dtype) + 0 * self.hidden.sum()
        return _scatter(positions, torch.cat(out))

    def dense(self) -> Tensor:
        return self.project(self.hidden)


def _packed_sequences_supported() -> bool:
    # transformers >= 4.53 reads sequences packed in one row from position ids that restart at 0
    # (with attention_mask=None) and masks attention block-diagonally; older versions would let
    # the sequences attend to each other, so they are never given packed input.
    try:
        from transformers.masking_utils import find_packed_sequence_indices  # noqa: F401
    except ImportError:
        return False
    return True


PACKED_SEQUENCES = _packed_sequences_supported()


def model_logits(model: nn.Module, sub_batch: dict[str, Tensor], chunk_rows: int | None = None) -> Logits:
    """``model``'s logits on ``sub_batch``: a ``HeadLogits`` over the decoder's hidden states where
    the output layer can be run on its own (see ``decoder_and_head``), else the full logits."""
    hidden = shared_hidden(model, [sub_batch])
    if hidden is not None:
        return HeadLogits(hidden[0], decoder_and_head(model)[1], softcap(model), chunk_rows)
    return DenseLogits(
        model(
            input_ids=sub_batch["input_ids"], attention_mask=sub_batch["attention_mask"], use_cache=False
        ).logits
    )


def pack_rows(lengths: list[int]) -> list[list[int]]:
    """Sequences (by index) grouped into rows no wider than the longest one: first-fit over the
    lengths in decreasing order. Bounding the width keeps each row's attention (quadratic in its
    width) no costlier than a padded batch's, while the rows carry at most as many tokens."""
    width, rows, room = max(lengths), [], []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([])
            room.append(width)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


def shared_hidden(model: nn.Module, sub_batches: list[dict[str, Tensor]]) -> list[Tensor] | None:
    """The decoder's final hidden states ``[B, T, D]`` of one or more sub-batches from ONE forward
    without padding between sequences: every sequence's real tokens packed into rows no wider than
    the longest sequence (``pack_rows``), position ids restarting at 0 for each, so attention stays
    within each sequence (transformers' packed-sequence masks) and every real position's state
    equals its own padded forward's (float rounding aside). The states are scattered back to each
    sub-batch's padded layout (0 at padding, which no loss reads). Fewer tokens than padded batches
    cost less on compute-bound hardware, and one forward instead of several less on overhead-bound
    hardware. None where the model has no separable decoder or transformers cannot mask packed
    sequences."""
    decoder, _ = decoder_and_head(model)
    if decoder is None or not PACKED_SEQUENCES:
        return None
    masks = [sub["attention_mask"].bool() for sub in sub_batches]
    sequences = [
        ids[mask]
        for sub, m in zip(sub_batches, masks, strict=True)
        for ids, mask in zip(sub["input_ids"], m, strict=True)
    ]
    lengths = [len(seq) for seq in sequences]
    rows, width = pack_rows(lengths), max(lengths)
    device = sequences[0].device
    ids = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    positions = torch.zeros(len(rows), width, dtype=torch.long, device=device)
    start = [0] * len(sequences)  # each sequence's first slot in the flattened rows
    for r, row in enumerate(rows):
        column = 0
        for i in row:
            ids[r, column : column + lengths[i]] = sequences[i]
            positions[r, column : column + lengths[i]] = torch.arange(lengths[i], device=device)
            start[i], column = r * width + column, column + lengths[i]
        positions[r, column:] = torch.arange(width - column, device=device)  # a filler sequence after
    hidden = decoder(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
    slots = torch.cat(
        [torch.arange(start[i], start[i] + lengths[i], device=device) for i in range(len(sequences))]
    )
    flat = hidden.reshape(-1, hidden.shape[-1])[slots]
    parts = flat.split([int(mask.sum()) for mask in masks])
    return [
        part.new_zeros(*mask.shape, part.shape[-1]).masked_scatter(mask[..., None], part)
        for part, mask in zip(parts, masks, strict=True)
    ]
