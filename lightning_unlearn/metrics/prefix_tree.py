"""Scoring every answer to a question in one packed sequence: a prefix tree of their tokens.

Each answer variant of a TOFU question (answer, paraphrase, perturbed answers) repeats the
question's prompt, and variants often share their first answer tokens too. A causal LM's state at
a token depends only on the tokens before it, so a prefix shared by several variants needs
computing once. The variants' token sequences are merged into a prefix tree whose nodes form one
sequence; each node attends to its ancestors only (a 4D attention mask) at its depth as position
id, so it gets the hidden state it has in every sequence passing through it, and each scored token
is predicted by its parent node. On the TOFU benchmark (120 questions with 7 or 4 variants) the
trees hold 20k tokens where the padded variants held 39k. The tree is built from token ids, so it
needs no assumption about where a prompt ends (a BPE merge across the prompt/answer boundary just
branches the tree one token earlier).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lightning_unlearn.architecture import base_model
from lightning_unlearn.logits import decoder_and_head, soft_capped
from lightning_unlearn.losses import IGNORE_INDEX

# Attention implementations that take an arbitrary 4D mask, and the mask's form for each.
PACKABLE_ATTENTION = ("sdpa", "eager")


@dataclass(frozen=True)
class PrefixTree:
    """Sequences merged on their common prefixes. Nodes are numbered in creation order, so a
    parent always precedes its children; ``paths[k][t]`` is the node of sequence k's token t."""

    tokens: list[int]
    parents: list[int]  # -1 for a first token
    depths: list[int]
    paths: list[list[int]]


def build_prefix_tree(sequences: Sequence[Sequence[int]]) -> PrefixTree:
    """The prefix tree of ``sequences`` (token ids)."""
    index: dict[tuple[int, int], int] = {}
    tokens: list[int] = []
    parents: list[int] = []
    depths: list[int] = []
    paths: list[list[int]] = []
    for sequence in sequences:
        parent, path = -1, []
        for depth, token in enumerate(sequence):
            node = index.get((parent, token))
            if node is None:
                node = index[(parent, token)] = len(tokens)
                tokens.append(token)
                parents.append(parent)
                depths.append(depth)
            path.append(node)
            parent = node
        paths.append(path)
    return PrefixTree(tokens, parents, depths, paths)


def ancestor_mask(parents: Sequence[int], width: int) -> torch.Tensor:
    """``[width, width]`` bool: node i may attend to node j iff j is i or an ancestor of i.
    Rows past the tree (padding) attend to themselves only, so no row is fully masked."""
    mask = torch.eye(width, dtype=torch.bool)
    for node, parent in enumerate(parents):
        if parent >= 0:
            mask[node] |= mask[parent]
    return mask


def attention_implementation(model) -> str | None:
    return getattr(getattr(base_model(model), "config", None), "_attn_implementation", None)


def can_pack(model) -> bool:
    """Whether the model's attention takes a custom 4D mask (sdpa, eager)."""
    return attention_implementation(model) in PACKABLE_ATTENTION


