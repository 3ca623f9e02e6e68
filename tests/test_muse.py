"""MUSE: VerbMem, KnowMem and PrivLeak against hand computations (Hugging Face ``generate`` one
prompt at a time, rouge-score, sklearn's ROC AUC as MUSE calls it), the hub-layout loaders and their
errors, the generated miniature, and the demo runner at toy size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_LLAMA
from rouge_score import rouge_scorer

from lightning_unlearn.data.muse import load_documents, load_knowmem, load_verbmem
from lightning_unlearn.data.synthetic_muse import MuseWorldConfig, make_muse_world
from lightning_unlearn.errors import UserError
from lightning_unlearn.metrics import muse as metrics
from lightning_unlearn.models import ModelSpec, load_model, load_spec_tokenizer


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_muse_world(tmp_path_factory.mktemp("muse") / "world", MuseWorldConfig(n_facts=4))


@pytest.fixture(scope="module")
def tiny(world):
    spec = ModelSpec(
        config={**TINY_LLAMA, "max_position_embeddings": 256}, tokenizer=str(world / "tokenizer")
    )
    tokenizer = load_spec_tokenizer(spec)
    return load_model(spec, tokenizer).eval(), tokenizer


def _hand_generate(model, tokenizer, prompt: str, max_new_tokens: int) -> str:
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    out = model.generate(
        ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def _f1(reference: str, generated: str) -> float:
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return scorer.score(reference, generated)["rougeL"].fmeasure


def test_verbmem_matches_hand_computation(world, tiny):
    """Batched greedy continuations equal ``generate`` one prompt at a time; the reference is the
    ground truth's first max_new_tokens tokens (words here); the score is 100 x mean ROUGE-L F1."""
    model, tokenizer = tiny
    rows = load_verbmem(world)[:3]
    n = 6
    outputs = [_hand_generate(model, tokenizer, r["prompt"], n) for r in rows]
    # Ground truths that share some words with each output, so F1 lies strictly between 0 and 1.
    rows = [
        {"prompt": r["prompt"], "gt": " ".join(o.split()[:3]) + r["gt"]}
        for r, o in zip(rows, outputs, strict=True)
    ]
    references = [" ".join(r["gt"].split()[:n]) for r in rows]
    hand = [_f1(ref, out) for ref, out in zip(references, outputs, strict=True)]
    score, log = metrics.verbmem(model, tokenizer, rows, max_new_tokens=n, batch_size=2)
    assert [x["response"] for x in log] == outputs
    assert [x["gt"] for x in log] == references
    assert all(0 < h < 1 for h in hand)
    assert score == pytest.approx(100 * sum(hand) / len(hand))


def test_knowmem_prompt_cut_and_score(world, tiny):
    """MUSE's few-shot prompt, its answer cut, and 100 x mean ROUGE-L F1 against ``generate``."""
    fmt = metrics.KnowMemFormat()
    icl = [{"question": "q1?", "answer": "a1"}, {"question": "q2?", "answer": "a2"}]
    assert (
        fmt.prompt("q?", icl)
        == "Question: q1?\nAnswer: a1\n\nQuestion: q2?\nAnswer: a2\n\nQuestion: q?\nAnswer: "
    )
    assert fmt.cut("paris\n\nQuestion: x") == "paris"
    assert fmt.cut("rome is\nQuestion") == "rome is"
    assert fmt.cut("lima. Question: y") == "lima. "
    model, tokenizer = tiny
    icl = load_knowmem(world, "forget_qa_icl")
    rows = load_knowmem(world, "forget_qa")[:4]
    outputs = [_hand_generate(model, tokenizer, fmt.prompt(r["question"], icl), 5) for r in rows]
    rows = [
        {"question": r["question"], "answer": o.split()[0] + " " + r["answer"]}
        for r, o in zip(rows, outputs, strict=True)
    ]
    hand = [_f1(r["answer"], o) for r, o in zip(rows, outputs, strict=True)]
    score, log = metrics.knowmem(model, tokenizer, rows, icl, max_new_tokens=5, batch_size=3)
    assert [x["response"] for x in log] == outputs
    assert all(0 < h < 1 for h in hand)
    assert score == pytest.approx(100 * sum(hand) / len(hand))


