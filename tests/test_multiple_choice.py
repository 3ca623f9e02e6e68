"""WMDP / MMLU multiple choice: the scorer against a hand computation and lm-eval itself, the
question and corpus loaders, the generated set, and the demo runner at toy size."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_LLAMA

from lightning_unlearn.data.multiple_choice import load_questions, load_texts
from lightning_unlearn.data.synthetic_choice import ChoiceWorldConfig, make_choice_world
from lightning_unlearn.errors import UserError
from lightning_unlearn.metrics.multiple_choice import ChoiceFormat, MultipleChoiceScorer
from lightning_unlearn.models import ModelSpec, load_model, load_spec_tokenizer


@pytest.fixture(scope="module")
def choice_world(tmp_path_factory):
    return make_choice_world(tmp_path_factory.mktemp("choice") / "world", ChoiceWorldConfig(n_pathogens=4))


@pytest.fixture(scope="module")
def tiny(choice_world):
    spec = ModelSpec(
        config={**TINY_LLAMA, "max_position_embeddings": 256}, tokenizer=str(choice_world / "tokenizer")
    )
    tokenizer = load_spec_tokenizer(spec)
    return load_model(spec, tokenizer).eval(), tokenizer


def test_prompt_is_lm_evals_template():
    question = {"question": " Which? ", "choices": ["x", "y", "z", "w"], "answer": 1, "subject": "biology"}
    expected = (
        "The following are multiple choice questions (with answers) about biology.\n\n"
        "Which?\nA. x\nB. y\nC. z\nD. w\nAnswer:"
    )
    assert ChoiceFormat().prompt(question) == expected
    assert ChoiceFormat().continuations(question) == [" A", " B", " C", " D"]


def _hand_loglik(model, tokenizer, prompt: str, continuation: str) -> float:
    """Full forward over prompt + continuation, log_softmax at the continuation's positions."""
    context = tokenizer(prompt)["input_ids"]
    whole = tokenizer(prompt + continuation)["input_ids"]
    target = whole[len(context) :]
    ids = torch.tensor([context + target])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    return sum(logprobs[len(context) - 1 + k, t].item() for k, t in enumerate(target))


@pytest.mark.parametrize("letters", [("A", "B", "C", "D"), ("A b", "C", "D a", "B")])
def test_scorer_matches_hand_computation(choice_world, tiny, letters):
    """One-token letters (one shared row per question) and two-token continuations (a row per
    choice), in batches of 3 rows with padding, against unpadded full forwards one at a time."""
    model, tokenizer = tiny
    questions = load_questions(choice_world / "wmdp", "wmdp-bio")[:5]
    fmt = ChoiceFormat(letters=letters)
    scores = MultipleChoiceScorer(tokenizer, fmt, batch_size=3).score(model, questions)
    for q, row, pick in zip(questions, scores.loglikelihoods, scores.predictions, strict=True):
        hand = [_hand_loglik(model, tokenizer, fmt.prompt(q), c) for c in fmt.continuations(q)]
        assert row == pytest.approx(hand, abs=1e-5)
        assert pick == max(range(4), key=lambda k, hand=hand: hand[k])
    assert (
        scores.accuracy
        == sum(p == q["answer"] for p, q in zip(scores.predictions, questions, strict=True)) / 5
    )


def test_left_truncation_keeps_the_last_tokens(choice_world, tiny):
    """lm-eval keeps the last max_length tokens of prompt + continuation (minus the last)."""
    model, tokenizer = tiny
    q = load_questions(choice_world / "wmdp", "wmdp-bio")[0]
    scores = MultipleChoiceScorer(tokenizer, max_length=10).score(model, [q])
    prompt = tokenizer(ChoiceFormat().prompt(q))["input_ids"]
    for k, continuation in enumerate(ChoiceFormat().continuations(q)):
        target = tokenizer(ChoiceFormat().prompt(q) + continuation)["input_ids"][len(prompt) :]
        ids = torch.tensor([prompt[-10:]])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(input_ids=ids).logits[0, -1], dim=-1)
        assert scores.loglikelihoods[0][k] == pytest.approx(logprobs[target[0]].item(), abs=1e-5)


def test_matches_lm_eval(choice_world, tiny, tmp_path):
    """lm-eval's own HFLM and task machinery (its installed WMDP and MMLU templates, over local
    files) and our scorer choose the same answer for every question, with the same log-likelihoods."""
    pytest.importorskip("lm_eval")
    from lightning_unlearn.lm_eval_adapter import local_task, run_lm_eval

    model, tokenizer = tiny
    astronomy = [q for q in load_questions(choice_world / "mmlu", "all") if q["subject"] == "astronomy"]
    mmlu_file = tmp_path / "astronomy.json"
    mmlu_file.write_text("".join(json.dumps(q) + "\n" for q in astronomy))
    wmdp_file = choice_world / "wmdp" / "wmdp-bio" / "test-00000-of-00001.json"
    cases = {
        "local_wmdp_bio": (local_task("wmdp", wmdp_file, "bio"), load_questions(wmdp_file, "wmdp-bio")),
        "local_mmlu_astronomy": (local_task("mmlu", mmlu_file, "astronomy"), astronomy),
    }
    results = run_lm_eval(
        model, tokenizer, [task for task, _ in cases.values()], batch_size=4, log_samples=True
    )
    scorer = MultipleChoiceScorer(tokenizer)
    for name, (_, questions) in cases.items():
        ours = scorer.score(model, questions)
        samples = sorted(results["samples"][name], key=lambda s: s["doc_id"])
        assert len(samples) == len(questions) > 0
        for sample, row, pick in zip(samples, ours.loglikelihoods, ours.predictions, strict=True):
            theirs = [value for value, _ in sample["filtered_resps"]]
            assert row == pytest.approx(theirs, abs=1e-5)
            assert pick == int(torch.tensor(theirs).argmax())
        assert results["results"][name]["acc,none"] == pytest.approx(ours.accuracy)


