"""TOFU metric functions against values computed by hand."""

import math

import pytest
import torch

from lightning_unlearn.metrics.tofu import (
    answer_probability,
    forget_quality,
    forget_truth_ratio,
    model_utility,
    prob_normalised,
    rouge_l_recall,
    truth_ratio,
    truth_ratio_score,
)


def test_truth_ratio_is_geometric_mean_of_perturbed_over_correct():
    tr = truth_ratio(torch.tensor([1.0, 2.0]), torch.tensor([[2.0, 3.0], [1.0, 1.0]]))
    # exp(-2.5) / exp(-1) and exp(-1) / exp(-2)
    torch.testing.assert_close(tr, torch.tensor([math.exp(-1.5), math.e]))


def test_truth_ratio_aggregates():
    tr = torch.tensor([0.5, 2.0, 1.0])
    assert forget_truth_ratio(tr) == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert truth_ratio_score(tr) == pytest.approx((0.5 + 0.0 + 0.0) / 3)


def test_prob_and_prob_normalised():
    assert answer_probability(torch.tensor([0.0, math.log(4)])).tolist() == pytest.approx([1.0, 0.25])
    c, w1, w2 = math.exp(-1), math.exp(-2), math.exp(-3)
    got = prob_normalised(torch.tensor([1.0]), torch.tensor([[2.0, 3.0]]))
    assert got.item() == pytest.approx(c / (c + w1 + w2))


def test_rouge_l_recall_counts_lcs_over_reference_words():
    # LCS("the cat sat", "the cat sat on the mat") = 3 of 6 reference words.
    assert rouge_l_recall(["the cat sat"], ["the cat sat on the mat"]) == [pytest.approx(0.5)]
    # Porter stemming: "cats"/"cat", "sitting"/"sit" match.
    assert rouge_l_recall(["cats sitting"], ["cat sit"]) == [pytest.approx(1.0)]
    assert rouge_l_recall(["", "dog"], ["a b", "cat"]) == [0.0, 0.0]


def test_forget_quality_is_exact_ks_pvalue():
    assert forget_quality([0.1, 0.2, 0.3], [0.1, 0.2, 0.3]) == pytest.approx(1.0)
    # Two fully separated samples of 5: exact two-sided p = 2 / C(10, 5).
    assert forget_quality([1, 2, 3, 4, 5], [6, 7, 8, 9, 10]) == pytest.approx(2 / 252, rel=1e-6)


def test_model_utility_harmonic_mean_of_present_components():
    metrics = {
        "retain_Q_A_Prob": 0.5,
        "retain_Q_A_ROUGE": 1.0,
        "wf_Truth_Ratio": 0.25,
        "forget_Q_A_Prob": 0.9,
    }
    value, used = model_utility(metrics)
    assert used == ["retain_Q_A_Prob", "retain_Q_A_ROUGE", "wf_Truth_Ratio"]
    assert value == pytest.approx(3 / (2 + 1 + 4))
    assert model_utility({**metrics, "retain_Truth_Ratio": 0.0})[0] == 0.0
    assert math.isnan(model_utility({"forget_Q_A_Prob": 0.9})[0])
