"""Evaluator against an independent computation: one sequence per forward with Hugging Face's own
loss, unpadded generation one question at a time, and scipy / rouge_score called directly."""

from __future__ import annotations

import math

import pytest
import torch
from rouge_score import rouge_scorer
from scipy.stats import hmean, ks_2samp

from lightning_unlearn.data.formatting import PromptFormat, encode, encode_prompt
from lightning_unlearn.data.tofu import load_split
from lightning_unlearn.data.tokenizer import load_tokenizer
from lightning_unlearn.errors import UserError
from lightning_unlearn.evaluation import Evaluator
from lightning_unlearn.models import load_model
from lightning_unlearn.report import Report


@pytest.fixture
def setup(world_dir, tokenizer_dir, tiny_spec):
    torch.manual_seed(0)
    tokenizer = load_tokenizer(tokenizer_dir)
    model = load_model(tiny_spec).eval()
    splits = {
        "forget": load_split(world_dir, "forget10_perturbed")[:6],
        "retain": load_split(world_dir, "retain_perturbed")[:5],
        "world_facts": load_split(world_dir, "world_facts_perturbed")[:4],
    }
    return tokenizer, model, splits


def _avg_nll(model, tokenizer, question, answer):
    enc = encode(question, answer, tokenizer, PromptFormat(), 128)
    ids, labels = torch.tensor([enc["input_ids"]]), torch.tensor([enc["labels"]])
    with torch.no_grad():
        return model(input_ids=ids, labels=labels).loss.item()


def _greedy(model, tokenizer, question, max_new_tokens):
    ids = torch.tensor([encode_prompt(question, tokenizer, PromptFormat(), 128)])
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = model(input_ids=ids).logits[0, -1].argmax().item()
            if nxt == tokenizer.eos_token_id:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return tokenizer.decode(out, skip_special_tokens=True).strip()


def test_evaluator_matches_independent_computation(setup):
    tokenizer, model, splits = setup
    retain_tr = [0.5, 0.7, 0.9, 1.1, 1.3, 1.5, 2.0]
    evaluator = Evaluator(tokenizer, splits, batch_size=4, max_new_tokens=6, retain_truth_ratios=retain_tr)
    report = evaluator.run(model)

    forget = splits["forget"]
    tr = []
    for r in forget:
        para = _avg_nll(model, tokenizer, r["question"], r["paraphrased_answer"])
        pert = [_avg_nll(model, tokenizer, r["question"], p) for p in r["perturbed_answer"]]
        tr.append(math.exp(-sum(pert) / len(pert)) / math.exp(-para))
    assert report.per_sample["forget_truth_ratio"] == pytest.approx(tr, rel=1e-4)
    assert report.metrics["forget_truth_ratio"] == pytest.approx(
        sum(min(t, 1 / t) for t in tr) / len(tr), rel=1e-4
    )
    assert report.metrics["forget_quality"] == pytest.approx(ks_2samp(tr, retain_tr).pvalue, rel=1e-6)
    probs = [math.exp(-_avg_nll(model, tokenizer, r["question"], r["answer"])) for r in forget]
    assert report.per_sample["forget_Q_A_Prob"] == pytest.approx(probs, rel=1e-4)

    wf = splits["world_facts"]
    normalised, wf_tr = [], []
    for r in wf:
        c = math.exp(-_avg_nll(model, tokenizer, r["question"], r["answer"]))
        w = [math.exp(-_avg_nll(model, tokenizer, r["question"], p)) for p in r["perturbed_answer"]]
        normalised.append(c / (c + sum(w)))
        wf_tr.append(math.exp(sum(math.log(x) for x in w) / len(w)) / c)
    assert report.per_sample["wf_Q_A_Prob_normalised"] == pytest.approx(normalised, rel=1e-4)
    assert report.metrics["wf_Truth_Ratio"] == pytest.approx(
        sum(max(0, 1 - t) for t in wf_tr) / len(wf_tr), rel=1e-4
    )

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    for role, records in splits.items():
        generated = [g["generated"] for g in report.generations[role]]
        # Batched, left-padded generation equals unpadded greedy decoding one question at a time.
        assert generated == [_greedy(model, tokenizer, r["question"], 6) for r in records]
        rouge = [
            scorer.score(r["answer"], g)["rougeL"].recall for r, g in zip(records, generated, strict=True)
        ]
        prefix = {"forget": "forget", "retain": "retain", "world_facts": "wf"}[role]
        assert report.per_sample[f"{prefix}_Q_A_ROUGE"] == pytest.approx(rouge)

    components = [report.metrics[n] for n in report.settings["model_utility_components"]]
    assert len(components) == 6
    assert report.metrics["model_utility"] == pytest.approx(hmean(components))