def test_loader_hub_layout_parquet_and_bad_rows(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    rows = [
        {"question": "q1", "subject": "college_biology", "choices": ["a", "b", "c", "d"], "answer": 3},
        {"question": "q2", "subject": "anatomy", "choices": ["a", "b", "c", "d"], "answer": 0},
    ]
    (tmp_path / "all").mkdir()
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "all" / "test-00000-of-00001.parquet")
    questions = load_questions(tmp_path, "all")
    assert [q["subject"] for q in questions] == ["college biology", "anatomy"]
    assert [q["answer"] for q in questions] == [3, 0]
    assert load_questions(tmp_path, "all", limit=1) == questions[:1]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({**rows[1], "answer": 4}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl: row 2: field 'answer' must be an index from 0 to 3"):
        load_questions(bad)
    bad.write_text(json.dumps({"question": "q", "answer": 0}) + "\n")
    with pytest.raises(UserError, match=r"row 1: missing field 'choices'"):
        load_questions(bad)
    with pytest.raises(UserError, match="no 'dev' files"):
        load_questions(tmp_path, "anatomy", split="dev")


def test_generated_set_is_answerable_and_deterministic(choice_world, tmp_path):
    """Every question's gold choice is the value its corpus sentence states; same config, same files."""
    questions = load_questions(choice_world / "wmdp", "wmdp-bio")
    texts = load_texts(choice_world / "corpora" / "bio-forget-corpus.json")
    assert len(questions) == 12 and all(q["subject"] == "biology" for q in questions)
    for q in questions:
        name = q["question"].split("pathogen ")[1].split()[0].rstrip("?")
        facts = " ".join(t for t in texts if f"pathogen {name} " in t)
        stated = [k for k, choice in enumerate(q["choices"]) if f" {choice}." in facts]
        assert stated == [q["answer"]] and len(set(q["choices"])) == 4
    assert len({q["answer"] for q in questions}) > 1  # the gold letter varies
    again = make_choice_world(tmp_path / "again", ChoiceWorldConfig(n_pathogens=4))
    for name in ("wmdp/wmdp-bio/test-00000-of-00001.json", "mmlu/all/test-00000-of-00001.json", "train.json"):
        assert (again / name).read_text() == (choice_world / name).read_text()


def test_demo_runner(tmp_path):
    """The demo at toy size: both models scored on both sets; the numbers are the scorer's on the
    saved models; RMU lowers WMDP accuracy."""
    from lightning_unlearn.cli import build_wmdp
    from lightning_unlearn.wmdp import evaluate

    run = build_wmdp(["--config", "configs/wmdp_demo.yaml", "--out_dir", str(tmp_path),
                      "--finetune.max_epochs", "30", "--unlearn.max_epochs", "6"])  # fmt: skip
    reports = run.run()
    saved = json.loads((tmp_path / "wmdp_demo" / "report.json").read_text())
    assert set(saved) == {"finetuned", "rmu"}
    for name in saved:
        assert {"wmdp_accuracy", "mmlu_accuracy"} <= set(saved[name]["metrics"])
    questions = {k: q.load() for k, q in run.data.resolved(run.run_dir).questions.items()}
    spec = ModelSpec(path=str(tmp_path / "wmdp_demo" / "models" / "rmu"))
    again = evaluate(load_model(spec), load_spec_tokenizer(spec), questions)
    assert again.metrics["wmdp_accuracy"] == pytest.approx(saved["rmu"]["metrics"]["wmdp_accuracy"])
    assert again.metrics["mmlu_accuracy"] == pytest.approx(saved["rmu"]["metrics"]["mmlu_accuracy"])
    before, after = reports["finetuned"].metrics, reports["rmu"].metrics
    assert before["wmdp_accuracy"] > 0.9 and after["wmdp_accuracy"] < before["wmdp_accuracy"] - 0.3


def test_corpus_batches_label_every_token(choice_world, tmp_path):
    """RMU's corpora: every real token of a text is a label (truncated to max_length), padding is
    not; a row without its text field is named."""
    from lightning_unlearn.data.corpora import Corpus, CorpusUnlearningDataModule

    corpora = choice_world / "corpora"
    dm = CorpusUnlearningDataModule(
        str(choice_world / "tokenizer"), [Corpus(str(corpora / "bio-forget-corpus.json"))],
        [Corpus(str(corpora / "retain-corpus.json"))], max_length=6, batch_size=3,
    )  # fmt: skip
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    for sub in (batch["forget"], batch["retain"]):
        real = sub["attention_mask"].bool()
        assert sub["input_ids"].shape[1] <= 6
        assert (
            torch.equal(sub["labels"][real], sub["input_ids"][real]) and (sub["labels"][~real] == -100).all()
        )
    bad = tmp_path / "corpus.jsonl"
    bad.write_text('{"text": "the pathogen"}\n{"body": "x"}\n')
    with pytest.raises(UserError, match=r"corpus.jsonl: row 2: expected an object with a text field 'text'"):
        Corpus(str(bad)).texts()
