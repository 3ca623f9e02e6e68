"""Memorisation, MIA and closer-look aggregate functions against hand-worked values and plain-Python
re-computations (explicit loops over tokens, math.log/exp softmax)."""

import math
import zlib

import pytest
import torch

from lightning_unlearn.metrics.closer_look import (
    CLOSER_LOOK_FE_COMPONENTS,
    CLOSER_LOOK_MU_COMPONENTS,
    closer_look_fe,
    closer_look_mu,
)
from lightning_unlearn.metrics.memorisation import (
    exact_memorization,
    extraction_strength,
    mia_auc,
    mia_loss,
    mia_min_k,
    mia_min_k_plus_plus,
    mia_zlib,
    privleak,
)

LN2 = math.log(2)


# ---------------------------------------------------------------- plain-Python references


def _log_softmax(row):
    m = max(row)
    lse = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - lse for x in row]


def _scored_positions(labels, drop_last):
    """Positions t whose logits predict a scored label labels[t+1], in order."""
    pos = [t for t in range(len(labels) - 1) if labels[t + 1] != -100]
    return pos[:-1] if drop_last else pos


def _ref_row(logits, labels, drop_last):
    """(log-softmax rows, targets) over the scored positions of one sample."""
    pos = _scored_positions(labels, drop_last)
    return [_log_softmax(logits[t]) for t in pos], [labels[t + 1] for t in pos]


def _ref_em(logits, labels, drop_last=True):
    lps, ys = _ref_row(logits, labels, drop_last)
    if not ys:
        return 0.0
    return sum(lp.index(max(lp)) == y for lp, y in zip(lps, ys, strict=True)) / len(ys)


def _ref_es(logits, labels, drop_last=True):
    # open-unlearning's loop, literally: first k whose suffix is fully predicted, else k = n - 1
    lps, ys = _ref_row(logits, labels, drop_last)
    n = len(ys)
    if n == 0:
        return 0.0
    preds = [lp.index(max(lp)) for lp in lps]
    for k in range(n):  # noqa: B007 - k is read after the loop, as in the original
        if preds[k:] == ys[k:]:
            break
    return 1 - k / n


def _ref_mean_nll(logits, labels):
    lps, ys = _ref_row(logits, labels, drop_last=False)
    return -sum(lp[y] for lp, y in zip(lps, ys, strict=True)) / max(len(ys), 1)


def _ref_min_k(values, k):
    if not values:
        return 0.0
    num = max(1, int(len(values) * k))
    return -sum(sorted(values)[:num]) / num


def _ref_min_k_logp(logits, labels, k, drop_last=True):
    lps, ys = _ref_row(logits, labels, drop_last)
    return _ref_min_k([lp[y] for lp, y in zip(lps, ys, strict=True)], k)


def _ref_min_k_pp(logits, labels, k, drop_last=True):
    lps, ys = _ref_row(logits, labels, drop_last)
    z = []
    for lp, y in zip(lps, ys, strict=True):
        mu = sum(math.exp(a) * a for a in lp)
        var = sum(math.exp(a) * a * a for a in lp) - mu * mu
        z.append((lp[y] - mu) / math.sqrt(max(var, 1e-6)))
    return _ref_min_k(z, k)


def _ref_auc(members, nonmembers):
    won = sum((n > m) + 0.5 * (n == m) for m in members for n in nonmembers)
    return won / (len(members) * len(nonmembers))