def test_privleak_matches_hand_auc(world, tiny):
    """Min-40% per text from unpadded forwards, sklearn's ROC AUC with MUSE's labels (forget 0,
    holdout 1, minus the score), and (AUC - AUC_retrain) / AUC_retrain x 100."""
    from sklearn.metrics import auc, roc_curve

    model, tokenizer = tiny
    forget = load_documents(world, "privleak", "forget")
    holdout = load_documents(world, "privleak", "holdout") + ["news about alma ashdown."]

    def hand_min_k(text: str) -> float:
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0].double(), -1)
        token_logp = [logp[i, ids[0, i + 1]].item() for i in range(ids.shape[1] - 1)]
        k = int(len(token_logp) * 0.4)
        return -sum(sorted(token_logp)[:k]) / k

    f_scores = metrics.min_k_scores(model, tokenizer, forget, batch_size=3)
    h_scores = metrics.min_k_scores(model, tokenizer, holdout, batch_size=3)
    assert f_scores == pytest.approx([hand_min_k(t) for t in forget], rel=1e-5)
    assert h_scores == pytest.approx([hand_min_k(t) for t in holdout], rel=1e-5)
    fpr, tpr, _ = roc_curve([0] * len(f_scores) + [1] * len(h_scores), [-s for s in f_scores + h_scores])
    hand_auc = auc(fpr, tpr)
    assert metrics.muse_auc(f_scores, h_scores) == pytest.approx(hand_auc)
    assert metrics.muse_auc([1.0, 2.0], [3.0, 4.0]) == 0.0  # forget far likelier: MUSE's 0
    assert metrics.privleak(0.1, 0.4) == pytest.approx(-75.0)
    assert metrics.privleak(0.6, 0.4) == pytest.approx(50.0)


def test_loaders_hub_layout_parquet_and_bad_rows(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    def write(config: str, split: str, rows: list[dict]) -> None:
        (tmp_path / config).mkdir(exist_ok=True)
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / config / f"{split}-00000-of-00001.parquet")

    write("verbmem", "forget", [{"prompt": "p1", "gt": "g1"}, {"prompt": "p2", "gt": "g2"}])
    write("knowmem", "retain_qa", [{"answer": "a", "question": "q"}])
    write("knowmem", "retain_qa_icl", [{"answer": "b", "question": "r"}])
    write("privleak", "holdout", [{"text": "t1"}, {"text": "t2"}, {"text": "t3"}])
    assert load_verbmem(tmp_path) == [{"prompt": "p1", "gt": "g1"}, {"prompt": "p2", "gt": "g2"}]
    assert load_verbmem(tmp_path, limit=1) == [{"prompt": "p1", "gt": "g1"}]
    assert load_knowmem(tmp_path, "retain_qa") == [{"question": "q", "answer": "a"}]
    assert load_knowmem(tmp_path, "retain_qa_icl") == [{"question": "r", "answer": "b"}]
    assert load_documents(tmp_path, "privleak", "holdout") == ["t1", "t2", "t3"]
    write("verbmem", "forget", [{"prompt": "p1", "gt": "g1"}, {"prompt": "p2", "gt": None}])
    with pytest.raises(UserError, match=r"verbmem/forget-00000-of-00001.parquet: row 2: missing field 'gt'$"):
        load_verbmem(tmp_path)
    bad = tmp_path / "knowmem" / "forget_qa.jsonl"
    bad.write_text(
        json.dumps({"question": "q", "answer": "a"}) + "\n" + json.dumps({"question": "q", "answer": 3})
    )
    with pytest.raises(UserError, match=r"forget_qa.jsonl: row 2: field 'answer' must be non-empty text$"):
        load_knowmem(tmp_path, "forget_qa")
    with pytest.raises(UserError, match="no 'forget' files"):
        load_documents(tmp_path, "privleak", "forget")


