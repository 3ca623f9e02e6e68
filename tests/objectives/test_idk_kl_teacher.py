"""IDK objectives (closer-look) and EUL's KL teacher: losses against an independent computation
with Hugging Face's own loss, and one step moves each forget term the intended way."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import build, hf_nll, sgd_step

from lightning_unlearn.errors import UserError
from lightning_unlearn.models import LoraSpec
from lightning_unlearn.objectives.idk import IdkAP, IdkDPO, IdkNLL
from lightning_unlearn.objectives.kl_teacher import KLTeacher

LORA = LoraSpec(r=4, alpha=8)


pytestmark = pytest.mark.usefixtures("no_logging")


def _rows(sub):
    """Each row of a sub-batch unpadded, as its own batch of one."""
    for i in range(sub["input_ids"].shape[0]):
        n = int(sub["attention_mask"][i].sum())
        yield {k: sub[k][i : i + 1, :n] for k in ("input_ids", "attention_mask", "labels")}


def _hf_logprob(model, sub) -> torch.Tensor:
    """Sequence log-prob per row: HF's mean loss times the row's number of scored tokens."""
    return torch.stack([-hf_nll(model, row) * (row["labels"][0, 1:] != -100).sum() for row in _rows(sub)])


def _kl(model_logits, ref_logits, labels):
    """KL(ref || model) per answer token from torch's kl_div, averaged over answer tokens."""
    mask = labels[:, 1:] != -100
    log_p = F.log_softmax(model_logits[:, :-1][mask], -1)
    log_q = F.log_softmax(ref_logits[:, :-1][mask], -1)
    return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean")


def test_idk_nll_is_refusal_nll_plus_retain_nll_and_teaches_refusals(tiny_spec, idk_data):
    batch = next(iter(idk_data.train_dataloader()))
    idk = build(IdkNLL, tiny_spec, retain_weight=0.5)
    want = hf_nll(idk.model, batch["forget_idk"]) + 0.5 * hf_nll(idk.model, batch["retain"])
    torch.testing.assert_close(idk.training_step(batch, 0), want)
    before = hf_nll(idk.model, batch["forget_idk"]).item()
    sgd_step(idk, batch)
    assert hf_nll(idk.model, batch["forget_idk"]).item() < before - 1e-3


def test_idk_ap_retain_term_is_answer_preservation(tiny_spec, idk_data):
    batch = next(iter(idk_data.train_dataloader()))
    ap = build(IdkAP, tiny_spec, beta=0.5)
    answer = _hf_logprob(ap.model, batch["retain"])
    refusal = _hf_logprob(ap.model, batch["retain_idk"])
    want_ap = -(1 / 0.5) * F.logsigmoid(0.5 * (answer - refusal)).mean()
    torch.testing.assert_close(ap.retain_loss(batch), want_ap, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        ap.training_step(batch, 0), hf_nll(ap.model, batch["forget_idk"]) + want_ap, rtol=1e-5, atol=1e-5
    )
    # Each term moves its way: refusals likelier on forget questions; the retain answers' margin
    # over refusals wider (on a random model the two compete for the same refusal words).
    forget_side = build(IdkAP, tiny_spec, beta=0.5, retain_weight=0.0)
    before = hf_nll(forget_side.model, batch["forget_idk"]).item()
    sgd_step(forget_side, batch, lr=0.2)
    assert hf_nll(forget_side.model, batch["forget_idk"]).item() < before - 1e-3
    retain_side = build(IdkAP, tiny_spec, beta=0.5, forget_weight=0.0)
    sgd_step(retain_side, batch, lr=0.01)
    model = retain_side.model
    new_margin = _hf_logprob(model, batch["retain"]) - _hf_logprob(model, batch["retain_idk"])
    assert new_margin.mean().item() > (answer - refusal).mean().item() + 1e-3


