"""Two CPU processes under ddp_spawn: sharded data, reproducible pairing, identical final weights."""

from __future__ import annotations

import functools

import lightning as L
import pytest
import torch

from lightning_unlearn.data.datamodule import UnlearningDataModule
from lightning_unlearn.data.tofu import load_split
from lightning_unlearn.data.tokenizer import load_tokenizer
from lightning_unlearn.evaluation import Evaluator
from lightning_unlearn.models import LoraSpec, load_model
from lightning_unlearn.objectives import CEU, NPO, UNDIAL, GradDiff, KLTeacher, MaxEntropy, SatImp


def _tokens(sub: dict, row: int) -> tuple[int, ...]:
    return tuple(sub["input_ids"][row][sub["attention_mask"][row].bool()].tolist())


class RecordRank(L.Callback):
    """Each rank saves the (forget, retain) pairs it trained on and its final weights."""

    def __init__(self, out_dir: str) -> None:
        self.out_dir, self.pairs = out_dir, []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        n = batch["forget"]["input_ids"].shape[0]
        self.pairs += [(_tokens(batch["forget"], i), _tokens(batch["retain"], i)) for i in range(n)]

    def on_train_end(self, trainer, pl_module) -> None:
        state = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
        torch.save({"pairs": self.pairs, "state": state}, f"{self.out_dir}/rank{trainer.global_rank}.pt")


def test_ddp_spawn_shards_pairs_reproducibly_and_ends_identical(
    tmp_path, tiny_spec, world_dir, tokenizer_dir
):
    dm = UnlearningDataModule(
        tokenizer=tokenizer_dir, source=str(world_dir), forget_split="forget10", retain_split="retain90",
        batch_size=2, max_length=64, seed=3,
    )  # fmt: skip
    objective = GradDiff(model=tiny_spec)
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=1, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[RecordRank(str(tmp_path))],
    )  # fmt: skip
    trainer.fit(objective, datamodule=dm)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))

    # The same pairing a single process draws for epoch 0.
    dm.setup("fit")
    data = dm.dataset
    expected = {
        (tuple(data[i]["forget"]["input_ids"]), tuple(data[i]["retain"][0]["input_ids"]))
        for i in range(len(data))
    }
    seen0, seen1 = set(rank0["pairs"]), set(rank1["pairs"])
    assert seen0 and seen1 and not ({f for f, _ in seen0} & {f for f, _ in seen1})
    assert seen0 | seen1 == expected

    for name, value in rank0["state"].items():
        torch.testing.assert_close(rank1["state"][name], value, rtol=0, atol=0)
    initial = load_model(tiny_spec).state_dict()  # init is seeded: the same start both ranks had
    assert any(not torch.equal(initial[n], v) for n, v in rank0["state"].items())


