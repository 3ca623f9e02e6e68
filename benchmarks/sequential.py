"""Sequential forgetting at scale of requests: does request 10 cost what request 1 did, and what
do the Grams cost to store and to fuse, dense against factored?

    python benchmarks/sequential.py [--requests 10] [--per-request 4] [--epochs-per-request 1]

SmolLM2-135M-Instruct (GGUF) with a LoRA r8 on every linear layer, GradDiff (float32 unless
--precision bf16-mixed), on TOFU forget01 split into ``--requests`` deletion requests of
``--per-request`` records, all in one
``Trainer.fit`` with ``SequentialForgetting`` (independent adapters, RegMean fusion after every
request). Printed per request, from the ledger: wall time and its parts (training, Gram pass,
writing the adapter and its Grams, fusion), and the ratio of the last request's wall time to
the first's.

Then the Grams, old against new in the same run. Each request's saved Grams (one factor or dense
Gram per distinct layer input) are also written in the earlier format, one dense float32 in x in
Gram per module, as the callback wrote them before: its bytes per request against the new file's.
Fusion is timed as the callback does it after request k, on each format: read request k's adapter
and Grams from disk, add them to RegMean's running sums, solve, write fused/. The earlier format
goes through the dense Cholesky per module, which is the earlier algorithm; the new one shares a
solve between modules reading one input and uses the Woodbury solve while a sum's stacked factors
have fewer rows than in_dim. Last, the fusion of all requests from scratch (reload every adapter
and Gram, solve) on each format, and the largest relative difference between the fused adapters.
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
        accelerator="cpu", precision=args.precision, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, callbacks=[callback],
    )  # fmt: skip
    trainer.fit(objective, datamodule=data)
    return [json.loads(line) for line in (run_dir / "ledger.jsonl").read_text().splitlines()]


def write_dense_grams(run_dir: Path, k: int, out: Path) -> int:
    """Request k's Grams in the earlier format (one dense float32 Gram per module) under ``out``;
    its size in bytes."""
    from safetensors.torch import save_file

    from lightning_unlearn.adapters import load_grams

    grams = load_grams(run_dir / "requests" / str(k) / "grams.safetensors")
    path = out / str(k) / "grams.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({name: gram.matrix().float().contiguous() for name, gram in grams.items()}, str(path))
    return path.stat().st_size


def fusion_step(sums, run_dir: Path, grams_dir: Path, k: int, out: Path) -> tuple[float, dict, dict]:
    """Request k's fusion step as the callback takes it: read its adapter and Grams, add them to the
    running sums, solve, write fused/. Seconds, fused factors and the fusion info."""
    from lightning_unlearn.adapters import load_factors, load_grams, save_factors

    config = json.loads((run_dir / "requests" / str(k) / "adapter_config.json").read_text())
    start = time.perf_counter()
    sums.add(
        load_factors(run_dir / "requests" / str(k)), load_grams(grams_dir / str(k) / "grams.safetensors")
    )
    fused, info = sums.fuse()
    save_factors(out, fused, config, info)
    return time.perf_counter() - start, fused, info


def reference_fusion(run_dir: Path, requests: int) -> dict:
    """RegMean's dense closed form in float64 over the factored Grams (G = F^T F formed densely)."""
    from lightning_unlearn.adapters import load_factors, load_grams, regmean

    factors, grams = [], []
    for k in range(requests):
        factors.append(load_factors(run_dir / "requests" / str(k)))
        loaded = load_grams(run_dir / "requests" / str(k) / "grams.safetensors")
        dense = {id(g): g.matrix() for g in loaded.values()}
        grams.append({name: dense[id(g)] for name, g in loaded.items()})
    return regmean(factors, grams)[0]


def naive_fusion(run_dir: Path, grams_dir: Path, upto: int) -> tuple[float, dict]:
    """Reload adapters and Grams of requests 0..upto-1 and fuse from scratch; seconds and factors."""
    from lightning_unlearn.adapters import load_factors, load_grams, regmean

    start = time.perf_counter()
    factors = [load_factors(run_dir / "requests" / str(k)) for k in range(upto)]
    grams = [load_grams(grams_dir / str(k) / "grams.safetensors") for k in range(upto)]
    fused, _ = regmean(factors, grams)
    return time.perf_counter() - start, fused


