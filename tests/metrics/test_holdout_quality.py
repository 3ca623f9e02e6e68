"""forget_quality_holdout and mia_gap, the stopping monitors that need no retain model: the KS test
against scipy and a closed form, the Evaluator's value against its own per-sample lists and an
independent one-sequence-at-a-time scoring, and Lightning's EarlyStopping / ModelCheckpoint reading
the values UnlearningEvaluation logs."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from scipy.stats import ks_2samp

from lightning_unlearn.callbacks import UnlearningEvaluation
from lightning_unlearn.data.datamodule import UnlearningDataModule
from lightning_unlearn.data.formatting import PromptFormat, encode
from lightning_unlearn.data.tofu import load_split
from lightning_unlearn.data.tokenizer import load_tokenizer
from lightning_unlearn.evaluation import Evaluator
from lightning_unlearn.metrics.memorisation import mia_gap
from lightning_unlearn.metrics.tofu import forget_quality_holdout
from lightning_unlearn.models import load_model
from lightning_unlearn.objectives import GradAscent


def test_forget_quality_holdout_is_the_two_sample_ks_p_value():
    forget = [0.91, 0.85, 0.40, 0.77, 0.66, 0.95, 0.12]
    holdout = [0.05, 0.11, 0.31, 0.08]  # a different size from forget
    assert forget_quality_holdout(forget, holdout) == pytest.approx(
        ks_2samp(forget, holdout).pvalue, rel=1e-12
    )
    # Completely separated samples of sizes n and m: D = 1, and the exact two-sided p-value is the
    # chance that a random split of the n + m ranks puts one sample wholly below or above: 2 / C(n+m, n).
    assert forget_quality_holdout([5.0, 6.0, 7.0], [1.0, 2.0, 3.0, 4.0]) == pytest.approx(2 / math.comb(7, 3))
    assert forget_quality_holdout(forget, forget) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="at least one"):
        forget_quality_holdout([], holdout)


def test_mia_gap_is_the_distance_from_chance():
    assert [mia_gap(a) for a in (0.5, 0.8, 0.2, 1.0)] == pytest.approx([0.0, 0.3, 0.3, 0.5])


def _nll(model, tokenizer, question: str, answer: str) -> float:
    """Hugging Face's own loss on one unpadded sequence: the independent per-answer mean NLL."""
    enc = encode(question, answer, tokenizer, PromptFormat(), 128)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([enc["input_ids"]]), labels=torch.tensor([enc["labels"]]))
    return out.loss.item()


@pytest.fixture
def scored(world_dir, tokenizer_dir, tiny_spec):
    torch.manual_seed(0)
    return load_tokenizer(tokenizer_dir), load_model(tiny_spec).eval()


def test_evaluator_compares_answer_probabilities_when_holdout_has_only_answers(scored, world_dir):
    tokenizer, model = scored
    forget = load_split(world_dir, "forget10_perturbed")[:6]
    holdout = load_split(world_dir, "holdout10")[:4]  # question and answer only, as on TOFU
    report = Evaluator(tokenizer, {"forget": forget, "holdout": holdout}, max_new_tokens=0, batch_size=4).run(
        model
    )
    assert report.settings["forget_quality_holdout_statistic"] == "Q_A_Prob"
    expected = [math.exp(-_nll(model, tokenizer, r["question"], r["answer"])) for r in holdout]
    assert report.per_sample["holdout_Q_A_Prob"] == pytest.approx(expected, rel=1e-4)
    fq = ks_2samp(report.per_sample["forget_Q_A_Prob"], report.per_sample["holdout_Q_A_Prob"]).pvalue
    assert report.metrics["forget_quality_holdout"] == pytest.approx(fq, rel=1e-12)
    assert report.metrics["mia_gap"] == pytest.approx(abs(report.metrics["mia_min_k"] - 0.5))


def test_evaluator_compares_truth_ratios_when_holdout_has_perturbed_answers(scored, world_dir):
    tokenizer, model = scored
    forget = load_split(world_dir, "forget10_perturbed")[:6]
    # Retain-author records stand in for a holdout split with paraphrased and perturbed answers.
    holdout = load_split(world_dir, "retain_perturbed")[:5]
    report = Evaluator(tokenizer, {"forget": forget, "holdout": holdout}, max_new_tokens=0, batch_size=4).run(
        model
    )
    assert report.settings["forget_quality_holdout_statistic"] == "truth_ratio"
    expected = []
    for r in holdout:
        perturbed = [_nll(model, tokenizer, r["question"], p) for p in r["perturbed_answer"]]
        paraphrase = _nll(model, tokenizer, r["question"], r["paraphrased_answer"])
        expected.append(math.exp(paraphrase - sum(perturbed) / len(perturbed)))
    assert report.per_sample["holdout_truth_ratio"] == pytest.approx(expected, rel=1e-4)
    fq = ks_2samp(report.per_sample["forget_truth_ratio"], report.per_sample["holdout_truth_ratio"]).pvalue
    assert report.metrics["forget_quality_holdout"] == pytest.approx(fq, rel=1e-12)


def test_early_stopping_and_checkpoint_monitor_forget_quality_holdout(
    tmp_path, tiny_spec, world_dir, tokenizer_dir
):
    torch.manual_seed(0)
    objective = GradAscent(model=tiny_spec, optimizer=lambda p: torch.optim.SGD(p, lr=2.0))
    data = UnlearningDataModule(tokenizer=tokenizer_dir, source=str(world_dir), forget_split="forget10",
                                retain_split="retain90", batch_size=5, max_length=64)  # fmt: skip
    evaluation = UnlearningEvaluation(
        source=str(world_dir), splits={"forget": "forget10_perturbed", "holdout": "holdout10"}, limit=8,
        max_new_tokens=0, max_length=64,
    )  # fmt: skip
    key = "eval/forget_quality_holdout"
    # strict=True: a monitor missing from trainer.callback_metrics is an error, not a skip.
    stopping = EarlyStopping(monitor=key, mode="max", patience=1, strict=True)
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor=key, mode="max", save_top_k=1)
    trainer = L.Trainer(
        accelerator="cpu", max_epochs=4, logger=False, callbacks=[stopping, checkpoint, evaluation],
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(objective, datamodule=data)
    # history[0] is the evaluation before training; the monitors check each epoch's end.
    at_epoch_end = [h["forget_quality_holdout"] for h in evaluation.history[1:]]
    assert len(set(at_epoch_end)) > 1  # the values move, so reading the wrong one would show
    # EarlyStopping's rule on the logged values, replayed: stop after one check without improvement.
    best, stop_epoch = -math.inf, None
    for epoch, value in enumerate(at_epoch_end):
        if value > best:
            best = value
        else:
            stop_epoch = epoch
            break
    assert stopping.best_score.item() == best
    assert stopping.stopped_epoch == (stop_epoch or 0) and trainer.should_stop == (stop_epoch is not None)
    assert checkpoint.best_model_score.item() == max(at_epoch_end)
    last = evaluation.history[-1]
    assert trainer.callback_metrics[key].item() == last["forget_quality_holdout"]
    assert trainer.callback_metrics["eval/mia_gap"].item() == last["mia_gap"]
