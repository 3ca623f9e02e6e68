"""Sequential forgetting at scale of requests: does request 10 cost what request 1 did?

    python benchmarks/sequential.py [--requests 10] [--per-request 4] [--epochs-per-request 1]

SmolLM2-135M-Instruct (GGUF) with a LoRA r8 on every linear layer, GradDiff, bf16-mixed, on TOFU
forget01 split into ``--requests`` deletion requests of ``--per-request`` records, all in one
``Trainer.fit`` with ``SequentialForgetting`` (independent adapters, RegMean fusion after every
request). Printed per request, from the ledger: wall time and its parts (training, Gram pass,
writing the adapter and its Grams, fusion), and the ratio of the last request's wall time to
the first's. Side by side, the fusion of requests 1..k done the naive way, reloading every saved
adapter and Gram from disk and solving from scratch (``adapters.regmean``), against the running
sums the callback keeps (``RegMeanSums``): the fused adapters agree and the times are compared.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from reference import smollm2_gguf  # noqa: E402


def run(args: argparse.Namespace, run_dir: Path) -> list[dict]:
    import lightning as L
    import torch

    from lightning_unlearn.callbacks import ForgetRequest, SequentialForgetting
    from lightning_unlearn.data.datamodule import UnlearningDataModule
    from lightning_unlearn.data.tofu import load_split
    from lightning_unlearn.models import LoraSpec, ModelSpec
    from lightning_unlearn.objectives import GradDiff

    gguf = smollm2_gguf()
    forget = load_split(args.tofu, "forget01")
    needed = args.requests * args.per_request
    if needed > len(forget):
        sys.exit(
            f"forget01 has {len(forget)} records; {args.requests} x {args.per_request} = {needed} needed"
        )
    ids = [str(r["id"]) for r in forget]
    requests = [
        ForgetRequest(name=f"request{k}", ids=ids[k * args.per_request : (k + 1) * args.per_request])
        for k in range(args.requests)
    ]
    data = UnlearningDataModule(
        tokenizer=gguf, source=args.tofu, forget_split="forget01", retain_split="retain99",
        max_length=args.max_length, batch_size=args.batch_size,
    )  # fmt: skip
    objective = GradDiff(
        model=ModelSpec(path=gguf, dtype="float32"),
        adapter=LoraSpec(r=8, alpha=16, target_modules=args.targets),
        optimizer=lambda p: torch.optim.AdamW(p, lr=1e-5),
    )
    callback = SequentialForgetting(str(run_dir), requests, epochs_per_request=args.epochs_per_request)
    trainer = L.Trainer(
        accelerator="cpu", precision="bf16-mixed", logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[callback],
    )  # fmt: skip
    trainer.fit(objective, datamodule=data)
    return [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]


def naive_fusion(run_dir: Path, upto: int) -> tuple[float, dict]:
    """Reload adapters and Grams of requests 0..upto-1 and fuse from scratch; seconds and factors."""
    from safetensors.torch import load_file

    from lightning_unlearn.adapters import load_factors, regmean

    start = time.perf_counter()
    dirs = [run_dir / "requests" / str(k) for k in range(upto)]
    factors = [load_factors(d) for d in dirs]
    grams = [load_file(str(d / "grams.safetensors")) for d in dirs]
    fused, _ = regmean(factors, grams)
    return time.perf_counter() - start, fused


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=10)
    parser.add_argument("--per-request", type=int, default=4)
    parser.add_argument("--epochs-per-request", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--targets", default="all-linear", help="LoRA target modules (peft's)")
    parser.add_argument("--naive-at", type=int, nargs="*", default=None, help="k values for the naive fusion")
    parser.add_argument("--tofu", default=str(ROOT.parent / "shared" / "data" / "tofu"))
    args = parser.parse_args()

    from lightning_unlearn.adapters import load_factors

    with tempfile.TemporaryDirectory(prefix="sequential_bench_") as tmp:
        run_dir = Path(tmp)
        ledger = run(args, run_dir)
        gram_mib = (run_dir / "requests" / "0" / "grams.safetensors").stat().st_size / 2**20
        print(
            f"SequentialForgetting (independent, RegMean) on SmolLM2-135M, LoRA r8 {args.targets}, GradDiff, "
            f"bf16-mixed; {args.requests} requests x {args.per_request} TOFU forget01 records, "
            f"{args.epochs_per_request} epoch(s) each at batch {args.batch_size}; Grams {gram_mib:.0f} MiB/request"
        )
        print("| request | wall s | train s | Gram pass s | save s | fuse s (running sums) |")
        print("|---|---|---|---|---|---|")
        walls = []
        for k, entry in enumerate(ledger, start=1):
            s = entry["seconds"]
            walls.append(entry["end"] - entry["start"])
            print(
                f"| {k} | {walls[-1]:.2f} | {s['train']:.2f} | {s['grams']:.2f} | {s['save']:.2f} | {s['fuse']:.2f} |"
            )
        print(f"last / first request wall time: {walls[-1] / walls[0]:.2f}x")
        if len(walls) >= 6:
            first, last = sorted(walls[:3])[1], sorted(walls[-3:])[1]
            print(f"median of the last three / median of the first three: {last / first:.2f}x")

        fused = load_factors(run_dir / "fused")
        print("\n| requests fused | running sums s | reload + solve from scratch s | ratio | max rel. diff |")
        print("|---|---|---|---|---|")
        for k in args.naive_at or sorted({1, args.requests // 2, args.requests}):
            naive_s, naive = naive_fusion(run_dir, k)
            ours = ledger[k - 1]["seconds"]["fuse"]
            diff = float("nan")
            if k == args.requests:
                diff = max(
                    float((naive[n][0] @ naive[n][1] - b @ a).norm() / (b @ a).norm().clamp_min(1e-30))
                    for n, (b, a) in fused.items()
                )
            print(f"| {k} | {ours:.2f} | {naive_s:.2f} | {naive_s / ours:.2f}x | {diff:.1e} |")


if __name__ == "__main__":
    main()
