"""Every path as a real command (``lightning-unlearn fit --config``) under 2 CPU processes with gloo,
compared to the same command in 1 process on the same global batches: ``ddp`` and
``ModelParallelStrategy`` with FSDP2 ``fully_shard`` (frozen base and LoRA sharded). Both
strategies re-run argv, so each run is a subprocess. ``make test-distributed`` runs this file.

Tolerance: max |got - want| <= 1e-5 x max |want| per tensor (adapter weights, Grams, fused
updates: 1e-4, as RegMean's solve with the Gram amplifies the rest), 1e-5 relative on metrics. The 2-process runs sum the same numbers in a different order
(gloo all-reduce, sharded matmuls), so bit equality is not expected; we measure 1e-7 to 3e-7,
and a wrong gather, a per-rank token mean, a missed all-reduce or a different data order give
1e-3 and up (Lightning's own sampler wrapper reshuffling our order gave 30x the tensor's scale).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_LLAMA
from helpers import forget10_data
from safetensors.torch import load_file

from lightning_unlearn.adapters import load_factors, load_grams
from lightning_unlearn.data.tofu import load_split

TESTS = Path(__file__).resolve().parents[1]
TOL = 1e-5


def _close(got: torch.Tensor, want: torch.Tensor, tol: float = TOL) -> None:
    """``got`` equals ``want`` up to ``tol`` times ``want``'s scale (the largest magnitude in it)."""
    assert got.shape == want.shape
    error = (got - want).abs().max().item()
    assert error <= tol * max(want.abs().max().item(), 1e-6), f"max error {error:.2e}"


STRATEGIES = {
    "ddp": {"devices": 2, "strategy": "ddp"},
    "fsdp2": {
        "devices": 2,
        "strategy": {
            "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
            "init_args": {"data_parallel_size": 2, "tensor_parallel_size": 1},
        },
    },
}

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")


def _config(tmp_path: Path, world_dir: Path, tokenizer_dir: str, name: str, objective: dict, processes: int,
            callbacks: list[dict], epochs: int = 2, strategy: dict | None = None,
            layers: int = 1) -> Path:  # fmt: skip
    """A fit of ``objective`` on forget10 with SGD: one global batch of 4 forget rows per epoch
    (2 per rank on 2 ranks), so every process count sees the same global batches."""
    forget = len(load_split(str(world_dir), "forget10"))
    trainer = {
        "accelerator": "cpu",
        "devices": 1,
        "max_epochs": epochs,
        "limit_train_batches": 1,
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "callbacks": callbacks,
        **(strategy or {}),
    }
    config = {
        "seed_everything": 0,
        "trainer": trainer,
        "model": {
            "class_path": objective["class_path"],
            "init_args": {
                "model": {"config": dict(TINY_LLAMA, num_hidden_layers=layers), "tokenizer": tokenizer_dir},
                "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}},
                **objective.get("init_args", {}),
            },
        },
        "data": forget10_data(world_dir, tokenizer_dir, 4 // processes),
    }
    assert forget >= 4
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run(config: Path, cwd: Path) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    env["WANDB_MODE"] = "disabled"
    command = [sys.executable, "-m", "lightning_unlearn", "fit", "--config", str(config)]
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]


def _export(path: Path, merge: bool = False) -> dict:
    return {
        "class_path": "lightning_unlearn.callbacks.ExportModel",
        "init_args": {"dirpath": str(path), "merge": merge},
    }


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "adapter_model.safetensors"))


# GD with activation checkpointing: recomputation inside FSDP2's gathered layers changes nothing.
GD_LORA = {
    "class_path": "lightning_unlearn.objectives.GradDiff",
    "init_args": {"adapter": {"r": 4, "alpha": 8}, "activation_checkpointing": True},
}
# NPO with the reference read from the live model with the adapter disabled, on a sharded model.
NPO_LORA = {
    "class_path": "lightning_unlearn.objectives.NPO",
    "init_args": {"adapter": {"r": 4, "alpha": 8}, "reference": "adapter_off"},
}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("objective", [GD_LORA, NPO_LORA], ids=["gd", "npo"])
def test_fit_two_processes_equal_one(tmp_path, world_dir, tokenizer_dir, strategy, objective):
    """The exported adapter after 2 steps equals the 1-process adapter, and it moved (so equality
    is not two untouched initialisations)."""
    runs = {}
    for name, processes, extra in [("one", 1, None), (strategy, 2, STRATEGIES[strategy])]:
        config = _config(tmp_path, world_dir, tokenizer_dir, name, objective, processes,
                         [_export(tmp_path / name / "adapter")], strategy=extra)  # fmt: skip
        _run(config, tmp_path)
        runs[name] = _adapter(tmp_path / name / "adapter")
    one, two = runs["one"], runs[strategy]
    assert set(one) == set(two) and any("lora_B" in k for k in one)
    for key in one:
        _close(two[key], one[key])
    moved = max(one[k].abs().max().item() for k in one if "lora_B" in k)  # B starts at zero
    assert moved > 1e-3