def max_relative_difference(a: dict, b: dict) -> float:
    return max(
        float((a[n][0] @ a[n][1] - b[n][0] @ b[n][1]).norm() / (b[n][0] @ b[n][1]).norm().clamp_min(1e-30))
        for n in b
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=10)
    # float32 by default: on CPUs without AVX512-BF16 or AMX, bf16 matmuls are emulated and slower.
    parser.add_argument("--precision", default="32-true", choices=("32-true", "bf16-mixed"))
    parser.add_argument("--per-request", type=int, default=4)
    parser.add_argument("--epochs-per-request", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--targets", default="all-linear", help="LoRA target modules (peft's)")
    parser.add_argument("--naive-at", type=int, nargs="*", default=None, help="k values for the naive fusion")
    parser.add_argument("--tofu", default=str(ROOT.parent / "shared" / "data" / "tofu"))
    args = parser.parse_args()

    from lightning_unlearn.adapters import RegMeanSums

    with tempfile.TemporaryDirectory(prefix="sequential_bench_") as tmp:
        run_dir = Path(tmp) / "run"
        ledger = run(args, run_dir)
        print(
            f"SequentialForgetting (independent, RegMean) on SmolLM2-135M, LoRA r8 {args.targets}, GradDiff, "
            f"{args.precision}; {args.requests} requests x {args.per_request} TOFU forget01 records, "
            f"{args.epochs_per_request} epoch(s) each at batch {args.batch_size}"
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

        dense_dir, new_dir = Path(tmp) / "dense", run_dir / "requests"
        old_bytes = [write_dense_grams(run_dir, k, dense_dir) for k in range(args.requests)]
        new_bytes = [(new_dir / str(k) / "grams.safetensors").stat().st_size for k in range(args.requests)]
        old_sums, new_sums, old_s, new_s, woodbury = RegMeanSums(), RegMeanSums(), [], [], []
        for k in range(args.requests):  # alternating, so that load on the machine hits both alike
            seconds, old_fused, _ = fusion_step(old_sums, run_dir, dense_dir, k, Path(tmp) / "fused_dense")
            old_s.append(seconds)
            seconds, new_fused, info = fusion_step(new_sums, run_dir, new_dir, k, Path(tmp) / "fused_new")
            new_s.append(seconds)
            woodbury.append(sum(how == "woodbury" for how in info["solve"].values()))
        print("\n| request | Grams MiB, dense per module | Grams MiB, factored per input | smaller by "
              "| fuse s, dense | fuse s, factored | modules solved by Woodbury |")  # fmt: skip
        print("|---|---|---|---|---|---|---|")
        for k in range(args.requests):
            print(
                f"| {k + 1} | {old_bytes[k] / 2**20:.1f} | {new_bytes[k] / 2**20:.1f} | "
                f"{old_bytes[k] / new_bytes[k]:.2f}x | {old_s[k]:.2f} | {new_s[k]:.2f} | "
                f"{woodbury[k]}/{len(new_fused)} |"
            )
        mean_old, mean_new = sum(old_bytes) / len(old_bytes), sum(new_bytes) / len(new_bytes)
        print(
            f"| mean | {mean_old / 2**20:.1f} | {mean_new / 2**20:.1f} | {mean_old / mean_new:.2f}x "
            f"| {sum(old_s) / len(old_s):.2f} | {sum(new_s) / len(new_s):.2f} | |"
        )
        reference = reference_fusion(run_dir, args.requests)
        print(
            f"fused adapter after {args.requests} requests against RegMean's dense closed form in float64 "
            f"over the factored Grams, max relative difference: from the dense float32 Grams "
            f"{max_relative_difference(old_fused, reference):.1e}, from the factored Grams "
            f"{max_relative_difference(new_fused, reference):.1e}"
        )

        print("\n| requests fused from scratch | dense s | factored s | max rel. diff to running sums |")
        print("|---|---|---|---|")
        for k in args.naive_at or [args.requests]:
            old_naive_s, old_naive = naive_fusion(run_dir, dense_dir, k)
            new_naive_s, new_naive = naive_fusion(run_dir, new_dir, k)
            diff = max_relative_difference(new_naive, new_fused) if k == args.requests else float("nan")
            print(f"| {k} | {old_naive_s:.2f} | {new_naive_s:.2f} | {diff:.1e} |")


if __name__ == "__main__":
    main()
