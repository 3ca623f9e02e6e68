"""Greedy decoding that stops computing a sequence once it has ended.

Hugging Face ``generate`` keeps every row of a batch in every forward until the last row ends,
feeding finished rows padding. On TOFU a third of SmolLM2's answers run to the 200-token budget
while the median ends within 60, so a batch spends most of its forwards on finished rows. Here a
row leaves the batch (and the key/value cache) at its EOS, so a large batch costs what its live
rows cost. A decode step has a cost that does not grow with the batch (every layer's kernels run
once, each on more rows) and matmuls on more rows run faster per row (SmolLM2 on 2 CPU cores:
18 ms per row and step at 8 rows, 5 at 40, 3.5 at 120), so one large batch that shrinks as answers
end beats many small ones that each run to their longest answer.

The arithmetic is ``generate``'s: the same left-padded prompts, position ids counted from each
row's first real token, the model's own cache, argmax of the last position's logits. Rows are
independent, so leaving the batch changes no row's tokens beyond float rounding of the batch's
shape (tests compare the tokens with ``generate`` and with each prompt decoded alone).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import GenerationConfig
from transformers.modeling_outputs import BaseModelOutputWithPast

from lightning_unlearn.architecture import base_model
from lightning_unlearn.logits import decoder_and_head, soft_capped

try:  # transformers >= 4.56: a cache is a list of layers; older ones concatenate as before
    from transformers.cache_utils import DynamicLayer
except ImportError:  # pragma: no cover
    DynamicLayer = None

# transformers 5 renamed ``past_key_values`` to ``cache`` (argument and output field).
CACHE_ARG = "cache" if "cache" in BaseModelOutputWithPast.__dataclass_fields__ else "past_key_values"

# Settings under which ``generate`` changes greedy logits (a processor) or stops differently; the
# value each takes when it does nothing. A model whose generation config sets one of them decodes
# through ``generate`` so that its answers stay what ``generate`` gives.
NEUTRAL_SETTINGS: dict[str, tuple] = {
    "repetition_penalty": (None, 1.0),
    "encoder_repetition_penalty": (None, 1.0),
    "no_repeat_ngram_size": (None, 0),
    "encoder_no_repeat_ngram_size": (None, 0),
    "bad_words_ids": (None,),
    "sequence_bias": (None,),
    "min_length": (None, 0),
    "min_new_tokens": (None, 0),
    "forced_bos_token_id": (None,),
    "forced_eos_token_id": (None,),
    "suppress_tokens": (None,),
    "begin_suppress_tokens": (None,),
    "exponential_decay_length_penalty": (None,),
    "guidance_scale": (None, 1.0),
    "watermarking_config": (None,),
    "stop_strings": (None,),
    "num_beams": (None, 1),
}


def cache_bytes_per_row(model, positions: int) -> int | None:
    """Bytes of key/value cache one sequence of ``positions`` tokens takes (None if the config does
    not say): 2 (keys, values) x layers x key/value heads x head size x element size."""
    config = base_model(model).config
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    try:
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        layers = config.num_hidden_layers
    except AttributeError:
        return None
    return 2 * layers * heads * head_dim * next(model.parameters()).element_size() * positions


def plain_greedy(model) -> bool:
    """Whether ``generate``, given only max_new_tokens, do_sample=False, pad and EOS, is plain
    argmax decoding for ``model``: its own generation config may add processors (a repetition
    penalty, suppressed tokens) that transformers merges into every call."""
    config = getattr(model, "generation_config", None) or GenerationConfig()
    return all(getattr(config, name, None) in neutral for name, neutral in NEUTRAL_SETTINGS.items())


def _project(head: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``head(hidden)`` for a bias-free linear head, computed as ``(W @ h.T).T``: with the
    vocabulary as the long side of the product, MKL runs a decode step's projection (40 rows x
    576 -> 49,152 on SmolLM2) in 30 ms instead of 50; the values are the same dot products."""
    if type(head) is torch.nn.Linear and head.bias is None:
        return (head.weight @ hidden.T).T
    return head(hidden)