def test_report_round_trip_and_retain_ratios_from_a_saved_report(setup, tmp_path):
    tokenizer, model, splits = setup
    first = Evaluator(tokenizer, {"forget": splits["forget"]}, max_new_tokens=0).run(model)
    first.save(tmp_path / "retain")
    assert Report.load(tmp_path / "retain").to_dict() == first.to_dict()
    assert "forget_truth_ratio" in (tmp_path / "retain" / "report.md").read_text()
    again = Evaluator(
        tokenizer, {"forget": splits["forget"]}, max_new_tokens=0, retain_truth_ratios=tmp_path / "retain"
    )
    assert again.run(model).metrics["forget_quality"] == 1.0


def test_evaluator_bad_input(setup):
    tokenizer, _, splits = setup
    with pytest.raises(UserError, match="unknown evaluation role"):
        Evaluator(tokenizer, {"forgets": splits["forget"]})
    broken = [dict(r) for r in splits["forget"]]
    del broken[2]["paraphrased_answer"]
    with pytest.raises(UserError, match="missing field 'paraphrased_answer'"):
        Evaluator(tokenizer, {"forget": broken})


def test_evaluate_command_on_base_plus_adapter_equals_the_merged_model(
    tmp_path, world_dir, tiny_spec, no_logging
):
    """`lightning-unlearn evaluate` on base + adapter gives the merged model's numbers; the retain
    report feeds forget_quality; report files and the truth-ratio plot are written."""
    from helpers import build, first_batch, sgd_step

    from lightning_unlearn.data.datamodule import UnlearningDataModule
    from lightning_unlearn.evaluate import EvaluateCommand
    from lightning_unlearn.models import LoraSpec
    from lightning_unlearn.objectives import GradAscent

    base = build(GradAscent, tiny_spec)
    base.export(tmp_path / "base")
    spec = type(tiny_spec)(path=str(tmp_path / "base"))
    ga = build(GradAscent, spec, adapter=LoraSpec(r=4, alpha=8))
    dm = UnlearningDataModule(tokenizer=str(tmp_path / "base"), source=str(world_dir), forget_split="forget10",
                              retain_split="retain90", max_length=64)  # fmt: skip
    dm.setup()
    sgd_step(ga, first_batch(dm), lr=1.0)
    ga.export(tmp_path / "adapter", merge=False)
    ga.export(tmp_path / "merged", merge=True)

    splits = {"forget": "forget10_perturbed", "retain": "retain_perturbed"}
    common = dict(source=str(world_dir), splits=splits, limit=5, max_new_tokens=8, max_length=64)
    retain = EvaluateCommand(model=str(tmp_path / "base"), out_dir=str(tmp_path / "r"), **common).run()
    kwargs = dict(retain_report=str(tmp_path / "r"), **common)
    with_adapter = EvaluateCommand(
        model=str(tmp_path / "base"), adapter=str(tmp_path / "adapter"), out_dir=str(tmp_path / "a"), **kwargs
    ).run()
    merged = EvaluateCommand(model=str(tmp_path / "merged"), out_dir=str(tmp_path / "m"), **kwargs).run()
    assert len(with_adapter.per_sample["forget_truth_ratio"]) == 5
    assert with_adapter.metrics == pytest.approx(merged.metrics, rel=1e-4)
    want = ks_2samp(with_adapter.per_sample["forget_truth_ratio"], retain.per_sample["forget_truth_ratio"])
    assert with_adapter.metrics["forget_quality"] == pytest.approx(want.pvalue)
    assert with_adapter.metrics["forget_Q_A_Prob"] != pytest.approx(
        retain.metrics["forget_Q_A_Prob"], rel=1e-3
    )
    for name in ("report.json", "report.md", "truth_ratios.png"):
        assert (tmp_path / "a" / name).stat().st_size > 0


