"""Losses read logits only where they score: every objective's loss and gradients equal the
full-logits path, the output layer never sees a whole ``[B, T, D]`` batch in training, and forget
and retain sub-batches share one forward."""

from __future__ import annotations

import pytest
import torch
from helpers import build, first_batch

from lightning_unlearn.logits import DenseLogits, HeadLogits, pack_rows, shared_hidden
from lightning_unlearn.losses import kl_divergence, max_entropy_loss, nll_loss, undial_loss
from lightning_unlearn.models import LoraSpec
from lightning_unlearn.objectives import (
    CEU,
    NPO,
    RMU,
    UNDIAL,
    WGA,
    GradAscent,
    GradDiff,
    IdkAP,
    IdkDPO,
    IdkNLL,
    KLTeacher,
    MaxEntropy,
    SatImp,
    SimNPO,
)

pytestmark = pytest.mark.usefixtures("no_logging")

CHUNK = 3  # rows per output-layer chunk: several chunks per sub-batch

# (objective, arguments, decoder forwards per LoRA training step: one shared student forward plus
# one per sub-batch whose reference logits are read; None: not counted)
CASES = [
    (GradAscent, {}, 1),
    (GradDiff, {}, 1),
    (GradDiff, {"retain_loss_type": "kl"}, 2),
    (MaxEntropy, {}, 1),
    (MaxEntropy, {"positions": "sequence"}, 1),
    (NPO, {"reference": None}, 2),
    (NPO, {"reference": "cached"}, 1),
    (SimNPO, {}, 1),
    (KLTeacher, {}, 3),
    (RMU, {"layer": 0, "retain_loss_type": "nll"}, None),  # its forget term reads a layer through a hook
    (UNDIAL, {"retain_weight": 1.0}, 2),
    (WGA, {}, 1),
    (SatImp, {}, 1),
    (CEU, {"retain_weight": 1.0}, 1),
    (IdkNLL, {}, 1),
    (IdkAP, {}, 1),
    (IdkDPO, {"reference": None}, 3),
    (IdkDPO, {"reference": "cached"}, 1),
]
IDS = [f"{cls.__name__}-{'-'.join(map(str, kwargs.values())) or 'default'}" for cls, kwargs, _ in CASES]


def _objective(cls, spec, kwargs, lora: bool, scored: bool, data):
    kwargs = dict(kwargs)
    if kwargs.get("reference") != "cached":
        kwargs["reference"] = "adapter_off" if lora else "copy"
    objective = build(cls, spec, adapter=LoraSpec(r=4, alpha=8) if lora else None, **kwargs)
    objective.scored_logits, objective.logit_chunk_rows = scored, CHUNK
    # Move every trained weight off its initialisation (a LoRA's B starts at 0) by the same draw, so
    # the model differs from its reference and every gradient is non-trivial.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, p in sorted(objective.named_parameters()):
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=generator))
    if objective.reference_policy == "cached":
        objective.build_reference_cache(data)
    return objective


def _loss_and_grads(objective, batch):
    objective.model.zero_grad()
    loss = objective.training_step(batch, 0)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
@pytest.mark.parametrize(("cls", "kwargs", "forwards"), CASES, ids=IDS)
def test_scored_logits_equal_the_full_logits_path(cls, kwargs, forwards, lora, tiny_spec, idk_data):
    """Loss and every gradient of one training step, scored-and-chunked against full logits with
    separate forwards (the path before scored logits): equal to 1e-6 in float32."""
    if kwargs.get("reference") == "cached" and not lora:
        pytest.skip("the cached reference is tested with a LoRA; full fine-tuning is the same cache")
    batch = first_batch(idk_data)
    dense = _objective(cls, tiny_spec, kwargs, lora, scored=False, data=idk_data)
    scored = _objective(cls, tiny_spec, kwargs, lora, scored=True, data=idk_data)
    want_loss, want = _loss_and_grads(dense, batch)
    got_loss, got = _loss_and_grads(scored, batch)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-6, atol=1e-6)
    assert got.keys() == want.keys() and want
    assert any(g.abs().max() > 0 for g in want.values())
    for name, grad in want.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-6, atol=1e-6 * grad.abs().max().item() + 1e-9)