def _forward_last(model, inputs: dict, cache) -> tuple[torch.Tensor, object]:
    """Logits of each row's last position ``[B, V]`` and the updated cache."""
    body, head = decoder_and_head(model)
    if body is None:
        out = model(**inputs, use_cache=True, **{CACHE_ARG: cache})
        return out.logits[:, -1], getattr(out, CACHE_ARG)
    out = body(**inputs, use_cache=True, **{CACHE_ARG: cache})
    return soft_capped(model, _project(head, out.last_hidden_state[:, -1])), getattr(out, CACHE_ARG)


if DynamicLayer is not None:

    class PreallocatedLayer(DynamicLayer):
        """A full-attention cache layer that writes each new position into a buffer sized for the
        whole decode and hands attention a view of the filled part. ``DynamicLayer`` concatenates
        instead, copying the whole cache at every token: 45% of a 40-row SmolLM2 step at 180
        positions. The values attention reads are the same."""

        @classmethod
        def over(cls, keys: torch.Tensor, values: torch.Tensor, length: int) -> PreallocatedLayer:
            """A layer on the buffers ``keys`` and ``values`` ``[B, H, capacity, D]``, of which
            the first ``length`` positions are filled."""
            layer = cls()
            layer.device, layer.is_initialized, layer.buffers = keys.device, True, [keys, values]
            layer._view(length)
            return layer

        def _view(self, length: int) -> None:
            self.keys, self.values = (b[..., :length, :] for b in self.buffers)

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
            start = self.keys.shape[-2]
            end = start + key_states.shape[-2]
            for buffer, new in zip(self.buffers, (key_states, value_states), strict=True):
                buffer[..., start:end, :] = new
            self._view(end)
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            length = self.keys.shape[-2]
            buffers = []
            for buffer in self.buffers:  # copy the filled positions only
                kept = buffer.new_empty((len(indices), *buffer.shape[1:]))
                kept[..., :length, :] = buffer[:, :, :length][indices]
                buffers.append(kept)
            self.buffers = buffers
            self._view(length)


def _left_padded(prompts: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt) :] = 1
    return ids.to(device), mask.to(device)


def similar_length_groups(
    lengths: list[int], max_size: int | None = None, slack: float = 0.1
) -> list[list[int]]:
    """Indices of ``lengths`` in groups of similar length, longest first: a group closes at
    ``max_size`` members or before a length more than ``slack`` below its longest, so padding
    each group to its longest wastes at most about ``slack`` of its work."""
    groups: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        group = groups[-1] if groups else None
        full = group is None or (max_size is not None and len(group) >= max_size)
        if full or lengths[i] < (1 - slack) * lengths[group[0]]:
            groups.append([i])
        else:
            group.append(i)
    return groups


def _stackable(cache) -> bool:
    """Whether the cache is a list of plain full-attention layers (transformers >= 4.56), which
    ``_stack`` can rebuild; sliding-window and other layer kinds are left to transformers."""
    layers = getattr(cache, "layers", None)
    return DynamicLayer is not None and bool(layers) and all(type(x) is DynamicLayer for x in layers)


def _stack(caches: list, widths: list[int], capacity: int):
    """One cache of preallocated layers holding the caches' rows in order, each cache's positions
    right-aligned in the widest one's width (left padding, zeroed: attention gives it weight 0,
    and 0 x uninitialised memory could be NaN)."""
    width = max(widths)
    stacked = caches[0]
    for i in range(len(stacked.layers)):
        buffers = []
        for name in ("keys", "values"):
            parts = [getattr(cache.layers[i], name) for cache in caches]
            shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:-2], capacity, parts[0].shape[-1])
            buffer, start = parts[0].new_zeros(shape), 0
            for part, w in zip(parts, widths, strict=True):
                buffer[start : start + part.shape[0], ..., width - w : width, :] = part
                start += part.shape[0]
            buffers.append(buffer)
        stacked.layers[i] = PreallocatedLayer.over(*buffers, width)
    return stacked


