"""Attacks on an unlearned model: quantization round trips against a hand computation, relearning
against its own definition (a copy, fewer NLL on what it trained on, reproducible)."""

from __future__ import annotations

import pytest
import torch

from lightning_unlearn.attacks import quantized_copy, relearned_copy, round_trip, split_for_relearning
from lightning_unlearn.data.collate import pad_batch
from lightning_unlearn.data.formatting import PromptFormat, encode
from lightning_unlearn.data.tofu import load_split
from lightning_unlearn.errors import UserError
from lightning_unlearn.models import load_model, load_spec_tokenizer


def test_round_trip_equals_the_hand_computed_levels():
    # 4 bits: levels -8..7 times max|w| / 7 per group; groups of 2 here, so each pair has its own scale.
    w = torch.tensor([[0.70, -0.20, 0.013, 0.004], [-1.40, 0.33, 0.0, 0.0]])
    got = round_trip(w, bits=4, group_size=2)
    want = torch.tensor(
        [
            [0.70, -2 * 0.1],  # scale 0.7/7 = 0.1: -0.2 -> -2 levels
            [0.013, 0.013 / 7 * 2],  # scale 0.013/7: 0.004 / (0.013/7) = 2.15 -> 2 levels
            [-1.40, 0.2 * 2],  # scale 0.2: 0.33 -> 1.65 -> 2 levels
            [0.0, 0.0],  # an all-zero group stays zero (its scale is clamped, not 0/0)
        ]
    ).reshape(2, 4)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    # one scale per row: 0.013 and 0.004 fall below half a step of 0.7/7 and vanish
    torch.testing.assert_close(
        round_trip(w, bits=4)[0], torch.tensor([0.70, -0.20, 0.0, 0.0]), rtol=1e-6, atol=1e-7
    )
    with pytest.raises(UserError, match="does not divide"):
        round_trip(w, bits=4, group_size=3)


def test_quantized_copy_rounds_every_linear_but_the_output_layer_and_leaves_the_model(tiny_spec):
    torch.manual_seed(0)
    model = load_model(tiny_spec)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    attacked = quantized_copy(model, bits=4, group_size=16)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    output = attacked.get_output_embeddings()
    changed = 0
    for name, module in attacked.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        original = model.get_submodule(name).weight
        if module is output:
            assert torch.equal(module.weight, original)
            continue
        groups, quantized = original.reshape(-1, 16), module.weight.reshape(-1, 16)
        step = groups.abs().amax(dim=1, keepdim=True) / 7
        levels = quantized / step
        # integer multiples of the group's step within the 4-bit range, each weight within half a step
        torch.testing.assert_close(levels, levels.round(), rtol=0, atol=1e-4)
        assert levels.round().min() >= -8 and levels.round().max() <= 7
        assert ((quantized - groups).abs() <= step / 2 + 1e-7).all()
        changed += int(not torch.equal(module.weight, original))
    assert changed > 0


def test_relearned_copy_lowers_the_nll_it_trains_on_reproducibly(tiny_spec, world_dir, tokenizer_dir):
    torch.manual_seed(0)
    model = load_model(tiny_spec).eval()
    tokenizer = load_spec_tokenizer(tiny_spec)
    records = load_split(world_dir, "forget10")[:6]
    fmt = PromptFormat()
    train, held_out = split_for_relearning(records)
    assert (len(train), len(held_out)) == (3, 3) and train + held_out == records
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def nll(m) -> float:
        batch = pad_batch(
            [encode(r["question"], r["answer"], tokenizer, fmt, 64) for r in train], tokenizer.pad_token_id
        )
        with torch.no_grad():
            return m(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
            ).loss.item()

    first = relearned_copy(model, train, tokenizer, fmt, steps=5, lr=1e-2, batch_size=2, max_length=64)
    again = relearned_copy(model, train, tokenizer, fmt, steps=5, lr=1e-2, batch_size=2, max_length=64)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in first.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    assert nll(first) < nll(model) - 0.1
    with pytest.raises(UserError, match="at least 2"):
        split_for_relearning(records[:1])


def test_protocol_attack_columns_equal_attacking_the_saved_models_directly(tmp_path):
    """``evaluation.attacks`` in the protocol: each model's ``quant4_*`` / ``relearn_*`` columns equal
    an Evaluator run on ``quantized_copy`` / ``relearned_copy`` of that saved model, the relearned
    copy measured on the forget rows it did not train on against the retain model's truth ratios of
    those rows; 8 bits barely move anything."""
    from test_protocol import _adamw, _protocol

    from lightning_unlearn.attacks import RelearnSettings
    from lightning_unlearn.evaluation import Evaluator
    from lightning_unlearn.models import ModelSpec
    from lightning_unlearn.objectives import GradAscent
    from lightning_unlearn.protocol import EvalSettings, Stage

    relearn = RelearnSettings(steps=3, lr=1e-3, batch_size=4)
    protocol = _protocol(
        tmp_path,
        objectives={"ga": Stage(objective=GradAscent(optimizer=_adamw(1e-3)), max_epochs=2, batch_size=4)},
        evaluation=EvalSettings(
            batch_size=32, max_new_tokens=8, attacks=["quant8", "quant4", "relearn"], relearn=relearn
        ),
    )
    reports = protocol.run()
    forget = protocol.eval_splits["forget"]
    train, held_out = split_for_relearning(forget, relearn.fraction)
    fmt, length = protocol.data.prompt_format, protocol.data.max_length
    for name in ("retain", "ga"):
        spec = ModelSpec(path=str(tmp_path / "runs" / "mini" / "models" / name))
        model, tokenizer = load_model(spec), load_spec_tokenizer(spec)
        metrics = reports[name].metrics

        def direct(m, records, reference, tokenizer=tokenizer):
            return Evaluator(tokenizer, {"forget": records}, fmt, batch_size=32, max_new_tokens=8,
                             retain_truth_ratios=reference, max_length=length).run(m).metrics  # fmt: skip

        quant = direct(quantized_copy(model, 4, 64), forget, protocol.retain_tr)
        relearned = relearned_copy(model, train, tokenizer, fmt, 3, 1e-3, 4, length, protocol.seed)
        again = direct(relearned, held_out, protocol.retain_tr[len(train) :])
        for key in ("forget_Q_A_Prob", "forget_quality", "forget_truth_ratio"):
            assert metrics[f"quant4_{key}"] == pytest.approx(quant[key], rel=1e-5), (name, key)
            assert metrics[f"relearn_{key}"] == pytest.approx(again[key], rel=1e-5), (name, key)
        assert metrics["quant8_forget_Q_A_Prob"] == pytest.approx(metrics["forget_Q_A_Prob"], rel=0.05)
    header = (tmp_path / "runs" / "mini" / "report.md").read_text().splitlines()[0]
    assert "| relearn_forget_quality |" in header and "| quant4_forget_Q_A_Prob |" in header