def test_generated_world_layout_and_answers(world, tmp_path):
    """Every KnowMem answer is stated in its group's raw documents, VerbMem prompt + gt is a
    forget document, the groups' authors are disjoint, and the same config gives the same files."""
    raw = {g: load_documents(world, "raw", g) for g in ("forget", "retain1", "retain2", "holdout")}
    assert [r["prompt"] + r["gt"] for r in load_verbmem(world)] == raw["forget"]
    for split, group in (("forget_qa", "forget"), ("retain_qa", "retain2")):
        for qa in load_knowmem(world, split) + load_knowmem(world, f"{split}_icl"):
            docs = [d for d in raw[group] if d.split(".")[0].removeprefix("news about ") in qa["question"]]
            assert len(docs) == 1 and f" {qa['answer']}." in docs[0]
    authors = [{d.split(".")[0] for d in docs} for docs in raw.values()]
    assert sum(len(a) for a in authors) == len(set().union(*authors)) == 16
    assert load_documents(world, "privleak", "holdout") == raw["holdout"]
    again = make_muse_world(tmp_path / "again", MuseWorldConfig(n_facts=4))
    for name in (
        "raw/forget-00000-of-00001.json",
        "knowmem/forget_qa-00000-of-00001.json",
        "train/retain2-00000-of-00001.json",
    ):
        assert (again / name).read_text() == (world / name).read_text()


def test_demo_runner(tmp_path):
    """The demo at toy size: every model has the four numbers; they equal the metric functions
    rerun on the saved models; the retrained model's PrivLeak is 0 and the target remembers more
    than the retrained model; a rerun keeps the trained models."""
    from lightning_unlearn import muse
    from lightning_unlearn.cli import build_muse

    config = yaml.safe_load(Path("configs/muse_demo.yaml").read_text())
    config["data"]["world"] = {"n_forget": 2, "n_retain1": 2, "n_retain2": 2, "n_holdout": 2, "n_facts": 4}
    config["finetune"]["max_epochs"] = 40
    config["retrain"] = {**config["finetune"], "max_epochs": 20}
    config["unlearn"] = {"npo": {**config["unlearn"]["npo"], "max_epochs": 3}}
    config["model"]["config"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=1)
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(config))
    run = build_muse(["--config", str(tmp_path / "demo.yaml"), "--out_dir", str(tmp_path)])
    reports = run.run()
    saved = json.loads((tmp_path / "muse_demo" / "report.json").read_text())
    assert list(saved) == ["target", "retrain", "npo"]
    for name in saved:
        assert set(muse.METRICS) <= set(saved[name]["metrics"])
    retrain_auc = saved["retrain"]["metrics"]["privleak_auc"]
    assert saved["retrain"]["metrics"]["privleak"] == 0.0
    _, source = run.data.resolved(run.run_dir)
    sets = source.load()
    for name in ("target", "npo"):
        spec = ModelSpec(path=str(tmp_path / "muse_demo" / "models" / name))
        again = muse.evaluate(
            load_model(spec).eval(), load_spec_tokenizer(spec), sets, run.evaluation, retrain_auc
        )
        for key in muse.METRICS:
            assert again.metrics[key] == pytest.approx(saved[name]["metrics"][key])
    target, retrain = reports["target"].metrics, reports["retrain"].metrics
    assert target["forget_verbmem"] > retrain["forget_verbmem"] + 20
    assert target["privleak"] == pytest.approx((target["privleak_auc"] - retrain_auc) / retrain_auc * 100)
    stamp = (tmp_path / "muse_demo" / "models" / "npo").stat().st_mtime_ns
    run.run()
    assert (tmp_path / "muse_demo" / "models" / "npo").stat().st_mtime_ns == stamp
    with pytest.raises(UserError, match="exactly one of retrain, retrain_model and retrain_auc"):
        build_muse(["--config", str(tmp_path / "demo.yaml"), "--retrain", "null"])


@pytest.mark.parametrize("config", sorted(Path("configs/muse").glob("*.yaml")), ids=lambda p: p.stem)
def test_real_model_configs_build(config):
    """The hub configs parse into a run (nothing is downloaded until it runs)."""
    from lightning_unlearn.cli import build_muse

    run = build_muse(["--config", str(config)])
    spec = yaml.safe_load(config.read_text())
    assert list(run.unlearn) == list(spec["unlearn"]) and run.retrain_auc == spec["retrain_auc"]
    assert run.data.source == spec["data"]["source"] and run.base.path == spec["model"]["path"]
    assert run.data.windows  # MUSE's baselines train on windows over the joined documents
