"""Objectives: each training_step against an independent computation, and its direction of travel."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
from conftest import TINY_LLAMA
from helpers import build, first_batch, hf_nll, sgd_step
from transformers import PreTrainedModel

from lightning_unlearn.errors import UserError
from lightning_unlearn.losses import max_entropy_loss
from lightning_unlearn.models import LoraSpec, ModelSpec
from lightning_unlearn.objectives import FineTune, GradAscent, GradDiff, MaxEntropy

pytestmark = pytest.mark.usefixtures("no_logging")


def test_grad_diff_loss_is_minus_forget_nll_plus_alpha_retain_nll(tiny_spec, unlearning_data):
    torch.manual_seed(0)
    batch = first_batch(unlearning_data)
    gd = build(GradDiff, tiny_spec, forget_weight=1.5, retain_weight=0.7)
    expected = -1.5 * hf_nll(gd.model, batch["forget"]) + 0.7 * hf_nll(gd.model, batch["retain"])
    torch.testing.assert_close(gd.training_step(batch, 0), expected)
    ga = build(GradAscent, tiny_spec)
    torch.testing.assert_close(ga.training_step(batch, 0), -hf_nll(ga.model, batch["forget"]))


def test_grad_ascent_step_raises_forget_nll(tiny_spec, unlearning_data):
    batch = first_batch(unlearning_data)
    ga = build(GradAscent, tiny_spec)
    before = hf_nll(ga.model, batch["forget"]).item()
    sgd_step(ga, batch)
    assert hf_nll(ga.model, batch["forget"]).item() > before + 1e-3


def test_grad_diff_step_lowers_loss_and_raises_forget_nll(tiny_spec, unlearning_data):
    batch = first_batch(unlearning_data)
    gd = build(GradDiff, tiny_spec)
    before_forget = hf_nll(gd.model, batch["forget"]).item()
    before = gd.training_step(batch, 0).item()
    sgd_step(gd, batch, lr=0.1)
    assert gd.training_step(batch, 0).item() < before
    assert hf_nll(gd.model, batch["forget"]).item() > before_forget


def test_max_entropy_step_moves_forget_towards_uniform(tiny_spec, unlearning_data):
    batch = first_batch(unlearning_data)
    # Make the starting model confident (far from uniform) so the direction is unambiguous.
    me = build(MaxEntropy, tiny_spec, forget_weight=1.0, retain_weight=0.0)
    with torch.no_grad():
        me.model.lm_head.weight.mul_(50)
    forget = batch["forget"]

    def kl_to_uniform():
        return max_entropy_loss(me(forget), forget["labels"]).item()

    before = kl_to_uniform()
    torch.testing.assert_close(me.training_step(batch, 0).item(), before, rtol=1e-5, atol=1e-6)
    sgd_step(me, batch, lr=1e-3)
    assert kl_to_uniform() < before


def test_finetune_step_lowers_nll(tiny_spec, world_dir, tokenizer_dir):
    from lightning_unlearn.data.datamodule import FineTuneDataModule

    dm = FineTuneDataModule(
        tokenizer=tokenizer_dir, source=str(world_dir), split="full", batch_size=8, max_length=64
    )
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    ft = build(FineTune, tiny_spec)
    before = ft.training_step(batch, 0).item()
    torch.testing.assert_close(ft.training_step(batch, 0), hf_nll(ft.model, batch))
    sgd_step(ft, batch, lr=1.0)
    assert ft.training_step(batch, 0).item() < before


@pytest.mark.parametrize("policy", ["adapter_off", "copy"])
def test_reference_is_the_model_before_unlearning(tiny_spec, unlearning_data, policy):
    batch = first_batch(unlearning_data)
    adapter = LoraSpec(r=4, alpha=8) if policy == "adapter_off" else None
    gd = build(GradDiff, tiny_spec, adapter=adapter, reference=policy, retain_loss_type="kl")
    original = copy.deepcopy(gd.model if adapter is None else gd.model.get_base_model())
    retain = batch["retain"]
    # KL to the reference is zero before any update...
    assert gd.retain_loss(batch).item() == pytest.approx(0.0, abs=1e-6)
    for _ in range(2):
        sgd_step(gd, batch, lr=0.5)
    # ...and afterwards the reference still returns the original model's logits, not the current ones.
    with torch.no_grad():
        want = original(input_ids=retain["input_ids"], attention_mask=retain["attention_mask"]).logits
    real = retain["attention_mask"].bool()  # padding is packed away: no loss reads it
    torch.testing.assert_close(gd.reference_logits(retain).dense()[real], want[real])
    assert not torch.allclose(gd(retain), want, atol=1e-4)
    assert gd.retain_loss(batch).item() > 1e-6


def test_lora_trains_only_the_adapter_and_export_merges_exactly(tiny_spec, unlearning_data, tmp_path):
    from transformers import AutoModelForCausalLM

    batch = first_batch(unlearning_data)
    ga = build(GradAscent, tiny_spec, adapter=LoraSpec(r=4, alpha=8))
    trainable = [n for n, p in ga.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    sgd_step(ga, batch, lr=0.5)
    merged = AutoModelForCausalLM.from_pretrained(ga.export(tmp_path / "merged"))
    forget = batch["forget"]
    with torch.no_grad():
        torch.testing.assert_close(
            merged(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"]).logits,
            ga(forget),
            rtol=1e-4,
            atol=1e-5,
        )


def test_bad_objective_settings_are_user_errors(tiny_spec):
    with pytest.raises(UserError, match="adapter_off.*needs an adapter"):
        GradDiff(model=tiny_spec, reference="adapter_off")
    with pytest.raises(UserError, match="reference must be one of"):
        GradDiff(model=tiny_spec, reference="frozen")
    with pytest.raises(UserError, match="retain_loss_type"):
        GradDiff(model=tiny_spec, retain_loss_type="mse")
    with pytest.raises(UserError, match="positions"):
        MaxEntropy(model=tiny_spec, positions="all")
    with pytest.raises(UserError, match="lr_schedule must be one of.*cosine"):
        GradDiff(model=tiny_spec, lr_schedule="cosin")
    with pytest.raises(UserError, match="r must be at least 1"):
        LoraSpec(r=0)
    with pytest.raises(UserError, match="either 'path'"):
        ModelSpec()


def test_validate_logs_plain_nll_of_each_sub_batch(tiny_spec, world_dir, tokenizer_dir, monkeypatch):
    from lightning_unlearn.data.datamodule import UnlearningDataModule

    monkeypatch.undo()  # real logging for this test
    dm = UnlearningDataModule(tokenizer=tokenizer_dir, source=str(world_dir), forget_split="forget10",
                              retain_split="retain90", max_length=64, batch_size=64)  # fmt: skip
    gd = GradDiff(model=tiny_spec)
    trainer = L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False
    )
    (metrics,) = trainer.validate(gd, datamodule=dm)
    batch = next(iter(dm.val_dataloader()))  # one batch holds the whole forget split
    forget_nll = hf_nll(gd.model, batch["forget"]).item()
    assert metrics["val/forget_nll"] == pytest.approx(forget_nll, rel=1e-5)
    assert metrics["val/forget_loss"] == pytest.approx(-forget_nll, rel=1e-5)
    # The two terms nearly cancel: compare absolutely, at float32 resolution of the terms.
    assert metrics["val/loss"] == pytest.approx(-forget_nll + metrics["val/retain_nll"], abs=1e-5)


def test_npo_loss_against_reference_and_direction(tiny_spec, unlearning_data):
    import math

    from lightning_unlearn.objectives import NPO

    batch = first_batch(unlearning_data)
    npo = build(
        NPO, tiny_spec, adapter=LoraSpec(r=4, alpha=8), beta=0.5, retain_weight=0.0, reference="adapter_off"
    )
    # Before any update the model is its own reference: -(2/beta) ln(1/2) exactly.
    assert npo.training_step(batch, 0).item() == pytest.approx(2 / 0.5 * math.log(2), rel=1e-5)
    before = hf_nll(npo.model, batch["forget"]).item()
    for _ in range(3):
        sgd_step(npo, batch, lr=0.5)
    assert hf_nll(npo.model, batch["forget"]).item() > before
    assert npo.training_step(batch, 0).item() < 2 / 0.5 * math.log(2)


def test_simnpo_loss_from_hf_per_sequence_nll(tiny_spec, unlearning_data):
    import torch.nn.functional as F

    from lightning_unlearn.objectives import SimNPO

    batch = first_batch(unlearning_data)
    sim = build(SimNPO, tiny_spec, beta=2.0, delta=0.5, retain_weight=0.0)
    forget = batch["forget"]
    per_seq = torch.stack(
        [
            hf_nll(
                sim.model,
                {
                    k: forget[k][i : i + 1, : int(forget["attention_mask"][i].sum())]
                    for k in ("input_ids", "attention_mask", "labels")
                },
            )
            for i in range(forget["input_ids"].shape[0])
        ]
    )
    expected = 0.125 * -(2 / 2.0) * F.logsigmoid(2.0 * (per_seq - 0.5)).mean()
    torch.testing.assert_close(sim.training_step(batch, 0), expected, rtol=1e-5, atol=1e-6)
    # Direction: with delta near the current NLL the sigmoid is not saturated (at NLL ~ ln V and
    # delta 0 SimNPO's gradient vanishes, by design), and a step raises the forget NLL.
    sim = build(SimNPO, tiny_spec, beta=0.5, delta=5.0, forget_weight=1.0, retain_weight=0.0)
    before = hf_nll(sim.model, forget).item()
    sgd_step(sim, batch, lr=2.0)
    assert hf_nll(sim.model, forget).item() > before + 1e-3


@pytest.mark.parametrize("api", ["activation_checkpointing_enable", "gradient_checkpointing_enable"])
def test_activation_checkpointing_recomputes_layers_and_keeps_the_gradients(
    tiny_spec, unlearning_data, monkeypatch, api
):
    """With checkpointing every decoder layer's body runs twice per step (forward, again in backward)
    and the LoRA gradients equal the plain step's: recomputation changes memory, not numbers. Also
    under a transformers release that has only the old method name (5.17, the GPU image's, raised
    AttributeError here before)."""
    if api == "gradient_checkpointing_enable" and hasattr(
        PreTrainedModel, api.replace("gradient", "activation")
    ):
        # a release with only the old name: its method under the old name and keyword
        enable = PreTrainedModel.activation_checkpointing_enable

        def old_enable(self, gradient_checkpointing_kwargs=None):
            enable(self, activation_checkpointing_kwargs=gradient_checkpointing_kwargs)

        monkeypatch.setattr(PreTrainedModel, "gradient_checkpointing_enable", old_enable)
        monkeypatch.delattr(PreTrainedModel, "activation_checkpointing_enable")
    batch = first_batch(unlearning_data)
    grads, calls = {}, {}
    for checkpointing in (False, True):
        gd = build(
            GradDiff, tiny_spec, adapter=LoraSpec(r=4, alpha=8), activation_checkpointing=checkpointing
        )
        gd.model.train()
        count, mlp = [], gd.model.get_base_model().model.layers[0].mlp
        mlp.forward = lambda *a, _f=mlp.forward, _n=count, **kw: _n.append(1) or _f(*a, **kw)
        gd.training_step(batch, 0).backward()
        grads[checkpointing] = {n: p.grad.clone() for n, p in gd.named_parameters() if p.requires_grad}
        calls[checkpointing] = len(count)
    # forget and retain sub-batches share one forward, recomputed once more when checkpointing
    assert calls == {False: 1, True: 2}
    assert grads[True].keys() == grads[False].keys() and grads[False]
    for name, grad in grads[False].items():
        assert "lora_A" in name or grad.abs().max() > 0  # A's gradient is 0 while B is at its init 0
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-6, atol=1e-8)


def test_the_trained_model_is_in_train_mode_so_dropout_runs(tmp_path, tokenizer_dir, unlearning_data):
    """A model from from_pretrained is in eval mode and Lightning keeps each submodule's mode: the
    objective puts it in train mode, so a LoRA's dropout changes the loss between two identical
    forwards (and eval mode, as the Evaluator sets, makes them equal again)."""
    batch = first_batch(unlearning_data)
    from lightning_unlearn.models import load_model

    load_model(ModelSpec(config=dict(TINY_LLAMA), tokenizer=tokenizer_dir)).save_pretrained(tmp_path)
    spec = ModelSpec(path=str(tmp_path), tokenizer=tokenizer_dir)  # from_pretrained: eval mode
    ga = build(GradAscent, spec, adapter=LoraSpec(r=4, alpha=8, dropout=0.5))
    assert ga.model.training and all(m.training for m in ga.model.modules())
    with torch.no_grad():
        for name, weight in ga.model.named_parameters():  # B starts at 0: the LoRA path would add 0
            if "lora_B" in name:
                weight.normal_()
        assert not torch.equal(ga.training_step(batch, 0), ga.training_step(batch, 0))
        ga.model.eval()
        torch.testing.assert_close(ga.training_step(batch, 0), ga.training_step(batch, 0), rtol=0, atol=0)


class _LearningRates(L.Callback):
    """The learning rate each optimiser step runs at."""

    def __init__(self) -> None:
        self.rates: list[float] = []

    def on_train_batch_start(self, trainer, *args) -> None:
        self.rates.append(trainer.optimizers[0].param_groups[0]["lr"])


def _rates(spec, datamodule, max_steps: int, **schedule) -> list[float]:
    lr = _LearningRates()
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, callbacks=[lr], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    optimizer = lambda params: torch.optim.SGD(params, lr=0.1)  # noqa: E731
    trainer.fit(GradDiff(model=spec, optimizer=optimizer, **schedule), datamodule=datamodule)
    return lr.rates


def test_warmup_steps_make_a_shorter_run_the_start_of_the_longer_one(tiny_spec, unlearning_data):
    """transformers' constant_with_warmup: lr * step / warmup, then lr. With ``warmup_steps`` a
    run stopped at step 3 (a recipe's ``trainer.max_steps``) is the first 3 steps of a 6-step run;
    with ``warmup_ratio`` the warm-up is a share of each run's own length, so it is not."""
    steps = {"lr_schedule": "constant_with_warmup", "warmup_steps": 2}
    assert _rates(tiny_spec, unlearning_data, 6, **steps) == pytest.approx([0.0, 0.05, 0.1, 0.1, 0.1, 0.1])
    assert _rates(tiny_spec, unlearning_data, 3, **steps) == pytest.approx([0.0, 0.05, 0.1])
    ratio = {"lr_schedule": "constant_with_warmup", "warmup_ratio": 0.5}
    assert _rates(tiny_spec, unlearning_data, 6, **ratio)[:3] == pytest.approx([0.0, 1 / 30, 2 / 30])
    assert _rates(tiny_spec, unlearning_data, 3, **ratio) == pytest.approx([0.0, 0.1, 0.1])


def test_a_warmup_needs_a_schedule_that_has_one(tiny_spec):
    """transformers' ``constant`` schedule ignores the warm-up: asking for one there is an error,
    not a run without it."""
    with pytest.raises(UserError, match="'constant' has no warm-up; use 'constant_with_warmup'"):
        GradDiff(model=tiny_spec, warmup_ratio=0.1)
    with pytest.raises(UserError, match="'constant' has no warm-up"):
        GradDiff(model=tiny_spec, warmup_steps=3)
    with pytest.raises(UserError, match="not both"):
        GradDiff(model=tiny_spec, lr_schedule="linear", warmup_ratio=0.1, warmup_steps=3)
    with pytest.raises(UserError, match="warmup_steps must not be negative"):
        GradDiff(model=tiny_spec, lr_schedule="linear", warmup_steps=-1)
