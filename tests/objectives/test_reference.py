"""Reference policies: ``cached`` gives exactly the loss ``copy`` and ``adapter_off`` give, and keeps
giving the pre-unlearning values after the weights move."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from helpers import sgd_step

from lightning_unlearn.errors import UserError
from lightning_unlearn.losses import sequence_logprob
from lightning_unlearn.models import LoraSpec, load_model
from lightning_unlearn.objectives import NPO, GradDiff

pytestmark = pytest.mark.usefixtures("no_logging")


def _npo(spec, **kwargs) -> NPO:
    torch.manual_seed(0)  # the same LoRA initialisation for every policy
    npo = NPO(model=spec, beta=0.5, retain_weight=0.0, **kwargs)
    npo.configure_model()
    return npo


@pytest.mark.parametrize("adapter", [None, LoraSpec(r=4, alpha=8)], ids=["full", "lora"])
def test_cached_reference_equals_the_exact_reference_after_updates(tiny_spec, unlearning_data, adapter):
    exact_policy = "copy" if adapter is None else "adapter_off"
    exact, cached = _npo(tiny_spec, adapter=adapter, reference=exact_policy), _npo(tiny_spec, adapter=adapter)
    assert cached.reference_policy == "cached" and cached.reference_model is None
    cached.build_reference_cache(unlearning_data)
    # The cache holds every forget item's log-prob under the starting model, scored one by one.
    forget = unlearning_data.dataset.forget
    with torch.no_grad():
        for i in (0, len(forget) - 1):
            one = {k: torch.tensor([forget[i][k]]) for k in ("input_ids", "labels")}
            one["attention_mask"] = torch.ones_like(one["input_ids"])
            want = sequence_logprob(exact(one), one["labels"])
            torch.testing.assert_close(cached.reference_cache["forget"][i : i + 1], want)
    batches = list(unlearning_data.train_dataloader())
    for batch in batches[:3]:  # identical losses, hence identical updates, step after step
        torch.testing.assert_close(cached.training_step(batch, 0), exact.training_step(batch, 0))
        sgd_step(exact, batch)
        sgd_step(cached, batch)
    batch = batches[0]
    assert cached.training_step(batch, 0).item() != pytest.approx(2 / 0.5 * 0.6931471805599453, rel=1e-4)
    torch.testing.assert_close(cached.training_step(batch, 0), exact.training_step(batch, 0))
    torch.testing.assert_close(
        cached.reference_logprob("forget", batch["forget"]),
        exact.reference_logprob("forget", batch["forget"]),
    )


def test_default_policy_is_the_cheapest_exact_one(tiny_spec):
    lora = LoraSpec(r=4, alpha=8)
    assert NPO(model=tiny_spec).reference_policy == "cached"
    assert NPO(model=tiny_spec, adapter=lora).reference_policy == "cached"
    assert GradDiff(model=tiny_spec, adapter=lora, retain_loss_type="kl").reference_policy == "adapter_off"
    assert GradDiff(model=tiny_spec, retain_loss_type="kl").reference_policy == "copy"
    with pytest.raises(UserError, match="'cached' only applies.*GradDiff"):
        GradDiff(model=tiny_spec, retain_loss_type="kl", reference="cached")


def test_cache_survives_a_checkpoint(tiny_spec, unlearning_data):
    npo = _npo(tiny_spec)
    npo.build_reference_cache(unlearning_data)
    checkpoint: dict = {"state_dict": npo.state_dict()}
    npo.on_save_checkpoint(checkpoint)
    # Only what training changes is kept (the frozen copy the reference would need is rebuilt).
    assert set(checkpoint["state_dict"]) == {n for n, p in npo.named_parameters() if p.requires_grad}
    resumed = _npo(tiny_spec)
    resumed.on_load_checkpoint(checkpoint)
    torch.testing.assert_close(
        resumed.reference_cache["forget"], npo.reference_cache["forget"], rtol=0, atol=0
    )
    with pytest.raises(RuntimeError, match="no cached reference"):
        _npo(tiny_spec).reference_logprob("forget", next(iter(unlearning_data.train_dataloader()))["forget"])


def test_fit_builds_the_cache_over_several_batches_under_autocast(tiny_spec, unlearning_data):
    expected = _npo(tiny_spec)
    expected.build_reference_cache(unlearning_data)
    npo = _npo(tiny_spec)
    trainer = L.Trainer(
        accelerator="cpu", precision="bf16-mixed", max_steps=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(npo, datamodule=unlearning_data)  # batch 4, 10 forget items: three cache batches
    # bf16 autocast scores like the training step does: close to, not equal to, the float32 cache.
    cache = npo.reference_cache["forget"]
    assert cache.shape == expected.reference_cache["forget"].shape and not torch.equal(
        cache, expected.reference_cache["forget"]
    )
    torch.testing.assert_close(cache, expected.reference_cache["forget"], rtol=2e-2, atol=0.5)


def _hand_logprob(model: torch.nn.Module, sub: dict) -> torch.Tensor:
    """sum_t log softmax(logits_t)[labels_{t+1}] over label tokens, from the dense forward."""
    with torch.no_grad():
        logits = model(input_ids=sub["input_ids"], attention_mask=sub["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = sub["labels"][:, 1:]
    picked = logp.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (picked * (targets != -100)).sum(-1)


@pytest.mark.parametrize(
    ("policy", "adapter"),
    [
        ("copy", None),
        ("cached", None),
        ("adapter_off", LoraSpec(r=4, alpha=8)),
        ("cached", LoraSpec(r=4, alpha=8)),
    ],
    ids=["copy", "cached_full", "adapter_off", "cached_lora"],
)
def test_each_reference_object_scores_the_target_as_it_was(tiny_spec, unlearning_data, policy, adapter):
    """After the weights have moved, every policy's sequence log-probs are still those of a dense
    forward of the starting model (built here from the same seed), and no longer the live model's."""
    npo = _npo(tiny_spec, adapter=adapter, reference=policy)
    torch.manual_seed(0)
    target = load_model(tiny_spec).eval()
    if policy == "cached":
        npo.build_reference_cache(unlearning_data)
    batches = list(unlearning_data.train_dataloader())
    for batch in batches[:2]:
        sgd_step(npo, batch)
    forget = batches[0]["forget"]
    want = _hand_logprob(target, forget)
    torch.testing.assert_close(npo.reference_logprob("forget", forget), want, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(_hand_logprob(npo.model, forget), want, rtol=1e-3, atol=1e-2), (
        "weights must move"
    )