def _prefill(model, prompts: list[list[int]], pad_id: int, capacity: int, grouped: bool) -> dict:
    """The prompts' forward: last-position logits, the cache (room for ``capacity`` positions
    where it is ``_stackable``), the attention mask, the next position id and the prompt index of
    each row. ``grouped``: run groups of similar prompt length separately and stack their caches
    (left padding to the longest prompt of a large batch wasted 45% of the TOFU prefill)."""
    device = next(model.parameters()).device
    groups = similar_length_groups([len(p) for p in prompts]) if grouped else [list(range(len(prompts)))]
    parts = []
    for group in groups:
        ids, mask = _left_padded([prompts[i] for i in group], pad_id, device)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        inputs = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        logits, cache = _forward_last(model, inputs, None)
        if len(groups) > 1 and not _stackable(cache):
            return _prefill(model, prompts, pad_id, capacity, grouped=False)
        parts.append((logits, cache, mask, positions[:, -1]))
    widths = [part[2].size(1) for part in parts]
    cache = _stack([p[1] for p in parts], widths, capacity) if _stackable(parts[0][1]) else parts[0][1]
    return {
        "logits": torch.cat([part[0] for part in parts]),
        "cache": cache,
        "mask": torch.cat([F.pad(part[2], (max(widths) - part[2].size(1), 0)) for part in parts]),
        "next": torch.cat([part[3] for part in parts]) + 1,
        "rows": torch.tensor([i for group in groups for i in group], device=device),
    }


def _worth_dropping(rows: int, keep: int) -> bool:
    """Drop ended rows once they are an eighth of the batch: each drop copies the live rows'
    cache, and an ended row costs only its share of each later step."""
    return keep < rows and (rows - keep) * 8 >= rows


def _all_finished(done: bool, synced: bool, device) -> bool:
    """Whether every rank's rows have ended (synced), else whether this rank's have."""
    if not synced:
        return done
    flag = torch.tensor(0.0 if done else 1.0, device=device)
    torch.distributed.all_reduce(flag)
    return flag.item() == 0.0


@torch.no_grad()
def greedy_decode(
    model, prompts: list[list[int]], eos_id: int, pad_id: int, max_new_tokens: int, synced: bool = False
) -> list[list[int]]:
    """Each prompt's greedy continuation (its EOS included, if reached within ``max_new_tokens``).

    ``synced``: under torch.distributed, keep taking part in forwards until every rank's rows have
    ended (a sharded model needs every rank in each forward); a rank whose rows have all ended
    runs one of them on as a placeholder whose tokens are discarded. Ranks then also prefill in
    one forward each, so that they run the same number of forwards.
    """
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    state = _prefill(model, prompts, pad_id, width + max_new_tokens, grouped=not synced)
    logits, cache, mask, position, rows = (state[k] for k in ("logits", "cache", "mask", "next", "rows"))
    outputs: list[list[int]] = [[] for _ in prompts]
    tokens = logits.float().argmax(-1)
    for step in range(max_new_tokens):
        live = rows >= 0
        for row, token in zip(rows[live].tolist(), tokens[live].tolist(), strict=True):
            outputs[row].append(token)
        rows = torch.where((tokens == eos_id) | ~live, torch.full_like(rows, -1), rows)
        if _all_finished(bool((rows < 0).all()), synced, device) or step == max_new_tokens - 1:
            break
        keep = torch.nonzero(rows >= 0).flatten()
        if keep.numel() == 0:  # synced: this rank runs a placeholder row until the others end
            keep = torch.zeros(1, dtype=torch.long, device=device)
        if _worth_dropping(rows.numel(), keep.numel()):
            cache.batch_select_indices(keep)
            rows, tokens, mask, position = rows[keep], tokens[keep], mask[keep], position[keep]
        mask = torch.cat([mask, mask.new_ones(mask.size(0), 1)], dim=1)
        inputs = {"input_ids": tokens[:, None], "attention_mask": mask, "position_ids": position[:, None]}
        logits, cache = _forward_last(model, inputs, cache)
        tokens, position = logits.float().argmax(-1), position + 1
    return outputs