@pytest.mark.parametrize(("cls", "kwargs", "forwards"), CASES, ids=IDS)
def test_output_layer_never_sees_a_whole_batch_in_training(cls, kwargs, forwards, tiny_spec, idk_data):
    """Every call of the output layer during a training step (forward, reference, backward's
    recomputation) gets at most CHUNK gathered rows, never the ``[B, T, D]`` hidden states: full
    logits are never built. Forget and retain share one decoder forward where both are trained."""
    batch = first_batch(idk_data)
    objective = _objective(cls, tiny_spec, kwargs, lora=True, scored=True, data=idk_data)
    base = objective.model.get_base_model()
    shapes, decoder_calls = [], []
    base.lm_head.register_forward_hook(lambda m, args, out: shapes.append(tuple(args[0].shape)))
    base.model.register_forward_hook(lambda m, args, out: decoder_calls.append(1))
    objective.training_step(batch, 0).backward()
    assert shapes and all(len(s) == 2 and s[0] <= CHUNK for s in shapes), shapes
    if forwards is not None:
        assert len(decoder_calls) == forwards


def test_head_logits_values_and_gradients_equal_dense_with_softcap():
    """HeadLogits on random hidden states (chunks of 2 rows, soft-capping on) against the dense
    computation, for a loss with a teacher and one with a label argument, values and gradients."""
    torch.manual_seed(0)
    hidden = torch.randn(3, 5, 4, requires_grad=True)
    head = torch.nn.Linear(4, 7, bias=False)
    teacher_hidden = torch.randn(3, 5, 4)
    labels = torch.randint(0, 7, (3, 5))
    labels[0, :2] = -100
    labels[2, :] = -100
    mask = labels[:, 1:] != -100
    positions = torch.nn.functional.pad(mask, (0, 1), value=False)

    def capped(h):
        return torch.tanh(head(h) / 3.0) * 3.0

    def losses(student, teacher):
        return (
            nll_loss(student, labels)
            + max_entropy_loss(student, labels)
            + kl_divergence(student, teacher, positions)
            + undial_loss(student, teacher, labels, beta=2.0)
        )

    dense = losses(DenseLogits(capped(hidden)), DenseLogits(capped(teacher_hidden)))
    want = torch.autograd.grad(dense, [hidden, head.weight])
    lazy = losses(
        HeadLogits(hidden, head, 3.0, chunk_rows=2), HeadLogits(teacher_hidden, head, 3.0, chunk_rows=2)
    )
    got = torch.autograd.grad(lazy, [hidden, head.weight])
    torch.testing.assert_close(lazy, dense)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
    # the last row scores nothing: its hidden states get no gradient
    assert got[0][2].abs().max() == 0 and want[0][2].abs().max() == 0


def test_shared_hidden_equals_separate_forwards(tiny_spec, idk_data):
    """One decoder forward over forget + retain (padded to the longer) gives each sub-batch's
    hidden states at its real positions as its own forward does."""
    objective = build(GradDiff, tiny_spec)
    batch = first_batch(idk_data)
    subs = [batch["forget"], batch["retain"], batch["retain_idk"]]
    assert len({s["input_ids"].shape[1] for s in subs}) > 1  # the padding is exercised
    decoder = objective.model.model
    together = shared_hidden(objective.model, subs)
    for sub, hidden in zip(subs, together, strict=True):
        alone = decoder(input_ids=sub["input_ids"], attention_mask=sub["attention_mask"]).last_hidden_state
        real = sub["attention_mask"].bool()
        torch.testing.assert_close(hidden[real], alone[real], rtol=1e-5, atol=1e-6)


def test_pack_rows_fills_rows_no_wider_than_the_longest_sequence():
    lengths = [83, 20, 57, 60, 30, 5, 83, 26]
    rows = pack_rows(lengths)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 83 for row in rows)
    # first-fit decreasing: 83 | 83 | 60+20 | 57+26 | 30+5 -> 5 rows instead of 8
    assert [sorted(lengths[i] for i in row) for row in rows] == [[83], [83], [20, 60], [26, 57], [5, 30]]