@pytest.fixture
def batch():
    """3 rows x 8 positions x 5 tokens: prompt (-100), answer, padding (-100); row 2 has no answer."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 8, 5, generator=g) * 2
    labels = torch.tensor(
        [
            [-100, -100, 1, 3, 3, 0, 2, 4],
            [-100, 2, 2, 0, 4, -100, -100, -100],
            [-100] * 8,
        ]
    )
    # make some argmaxes hit so EM / ES are not trivially 0
    for b, t in [(0, 3), (0, 4), (0, 5), (1, 1), (1, 3)]:
        logits[b, t, labels[b, t + 1]] += 6.0
    return logits, labels


# ---------------------------------------------------------------- exact memorisation / extraction strength


def _one_hot_logits(argmaxes, vocab=3):
    logits = torch.zeros(1, len(argmaxes), vocab)
    for t, a in enumerate(argmaxes):
        logits[0, t, a] = 5.0
    return logits


def test_em_and_es_by_hand():
    # labels predicted by positions 0..3: [0, 1, 2, 2]; the last (EOS) is dropped by default
    labels = torch.tensor([[-100, 0, 1, 2, 2]])
    logits = _one_hot_logits([1, 1, 2, 0, 0])  # position 0 wrong, 1 and 2 right, 3 (EOS) wrong
    assert exact_memorization(logits, labels).tolist() == pytest.approx([2 / 3])
    # trailing correct run of 2 out of 3 scored tokens: prefix of k* = 1 extracts the rest
    assert extraction_strength(logits, labels).tolist() == pytest.approx([2 / 3])
    # keep the EOS: 2 of 4 right; last token wrong -> open-unlearning's 1/n floor, the paper's 0
    assert exact_memorization(logits, labels, drop_last=False).tolist() == pytest.approx([0.5])
    assert extraction_strength(logits, labels, drop_last=False).tolist() == pytest.approx([0.25])
    strict = extraction_strength(logits, labels, drop_last=False, match_open_unlearning=False)
    assert strict.tolist() == pytest.approx([0.0])
    # everything right -> 1; first token wrong only -> (n-1)/n
    assert extraction_strength(_one_hot_logits([0, 1, 2, 2, 0]), labels).tolist() == pytest.approx([1.0])
    assert exact_memorization(_one_hot_logits([0, 1, 2, 2, 0]), labels).tolist() == pytest.approx([1.0])


def test_em_es_match_open_unlearning_loops(batch):
    logits, labels = batch
    rows = [(logits[b].tolist(), labels[b].tolist()) for b in range(3)]
    for drop_last in (True, False):
        em = exact_memorization(logits, labels, drop_last=drop_last)
        es = extraction_strength(logits, labels, drop_last=drop_last)
        assert em.tolist() == pytest.approx([_ref_em(lg, lb, drop_last) for lg, lb in rows])
        assert es.tolist() == pytest.approx([_ref_es(lg, lb, drop_last) for lg, lb in rows])
    # the fixture exercises non-trivial values, not just 0 / 1
    assert 0 < exact_memorization(logits, labels)[0] < 1


def test_es_non_contiguous_labels():
    # scored tokens at positions 0 and 2 only (position 1's label is -100): the run is over scored tokens
    labels = torch.tensor([[-100, 0, -100, 2, 1]])
    logits = _one_hot_logits([1, 0, 2, 0, 0])  # pos0 wrong, pos1 unscored, pos2 right, pos3 = EOS
    assert extraction_strength(logits, labels).tolist() == pytest.approx([0.5])
    assert exact_memorization(logits, labels).tolist() == pytest.approx([0.5])


# ---------------------------------------------------------------- MIA scores


def test_mia_loss_and_zlib_match_reference(batch):
    logits, labels = batch
    texts = ["Jaime Vasquez was born in Santiago.", "abc abc abc abc abc", ""]
    loss = mia_loss(logits, labels)
    z = mia_zlib(logits, labels, texts)
    for b in range(3):
        nll = _ref_mean_nll(logits[b].tolist(), labels[b].tolist())
        assert loss[b].item() == pytest.approx(nll, rel=1e-5, abs=1e-6)
        assert z[b].item() == pytest.approx(
            nll / len(zlib.compress(texts[b].encode("utf-8"))), rel=1e-5, abs=1e-7
        )
    with pytest.raises(ValueError):
        mia_zlib(logits, labels, texts[:2])


def test_mia_loss_by_hand():
    # two scored tokens with probabilities 1/2 and 1/4 (EOS included for the loss attack)
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.25, 0.25, 0.5], [1 / 3, 1 / 3, 1 / 3]]]))
    labels = torch.tensor([[-100, 0, 1]])
    assert mia_loss(logits, labels).item() == pytest.approx((LN2 + 2 * LN2) / 2)


def test_min_k_by_hand():
    # 5 scored tokens + EOS; token log-probs log(.5), log(.25), log(.125), log(.5), log(.25)
    dist = [0.5, 0.25, 0.125, 0.125]
    logits = torch.log(torch.tensor(dist)).repeat(1, 7, 1)
    labels = torch.tensor([[-100, 0, 1, 2, 0, 1, 3]])
    # k=0.4: floor(5*0.4)=2 lowest: log .125, log .25 -> score = (3 ln2 + 2 ln2) / 2
    assert mia_min_k(logits, labels, k=0.4).item() == pytest.approx(2.5 * LN2)
    # k=0.1: max(1, floor(0.5)) = 1 lowest
    assert mia_min_k(logits, labels, k=0.1).item() == pytest.approx(3 * LN2)
    # k=1: all five
    assert mia_min_k(logits, labels, k=1.0).item() == pytest.approx((1 + 2 + 3 + 1 + 2) / 5 * LN2)
    # drop_last=False adds the EOS token (log .125): 6 tokens, floor(2.4)=2 -> two log .125
    assert mia_min_k(logits, labels, k=0.4, drop_last=False).item() == pytest.approx(3 * LN2)


def test_min_k_plus_plus_by_hand():
    # p = [1/2, 1/4, 1/4]: E[log p] = -1.5 ln2, Var[log p] = 0.25 ln2^2, std = 0.5 ln2
    # token 0 -> z = +1, token 1 -> z = -1; a uniform position has Var 0 -> clamp 1e-6 and z = 0
    peaked = torch.log(torch.tensor([0.5, 0.25, 0.25]))
    uniform = torch.zeros(3)
    logits = torch.stack([peaked, peaked, uniform, peaked, peaked]).unsqueeze(0)
    labels = torch.tensor([[-100, 0, 1, 2, 1]])  # z = [+1, -1, 0], last (EOS) dropped
    # k=0.4 -> max(1, floor(1.2)) = 1 lowest: -1 -> score +1
    assert mia_min_k_plus_plus(logits, labels, k=0.4).item() == pytest.approx(1.0, abs=1e-3)
    # k=1 -> mean of all three z = 0
    assert mia_min_k_plus_plus(logits, labels, k=1.0).item() == pytest.approx(0.0, abs=1e-3)
    # k=0.7 -> floor(2.1) = 2 lowest: -1, 0 -> score 0.5
    assert mia_min_k_plus_plus(logits, labels, k=0.7).item() == pytest.approx(0.5, abs=1e-3)


def test_min_k_variants_match_reference(batch):
    logits, labels = batch
    for k in (0.2, 0.4, 0.7, 1.0):
        mk = mia_min_k(logits, labels, k=k)
        mkpp = mia_min_k_plus_plus(logits, labels, k=k)
        for b in range(3):
            lg, lb = logits[b].tolist(), labels[b].tolist()
            assert mk[b].item() == pytest.approx(_ref_min_k_logp(lg, lb, k), rel=1e-5, abs=1e-6)
            assert mkpp[b].item() == pytest.approx(_ref_min_k_pp(lg, lb, k), rel=1e-4, abs=1e-5)


def test_masked_positions_are_ignored(batch):
    logits, labels = batch
    noisy = logits.clone()
    # positions whose next label is -100 (prompt, padding, the final position) get garbage logits
    unscored = torch.nn.functional.pad(labels[:, 1:] == -100, (0, 1), value=True)
    noisy[unscored] = torch.randn(int(unscored.sum()), 5) * 50
    texts = ["a", "b", "c"]
    for fn in (exact_memorization, extraction_strength, mia_loss, mia_min_k, mia_min_k_plus_plus):
        torch.testing.assert_close(fn(noisy, labels), fn(logits, labels))
    torch.testing.assert_close(mia_zlib(noisy, labels, texts), mia_zlib(logits, labels, texts))


def test_no_label_tokens_give_zero_not_nan():
    logits = torch.randn(2, 4, 3)
    labels = torch.tensor([[-100] * 4, [-100, -100, -100, 1]])  # none; a single token (dropped as EOS)
    for fn in (exact_memorization, extraction_strength, mia_min_k, mia_min_k_plus_plus):
        out = fn(logits, labels)
        assert torch.isfinite(out).all() and out.tolist() == [0.0, 0.0], fn.__name__
    assert mia_loss(logits, labels)[0].item() == 0.0
    assert torch.isfinite(mia_zlib(logits, labels, ["", ""])).all()


# ---------------------------------------------------------------- AUC and privleak


def test_mia_auc_hand_counted_with_ties():
    members, nonmembers = [1.0, 2.0, 3.0], [2.0, 4.0]
    # non-member 2.0: beats 1.0, ties 2.0, loses to 3.0 -> 1.5; non-member 4.0 beats all -> 3; 4.5 / 6
    assert mia_auc(members, nonmembers) == pytest.approx(0.75)
    assert mia_auc(torch.tensor(members), torch.tensor(nonmembers)) == pytest.approx(0.75)


def test_mia_auc_direction_convention():
    # loss-like scores: members (forget) far more likely = lower loss -> AUC 1; reversed -> 0
    assert mia_auc([0.1, 0.2, 0.3], [1.0, 2.0]) == pytest.approx(1.0)
    assert mia_auc([1.0, 2.0], [0.1, 0.2, 0.3]) == pytest.approx(0.0)
    assert mia_auc([1.0, 1.0], [1.0, 1.0]) == pytest.approx(0.5)
    # large losses (after gradient ascent) must not be tied by a sigmoid squash
    assert mia_auc([30.0, 31.0], [40.0, 41.0]) == pytest.approx(1.0)
    assert mia_auc([-50.0, 70.0], [60.0, 80.0]) == pytest.approx(0.75)


def test_mia_auc_matches_pair_count_on_random_scores():
    g = torch.Generator().manual_seed(1)
    members = (torch.randint(0, 6, (13,), generator=g).double() * 7.5).tolist()  # many ties, values > 1
    nonmembers = (torch.randint(2, 9, (11,), generator=g).double() * 7.5).tolist()
    assert mia_auc(members, nonmembers) == pytest.approx(_ref_auc(members, nonmembers))
    with pytest.raises(ValueError):
        mia_auc([], [1.0])


def test_privleak_formula_and_sign():
    # open-unlearning issue #167: mia_min_k AUC 0.981 vs the default retain AUC 0.5 -> privleak -96.2
    assert privleak(0.981, 0.5) == pytest.approx(-96.2, abs=1e-6)
    assert privleak(0.7, 0.7) == pytest.approx(0.0)
    a, r = 1 - 0.3, 1 - 0.6
    assert privleak(0.3, 0.6) == pytest.approx((a - r) / r * 100)  # over-unlearned: positive
    assert math.isfinite(privleak(0.9, 1.0))


# ---------------------------------------------------------------- closer-look MU / FE


def _full_metrics():
    metrics = {}
    for i, name in enumerate(CLOSER_LOOK_MU_COMPONENTS):
        metrics[name] = 0.2 + 0.04 * i
    metrics.update(
        {
            "forget_Q_A_Prob": 0.9,
            "forget_Q_A_ROUGE": 0.8,
            "forget_truth_ratio": 0.6,
            "forget_cosine_similarity": 0.7,
            "forget_entailment_score": 0.5,
            "forget_token_entropy": 0.95,  # excluded from FE
            "ra_Q_A_Prob": 0.01,  # not closer-look's ra probability (that is the normalised one)
            "model_utility": 0.4,
        }
    )
    return metrics


def test_closer_look_mu_is_harmonic_mean_of_18():
    metrics = _full_metrics()
    value, names = closer_look_mu(metrics)
    assert len(names) == 18 and set(names) == set(CLOSER_LOOK_MU_COMPONENTS)
    assert "ra_Q_A_Prob_normalised" in names and "ra_Q_A_Prob" not in names
    xs = [metrics[n] for n in CLOSER_LOOK_MU_COMPONENTS]
    assert value == pytest.approx(len(xs) / sum(1 / x for x in xs))
    retain_value, retain_names = closer_look_mu(metrics, prefixes=("retain",))
    assert retain_names == [n for n in CLOSER_LOOK_MU_COMPONENTS if n.startswith("retain_")]
    assert retain_value == pytest.approx(6 / sum(1 / metrics[n] for n in retain_names))


def test_closer_look_mu_skips_absent_and_handles_zero_and_empty():
    metrics = {"retain_Q_A_Prob": 0.5, "retain_Q_A_ROUGE": 0.25, "wf_token_entropy": 1.0}
    value, names = closer_look_mu(metrics)
    assert names == ["retain_Q_A_Prob", "retain_Q_A_ROUGE", "wf_token_entropy"]
    assert value == pytest.approx(3 / (2 + 4 + 1))
    assert closer_look_mu({**metrics, "ra_entailment_score": 0.0}) == (
        0.0,
        [*names[:2], "ra_entailment_score", names[2]],
    )
    value, names = closer_look_mu({})
    assert math.isnan(value) and names == []


def test_closer_look_fe_uses_one_minus_forget_truth_ratio():
    value, names = closer_look_fe(_full_metrics())
    assert names == list(CLOSER_LOOK_FE_COMPONENTS)
    # closer-look's forget Truth Ratio is 1 - mean min(TR, 1/TR) = 1 - 0.6
    assert value == pytest.approx(1 - (0.9 + 0.8 + (1 - 0.6) + 0.7 + 0.5) / 5)
    value, names = closer_look_fe({"forget_Q_A_ROUGE": 0.2, "forget_truth_ratio": 1.0})
    assert names == ["forget_Q_A_ROUGE", "forget_truth_ratio"]
    assert value == pytest.approx(1 - (0.2 + 0.0) / 2)
    value, names = closer_look_fe({"retain_Q_A_ROUGE": 0.2})
    assert math.isnan(value) and names == []
