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


# -- num_tokens: the DDP denominator (the mean token count per rank) --------------------------


def _per_token_values():
    """Random logits and labels with gaps, and for each token-mean loss: the loss as a function of
    ``num_tokens`` and its per-position values worked out with plain log_softmax/softmax ops."""
    from lightning_unlearn.losses import ce_u_loss, satimp_loss, undial_loss, wga_loss

    gen = torch.Generator().manual_seed(0)
    logits, teacher = 2 * torch.randn(3, 6, 7, generator=gen), 2 * torch.randn(3, 6, 7, generator=gen)
    labels = torch.randint(0, 7, (3, 6), generator=gen)
    labels[0, :3] = -100
    labels[1, :5] = -100
    labels[2, [0, 2, 5]] = -100
    attention = torch.ones(3, 6, dtype=torch.long)
    attention[1, 4:] = 0
    answer = labels[:, 1:] != -100
    log_p = torch.log_softmax(logits[:, :-1], -1)  # position t predicts label t + 1
    target = labels[:, 1:].clamp_min(0)
    onehot = torch.nn.functional.one_hot(target, 7).bool()
    logp_t = (log_p * onehot).sum(-1)
    p_t = logp_t.exp()
    uniform_kl = (-math.log(7) - log_p).mean(-1)
    log_t = torch.log_softmax(teacher[:, :-1], -1)
    kl = (log_t.exp() * (log_t - log_p)).sum(-1)
    undial_q = torch.softmax(teacher[:, :-1] - 3.0 * onehot, -1)
    ce_u_q = torch.softmax(logits[:, :-1].masked_fill(onehot, -math.inf), -1)
    return {
        "nll": (lambda k: nll_loss(logits, labels, num_tokens=k), -logp_t, answer),
        "max_entropy_answer": (
            lambda k: max_entropy_loss(logits, labels, num_tokens=k),
            uniform_kl,
            answer,
        ),
        "max_entropy_sequence": (
            lambda k: max_entropy_loss(logits, labels, attention, "sequence", num_tokens=k),
            uniform_kl,
            attention[:, 1:].bool(),
        ),
        "kl_divergence": (
            lambda k: kl_divergence(logits[:, :-1], teacher[:, :-1], answer, num_tokens=k),
            kl,
            answer,
        ),
        "undial": (
            lambda k: undial_loss(logits, teacher, labels, 3.0, num_tokens=k),
            -(undial_q * log_p).sum(-1),
            answer,
        ),
        "wga": (lambda k: wga_loss(logits, labels, 0.7, num_tokens=k), p_t**0.7 * logp_t, answer),
        "satimp": (
            lambda k: satimp_loss(logits, labels, 2.0, 1.5, num_tokens=k),
            p_t**2.0 * (1 - p_t) ** 1.5 * logp_t,
            answer,
        ),
        "ce_u": (lambda k: ce_u_loss(logits, labels, num_tokens=k), -(ce_u_q * log_p).sum(-1), answer),
    }


@pytest.mark.parametrize(
    "name",
    ["nll", "max_entropy_answer", "max_entropy_sequence", "kl_divergence", "undial", "wga", "satimp", "ce_u"],
)
def test_token_mean_losses_divide_their_token_sum_by_num_tokens(name):
    loss, values, mask = _per_token_values()[name]
    total = values[mask].sum()
    count = int(mask.sum())
    assert 0 < count < mask.numel()  # some positions are left out
    # The default is the batch's own count (single-process behaviour, unchanged) ...
    torch.testing.assert_close(loss(None), total / count)
    # ... and num_tokens, a float or a tensor (under DDP: the mean count per rank), replaces it.
    torch.testing.assert_close(loss(2.5), total / 2.5)
    torch.testing.assert_close(loss(torch.tensor(17.0)), total / 17)
