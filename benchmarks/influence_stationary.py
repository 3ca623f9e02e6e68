"""Influence-function removal (LLMEraser) against retraining without the removed records.

    python benchmarks/influence_stationary.py [--n-train 64] [--remove 4] [--damping 0.3] [--extra-damping 0] \
        [--lora-r 1] [--targets q_proj v_proj] [--seed 0] [--solver cg kfac ekfac datainf lissa]

``--solver`` also runs each named inverse-HVP directly (``influence_delta``) on the same removal and
prints them side by side: wall time, iterations (passes over the data for the layer-wise ones),
cosine and norm ratio with ``exact`` (run as the reference when the adapter has at most
--exact-max-dim parameters) and with the retrain's change, and the losses after each step.

The defaults run in under a minute on 2 cores. With r >= 2 (say --lora-r 4 --damping 0.1
--extra-damping 0.1) theta_hat itself is not reached: L-BFGS stops at its iteration limit (1000 in our run, 70 s) with
|grad| of the order of |b| (the rotations below make the objective flat), and no one-step edit
can then be compared with anything.

A smoke run (about 10 s): --n-train 16 --remove 2 --authors 10 --forget-authors 1 --world-facts 10
--hidden 32 --layers 1 --base-epochs 40 --base-lr 1e-2 --lora-r 2 --damping 1.

On a synthetic world (``make_world``), a Llama with configs/demo.yaml's model config (hidden 128,
2 layers) is first fine-tuned in full (AdamW) on retain records that are not in the LoRA's training
set, so that it knows the world's sentence shapes: the Hessian of an adapter on a random network
would say little. A LoRA is then fitted by L-BFGS from a seeded initial point theta_0 to a
stationary point theta_hat of

    (1/n) sum_i l_i(theta) + (damping / 2) ||theta||^2

over ``--n-train`` records (``--remove`` of them from the forget split, the rest from the retain
split): the influence step assumes a stationary point, and damping = the L2 penalty makes it the
Newton step of this objective. The removed records are then taken out in two ways:

* the influence step through the production path: ``InfluenceStep`` (cg) run by
  ``lightning.Trainer.fit`` on an ``InfluenceDataModule``, loading the saved base and adapter, as
  ``lightning-unlearn fit`` would; iterations, residual and solve time come from its summary.json;
* retraining: L-BFGS on the same objective over the kept records to the same tolerance, from
  theta_0 ("from scratch": theta_hat's initial point and optimiser, without the removed records)
  and, as a second row, warm-started from theta_hat.

The retraining objective keeps the factor 1/n of the original n, not 1/(n - k): removing S leaves
(1/n) sum_{i not in S} l_i + (damping/2) ||theta||^2, the objective whose Newton step the influence
step takes; renormalising by n - k would reweight the penalty against the data and move the target.

LoRA with r >= 2 makes H + damping I singular at every stationary point: A -> R A, B -> B R^T (R
orthogonal) leaves B A and ||A||^2 + ||B||^2 unchanged, so the penalised loss is flat along those
rotations, and adapters whose gradient is below the penalty's threshold sit at A = B = 0 with
eigenvalues near 0. cg then stalls and blows up (reported as negative curvature, p^T A p ~ -1e-6
|p|^2) before reaching --tol; ``--extra-damping`` (a fraction of --damping, added in the solve
only; 0 for the exact Newton step, fine with r = 1) regularises it, at the price of a step a little
shorter than Newton's. For the same reason the retrain from theta_0 lands anywhere on the rotation
orbit, so changes are also compared in the merged weights B A, which the rotations leave alone.

Printed: the cost of each (wall seconds, and retrain-from-scratch time over it); where each lands
(cosine and norm ratio of theta - theta_hat against each retrain's change, in the LoRA parameters
and in B A), with a diagnostic Newton step using the kept records' Hessian H' instead of H (if it
lands on the retrain, the gap is the H ~ H' approximation, i.e. the edit's size; if not, one
Newton step is not enough: the loss is not quadratic that far); and the metrics of theta_hat, the
influence step and both retrains: mean per-example loss on the removed and kept records and, from
``Evaluator`` on the removed records (role forget, with their paraphrased and perturbed answers)
and the kept ones (role retain), forget_Q_A_Prob, forget_truth_ratio, forget_quality against the
retrain from theta_0, and retain_Q_A_Prob.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn

from lightning_unlearn.data.collate import pad_batch
from lightning_unlearn.data.datamodule import encode_records
from lightning_unlearn.data.edits import InfluenceDataModule
from lightning_unlearn.data.formatting import PLAIN
from lightning_unlearn.data.synthetic import WorldConfig, make_world
from lightning_unlearn.data.tofu import load_split
from lightning_unlearn.data.tokenizer import load_tokenizer
from lightning_unlearn.evaluation_settings import EvaluationSettings
from lightning_unlearn.influence import (
    METHODS,
    Edit,
    NegativeCurvatureError,
    flatten,
    influence_delta,
    per_example_loss,
    trainable_parameters,
)
from lightning_unlearn.models import LoraSpec, ModelSpec, attach_lora, load_adapter, load_model
from lightning_unlearn.objectives import InfluenceStep

SCRATCH, WARM = "retrain from theta_0", "retrain warm from theta_hat"
# configs/demo.yaml's model; hidden size and depth are options.
LLAMA = {
    "model_type": "llama",
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 128,
    "tie_word_embeddings": False,
}


@dataclass
class Fit:
    """One L-BFGS run: wall seconds, iterations, objective evaluations, final gradient norm."""

    seconds: float
    iterations: int
    evaluations: int
    grad_norm: float


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def key(record: dict) -> tuple[str, str]:
    return record["question"], record["answer"]


def write_jsonl(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def encode_batches(records: list[dict], tokenizer, max_length: int, batch_size: int) -> list[dict]:
    """Padded batches encoded as InfluenceDataModule encodes them, so every path sees the same l_i."""
    features = encode_records(records, tokenizer, PLAIN, max_length)
    return [
        pad_batch(features[i : i + batch_size], tokenizer.pad_token_id)
        for i in range(0, len(features), batch_size)
    ]


def train_base(model: nn.Module, batches: list[dict], epochs: int, lr: float) -> float:
    """Full fine-tune (AdamW) so the LoRA is fitted on a model that has learnt the world's sentence
    shapes; its Hessian at a random network would say little about a real adapter. Returns the
    mean loss of the last epoch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    order = random.Random(0)
    losses: list[float] = []
    for _ in range(epochs):
        losses = []
        for batch in order.sample(batches, len(batches)):
            optimizer.zero_grad()
            loss = per_example_loss(model, batch).mean()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    model.eval()
    return sum(losses) / max(len(losses), 1)