def test_memorisation_and_mia_match_one_sequence_at_a_time(setup, world_dir):
    """Batched, padded scoring gives each record's memorisation and MIA scores as scoring it alone
    does; the AUC counts forget-vs-holdout pairs; privleak uses the retain model's min-k AUC."""
    from lightning_unlearn.metrics import memorisation as mem

    tokenizer, model, splits = setup
    holdout = load_split(world_dir, "holdout10")[:5]
    evaluator = Evaluator(
        tokenizer, {"forget": splits["forget"], "holdout": holdout}, max_new_tokens=0, batch_size=4,
        retain_mia_auc=0.6,
    )  # fmt: skip
    report = evaluator.run(model)

    def alone(record):
        enc = encode(record["question"], record["answer"], tokenizer, PromptFormat(), 128)
        ids, labels = torch.tensor([enc["input_ids"]]), torch.tensor([enc["labels"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        text = tokenizer.decode([t for t in enc["labels"] if t != -100], skip_special_tokens=True)
        return {
            "exact_memorization": mem.exact_memorization(logits, labels).item(),
            "extraction_strength": mem.extraction_strength(logits, labels).item(),
            "mia_loss": mem.mia_loss(logits, labels).item(),
            "mia_zlib": mem.mia_zlib(logits, labels, [text]).item(),
            "mia_min_k": mem.mia_min_k(logits, labels).item(),
            "mia_min_k_plus_plus": mem.mia_min_k_plus_plus(logits, labels).item(),
        }

    forget = [alone(r) for r in splits["forget"]]
    held = [alone(r) for r in holdout]
    for name in forget[0]:
        assert report.per_sample[f"forget_{name}"] == pytest.approx(
            [f[name] for f in forget], rel=1e-4, abs=1e-6
        )
    for name in ("exact_memorization", "extraction_strength"):
        assert report.metrics[f"forget_{name}"] == pytest.approx(sum(f[name] for f in forget) / len(forget))
    for name in ("mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus"):
        assert report.per_sample[f"holdout_{name}"] == pytest.approx(
            [h[name] for h in held], rel=1e-4, abs=1e-6
        )
        # AUC by counting: a pair is won when the holdout (non-member) scores higher; ties count half.
        pairs = [(f[name], h[name]) for f in forget for h in held]
        won = sum(1.0 if h > f else 0.5 if h == f else 0.0 for f, h in pairs)
        assert report.metrics[name] == pytest.approx(won / len(pairs))
    auc = report.metrics["mia_min_k"]
    assert report.metrics["privleak"] == pytest.approx(((1 - auc) - (1 - 0.6)) / (1 - 0.6) * 100, rel=1e-6)


def test_answer_logits_are_the_full_logits_at_answer_positions(setup, tiny_spec):
    from lightning_unlearn.data.collate import pad_batch
    from lightning_unlearn.evaluation import answer_logits
    from lightning_unlearn.losses import mean_token_nll, sequence_logprob
    from lightning_unlearn.models import LoraSpec, attach_lora

    tokenizer, model, splits = setup
    records = splits["forget"][:4]
    feats = [
        encode(r["question"], a, tokenizer, PromptFormat(), 128) for r in records for a in (r["answer"], "x")
    ]
    batch = pad_batch(feats, tokenizer.pad_token_id)
    lora = attach_lora(load_model(tiny_spec), LoraSpec(r=4, alpha=8))
    with torch.no_grad():
        for p in lora.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)  # a live adapter: the body must run through it
        for m in (model, lora):
            full = m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logits, labels = answer_logits(m, batch)
            torch.testing.assert_close(mean_token_nll(logits, labels), mean_token_nll(full, batch["labels"]))
            torch.testing.assert_close(
                sequence_logprob(logits, labels), sequence_logprob(full, batch["labels"])
            )
            row = batch["labels"][0]
            positions = [t for t in range(len(row) - 1) if row[t + 1] != -100]
            torch.testing.assert_close(logits[0, : len(positions)], full[0, positions])
