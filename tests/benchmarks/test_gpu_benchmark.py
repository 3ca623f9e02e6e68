"""benchmarks/gpu.py gets one run on a lent GPU: its smoke run (the same code path at toy size on
the CPU) must produce figures that are right by construction. Each figure is recomputed here from
the JSON's raw fields and the model's config, independently of the script's own arithmetic."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "gpu.py"
PEAK_TFLOPS = 2.0  # a stand-in peak so the CPU run reports an MFU to check
SMOKE_IDS = {
    "train/npo_lora/single/bf16-true/nockpt/tiny",
    "train/npo_lora/single/bf16-mixed/nockpt/tiny",
    "train/npo_lora/single/bf16-true/ckpt/tiny",
    "train/finetune/single/bf16-true/nockpt/tiny",
    "eval/evaluator/single/bf16-true/nockpt/tiny",
    "eval/direct/single/bf16-true/nockpt/tiny",
    "train/npo_lora/ddp/bf16-true/nockpt/tiny",
    "train/npo_lora/ddp/bf16-mixed/nockpt/tiny",
    "train/npo_lora/fsdp2/bf16-true/nockpt/tiny",
    "train/finetune/fsdp2/bf16-true/nockpt/tiny",
}
# Packages the GPU machine lacks: the script must import without them.
ABSENT_THERE = ("rouge_score", "nltk", "wandb", "optuna", "gguf")

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory) -> tuple[dict, str]:
    out = tmp_path_factory.mktemp("gpu") / "gpu.json"
    command = [sys.executable, str(SCRIPT), "--smoke", "--json", str(out), "--peak-tflops", str(PEAK_TFLOPS)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(out.read_text()), done.stdout


def training(report: dict) -> list[dict]:
    return [r for r in report["cases"] if r["kind"] == "train"]


def llama_counts(config: dict, r: int) -> tuple[int, int, int]:
    """(N: linear-layer parameters with the tied output layer once, A: LoRA r on every linear
    layer of the decoder, norm weights) of a llama config, by hand."""
    h, i, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    kv = config["num_key_value_heads"] * h // config["num_attention_heads"]
    n = layers * (2 * h * h + 2 * h * kv + 3 * h * i) + config["vocab_size"] * h
    a = layers * r * (2 * (h + h) + 2 * (h + kv) + 2 * (h + i) + (i + h))
    return n, a, (2 * layers + 1) * h


def test_every_smoke_case_ran(smoke):
    report, _ = smoke
    assert {r["id"] for r in report["cases"]} == SMOKE_IDS
    assert [r["id"] for r in report["cases"] if r["status"] != "ok"] == []


def test_tokens_are_batch_times_real_tokens(smoke):
    report, _ = smoke
    s = report["settings"]
    for r in training(report):
        sub_batches = 2 if r["objective"] == "npo_lora" else 1  # NPO forwards forget and retain
        assert r["timed_steps"] == s["steps"] == len(r["step_tokens"])
        assert r["step_tokens"] == [sub_batches * s["batch_size"] * s["seq_len"]] * s["steps"], r["id"]
        assert r["tokens"] == sum(r["step_tokens"])


def test_rates_are_tokens_over_measured_seconds(smoke):
    report, _ = smoke
    for r in training(report):
        assert r["seconds"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["seconds"], rel=1e-9)
        assert r["step_ms"] == pytest.approx(1000 * r["seconds"] / r["timed_steps"], rel=1e-9)


def test_time_accounting_adds_up(smoke):
    """Set-up precedes the timed steps, and both fit inside the case's own wall time."""
    report, _ = smoke
    for r in report["cases"]:
        assert r["case_seconds"] > 0
        if r["kind"] == "train":
            assert r["setup_seconds"] > 0 and r["setup_seconds"] + r["seconds"] <= r["case_seconds"]
    assert sum(r["case_seconds"] for r in report["cases"]) <= report["wall_s"]


def test_parameter_counts_and_mfu_from_the_config(smoke):
    report, _ = smoke
    rank = report["lora"]["r"]
    for r in training(report):
        n, a, norms = llama_counts(report["shapes"][r["shape"]], rank)
        lora = r["objective"] == "npo_lora"
        assert r["matmul_params"] == n
        assert r["adapter_params"] == (a if lora else 0)
        assert r["params_total"] == n + norms + (a if lora else 0)
        assert r["params_trainable"] == (a if lora else n + norms)
        per_token = 4 * n + 6 * a if lora else 6 * n
        assert r["flops_per_token"] == per_token
        assert r["peak_tflops"] == PEAK_TFLOPS
        want = per_token * r["tokens"] / r["seconds"] / (PEAK_TFLOPS * 1e12)
        assert r["mfu"] == pytest.approx(want, rel=1e-9)


def test_precision_reaches_the_weights(smoke):
    """bf16-true trains bf16 weights; bf16-mixed keeps float32 masters."""
    report, _ = smoke
    for r in training(report):
        assert r["trainable_dtype"] == ("bfloat16" if r["precision"] == "bf16-true" else "float32"), r["id"]


def test_peak_memory_is_reported_where_measurable(smoke):
    report, _ = smoke
    for r in report["cases"]:
        assert "peak_memory_bytes" in r
        if not torch.cuda.is_available():
            assert r["peak_memory_bytes"] is None


def test_evaluator_rates(smoke):
    report, _ = smoke
    s = report["settings"]
    rows = [r for r in report["cases"] if r["kind"] == "eval"]
    assert sorted(r["path"] for r in rows) == ["direct", "evaluator"]
    for r in rows:
        assert r["records"] == s["eval_records"]
        assert r["scored_sequences"] == r["records"] * (2 + s["perturbed"])
        assert r["sequences_per_s"] == pytest.approx(r["scored_sequences"] / r["score_seconds"], rel=1e-9)
        assert 0 < r["generated_tokens"] <= r["records"] * s["max_new_tokens"]
        rate = r["generated_tokens"] / r["generate_seconds"]
        assert r["generated_tokens_per_s"] == pytest.approx(rate, rel=1e-9)


def test_table_has_a_row_per_case(smoke):
    report, stdout = smoke
    rows = [
        line for line in stdout.splitlines() if line.startswith("| ") and line.rstrip().endswith("| ok |")
    ]
    assert len(rows) == len(report["cases"])


def test_imports_without_what_the_gpu_machine_lacks():
    """Importing the script (everything the training cases use) needs none of ABSENT_THERE;
    the Evaluator, which needs rouge-score, is imported only when measured."""
    blocked = "; ".join(f"sys.modules[{name!r}] = None" for name in ABSENT_THERE)
    code = (
        f"import runpy, sys; {blocked}; "
        f"runpy.run_path({str(SCRIPT)!r}, run_name='gpu'); "
        "assert 'lightning_unlearn.evaluation' not in sys.modules"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