def test_ddp_spawn_validate_reports_the_mean_over_ranks(tiny_spec, world_dir, tokenizer_dir):
    dm = UnlearningDataModule(
        tokenizer=tokenizer_dir, source=str(world_dir), forget_split="forget10", retain_split="retain90",
        batch_size=5, max_length=64,
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    (metrics,) = trainer.validate(GradDiff(model=tiny_spec), datamodule=dm)

    # Each rank validates one batch of 5: the DistributedSampler's interleaved shard, in order. The
    # logged NLL is the global token mean: each rank's NLL sum over both ranks' token count.
    dm.setup("validate")
    model = load_model(tiny_spec).eval()
    collate = dm.val_dataloader().collate_fn
    per_rank, sums, counts = [], [], []
    for rank in (0, 1):
        forget = collate([dm.dataset[i] for i in range(rank, len(dm.dataset), 2)])["forget"]
        with torch.no_grad():
            loss = model(
                forget["input_ids"], attention_mask=forget["attention_mask"], labels=forget["labels"]
            ).loss
        tokens = int((forget["labels"][:, 1:] != -100).sum())
        per_rank.append(loss.item())
        sums.append(loss.item() * tokens)
        counts.append(tokens)
    assert counts[0] != counts[1]  # so a mean of per-rank token means would differ
    assert metrics["val/forget_nll"] == pytest.approx(sum(sums) / sum(counts), rel=1e-5)
    assert per_rank[0] != pytest.approx(per_rank[1], rel=1e-3)  # so rank 0 alone would be wrong


def test_ddp_spawn_npo_with_cached_reference_matches_one_process_on_the_global_batch(
    tiny_spec, world_dir, tokenizer_dir
):
    def data(batch_size: int) -> UnlearningDataModule:
        return UnlearningDataModule(
            tokenizer=tokenizer_dir, source=str(world_dir), forget_split="forget10", retain_split="retain90",
            batch_size=batch_size, max_length=64,
        )  # fmt: skip

    torch.manual_seed(0)
    npo = NPO(model=tiny_spec, adapter=LoraSpec(r=4, alpha=8), beta=0.5, retain_weight=0.0)
    npo.configure_model()
    with torch.no_grad():  # move the model away from its reference so the loss depends on the cache
        for name, p in npo.model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    # Each rank validates 5 of the 10 forget items (interleaved) but caches a contiguous half, so
    # every rank's loss needs log-probs the other rank computed.
    (metrics,) = trainer.validate(npo, datamodule=data(5))

    single = data(10)
    single.setup("validate")
    npo.reference_cache = {}
    npo.build_reference_cache(single)
    (batch,) = list(single.val_dataloader())
    with torch.no_grad():
        global_loss = npo.forget_loss(batch).item()
    assert global_loss != pytest.approx(2 / 0.5 * 0.6931471805599453, rel=1e-3)
    assert metrics["val/forget_loss"] == pytest.approx(global_loss, rel=1e-5)


class EvaluateOnValidationEnd(L.Callback):
    """Every rank runs the Evaluator (it shards the splits); rank 0 saves the gathered report."""

    def __init__(self, out: str, tokenizer_dir: str, splits: dict, retain_tr: list[float]) -> None:
        self.out, self.tokenizer_dir, self.splits, self.retain_tr = out, tokenizer_dir, splits, retain_tr

    def evaluator(self) -> Evaluator:
        return Evaluator(
            load_tokenizer(self.tokenizer_dir), self.splits, batch_size=1, max_new_tokens=6, max_length=64,
            retain_truth_ratios=self.retain_tr, retain_mia_auc=0.6, progress=False,
        )  # fmt: skip

    def on_validation_end(self, trainer, pl_module) -> None:
        report = self.evaluator().run(pl_module.model)
        if trainer.is_global_zero:
            torch.save(report.to_dict(), self.out)


def test_ddp_spawn_evaluation_equals_one_process(tmp_path, tiny_spec, world_dir, tokenizer_dir):
    splits = {
        "forget": load_split(world_dir, "forget10_perturbed"),  # 10 rows: 5 per rank
        "retain": load_split(world_dir, "retain_perturbed")[:7],  # 7 rows: 4 + 3, one padded
        "holdout": load_split(world_dir, "holdout10")[:5],
    }
    retain_tr = [0.5 + 0.1 * i for i in range(10)]
    callback = EvaluateOnValidationEnd(str(tmp_path / "report.pt"), tokenizer_dir, splits, retain_tr)
    dm = UnlearningDataModule(
        tokenizer=tokenizer_dir, source=str(world_dir), forget_split="forget10", retain_split="retain90",
        batch_size=5, max_length=64,
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[callback],
    )  # fmt: skip
    trainer.validate(GradDiff(model=tiny_spec), datamodule=dm)
    spawned = torch.load(tmp_path / "report.pt", weights_only=False)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each spawned process runs: the same float reduction order
    try:
        single = callback.evaluator().run(load_model(tiny_spec)).to_dict()
    finally:
        torch.set_num_threads(threads)
    assert spawned["per_sample"] == single["per_sample"]
    assert spawned["metrics"] == single["metrics"]
    assert spawned["generations"] == single["generations"]
    for name in ("forget_quality", "mia_min_k", "privleak", "retain_Q_A_ROUGE"):
        assert name in spawned["metrics"]


# Forget terms alone (no NLL), so each case tests only its own token-mean loss.
TOKEN_MEAN_OBJECTIVES = {
    "max_entropy_sequence": (MaxEntropy, dict(positions="sequence", forget_weight=1.0, retain_weight=0.0)),
    "kl_teacher": (KLTeacher, dict(nll_weight=0.0, lm_weight=0.0)),  # both terms are reference_kl
    "satimp": (SatImp, dict(beta1=1.0, beta2=1.0, forget_weight=1.0, retain_weight=0.0)),
    "undial": (UNDIAL, dict(beta=3.0)),
    "ce_u": (CEU, dict()),
}


def _token_mean_step(name: str, spec, devices: int, dm: UnlearningDataModule, out) -> dict:
    """The weights before and after one plain SGD step (lr 1, so the update is minus the averaged
    gradient; Adam would normalise a mis-scaled gradient away) on ``devices`` CPU processes."""
    cls, kwargs = TOKEN_MEAN_OBJECTIVES[name]
    objective = cls(model=spec, optimizer=functools.partial(torch.optim.SGD, lr=1.0), **kwargs)
    objective.configure_model()  # the reference (a frozen copy) is the seeded initialisation
    with torch.no_grad():  # move away from it, so the KL terms have a gradient
        gen = torch.Generator().manual_seed(1)
        for p in objective.model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    before = {k: v.detach().clone() for k, v in objective.model.state_dict().items()}
    out.mkdir()
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy="ddp_spawn" if devices > 1 else "auto", max_steps=1,
        logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[RecordRank(str(out))],
    )  # fmt: skip
    trainer.fit(objective, datamodule=dm)
    return {"before": before, **torch.load(out / "rank0.pt", weights_only=False)}


