"""Each loss against values worked out by hand on 2-token vocabularies."""

import math

import pytest
import torch

from lightning_unlearn.losses import (
    kl_divergence,
    max_entropy_loss,
    mean_token_nll,
    nll_loss,
    sequence_logprob,
    token_logprobs,
)

LN = math.log


def _logits(*rows):
    """Logits whose softmax is the given 2-way probabilities (log p is a valid logit)."""
    return torch.tensor([[[LN(p), LN(1 - p)] for p in row] for row in rows])


# Sequence 0: p(token 0) = 3/4, 1/3, 1/2 at positions 0..2. Labels: prompt, 0, 1.
# Position 0 predicts label[1] = 0 -> 3/4; position 1 predicts label[2] = 1 -> 2/3.
LOGITS = _logits([0.75, 1 / 3, 0.5], [0.5, 0.9, 0.5])
LABELS = torch.tensor([[-100, 0, 1], [-100, -100, 0]])  # sequence 1: position 1 predicts 0 -> 0.9


def test_token_logprobs_by_hand():
    logp, mask = token_logprobs(LOGITS, LABELS)
    assert mask.tolist() == [[True, True], [False, True]]
    expected = torch.tensor([[LN(0.75), LN(2 / 3)], [0.0, LN(0.9)]])
    torch.testing.assert_close(logp * mask, expected)


def test_sequence_logprob_sums_without_length_norm():
    torch.testing.assert_close(sequence_logprob(LOGITS, LABELS), torch.tensor([LN(0.5), LN(0.9)]))


def test_nll_loss_is_mean_over_all_label_tokens_of_batch():
    expected = -(LN(0.75) + LN(2 / 3) + LN(0.9)) / 3
    assert nll_loss(LOGITS, LABELS).item() == pytest.approx(expected, rel=1e-6)
    # Per-sequence mean differs from the batch token mean: (-ln .5 / 2 - ln .9) / 2.
    torch.testing.assert_close(mean_token_nll(LOGITS, LABELS), torch.tensor([-LN(0.5) / 2, -LN(0.9)]))


def test_nll_loss_matches_hf_cross_entropy_convention():
    torch.manual_seed(0)
    logits, labels = torch.randn(3, 7, 11), torch.randint(0, 11, (3, 7))
    labels[:, :3] = -100
    ref = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    assert nll_loss(logits, labels).item() == pytest.approx(ref.item(), rel=1e-6)


def test_max_entropy_answer_positions_by_hand():
    # KL(U || p) = 1/2 ln(1/2 / p) + 1/2 ln(1/2 / (1-p)).
    def kl(p):
        return 0.5 * LN(0.5 / p) + 0.5 * LN(0.5 / (1 - p))

    expected = (kl(0.75) + kl(1 / 3) + kl(0.9)) / 3
    assert max_entropy_loss(LOGITS, LABELS).item() == pytest.approx(expected, rel=1e-6)
    # Uniform predictions have zero loss.
    assert max_entropy_loss(torch.zeros(2, 4, 5), torch.ones(2, 4, dtype=torch.long)).item() == pytest.approx(
        0.0
    )


def test_max_entropy_sequence_positions_skip_padding():
    def kl(p):
        return 0.5 * LN(0.5 / p) + 0.5 * LN(0.5 / (1 - p))

    attention = torch.tensor([[1, 1, 1], [1, 1, 0]])  # sequence 1 has one padding token at the end
    # Positions predicting real tokens: seq0 positions 0, 1; seq1 position 0 only.
    expected = (kl(0.75) + kl(1 / 3) + kl(0.5)) / 3
    got = max_entropy_loss(LOGITS, LABELS, attention, positions="sequence")
    assert got.item() == pytest.approx(expected, rel=1e-6)
    with pytest.raises(ValueError, match="attention_mask"):
        max_entropy_loss(LOGITS, LABELS, positions="sequence")


def test_kl_divergence_teacher_to_student_by_hand():
    teacher = _logits([0.75, 0.5])
    student = _logits([0.5, 0.5])
    mask = torch.tensor([[True, False]])
    expected = 0.75 * LN(0.75 / 0.5) + 0.25 * LN(0.25 / 0.5)
    assert kl_divergence(student, teacher, mask).item() == pytest.approx(expected, rel=1e-6)
    # Direction matters: KL(student || teacher) is a different number.
    assert kl_divergence(teacher, student, mask).item() != pytest.approx(expected, rel=1e-3)


def test_npo_by_hand():
    from lightning_unlearn.losses import npo_loss

    # logp == ref: -(2/beta) ln(1/2); with beta = 1 and logp - ref = ln 3: -2 ln(1/4).
    assert npo_loss(torch.tensor([-2.0]), torch.tensor([-2.0]), 0.1).item() == pytest.approx(
        20 * LN(2), rel=1e-6
    )
    got = npo_loss(torch.tensor([LN(3), 0.0]), torch.tensor([0.0, 0.0]), 1.0)
    assert got.item() == pytest.approx((2 * LN(4) + 2 * LN(2)) / 2, rel=1e-6)


def test_simnpo_by_hand():
    from lightning_unlearn.losses import simnpo_loss

    # beta (nll - delta) = ln 3 -> logsigmoid = ln(3/4); loss = -(2/beta) ln(3/4).
    beta = 2.0
    got = simnpo_loss(torch.tensor([LN(3) / beta + 0.5]), beta=beta, delta=0.5)
    assert got.item() == pytest.approx(-(2 / beta) * LN(0.75), rel=1e-6)


def test_dpo_by_hand():
    from lightning_unlearn.losses import dpo_loss

    # Margin ((-1) - (-2)) - ((-3) - (-1)) = 3; beta 0.5 -> logsigmoid(1.5).
    got = dpo_loss(
        torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-1.0]), 0.5
    )
    assert got.item() == pytest.approx(-(2 / 0.5) * LN(1 / (1 + math.exp(-1.5))), rel=1e-6)


def test_answer_preservation_by_hand():
    from lightning_unlearn.losses import answer_preservation_loss

    # beta (a - r) = 0 -> -(1/beta) ln(1/2); = ln 4 -> -(1/beta) ln(4/5).
    got = answer_preservation_loss(torch.tensor([0.0, LN(4) / 0.1]), torch.tensor([0.0, 0.0]), 0.1)
    assert got.item() == pytest.approx(-(LN(0.5) + LN(0.8)) / 0.1 / 2, rel=1e-6)