def objective(model: nn.Module, params: list[Tensor], batches: list[dict], n: int, damping: float) -> Tensor:
    """(1/n) sum over ``batches`` of l_i + (damping/2) ||theta||^2, with n the original training size."""
    loss = sum(per_example_loss(model, b).sum() for b in batches) / n
    return loss + damping / 2 * flatten(params).pow(2).sum()


def grad_norm(model: nn.Module, params: list[Tensor], batches: list[dict], n: int, damping: float) -> float:
    return flatten(torch.autograd.grad(objective(model, params, batches, n, damping), params)).norm().item()


def fit_lbfgs(
    model: nn.Module,
    params: list[Tensor],
    batches: list[dict],
    n: int,
    damping: float,
    args: argparse.Namespace,
) -> Fit:
    """L-BFGS with a strong Wolfe line search to max |gradient| <= gtol (or until the loss stops
    changing in float32), the optimiser of theta_hat and of both retrains, so their costs compare."""
    optimizer = torch.optim.LBFGS(
        params, lr=1, max_iter=args.lbfgs_max_iter, max_eval=2 * args.lbfgs_max_iter, history_size=50,
        tolerance_grad=args.gtol, tolerance_change=1e-10, line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure() -> Tensor:
        optimizer.zero_grad()
        loss = objective(model, params, batches, n, damping)
        loss.backward()
        return loss

    start = time.perf_counter()
    optimizer.step(closure)
    seconds = time.perf_counter() - start
    state = optimizer.state_dict()["state"][0]
    return Fit(seconds, state["n_iter"], state["func_evals"], grad_norm(model, params, batches, n, damping))


def assign(params: list[Tensor], theta: Tensor) -> None:
    """Copy ``theta`` into ``params`` (vector_to_parameters would alias it, and the next fit would
    then overwrite the saved point)."""
    with torch.no_grad():
        for p, piece in zip(params, torch.split(theta, [p.numel() for p in params]), strict=True):
            p.copy_(piece.view_as(p))


def merged(names: list[str], theta: Tensor, params: list[Tensor]) -> Tensor:
    """The LoRA's weight updates B A of every module, flattened: theta seen as the model sees it."""
    pieces = dict(zip(names, torch.split(theta, [p.numel() for p in params]), strict=True))
    shapes = {name: p.shape for name, p in zip(names, params, strict=True)}
    updates = []
    for name in names:
        if ".lora_A." in name:
            b_name = name.replace(".lora_A.", ".lora_B.")
            a = pieces[name].view(shapes[name])
            b = pieces[b_name].view(shapes[b_name])
            updates.append((b @ a).reshape(-1))
    return torch.cat(updates)


def cosine(a: Tensor, b: Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0).item()


def run_influence_step(
    args: argparse.Namespace, damping: float, base_dir: Path, adapter_dir: Path, source: Path, out_dir: Path
) -> tuple[float, dict]:
    """The removal as a user runs it: InfluenceStep under Trainer.fit, loading the saved base and
    adapter; returns the wall seconds of the whole fit (load, encode, solve, save) and summary.json."""
    step = InfluenceStep(
        model=ModelSpec(path=str(base_dir)), adapter_dir=str(adapter_dir), edit="instance_removal",
        damping=damping, method="cg", tol=args.tol, max_iter=args.cg_max_iter, out_dir=str(out_dir),
    )  # fmt: skip
    data = InfluenceDataModule(
        tokenizer=str(base_dir), source=str(source), train_split="train", removed_split="removed",
        max_length=args.max_length, batch_size=args.batch_size,
    )  # fmt: skip
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    start = time.perf_counter()
    try:
        trainer.fit(step, datamodule=data)
    except NegativeCurvatureError as err:
        sys.exit(f"influence step failed: {err} (here: --damping or --extra-damping)")
    seconds = time.perf_counter() - start
    return seconds, json.loads((out_dir / "summary.json").read_text())


@dataclass
class SolverRun:
    """One --solver: wall seconds of influence_delta, its iterations (passes for the layer-wise
    ones), and v."""

    seconds: float
    iterations: int
    v: Tensor


def solver_options(args: argparse.Namespace, method: str) -> dict:
    """The stopping rules this benchmark gives each solver (the rest are the solver's defaults)."""
    if method == "cg":
        return {"tol": args.tol, "max_iter": args.cg_max_iter}
    if method in ("stochastic", "lissa"):
        return {"max_iter": args.stochastic_iter}
    if method == "exact":
        return {"max_dim": args.exact_max_dim}
    if method in ("kfac", "ekfac"):
        return {"mc_samples": args.mc_samples}
    return {}


def run_solvers(
    args: argparse.Namespace,
    model: nn.Module,
    train_batches: list[dict],
    removed_batches: list[dict],
    n: int,
    damping: float,
    names: list[str],
    dim: int,
) -> dict[str, SolverRun]:
    """influence_delta for every --solver (and exact first, as the reference, when the adapter has
    at most --exact-max-dim parameters), timed."""
    methods = list(dict.fromkeys(args.solver))
    if dim <= args.exact_max_dim and "exact" not in methods:
        methods.insert(0, "exact")
    edit = Edit("instance_removal", removed=removed_batches)
    runs = {}
    for method in methods:
        start = time.perf_counter()
        try:
            delta, result = influence_delta(
                model, train_batches, edit, n, damping, method, **solver_options(args, method)
            )
        except NegativeCurvatureError as err:
            log(f"{method}: {err}")
            continue
        runs[method] = SolverRun(
            time.perf_counter() - start, result.iterations, flatten(delta[k] for k in names)
        )
        log(f"{method}: {runs[method].seconds:.2f} s, {result.iterations} iterations")
    return runs


def print_solvers(
    runs: dict[str, SolverRun],
    model: nn.Module,
    params: list[Tensor],
    theta_hat: Tensor,
    theta_retrain: Tensor,
    removed_batches: list[dict],
    kept_batches: list[dict],
) -> None:
    """The --solver table: cost, and where each step lands against exact and against the retrain."""
    exact = runs.get("exact")
    target = theta_retrain - theta_hat
    print("\nSolvers side by side (influence_delta called directly; exact: dense H from HVPs)")
    print("\n| solver | wall s | iterations / passes | cos(v, v_exact) | |v| / |v_exact| "
          "| cos(v, Δθ_retrain) | |v| / |Δθ_retrain| | loss removed | loss kept |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for method, run in runs.items():
        assign(params, theta_hat + run.v)
        versus_exact = (f"{cosine(run.v, exact.v):.4f} | {(run.v.norm() / exact.v.norm()).item():.3f}"
                        if exact is not None else "- | -")  # fmt: skip
        print(
            f"| {method} | {run.seconds:.2f} | {run.iterations} | {versus_exact} | {cosine(run.v, target):.4f} "
            f"| {(run.v.norm() / target.norm()).item():.3f} | {per_example(model, removed_batches).mean():.4f} "
            f"| {per_example(model, kept_batches).mean():.4f} |"
        )
    assign(params, theta_hat)


def per_example(model: nn.Module, batches: list[dict]) -> Tensor:
    with torch.no_grad():
        return torch.cat([per_example_loss(model, b) for b in batches])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n-train", type=int, default=64, help="records the LoRA is fitted on")
    parser.add_argument("--remove", type=int, default=4, help="of them removed (from the forget split)")
    parser.add_argument("--damping", type=float, default=0.3, help="L2 penalty of every fit = damping")
    parser.add_argument(
        "--extra-damping", type=float, default=0.0,
        help="fraction of --damping added in the solve only (H + damping I is singular for r >= 2: see above)",
    )  # fmt: skip
    parser.add_argument("--lora-r", type=int, default=1)
    parser.add_argument("--targets", nargs="+", default=["q_proj", "v_proj"], help="LoRA target modules")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--authors", type=int, default=40, help="authors of the synthetic world")
    parser.add_argument("--forget-authors", type=int, default=4)
    parser.add_argument("--world-facts", type=int, default=50)
    parser.add_argument("--hidden", type=int, default=128, help="hidden size (intermediate: 4x)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--base-epochs", type=int, default=20, help="full fine-tuning epochs of the base")
    parser.add_argument("--base-lr", type=float, default=2e-3)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="rows per forward (memory, not maths)")
    parser.add_argument("--tol", type=float, default=1e-4, help="cg: relative residual to stop at")
    parser.add_argument("--cg-max-iter", type=int, default=300)
    parser.add_argument("--gtol", type=float, default=1e-5, help="L-BFGS: max |gradient| to stop at")
    parser.add_argument("--lbfgs-max-iter", type=int, default=500)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (tiny ops: 1 is fastest)")
    parser.add_argument(
        "--kept-hessian", action=argparse.BooleanOptionalAction, default=True,
        help="also take the Newton step with the kept records' Hessian (a diagnostic; one more solve)",
    )  # fmt: skip
    parser.add_argument(
        "--solver", nargs="+", default=["cg", "kfac", "ekfac", "datainf", "lissa"], choices=METHODS,
        help="inverse-HVPs to compare side by side (time, cosine with exact, with the retrain)",
    )  # fmt: skip
    parser.add_argument("--exact-max-dim", type=int, default=1024,
                        help="also run exact (the reference) when the adapter has at most this many parameters")  # fmt: skip
    parser.add_argument("--stochastic-iter", type=int, default=200, help="iterations of stochastic / lissa")
    parser.add_argument("--mc-samples", type=int, default=1, help="kfac / ekfac: label draws per token")
    parser.add_argument("--work-dir", help="keep the world, base, adapters here (default: a temp dir)")
    args = parser.parse_args()
    if not 1 <= args.remove < args.n_train:
        sys.exit(f"--remove must be between 1 and --n-train - 1, got {args.remove}")
    torch.set_num_threads(args.threads)
    solve_damping = args.damping * (1 + args.extra_damping)

    with tempfile.TemporaryDirectory(prefix="influence_bench_") as tmp:
        root = Path(args.work_dir or tmp)
        root.mkdir(parents=True, exist_ok=True)
        n_retain_authors = args.authors - args.forget_authors
        config = WorldConfig(
            seed=args.seed, n_authors=args.authors, n_forget_authors=args.forget_authors,
            n_world_facts=args.world_facts, n_eval_retain_authors=min(10, max(n_retain_authors, 0)),
        )  # fmt: skip
        world = make_world(root / "world", config)
        pct = 100 * args.forget_authors // args.authors
        forget = load_split(world, f"forget{pct:02d}")
        retain = load_split(world, f"retain{100 - pct:02d}")
        perturbed = {key(r): r for r in load_split(world, f"forget{pct:02d}_perturbed")}
        n_kept = args.n_train - args.remove
        if args.remove > len(forget) or n_kept >= len(retain):
            sys.exit(
                f"the world has {len(forget)} forget and {len(retain)} retain records: --remove "
                f"{args.remove} and {n_kept} kept records (plus some for the base) do not fit"
            )

        # Training set: `remove` forget records and n_kept retain records; the base learns the rest.
        rng = random.Random(args.seed)
        removed = rng.sample(forget, args.remove)
        kept_rows = set(rng.sample(range(len(retain)), n_kept))
        kept = [r for i, r in enumerate(retain) if i in kept_rows]
        base_records = [r for i, r in enumerate(retain) if i not in kept_rows]
        source = root / "source"
        source.mkdir(exist_ok=True)
        write_jsonl(source / "train.json", kept + removed)
        write_jsonl(source / "removed.json", removed)

        tokenizer = load_tokenizer(str(world / "tokenizer"))
        spec = ModelSpec(
            config={**LLAMA, "hidden_size": args.hidden, "intermediate_size": 4 * args.hidden,
                    "num_hidden_layers": args.layers},
            tokenizer=str(world / "tokenizer"), init_seed=args.seed,
        )  # fmt: skip
        torch.manual_seed(args.seed)
        model = load_model(spec, tokenizer)

        def batches(records: list[dict]) -> list[dict]:
            return encode_batches(records, tokenizer, args.max_length, args.batch_size)

        start = time.perf_counter()
        base_loss = train_base(model, batches(base_records), args.base_epochs, args.base_lr)
        base_seconds = time.perf_counter() - start
        log(f"base: {args.base_epochs} epochs, loss {base_loss:.3f}, {base_seconds:.1f} s")
        base_dir = root / "base"
        model.save_pretrained(base_dir)
        tokenizer.save_pretrained(base_dir)

        # theta_0: peft's A and a small random B (peft's B = 0 makes every A-gradient vanish).
        targets = args.targets[0] if args.targets == ["all-linear"] else args.targets  # peft's shorthand
        model = attach_lora(model, LoraSpec(r=args.lora_r, alpha=2 * args.lora_r, target_modules=targets))
        generator = torch.Generator().manual_seed(args.seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=generator) * 0.1)
        model.eval()
        named = trainable_parameters(model)
        names, params = [n for n, _ in named], [p for _, p in named]
        theta_0 = flatten(params).detach().clone()
        n = args.n_train
        train_batches, kept_batches = batches(kept + removed), batches(kept)
        removed_batches = batches(removed)

        fits = {"theta_hat": fit_lbfgs(model, params, train_batches, n, args.damping, args)}
        theta_hat = flatten(params).detach().clone()
        b_norm = grad_norm(model, params, removed_batches, n, 0.0)  # |(1/n) sum_S grad l_z|
        fit = fits["theta_hat"]
        log(
            f"theta_hat: {fit.iterations} L-BFGS iterations, {fit.seconds:.1f} s, |grad| {fit.grad_norm:.1e}, "
            f"|theta_hat| {theta_hat.norm():.3g} (theta_0: {theta_0.norm():.3g}), |b| {b_norm:.1e}"
        )
        if b_norm < 10 * fit.grad_norm:
            log(
                "warning: |grad| at theta_hat is not well below |b|: not stationary enough for the "
                "step, or the adapter collapsed to A = B = 0 where every gradient vanishes (lower --damping)"
            )
        adapter_dir = root / "adapter"
        model.save_pretrained(adapter_dir)

        # (a) the influence step, as a user runs it: InfluenceStep loads base and adapter from disk.
        fit_seconds, summary = run_influence_step(
            args, solve_damping, base_dir, adapter_dir, source, root / "influence"
        )
        log(f"influence step: {summary['iterations']} cg iterations, {summary['wall_time_s']:.1f} s")
        edited = load_adapter(
            load_model(ModelSpec(path=str(base_dir))), str(root / "influence"), trainable=True
        )
        edited_params = dict(trainable_parameters(edited))
        theta_influence = flatten(edited_params[name] for name in names).detach().clone()
        thetas = {"theta_hat": theta_hat, "influence step": theta_influence}

        # Diagnostic: the same Newton step with the Hessian of the kept records only (H' instead of
        # H), i.e. the exact Newton step of the retraining objective at theta_hat. If it lands on the
        # retrain, a gap of the influence step is the H ~ H' approximation (the edit's size); if not,
        # one Newton step is not enough (non-quadratic loss, or the retrain found another minimum).
        notes: list[str] = []
        if args.kept_hessian:
            edit = Edit("instance_removal", removed=removed_batches)
            try:
                delta, _ = influence_delta(model, kept_batches, edit, n, solve_damping, "cg",
                                           tol=args.tol, max_iter=args.cg_max_iter)  # fmt: skip
                thetas["Newton step with H'"] = theta_hat + flatten(delta[name] for name in names)
            except NegativeCurvatureError:
                notes.append(
                    "Newton step with H': none, H' + damping I is not positive definite at theta_hat "
                    "(without the removed records' curvature the kept objective has directions of "
                    "negative curvature there, so no single Newton step can reach the retrain)"
                )

        # (c) every --solver on the same removal, called directly, against exact where it fits.
        solver_runs = run_solvers(args, model, train_batches, removed_batches, n, solve_damping, names,
                                  theta_hat.numel())  # fmt: skip

        # (b) retraining without the removed records: from theta_0, and warm from theta_hat.
        assign(params, theta_0)
        fits[SCRATCH] = fit_lbfgs(model, params, kept_batches, n, args.damping, args)
        log(f"{SCRATCH}: {fits[SCRATCH].iterations} iterations, {fits[SCRATCH].seconds:.1f} s")
        thetas[SCRATCH] = flatten(params).detach().clone()
        assign(params, theta_hat)
        fits[WARM] = fit_lbfgs(model, params, kept_batches, n, args.damping, args)
        thetas[WARM] = flatten(params).detach().clone()
        log(f"{WARM}: {fits[WARM].iterations} iterations, {fits[WARM].seconds:.1f} s")

        eval_splits = {"forget": [perturbed[key(r)] for r in removed], "retain": kept}
        scores: dict[str, dict[str, float]] = {}
        retain_truth_ratios = None
        # The from-scratch retrain first: its truth ratios are the reference of forget_quality.
        for label in [SCRATCH, *[t for t in thetas if t != SCRATCH]]:
            assign(params, thetas[label])
            evaluator = EvaluationSettings(batch_size=64, max_new_tokens=0).evaluator(
                tokenizer, eval_splits, prompt_format=PLAIN, max_length=args.max_length,
                retain_truth_ratios=retain_truth_ratios, progress=False,
            )  # fmt: skip
            report = evaluator.run(model)
            if retain_truth_ratios is None:
                retain_truth_ratios = report.per_sample["forget_truth_ratio"]
            with torch.no_grad():
                kept_objective = objective(model, params, kept_batches, n, args.damping).item()
            scores[label] = {
                "loss_removed": per_example(model, removed_batches).mean().item(),
                "loss_kept": per_example(model, kept_batches).mean().item(),
                "kept_objective": kept_objective,
                "grad_kept": grad_norm(model, params, kept_batches, n, args.damping),
                **report.metrics,
            }

    print(
        f"Influence removal vs retraining: Llama hidden {args.hidden} x {args.layers} layers, LoRA r{args.lora_r} "
        f"on {' '.join(args.targets)} ({theta_hat.numel()} parameters), float32, {args.threads} thread(s); "
        f"{args.n_train} training records, {args.remove} removed (forget{pct:02d}), L2 penalty = damping {args.damping} "
        f"(solve: {solve_damping:.3g}); "
        f"base: {args.base_epochs} epochs on {len(base_records)} other records, loss {base_loss:.3f}, "
        f"{base_seconds:.1f} s; theta_hat: |grad| {fits['theta_hat'].grad_norm:.1e} against "
        f"|b| = |(1/n) sum_S grad l_z| {b_norm:.1e}"
    )

    retrain_s = fits[SCRATCH].seconds
    solve_s = summary["wall_time_s"]
    print("\n| run | wall s | retrain from theta_0 / this | iterations | objective evals | final |")
    print("|---|---|---|---|---|---|")
    for label, fit in fits.items():
        print(
            f"| {label}: L-BFGS | {fit.seconds:.2f} | {retrain_s / fit.seconds:.2f}x | {fit.iterations} "
            f"| {fit.evaluations} | grad norm {fit.grad_norm:.1e} |"
        )
    print(
        f"| influence step: cg solve | {solve_s:.2f} | {retrain_s / solve_s:.2f}x | {summary['iterations']} "
        f"| - | relative residual {summary['relative_residual']:.1e} |"
    )
    print(
        f"| influence step: whole Trainer.fit | {fit_seconds:.2f} | {retrain_s / fit_seconds:.2f}x | - | - "
        "| load, encode, solve, save |"
    )

    def geometry(theta: Tensor, reference: Tensor) -> str:
        """cos and norm ratio of theta - theta_hat against reference - theta_hat, in the LoRA
        parameters and in the merged B A, and the distance left as a fraction of the step."""
        delta, target = theta - theta_hat, reference - theta_hat
        ba = merged(names, theta, params) - merged(names, theta_hat, params)
        ba_target = merged(names, reference, params) - merged(names, theta_hat, params)
        return (
            f"{cosine(delta, target):.3f} | {(delta.norm() / target.norm()).item():.3f} "
            f"| {cosine(ba, ba_target):.3f} | {(ba.norm() / ba_target.norm()).item():.3f} "
            f"| {((theta - reference).norm() / target.norm()).item():.3f}"
        )

    print("\nChange from theta_hat against each retrain's (Δ = θ - θ_hat; BA: the merged LoRA update)")
    print(
        "\n| step | retrain from theta_0: cos Δθ | |Δθ| ratio | cos ΔBA | |ΔBA| ratio | |θ - θ_retrain| / |Δθ_retrain| "
        "| warm retrain: cos Δθ | |Δθ| ratio | cos ΔBA | |ΔBA| ratio | |θ - θ_retrain| / |Δθ_retrain| |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for label, theta in thetas.items():
        if label != "theta_hat":
            print(f"| {label} | {geometry(theta, thetas[SCRATCH])} | {geometry(theta, thetas[WARM])} |")

    print(
        "\n| model | kept objective | its grad norm | loss removed | loss kept | forget_Q_A_Prob "
        "| forget_truth_ratio | forget_quality vs retrain from theta_0 | retain_Q_A_Prob |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for label in thetas:
        s = scores[label]
        quality = f"{s['forget_quality']:.3g}" if "forget_quality" in s else "reference"
        print(
            f"| {label} | {s['kept_objective']:.4f} | {s['grad_kept']:.1e} | {s['loss_removed']:.4f} "
            f"| {s['loss_kept']:.4f} | {s['forget_Q_A_Prob']:.4f} | {s['forget_truth_ratio']:.4f} | {quality} "
            f"| {s['retain_Q_A_Prob']:.4f} |"
        )
    for note in notes:
        print(f"\n{note}")
    print_solvers(solver_runs, model, params, theta_hat, thetas[SCRATCH], removed_batches, kept_batches)
    v, target = theta_influence - theta_hat, thetas[SCRATCH] - theta_hat
    print(
        f"\nretrain from theta_0 / influence step: {retrain_s / solve_s:.2f}x the cg solve, "
        f"{retrain_s / fit_seconds:.2f}x the whole Trainer.fit; cos(v, θ_retrain - θ_hat) {cosine(v, target):.3f}, "
        f"|v| / |θ_retrain - θ_hat| {(v.norm() / target.norm()).item():.3f}"
    )


if __name__ == "__main__":
    main()