@pytest.mark.parametrize("name", list(TOKEN_MEAN_OBJECTIVES))
def test_ddp_spawn_token_mean_losses_step_like_one_process_on_the_global_batch(
    name, tmp_path, tiny_spec, world_dir, tokenizer_dir
):
    def data(batch_size: int) -> UnlearningDataModule:
        return UnlearningDataModule(
            tokenizer=tokenizer_dir, source=str(world_dir), forget_split="forget10", retain_split="retain90",
            batch_size=batch_size, max_length=64, seed=2,
        )  # fmt: skip

    # EpochShuffle deals the same global batch of 10 to 1 process, or as 5 + 5 to 2.
    single = _token_mean_step(name, tiny_spec, 1, data(10), tmp_path / "one")
    spawned = _token_mean_step(name, tiny_spec, 2, data(5), tmp_path / "two")
    shards = [torch.load(tmp_path / "two" / f"rank{r}.pt", weights_only=False)["pairs"] for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == sorted(single["pairs"])

    # Answer lengths fall unevenly across the ranks' shards, so per-rank token means would not do.
    dm = data(10)
    dm.setup("fit")
    labels = {tuple(item["input_ids"]): item["labels"] for item in dm.dataset.forget}
    answers = [sum(lab != -100 for f, _ in shard for lab in labels[f][1:]) for shard in shards]
    positions = [sum(len(f) - 1 for f, _ in shard) for shard in shards]
    assert answers[0] != answers[1] and positions[0] != positions[1]

    for state in (single, spawned):
        state["update"] = {k: state["state"][k] - state["before"][k] for k in state["before"]}
    scale = max(u.abs().max() for u in single["update"].values())
    assert scale > 1e-4  # the step moved the weights
    for key, update in single["update"].items():
        torch.testing.assert_close(spawned["update"][key], update, rtol=1e-5, atol=2e-5 * scale)
