"""Kill and resume: a long command killed with SIGKILL (or, for the influence step and evaluate,
preempted with SIGTERM) at any moment and rerun with the same command ends with what an
uninterrupted run writes, bit for bit, and nothing half-written."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
from conftest import TINY_LLAMA
from helpers import forget10_data
from safetensors.torch import load_file

TESTS = Path(__file__).resolve().parent


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LU_PAUSE")}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    env["WANDB_MODE"] = "disabled"
    return {**env, **extra}


def _run(command: list[str], cwd: Path) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _kill_when(command: list[str], cwd: Path, ready, **env: str) -> None:
    """Start ``command``, SIGKILL it as soon as ``ready()`` holds."""
    process = subprocess.Popen(command, cwd=cwd, env=_env(**env), stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not ready():
        assert process.poll() is None, process.stderr.read().decode()[-3000:]
        assert time.time() < deadline, "the run never got there"
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL


def _fit_config(tmp_path: Path, world_dir: Path, tokenizer_dir: str, out: str, lr: float = 1e-2) -> Path:
    """GradDiff + LoRA, AdamW with a linear warm-up schedule (both have state a resume must
    restore), 3 epochs of 2 batches, the adapter exported at the end of fit."""
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": 3, "limit_train_batches": 2,
            "limit_val_batches": 0, "logger": False, "enable_progress_bar": False,
            "enable_model_summary": False,
            "callbacks": [
                {"class_path": "lightning_unlearn.callbacks.ExportModel", "init_args": {"dirpath": out}},
                {"class_path": "helpers.PauseAt"},
            ],
        },
        "model": {"class_path": "lightning_unlearn.objectives.GradDiff", "init_args": {
            "model": {"config": dict(TINY_LLAMA), "tokenizer": tokenizer_dir},
            "adapter": {"r": 4, "alpha": 8},
            "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": lr}},
            "lr_schedule": "linear", "warmup_ratio": 0.3}},
        "data": forget10_data(world_dir, tokenizer_dir, 4),
    }  # fmt: skip
    path = tmp_path / "fit.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _fit(config: Path) -> list[str]:
    return [sys.executable, "-m", "lightning_unlearn", "fit", "--config", str(config)]


def test_fit_killed_mid_epoch_resumes_to_the_uninterrupted_adapter(tmp_path, world_dir, tokenizer_dir):
    whole_dir, killed_dir = tmp_path / "whole", tmp_path / "killed"
    whole_dir.mkdir(), killed_dir.mkdir()
    _run(_fit(_fit_config(whole_dir, world_dir, tokenizer_dir, "adapter")), whole_dir)
    want = load_file(str(whole_dir / "adapter" / "adapter_model.safetensors"))

    # Killed after step 3: epoch 0 (steps 1-2) is checkpointed, epoch 1 is half done.
    config = _fit_config(killed_dir, world_dir, tokenizer_dir, "adapter")
    marker = killed_dir / "paused"
    _kill_when(_fit(config), killed_dir, marker.exists, LU_PAUSE_AT_STEP="3", LU_PAUSE_MARKER=str(marker))
    checkpoints = list((killed_dir / "runs" / "resume").glob("*/last.ckpt"))
    assert len(checkpoints) == 1 and not (killed_dir / "adapter").exists()
    saved = torch.load(checkpoints[0], weights_only=False)
    assert saved["global_step"] == 2 and all("lora_" in k for k in saved["state_dict"])  # the adapter only

    done = _run(_fit(config), killed_dir)  # the same command
    assert "resuming from" in done.stdout + done.stderr
    got = load_file(str(killed_dir / "adapter" / "adapter_model.safetensors"))
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    moved = max(want[k].abs().max().item() for k in want if "lora_B" in k)  # B starts at zero
    assert moved > 1e-3
    assert not [p for p in killed_dir.rglob("*") if p.name.startswith(".")], "a temporary was left behind"

    # Another learning rate is another run: it starts fresh in its own directory.
    changed = _fit_config(killed_dir, world_dir, tokenizer_dir, "adapter2", lr=2e-2)
    done = _run(_fit(changed), killed_dir)
    assert "resuming from" not in done.stdout + done.stderr
    assert len(list((killed_dir / "runs" / "resume").glob("*/last.ckpt"))) == 2


def _protocol_config(path: Path) -> Path:
    """The mini protocol: target and retain fine-tunes, gradient ascent evaluated every epoch,
    two sequential deletion requests (their own ledger), and an influence row."""
    adamw = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}}
    config = {
        "name": "mini", "seed": 0, "out_dir": "runs",
        "model": {"config": dict(TINY_LLAMA, hidden_size=64, intermediate_size=128)},
        "data": {"source": "synthetic", "max_length": 64,
                 "world": {"seed": 1, "n_authors": 10, "n_forget_authors": 1, "n_world_facts": 10,
                           "n_eval_retain_authors": 3},
                 "eval_splits": {"forget": "forget10_perturbed", "retain": "retain_perturbed",
                                 "holdout": "holdout10"}},
        "finetune": {"objective": {"class_path": "lightning_unlearn.objectives.FineTune", "init_args": {
            "optimizer": {**adamw, "init_args": {"lr": 3e-3}}}}, "max_epochs": 12, "batch_size": 16},
        "objectives": {
            "ga": {"objective": {"class_path": "lightning_unlearn.objectives.GradAscent",
                                 "init_args": {"optimizer": adamw}},
                   "max_epochs": 2, "batch_size": 4, "eval_every_n_epochs": 1},
            "seq": {"objective": {"class_path": "lightning_unlearn.objectives.GradDiff", "init_args": {
                "adapter": {"r": 4, "alpha": 8}, "optimizer": {**adamw, "init_args": {"lr": 1e-2}}}},
                    "batch_size": 4, "sequential": {"requests": 2, "epochs_per_request": 2}},
            "infl": {"objective": {"class_path": "lightning_unlearn.objectives.InfluenceStep",
                                   "init_args": {"damping": 0.05, "max_iter": 30}},
                     "batch_size": 32,
                     "adapter_fit": {"objective": {"class_path": "lightning_unlearn.objectives.FineTune",
                                                   "init_args": {"adapter": {"r": 1, "alpha": 2,
                                                                             "target_modules": ["q_proj", "v_proj"]},
                                                                 "optimizer": {**adamw, "init_args": {"lr": 1e-2}}}},
                                     "max_epochs": 3, "batch_size": 16}},
        },
        "evaluation": {"batch_size": 32, "max_new_tokens": 8},
        "trainer": {"enable_progress_bar": False},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(config, sort_keys=False))  # objectives run in this order
    return path


def _outputs(run: Path) -> dict[str, object]:
    """Every file a protocol run leaves that must not depend on when it ran: weights, split
    files, reports, histories (JSON without its wall-clock keys); not logs, ledgers (they hold
    start and end times) or figures."""
    skip = ("logs", "ledger.jsonl", "continual.json", "request.json", "fusion.json")
    out: dict[str, object] = {}
    for p in sorted(run.rglob("*")):
        if not p.is_file() or any(s in p.parts or p.name == s for s in skip):
            continue
        if p.suffix == ".json":  # a JSON document, or JSON Lines (the split files)
            text = p.read_text()
            try:
                value = json.loads(text)
            except json.JSONDecodeError:
                value = [json.loads(line) for line in text.splitlines()]
            out[str(p.relative_to(run))] = _timeless(value)
        elif p.suffix in (".safetensors", ".md"):
            out[str(p.relative_to(run))] = p.read_bytes()
    return out


def _timeless(value: object) -> object:
    """``value`` without wall-clock entries; peft's ``target_modules`` (a set it writes in hash
    order, which differs between processes) sorted."""
    if isinstance(value, dict):
        return {
            k: sorted(v) if k == "target_modules" and isinstance(v, list) else _timeless(v)
            for k, v in value.items()
            if "time" not in k and "seconds" not in k
        }
    if isinstance(value, list):
        return [_timeless(v) for v in value]
    return value


def test_protocol_is_deterministic_and_resumes_after_a_kill(tmp_path):
    """The protocol twice with the same config writes the same bytes (weights, reports); killed
    mid-way through the sequential stage and rerun, it keeps the finished stages and ends with
    the same bytes again."""
    runs = {}
    for name in ("first", "second", "killed"):
        (tmp_path / name).mkdir()
        config = _protocol_config(tmp_path / name / "mini.yaml")
        command = [sys.executable, "-m", "lightning_unlearn", "protocol", "--config", str(config)]
        run = tmp_path / name / "runs" / "mini"
        if name == "killed":
            request0 = run / "sequential" / "seq" / "requests" / "0"
            _kill_when(command, tmp_path / name, request0.is_dir)
            assert (run / "reports" / "ga" / "report.json").is_file() and not (
                run / "models" / "seq"
            ).exists()
            assert not (run / "report.json").exists()  # nothing that looks finished
            done = _run(command, tmp_path / name)
            for kept in ("retain", "finetuned", "ga"):
                assert f"{kept}: done before, kept" in done.stdout
            assert "seq: training" in done.stdout and "infl: training" in done.stdout
        else:
            _run(command, tmp_path / name)
        runs[name] = _outputs(run)
    assert "models/seq/model.safetensors" in runs["first"] and "histories/ga.json" in runs["first"]
    assert "report.json" in runs["first"] and "models/infl_adapter/adapter_model.safetensors" in runs["first"]
    for name in ("second", "killed"):
        assert runs[name].keys() == runs["first"].keys()
        different = {
            k: (runs["first"][k], runs[name][k]) for k in runs["first"] if runs[name][k] != runs["first"][k]
        }
        assert not different, f"{name}: files differ: {sorted(different)}; {str(different)[:1500]}"

    # Another setting in the same run directory is refused before anything is touched.
    config = tmp_path / "killed" / "mini.yaml"
    config.write_text(config.read_text().replace("max_epochs: 12", "max_epochs: 11"))
    command = [sys.executable, "-m", "lightning_unlearn", "protocol", "--config", str(config)]
    done = subprocess.run(command, cwd=tmp_path / "killed", env=_env(), capture_output=True, text=True)
    assert done.returncode == 2 and "holds a run of other settings" in done.stderr
    assert "Traceback" not in done.stderr
    assert _outputs(tmp_path / "killed" / "runs" / "mini") == runs["killed"]


def _preempt_when(command: list[str], cwd: Path, ready, **env: str) -> str:
    """Start ``command``, send it SIGTERM as soon as ``ready(log)`` holds (``log``: its stderr so
    far); check it exits 143 with the one line saying nothing needed saving; return the command
    that line says to rerun."""
    log = cwd / "preempted.log"
    with log.open("w") as stderr:
        process = subprocess.Popen(
            command, cwd=cwd, env=_env(**env), stderr=stderr, stdout=subprocess.DEVNULL
        )
        deadline = time.time() + 240
        while not ready(log.read_text()):
            assert process.poll() is None, log.read_text()[-3000:]
            assert time.time() < deadline, "the run never got there"
            time.sleep(0.02)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 143, log.read_text()[-3000:]
    lines = [line for line in log.read_text().splitlines() if line.startswith("lightning-unlearn: preempted")]
    assert lines == [
        f"lightning-unlearn: preempted by SIGTERM; nothing to save; rerun: cd {shlex.quote(str(cwd))} && "
        f"{shlex.join(command)}"
    ]
    return lines[0].split("rerun: ", 1)[1]


def test_influence_and_evaluate_preempted_then_rerun_write_the_uninterrupted_outputs(
    tmp_path, world_dir, tokenizer_dir
):
    """The influence step (one solve) and evaluate write nothing until they finish, atomically:
    sent SIGTERM after the solve but before the export, or in the middle of scoring, each exits
    143 at once with the one line, leaves no adapter or report directory, and the rerun it names
    writes exactly what an uninterrupted run does."""
    from lightning_unlearn.data.tofu import load_split
    from lightning_unlearn.models import LoraSpec, ModelSpec, attach_lora, load_model

    torch.manual_seed(0)
    base = load_model(ModelSpec(config=dict(TINY_LLAMA), tokenizer=tokenizer_dir))
    base.save_pretrained(tmp_path / "base")  # what evaluate scores, with the edited adapter
    model = attach_lora(base, LoraSpec(r=1, alpha=2, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "adapter")
    source = tmp_path / "source"
    source.mkdir()
    forget = load_split(str(world_dir), "forget10")
    rows = load_split(str(world_dir), "retain90")[:12] + forget[:4]
    (source / "train.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (source / "removed.json").write_text("".join(json.dumps(r) + "\n" for r in forget[:2]))

    outputs = {}
    for name in ("whole", "preempted"):
        work = tmp_path / name
        work.mkdir()
        config = {
            "seed_everything": 0,
            "trainer": {"accelerator": "cpu", "devices": 1, "max_epochs": 1, "logger": False,
                        "enable_progress_bar": False, "callbacks": [{"class_path": "helpers.PauseAt"}]},
            "model": {"class_path": "lightning_unlearn.objectives.InfluenceStep", "init_args": {
                "model": {"config": dict(TINY_LLAMA), "tokenizer": tokenizer_dir},
                "adapter_dir": str(tmp_path / "adapter"), "damping": 0.5, "tol": 1e-8, "max_iter": 100,
                "out_dir": "edited"}},
            "data": {"class_path": "lightning_unlearn.data.edits.InfluenceDataModule", "init_args": {
                "tokenizer": tokenizer_dir, "source": str(source), "train_split": "train",
                "removed_split": "removed", "max_length": 64, "batch_size": 4}},
        }  # fmt: skip
        (work / "influence.yaml").write_text(yaml.safe_dump(config))
        fit = _fit(work / "influence.yaml")
        evaluate = [sys.executable, "-m", "lightning_unlearn", "evaluate", "--model", str(tmp_path / "base"),
                    "--adapter", "edited", "--tokenizer", tokenizer_dir,
                    "--source", str(world_dir), "--splits", '{"forget": "forget10_perturbed"}',
                    "--max_new_tokens", "8", "--max_length", "64", "--batch_size", "2", "--out_dir", "report"]  # fmt: skip
        if name == "preempted":
            # After the solve, in the test's pause before the export (on_train_end).
            marker = work / "solved"
            pause = {"LU_PAUSE_AT_STEP": "0", "LU_PAUSE_MARKER": str(marker)}
            rerun = _preempt_when(fit, work, lambda log, marker=marker: marker.exists(), **pause)
            assert not (work / "edited").exists() and not list(work.glob(".*"))
            _run(["sh", "-c", rerun], work)
            rerun = _preempt_when(evaluate, work, lambda log: "forget" in log)  # scoring has begun
            assert not (work / "report").exists() and not list(work.glob(".*"))
            _run(["sh", "-c", rerun], work)
        else:
            _run(fit, work)
            _run(evaluate, work)
        outputs[name] = {
            "adapter": (work / "edited" / "adapter_model.safetensors").read_bytes(),
            "report": json.loads((work / "report" / "report.json").read_text()),
        }
    assert outputs["preempted"] == outputs["whole"]
    assert outputs["whole"]["report"]["metrics"]["forget_Q_A_Prob"] > 0
