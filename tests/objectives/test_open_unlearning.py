"""RMU, UNDIAL, WGA, SatImp and CE-U (open-unlearning's objectives): each loss against values worked
out by hand and by explicit per-position loops, each objective's training_step against an
independent computation from the Hugging Face model's own outputs, and its direction of travel."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_LLAMA
from helpers import build, first_batch, sgd_step

from lightning_unlearn.errors import UserError
from lightning_unlearn.losses import (
    ce_u_loss,
    drop_first_label_tokens,
    representation_loss,
    satimp_loss,
    undial_loss,
    wga_loss,
)
from lightning_unlearn.models import LoraSpec, ModelSpec
from lightning_unlearn.objectives.base import UnlearningObjective
from lightning_unlearn.objectives.ce_u import CEU
from lightning_unlearn.objectives.reweighted import WGA, SatImp
from lightning_unlearn.objectives.rmu import RMU
from lightning_unlearn.objectives.undial import UNDIAL

LN = math.log
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "tofu"


# -- helpers (as in test_objectives.py) ------------------------------------------------------------


def _logits(model, sub, **kwargs):
    return model(input_ids=sub["input_ids"], attention_mask=sub["attention_mask"], **kwargs)


def _hf_nll(model, sub):
    return _logits(model, sub, labels=sub["labels"]).loss


def _memorise(objective, sub, steps=10, lr=0.02):
    """Fine-tune on ``sub`` until its answers are likely: unlearning starts from a model that knows them."""
    params = [p for p in objective.model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    for _ in range(steps):
        optimizer.zero_grad()
        _hf_nll(objective.model, sub).backward()
        optimizer.step()
    objective.model.zero_grad()


pytestmark = pytest.mark.usefixtures("no_logging")


@pytest.fixture
def two_layer_spec(tokenizer_dir):
    # Two layers, so layer 0's output is hidden_states[1] (the last one is after the final norm).
    return ModelSpec(config={**TINY_LLAMA, "num_hidden_layers": 2}, tokenizer=tokenizer_dir)


# -- independent per-position computations -----------------------------------------------------------
def _scored(labels):
    """(b, t, y) for every position t whose logits predict a label token y = labels[b, t + 1]."""
    B, T = labels.shape
    return [(b, t, int(labels[b, t + 1])) for b in range(B) for t in range(T - 1) if labels[b, t + 1] != -100]


def _loop_mean(logits, labels, per_position):
    terms = [per_position(logits[b, t].double(), y, b, t) for b, t, y in _scored(labels)]
    return torch.stack(terms).mean().float()


def _loop_wga(logits, labels, beta):
    def term(z, y, b, t):
        p = torch.softmax(z, -1)[y]
        return -(p**beta) * -torch.log(p)

    return _loop_mean(logits, labels, term)


def _loop_satimp(logits, labels, beta1, beta2):
    def term(z, y, b, t):
        p = torch.softmax(z, -1)[y]
        return -(p**beta1) * (1 - p) ** beta2 * -torch.log(p)

    return _loop_mean(logits, labels, term)


def _loop_ce_u(logits, labels):
    def term(z, y, b, t):
        masked = z.clone()
        masked[y] = -math.inf
        q = torch.softmax(masked, -1)
        return -(q * torch.log_softmax(z, -1)).sum()

    return _loop_mean(logits, labels, term)


def _loop_undial(logits, teacher, labels, beta):
    def term(z, y, b, t):
        adjusted = teacher[b, t].double().clone()
        adjusted[y] -= beta
        q = torch.softmax(adjusted, -1)
        return -(q * torch.log_softmax(z, -1)).sum()

    return _loop_mean(logits, labels, term)


def _loop_mse(hidden, target, labels):
    """Per sequence: mean over its label positions of the mean squared error over the hidden dim."""
    per_seq = []
    for b in range(hidden.shape[0]):
        rows = [
            ((hidden[b, t] - target[b, t]) ** 2).mean()
            for t in range(hidden.shape[1])
            if labels[b, t] != -100
        ]
        per_seq.append(torch.stack(rows).mean())
    return torch.stack(per_seq).mean()


# -- losses by hand ---------------------------------------------------------------------------------
# One sequence of 3 positions over a 4-token vocabulary. Labels: prompt, 2, prompt: only position 0
# (predicting token 2) is scored; position 1's huge logits must be ignored.
HAND_LABELS = torch.tensor([[-100, 2, -100]])


def _hand_logits(row0):
    return torch.tensor([[row0, [50.0, -50.0, 9.0, 3.0], [7.0, 0.0, 0.0, -7.0]]])


def test_wga_and_satimp_by_hand():
    uniform = _hand_logits([0.0, 0.0, 0.0, 0.0])  # p(2) = 1/4, NLL = ln 4
    assert wga_loss(uniform, HAND_LABELS, beta=1.0).item() == pytest.approx(-LN(4) / 4, rel=1e-6)
    assert wga_loss(uniform, HAND_LABELS, beta=2.0).item() == pytest.approx(-LN(4) / 16, rel=1e-6)
    assert wga_loss(uniform, HAND_LABELS, beta=0.0).item() == pytest.approx(-LN(4), rel=1e-6)  # GA
    # SatImp weight p^b1 (1-p)^b2 = 1/4 * (3/4)^2 = 9/64.
    assert satimp_loss(uniform, HAND_LABELS, 1.0, 2.0).item() == pytest.approx(-9 / 64 * LN(4), rel=1e-6)
    # logits [0, 0, ln 3, 0]: p(2) = 3/6 = 1/2; weights (1/2)^5 * (1/2)^1 = 1/64.
    half = _hand_logits([0.0, 0.0, LN(3), 0.0])
    assert satimp_loss(half, HAND_LABELS, 5.0, 1.0).item() == pytest.approx(-LN(2) / 64, rel=1e-6)


def test_ce_u_by_hand():
    # Uniform model: target 1/3 on tokens 0, 1, 3; each log p = -ln 4.
    assert ce_u_loss(_hand_logits([0.0, 0.0, 0.0, 0.0]), HAND_LABELS).item() == pytest.approx(LN(4), rel=1e-6)
    # logits [0, 0, ln 2, 0]: p = (1, 1, 2, 1) / 5; target (1/3, 1/3, 0, 1/3): CE = ln 5.
    got = ce_u_loss(_hand_logits([0.0, 0.0, LN(2), 0.0]), HAND_LABELS).item()
    assert got == pytest.approx(LN(5), rel=1e-6)


def test_undial_by_hand():
    # Teacher uniform, beta = ln 3: adjusted exp (1, 1, 1/3, 1) -> q = (.3, .3, .1, .3).
    teacher = _hand_logits([0.0, 0.0, 0.0, 0.0])
    # Student p = (1, 1, 2, 1) / 5: CE = .9 ln 5 + .1 ln(5/2) = ln 5 - .1 ln 2.
    student = _hand_logits([0.0, 0.0, LN(2), 0.0])
    got = undial_loss(student, teacher, HAND_LABELS, beta=LN(3)).item()
    assert got == pytest.approx(LN(5) - 0.1 * LN(2), rel=1e-6)
    # beta 0 is plain distillation: CE(teacher, student) = ln 4 for a uniform student.
    assert undial_loss(teacher, teacher, HAND_LABELS, beta=0.0).item() == pytest.approx(LN(4), rel=1e-6)


def test_representation_loss_by_hand():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0], [2.0, 0.0]]])
    mask = torch.tensor([[1, 0, 1], [0, 1, 1]])
    # Sequence 0: per-position MSEs to 0 are 2.5, (12.5 masked), 0 -> 1.25; sequence 1: 1, 2 -> 1.5.
    assert representation_loss(hidden, torch.zeros(2), mask).item() == pytest.approx(1.375, rel=1e-6)
    # Broadcast target (1, 1): sequence 0: MSEs .5, 1 -> .75; sequence 1: 0, 1 -> .5.
    assert representation_loss(hidden, torch.ones(2), mask).item() == pytest.approx(0.625, rel=1e-6)
    # A full [B, T, D] target, and a sequence with nothing scored counts 0 (not NaN): (1.25 + 0) / 2.
    empty = torch.tensor([[1, 0, 1], [0, 0, 0]])
    assert representation_loss(hidden, torch.zeros_like(hidden), empty).item() == pytest.approx(
        0.625, rel=1e-6
    )


def test_drop_first_label_tokens():
    labels = torch.tensor([[-100, 5, 6, 7, -100], [-100, -100, -100, 8, 9]])
    assert drop_first_label_tokens(labels, 1).tolist() == [[-100, -100, 6, 7, -100], [-100] * 4 + [9]]
    assert drop_first_label_tokens(labels, 0).tolist() == labels.tolist()


def test_losses_match_per_position_loops_and_ignore_masked_positions():
    torch.manual_seed(0)
    logits, teacher = torch.randn(3, 6, 7) * 2, torch.randn(3, 6, 7) * 2
    labels = torch.randint(0, 7, (3, 6))
    labels[0, :3] = -100
    labels[1, :5] = -100
    labels[2, [0, 2, 5]] = -100  # gaps and trailing padding
    torch.testing.assert_close(wga_loss(logits, labels, 0.7), _loop_wga(logits, labels, 0.7))
    torch.testing.assert_close(satimp_loss(logits, labels, 2.0, 1.5), _loop_satimp(logits, labels, 2.0, 1.5))
    torch.testing.assert_close(ce_u_loss(logits, labels), _loop_ce_u(logits, labels))
    torch.testing.assert_close(
        undial_loss(logits, teacher, labels, 3.0), _loop_undial(logits, teacher, labels, 3.0)
    )
    # Logits at positions that predict no label change nothing.
    other = logits.clone()
    other[0, :2] += 100 * torch.randn(2, 7)
    other[:, -1] += 100 * torch.randn(3, 7)
    other_teacher = teacher.clone()
    other_teacher[1, :4] = 0
    assert wga_loss(other, labels, 0.7).item() == pytest.approx(wga_loss(logits, labels, 0.7).item())
    assert satimp_loss(other, labels, 2.0, 1.5).item() == pytest.approx(
        satimp_loss(logits, labels, 2.0, 1.5).item()
    )
    assert ce_u_loss(other, labels).item() == pytest.approx(ce_u_loss(logits, labels).item())
    assert undial_loss(other, other_teacher, labels, 3.0).item() == pytest.approx(
        undial_loss(logits, teacher, labels, 3.0).item()
    )


def test_reweighted_gradients_are_the_weighted_ga_gradients():
    # The weights are detached: d(loss)/d(logits) = -w * d(NLL)/d(logits) / n, not the product rule.
    torch.manual_seed(1)
    logits = torch.randn(1, 3, 5, requires_grad=True)
    labels = torch.tensor([[-100, 1, 4]])
    satimp_loss(logits, labels, 2.0, 1.0).backward()
    p = torch.softmax(logits.detach()[0, :2], -1)
    weight = torch.stack([p[0, 1] ** 2 * (1 - p[0, 1]), p[1, 4] ** 2 * (1 - p[1, 4])])
    onehot = torch.zeros(2, 5)
    onehot[0, 1] = onehot[1, 4] = 1
    expected = -(weight[:, None] * (p - onehot)) / 2  # d NLL / d z = p - onehot
    torch.testing.assert_close(logits.grad[0, :2], expected)
    assert torch.all(logits.grad[0, 2] == 0)


# -- objectives against the model's own outputs ------------------------------------------------------
@pytest.mark.parametrize("policy", ["copy", "adapter_off"])
def test_rmu_loss_is_steering_mse_plus_embed_diff(two_layer_spec, unlearning_data, policy):
    batch = first_batch(unlearning_data)
    adapter = LoraSpec(r=4, alpha=8) if policy == "adapter_off" else None
    rmu = build(RMU, two_layer_spec, adapter=adapter, reference=policy, layer=0, steering_coeff=3.0,
                 forget_weight=1.5, retain_weight=0.7)  # fmt: skip
    original = copy.deepcopy(rmu.model if adapter is None else rmu.model.get_base_model())
    torch.manual_seed(0)
    u = rmu.steering_vector
    assert u.shape == (TINY_LLAMA["hidden_size"],) and u.norm().item() == pytest.approx(1.0)
    assert torch.all(u >= 0)  # uniform [0, 1) direction, as open-unlearning and WMDP draw it
    assert "steering_vector" in rmu.state_dict()
    # Before any update the model is its own reference: the retain term is 0.
    assert rmu.retain_loss(batch).item() == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():  # move the trainable weights (the adapter, or the layers up to 0) off the reference
        for p in rmu.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))
    forget, retain = batch["forget"], batch["retain"]
    with torch.no_grad():
        h_forget = _logits(rmu.model, forget, output_hidden_states=True).hidden_states[1]
        h_retain = _logits(rmu.model, retain, output_hidden_states=True).hidden_states[1]
        h_original = _logits(original, retain, output_hidden_states=True).hidden_states[1]
    expected_forget = _loop_mse(h_forget, (3.0 * u).expand_as(h_forget), forget["labels"])
    expected_retain = _loop_mse(h_retain, h_original, retain["labels"])
    assert expected_retain.item() > 1e-4
    torch.testing.assert_close(rmu.training_step(batch, 0), 1.5 * expected_forget + 0.7 * expected_retain)


def test_rmu_step_moves_forget_activations_towards_the_steering_vector(two_layer_spec, unlearning_data):
    batch = first_batch(unlearning_data)
    rmu = build(RMU, two_layer_spec, layer=0)  # default steering_coeff 2, retain embed_diff, alpha 1
    forget_hidden = rmu.layer_output(batch["forget"]).detach()
    before = rmu.forget_loss(batch).item()
    sgd_step(rmu, batch, lr=1.0)
    after_hidden = rmu.layer_output(batch["forget"]).detach()
    assert rmu.forget_loss(batch).item() < before - 1e-3
    # ...by turning the forget activations towards u (their cosine with it grows).
    mask = batch["forget"]["labels"] != -100
    u = rmu.steering_vector
    cos_before = torch.cosine_similarity(forget_hidden[mask], u[None], dim=-1).mean()
    cos_after = torch.cosine_similarity(after_hidden[mask], u[None], dim=-1).mean()
    assert cos_after > cos_before + 0.01
    # The direction is fixed by the seed.
    again, other = build(RMU, two_layer_spec, layer=0), build(RMU, two_layer_spec, layer=0, seed=1)
    torch.testing.assert_close(again.steering_vector, rmu.steering_vector)
    assert not torch.allclose(other.steering_vector, rmu.steering_vector)


def test_rmu_freezes_what_its_loss_cannot_reach(two_layer_spec, unlearning_data):
    batch = first_batch(unlearning_data)
    rmu = build(RMU, two_layer_spec, layer=0)
    base = rmu.model
    assert not any(p.requires_grad for p in base.model.layers[1].parameters())
    assert not base.model.norm.weight.requires_grad and not base.lm_head.weight.requires_grad
    assert base.model.embed_tokens.weight.requires_grad
    rmu.training_step(batch, 0).backward()
    # Every trainable parameter gets a gradient (DDP without find_unused_parameters needs that).
    assert all(p.grad is not None for p in rmu.parameters() if p.requires_grad)
    nll = build(RMU, two_layer_spec, layer=0, retain_loss_type="nll")
    assert all(p.requires_grad for p in nll.model.parameters())
    expected = nll.forget_loss(batch) + _hf_nll(nll.model, batch["retain"])
    torch.testing.assert_close(nll.training_step(batch, 0), expected)


def test_rmu_layer_out_of_range_is_a_user_error(tiny_spec):
    with pytest.raises(
        UserError, match=r"layer 7 is out of range: the model has 1 decoder layers \(0 to 0\)"
    ):
        build(RMU, tiny_spec)
    with pytest.raises(UserError, match="layer 1 is out of range: the model has 1 decoder layers"):
        build(RMU, tiny_spec, layer=1, adapter=LoraSpec(r=4, alpha=8))  # through the peft wrapper
    build(RMU, tiny_spec, layer=0, adapter=LoraSpec(r=4, alpha=8))


def test_undial_loss_against_the_teacher_and_direction(tiny_spec, unlearning_data):
    batch = first_batch(unlearning_data)
    forget = batch["forget"]
    undial = build(UNDIAL, tiny_spec, reference="copy", beta=2.0, forget_weight=1.3, retain_weight=0.4)
    teacher = copy.deepcopy(undial.model)
    sgd_step(undial, batch, lr=0.5)  # so the student is no longer the teacher
    with torch.no_grad():
        student_logits, teacher_logits = _logits(undial.model, forget).logits, _logits(teacher, forget).logits
        assert not torch.allclose(student_logits, teacher_logits, atol=1e-4)
        expected = 1.3 * _loop_undial(student_logits, teacher_logits, forget["labels"], 2.0)
        expected = expected + 0.4 * _hf_nll(undial.model, batch["retain"])
    torch.testing.assert_close(undial.training_step(batch, 0), expected)
    # Default (beta 10, no retain term): a step lowers the loss and the label tokens' probability.
    undial = build(UNDIAL, tiny_spec)
    before_loss, before_nll = undial.training_step(batch, 0).item(), _hf_nll(undial.model, forget).item()
    sgd_step(undial, batch, lr=0.5)
    assert undial.training_step(batch, 0).item() < before_loss
    assert _hf_nll(undial.model, forget).item() > before_nll + 1e-3


@pytest.mark.parametrize("cls", [WGA, SatImp])
def test_reweighted_loss_against_loops(tiny_spec, unlearning_data, cls):
    batch = first_batch(unlearning_data)
    forget = batch["forget"]
    obj = build(cls, tiny_spec, forget_weight=0.9, retain_weight=0.6)
    _memorise(obj, forget)  # p_t away from 1/V, so the weights are not all ~0
    with torch.no_grad():
        logits = _logits(obj.model, forget).logits
        if cls is WGA:
            forget_term = _loop_wga(logits, forget["labels"], 1.0)
        else:
            forget_term = _loop_satimp(logits, forget["labels"], 5.0, 1.0)
        expected = 0.9 * forget_term + 0.6 * _hf_nll(obj.model, batch["retain"])
    assert abs(forget_term.item()) > 1e-3
    torch.testing.assert_close(obj.training_step(batch, 0), expected)


@pytest.mark.parametrize("cls", [WGA, SatImp, CEU])
def test_step_raises_forget_nll_of_a_memorised_answer(tiny_spec, unlearning_data, cls):
    batch = first_batch(unlearning_data)
    forget = batch["forget"]
    obj = build(cls, tiny_spec, forget_weight=1.0, retain_weight=0.0)
    _memorise(obj, forget)
    before = _hf_nll(obj.model, forget).item()
    assert before < 0.5 * LN(obj.model.config.vocab_size)  # memorised: p_t far above 1/V
    for _ in range(3):
        sgd_step(obj, batch, lr=1.0)
    assert _hf_nll(obj.model, forget).item() > before + 1e-2


def test_ce_u_loss_skips_the_first_answer_token(tiny_spec, unlearning_data):
    batch = first_batch(unlearning_data)
    forget = batch["forget"]
    ceu = build(CEU, tiny_spec, retain_weight=0.5)
    with torch.no_grad():
        logits = _logits(ceu.model, forget).logits
    labels = forget["labels"].clone()
    for row in labels:  # the first label token of each sequence is not scored
        row[int((row != -100).nonzero()[0])] = -100
    expected = _loop_ce_u(logits, labels) + 0.5 * _hf_nll(ceu.model, batch["retain"])
    torch.testing.assert_close(ceu.training_step(batch, 0), expected)
    every = build(CEU, tiny_spec, ignore_first_n_answer_tokens=0, retain_weight=0.0)
    torch.testing.assert_close(every.training_step(batch, 0), _loop_ce_u(logits, forget["labels"]))


# -- defaults and configs ------------------------------------------------------------------------------
OPEN_UNLEARNING_DEFAULTS = {
    # configs/trainer/RMU.yaml
    RMU: {"layer": 7, "steering_coeff": 2.0, "retain_loss_type": "embed_diff", "forget_weight": 1.0,
          "retain_weight": 1.0},
    # configs/trainer/UNDIAL.yaml
    UNDIAL: {"beta": 10.0, "forget_weight": 1.0, "retain_weight": 0.0, "retain_loss_type": "nll"},
    # configs/trainer/WGA.yaml
    WGA: {"beta": 1.0, "forget_weight": 1.0, "retain_weight": 1.0, "retain_loss_type": "nll"},
    # configs/trainer/SatImp.yaml
    SatImp: {"beta1": 5.0, "beta2": 1.0, "forget_weight": 0.1, "retain_weight": 1.0, "retain_loss_type": "nll"},
    # configs/trainer/CEU.yaml (CEU trains the forget term alone)
    CEU: {"ignore_first_n_answer_tokens": 1, "retain_weight": 0.0},
}  # fmt: skip
CONFIG_FILES = {RMU: "rmu", UNDIAL: "undial", WGA: "wga", SatImp: "satimp", CEU: "ce_u"}


@pytest.mark.parametrize("cls", list(OPEN_UNLEARNING_DEFAULTS), ids=lambda c: c.__name__)
def test_defaults_are_open_unlearnings_and_the_config_builds_them(cls):
    from jsonargparse import ArgumentParser

    defaults = cls()
    for name, value in OPEN_UNLEARNING_DEFAULTS[cls].items():
        assert getattr(defaults, name) == value, name
    config = yaml.safe_load((CONFIGS / f"{CONFIG_FILES[cls]}.yaml").read_text())
    # the shared target file, as LightningCLI reads it relative to the config
    config["model"]["init_args"]["model"] = yaml.safe_load((CONFIGS / "target.yaml").read_text())
    parser = ArgumentParser(exit_on_error=False)
    parser.add_subclass_arguments(UnlearningObjective, "model")
    objective = parser.instantiate_classes(parser.parse_object({"model": config["model"]})).model
    assert type(objective) is cls and objective.adapter_spec.r == 8
    for name, value in OPEN_UNLEARNING_DEFAULTS[cls].items():
        assert getattr(objective, name) == value, name


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="retain_loss_type must be one of embed_diff, nll"):
        RMU(retain_loss_type="kl")
    with pytest.raises(UserError, match="steering_coeff must be positive"):
        RMU(steering_coeff=0.0)
    with pytest.raises(UserError, match="layer must be a non-negative"):
        RMU(layer=-1)
    with pytest.raises(UserError, match="beta must be non-negative"):
        UNDIAL(beta=-1.0)
    with pytest.raises(UserError, match="beta must be non-negative"):
        WGA(beta=-0.5)
    with pytest.raises(UserError, match="beta1 and beta2"):
        SatImp(beta2=-1.0)
    with pytest.raises(UserError, match="ignore_first_n_answer_tokens"):
        CEU(ignore_first_n_answer_tokens=-1)
    with pytest.raises(UserError, match="retain_loss_type"):
        WGA(retain_loss_type="embed_diff")