def _evaluation(world_dir: Path, history: Path) -> dict:
    """The evaluation callback on the world's perturbed forget10 / retain splits (scoring and
    greedy generation, sharded across ranks), its history written as JSON."""
    return {
        "class_path": "lightning_unlearn.callbacks.UnlearningEvaluation",
        "init_args": {
            "source": str(world_dir),
            "splits": {"forget": "forget10_perturbed", "retain": "retain_perturbed"},
            "limit": 6,
            "batch_size": 4,
            "max_new_tokens": 6,
            "max_length": 64,
            "history_path": str(history),
        },
    }


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_sequential_fusion_and_evaluation_two_processes_equal_one(
    tmp_path, world_dir, tokenizer_dir, strategy
):
    """Two deletion requests, one LoRA each, fused by RegMean and evaluated after each request:
    each request's adapter and Grams, the fused adapter and every ledger metric (truth ratios over
    all and per request, ROUGE of greedy generations, utility) equal the 1-process run's."""
    ids = [str(r["id"]) for r in load_split(str(world_dir), "forget10")][:8]
    runs = {}
    for name, processes, extra in [("one", 1, None), (strategy, 2, STRATEGIES[strategy])]:
        sequential = {
            "class_path": "lightning_unlearn.callbacks.SequentialForgetting",
            "init_args": {
                "dirpath": str(tmp_path / name / "seq"),
                "requests": [{"name": f"r{k}", "ids": ids[4 * k : 4 * k + 4]} for k in range(2)],
                "epochs_per_request": 2,
                # 8 forget rows give Grams of rank < 64 (down_proj's inputs): a ridge that keeps
                # the solve's condition number, and so its amplification of rounding, moderate.
                "ridge": 0.01,
            },
        }
        callbacks = [_evaluation(world_dir, tmp_path / name / "history.json"), sequential]
        config = _config(
            tmp_path, world_dir, tokenizer_dir, name, GD_LORA, processes, callbacks, strategy=extra, layers=2
        )
        _run(config, tmp_path)
        runs[name] = tmp_path / name / "seq"
    one, two = runs["one"], runs[strategy]
    for k in range(2):
        want, got = (
            load_file(str(run / "requests" / str(k) / "adapter_model.safetensors")) for run in (one, two)
        )
        assert set(want) == set(got)
        for key in want:
            _close(got[key], want[key])
        # Grams as matrices: a stored factor (fewer tokens than inputs) is fixed by its Gram only up
        # to rounding amplified by the rows' conditioning
        want, got = (load_grams(run / "requests" / str(k) / "grams.safetensors") for run in (one, two))
        assert want.keys() == got.keys()
        for key in want:
            _close(got[key].matrix(), want[key].matrix())
    fused = {run: {n: b @ a for n, (b, a) in load_factors(run / "fused").items()} for run in (one, two)}
    for key in fused[one]:
        _close(fused[two][key], fused[one][key], tol=1e-4)  # RegMean's solve amplifies the 3e-7
    assert max(v.abs().max().item() for v in fused[one].values()) > 1e-3  # the requests moved it
    ledgers = [
        [json.loads(line) for line in (run / "ledger.jsonl").read_text().splitlines()] for run in (one, two)
    ]
    assert [e["ids"] for e in ledgers[0]] == [e["ids"] for e in ledgers[1]]
    for a, b in zip(*ledgers, strict=True):
        evals = {n: v for n, v in a["metrics"].items() if n.startswith("eval/")}
        # Truth ratios (0.97-0.98 here, from scoring every variant) and ROUGE of greedy generations
        # (synced across ranks); forget quality needs a retain model's report, not given here.
        assert {"eval/forget_truth_ratio", "eval/forget_truth_ratio/r0", "eval/forget_Q_A_ROUGE"} <= set(
            evals
        )
        assert {n: b["metrics"][n] for n in evals} == pytest.approx(evals, rel=1e-5, abs=1e-6)


def test_influence_step_under_ddp_and_fsdp2_equals_one_process(tmp_path, world_dir, tokenizer_dir):
    """The influence step's edited adapter from 2 ddp processes (each a shard of the training and
    removed rows, HVPs and b all-reduced by hand) equals the 1-process one; so does 2 processes
    under ModelParallelStrategy, where the step keeps the model replicated (not sharded)."""
    from lightning_unlearn.models import LoraSpec, ModelSpec, attach_lora, load_model

    spec = ModelSpec(config=dict(TINY_LLAMA), tokenizer=tokenizer_dir)
    adapter_dir = tmp_path / "adapter"
    torch.manual_seed(0)
    model = attach_lora(load_model(spec), LoraSpec(r=1, alpha=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(adapter_dir)
    forget = load_split(str(world_dir), "forget10")
    source = tmp_path / "source"
    source.mkdir()
    (source / "train.json").write_text(
        "".join(json.dumps(r) + "\n" for r in load_split(str(world_dir), "retain90")[:12] + forget[:4])
    )
    (source / "removed.json").write_text("".join(json.dumps(r) + "\n" for r in forget[:2]))
    results = {}
    for name, extra in [("one", {}), ("ddp", STRATEGIES["ddp"]), ("fsdp2", STRATEGIES["fsdp2"])]:
        config = {
            "seed_everything": 0,
            "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "logger": False,
                        "enable_checkpointing": False, "enable_progress_bar": False, **extra},
            "model": {"class_path": "lightning_unlearn.objectives.InfluenceStep", "init_args": {
                "model": {"config": dict(TINY_LLAMA), "tokenizer": tokenizer_dir}, "adapter_dir": str(adapter_dir),
                "damping": 0.5, "method": "cg", "tol": 1e-8, "max_iter": 100, "out_dir": str(tmp_path / name)}},
            "data": {"class_path": "lightning_unlearn.data.edits.InfluenceDataModule", "init_args": {
                "tokenizer": tokenizer_dir, "source": str(source), "train_split": "train",
                "removed_split": "removed", "max_length": 64, "batch_size": 4}},
        }  # fmt: skip
        path = tmp_path / f"influence_{name}.yaml"
        path.write_text(yaml.safe_dump(config))
        _run(path, tmp_path)
        results[name] = _adapter(tmp_path / name)
    before = load_file(str(adapter_dir / "adapter_model.safetensors"))
    for key in results["one"]:
        _close(results["ddp"][key], results["one"][key])
        _close(results["fsdp2"][key], results["one"][key])
    assert max((results["one"][k] - before[k]).abs().max().item() for k in before) > 1e-4