@pytest.mark.parametrize("reference", ["cached", "adapter_off"])
def test_idk_dpo_prefers_the_refusal_against_the_reference(tiny_spec, idk_data, reference):
    batch = next(iter(idk_data.train_dataloader()))
    dpo = build(IdkDPO, tiny_spec, adapter=LORA, beta=0.5, retain_weight=0.0, reference=reference)
    if reference == "cached":
        dpo.build_reference_cache(idk_data)
    # The model starts as its own reference: -(2/beta) ln(1/2).
    assert dpo.training_step(batch, 0).item() == pytest.approx(2 / 0.5 * math.log(2), rel=1e-5)
    ref_w, ref_l = _hf_logprob(dpo.model, batch["forget_idk"]), _hf_logprob(dpo.model, batch["forget"])
    for _ in range(2):
        sgd_step(dpo, batch, lr=0.2)
    w, lose = _hf_logprob(dpo.model, batch["forget_idk"]), _hf_logprob(dpo.model, batch["forget"])
    want = -(2 / 0.5) * F.logsigmoid(0.5 * ((w - ref_w) - (lose - ref_l))).mean()
    torch.testing.assert_close(dpo.training_step(batch, 0), want, rtol=1e-5, atol=1e-5)
    assert ((w - lose) - (ref_w - ref_l)).mean().item() > 0  # the refusal gained on the answer


def test_idk_objectives_without_refusals_say_how_to_get_them(tiny_spec, unlearning_data):
    batch = next(iter(unlearning_data.train_dataloader()))
    with pytest.raises(UserError, match="IdkNLL needs 'forget_idk'.*refusals"):
        build(IdkNLL, tiny_spec).training_step(batch, 0)


def _teacher_and_student_logits(eul, subs):
    with torch.no_grad():
        student = [eul(s) for s in subs]
        with eul.model.disable_adapter():
            teacher = [eul(s) for s in subs]
    return student, teacher


def test_kl_teacher_is_eul_objective(tiny_spec, unlearning_data):
    batch = next(iter(unlearning_data.train_dataloader()))
    eul = build(KLTeacher, tiny_spec, adapter=LORA)
    forget, retain = batch["forget"], batch["retain"]
    # Teacher = student at the start: both KL terms vanish, leaving -gamma NLL_f + lambda NLL_r.
    start = -0.2 * hf_nll(eul.model, forget) + 1.0 * hf_nll(eul.model, retain)
    torch.testing.assert_close(eul.training_step(batch, 0), start, rtol=1e-5, atol=1e-5)
    # Move the student off the teacher (KL has zero gradient at its minimum) and compare again.
    with torch.no_grad():
        for name, p in eul.model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    (s_f, s_r), (t_f, t_r) = _teacher_and_student_logits(eul, (forget, retain))
    kl_f, kl_r = _kl(s_f, t_f, forget["labels"]), _kl(s_r, t_r, retain["labels"])
    assert kl_f.item() > 1e-3 and kl_r.item() > 1e-3
    want = (-kl_f - 0.2 * hf_nll(eul.model, forget)) + (0.8 * kl_r + 1.0 * hf_nll(eul.model, retain))
    torch.testing.assert_close(eul.training_step(batch, 0), want, rtol=1e-4, atol=1e-5)
    # A step on the forget KL alone pushes the student further from the teacher on forget (with the
    # forget NLL term in, the direction depends on the batch).
    eul.retain_weight, eul.lm_weight = 0.0, 0.0
    sgd_step(eul, batch, lr=1.0)
    (s_f,), (t_f,) = _teacher_and_student_logits(eul, (forget,))
    assert _kl(s_f, t_f, forget["labels"]).item() > kl_f.item() + 1e-4


def test_kl_teacher_alternating_schedule_trains_one_side_per_epoch(tiny_spec, unlearning_data, monkeypatch):
    batch = next(iter(unlearning_data.train_dataloader()))
    eul = build(KLTeacher, tiny_spec, adapter=LORA, schedule="alternating")
    forget_only = eul.forget_loss(batch)
    retain_only = eul.retain_loss(batch)
    for epoch, want in ((0, forget_only), (1, retain_only), (2, forget_only)):
        monkeypatch.setattr(KLTeacher, "current_epoch", property(lambda self, e=epoch: e))
        torch.testing.assert_close(eul.training_step(batch, 0), want)
    torch.testing.assert_close(eul.step(batch, "val"), forget_only + retain_only)
    with pytest.raises(UserError, match="schedule must be one of"):
        KLTeacher(model=tiny_spec, schedule="cyclic")