def tree_batch(trees: Sequence[PrefixTree], pad_id: int, model) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``position_ids`` ``[B, T]`` and the 4D ``attention_mask`` ``[B, 1, T, T]``
    of ``trees`` (one per row, right-padded), the mask in the form the model's attention takes:
    bool for sdpa, additive float (0 or the dtype's minimum) for eager."""
    width = max(len(t.tokens) for t in trees)
    ids = torch.full((len(trees), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(trees), width), dtype=torch.long)
    mask = torch.zeros((len(trees), 1, width, width), dtype=torch.bool)
    for row, tree in enumerate(trees):
        n = len(tree.tokens)
        ids[row, :n] = torch.tensor(tree.tokens, dtype=torch.long)
        positions[row, :n] = torch.tensor(tree.depths, dtype=torch.long)
        mask[row, 0] = ancestor_mask(tree.parents, width)
    if attention_implementation(model) == "eager":
        dtype = next(model.parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype).masked_fill(~mask, torch.finfo(dtype).min)
    return {"input_ids": ids, "position_ids": positions, "attention_mask": mask}


@dataclass(frozen=True)
class ScoredPairs:
    """Every scored token of a batch of trees: the (row, node) whose logits predict it, as an index
    into the batch's distinct predicting nodes, its target, and the (question, variant) it belongs to."""

    nodes: list[tuple[int, int]]  # distinct (row, node) predicting at least one scored token
    pair_node: list[int]  # per scored token: index into ``nodes``
    pair_target: list[int]
    pair_variant: list[int]  # per scored token: flat index of its (question, variant)
    first_variant: list[list[int]]  # per question: the pairs (indices) of its first variant


def scored_pairs(trees: Sequence[PrefixTree], labels: Sequence[Sequence[Sequence[int]]]) -> ScoredPairs:
    """The scored tokens of every variant: label t (not -100) is predicted by the node of token t-1.
    ``labels[q][k]`` are question q's variant k's labels, aligned with its input ids."""
    where: dict[tuple[int, int], int] = {}
    pair_node, pair_target, pair_variant, first = [], [], [], []
    flat = 0
    for row, (tree, question) in enumerate(zip(trees, labels, strict=True)):
        first.append([])
        for k, (path, variant) in enumerate(zip(tree.paths, question, strict=True)):
            for t in range(1, len(variant)):
                if variant[t] == IGNORE_INDEX:
                    continue
                key = (row, path[t - 1])
                if k == 0:
                    first[-1].append(len(pair_node))
                pair_node.append(where.setdefault(key, len(where)))
                pair_target.append(variant[t])
                pair_variant.append(flat)
            flat += 1
    return ScoredPairs(list(where), pair_node, pair_target, pair_variant, first)


def node_logits(model, batch: dict[str, torch.Tensor], nodes: list[tuple[int, int]]) -> torch.Tensor:
    """Logits ``[len(nodes), V]`` at the given (row, node) positions of a packed batch. The body
    runs once over the trees and the output layer on those positions only; FSDP2-sharded models
    (whose head is gathered only by a whole forward) and models without a separable head use the
    full logits."""
    device = next(model.parameters()).device
    batch = {k: v.to(device) for k, v in batch.items()}
    index = torch.tensor(nodes, dtype=torch.long, device=device).reshape(-1, 2)
    body, head = decoder_and_head(model)
    if body is None:
        return model(**batch, use_cache=False).logits[index[:, 0], index[:, 1]]
    hidden = body(**batch, use_cache=False).last_hidden_state
    return soft_capped(model, head(hidden[index[:, 0], index[:, 1]]))


def variant_nll(logits: torch.Tensor, pairs: ScoredPairs, n_variants: int) -> torch.Tensor:
    """Mean NLL over each variant's scored tokens ``[n_variants]`` (0 for a variant with none),
    log-probabilities in float32 as ``losses.token_logprobs`` takes them."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    node = torch.tensor(pairs.pair_node, dtype=torch.long, device=logits.device)
    target = torch.tensor(pairs.pair_target, dtype=torch.long, device=logits.device)
    variant = torch.tensor(pairs.pair_variant, dtype=torch.long, device=logits.device)
    logp = logits[node, target] - torch.logsumexp(logits, dim=-1)[node]
    total = torch.zeros(n_variants, dtype=logp.dtype, device=logp.device).index_add_(0, variant, logp)
    count = torch.zeros(n_variants, dtype=logp.dtype, device=logp.device).index_add_(
        0, variant, torch.ones_like(logp)
    )
    return -total / count.clamp_min(1)


def first_variant_logits(logits: torch.Tensor, pairs: ScoredPairs) -> tuple[torch.Tensor, torch.Tensor]:
    """Each question's first variant in ``evaluation.answer_logits``' compact form: logits
    ``[Q, W, V]`` at its scored positions in order (then unused slots) and labels ``[Q, W]``
    (-100, then its scored tokens), so that slot j predicts label j + 1."""
    width = max(len(f) for f in pairs.first_variant) + 1
    rows = torch.zeros((len(pairs.first_variant), width), dtype=torch.long)
    labels = torch.full((len(pairs.first_variant), width), IGNORE_INDEX, dtype=torch.long)
    for q, scored in enumerate(pairs.first_variant):
        rows[q, : len(scored)] = torch.tensor([pairs.pair_node[i] for i in scored], dtype=torch.long)
        labels[q, 1 : len(scored) + 1] = torch.tensor(
            [pairs.pair_target[i] for i in scored], dtype=torch.long
        )
    return logits[rows.to(logits.device)], labels.to(logits.device)
