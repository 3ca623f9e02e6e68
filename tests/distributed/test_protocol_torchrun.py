"""The whole protocol under ``torchrun --nproc-per-node 2`` (CPU, gloo): the fine-tunes under ddp
and a gradient-ascent stage under FSDP2 (``ModelParallelStrategy``, distributed checkpoint),
SIGTERM to rank 1 in the middle of that stage, the rerun (the command the line names: torchrun's
own), and the final report against the same protocol in one process on the same global batches.

Tolerance: the fit tests' (``test_scale_out.py``): 1e-5 of each weight tensor's scale, metrics
and per-sample values within 1e-5 relative (1e-6 absolute), greedy generations identical. The
2-process run sums the same numbers in another order (gloo all-reduce, sharded FSDP2 gathers);
SGD at these learning rates keeps the rounding differences at the fit tests' 1e-7 to 1e-6 through
the chain of three trainings. (AdamW amplifies them: its first steps move every weight by about
``lr`` whatever the gradient's size, so a rounding-level gradient difference becomes a 1e-4
difference in the weights; the fit tests use SGD for the same reason.) A wrong rank split of the
data, a per-rank mean, a stage that trained on one rank only, or a resume from the wrong step
move these numbers by 1e-3 and more. One exception: per-sample Min-K%++ scores get 1e-3. They
divide each token's log-probability by the std of log p over the vocabulary, computed as
sqrt(E[log^2 p] - E[log p]^2): for this nearly uniform tiny model that is a float32 difference of
two numbers near (log V)^2 with a result near 1e-3, which turns 1e-7 differences into 1e-4
(measured 1.5e-4). (Their AUC needs a holdout split, which this protocol does not evaluate.)
"""

from __future__ import annotations

import json
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_LLAMA
from safetensors.torch import load_file
from test_preemption import _env, preempted_line, run, signal_at

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")


def _config(path: Path, processes: int) -> Path:
    """A tiny protocol: 22 retain + 10 forget rows, 3 fine-tune epochs of 2 global batches of 16,
    then gradient ascent for 2 epochs of 5 global batches of 2 under FSDP2; per-rank batch sizes
    halved on 2 ranks, so both runs see the same global batches."""
    sgd = {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.5}}
    fsdp2 = {
        "class_path": "lightning.pytorch.strategies.ModelParallelStrategy",
        "init_args": {"data_parallel_size": processes, "tensor_parallel_size": 1,
                      "save_distributed_checkpoint": True},
    }  # fmt: skip
    config = {
        "name": "mini", "seed": 0, "out_dir": "runs",
        "model": {"config": dict(TINY_LLAMA, num_hidden_layers=2)},
        "data": {"source": "synthetic", "max_length": 48, "retain_limit": 22, "eval_limit": 4,
                 "world": {"seed": 1, "n_authors": 10, "n_forget_authors": 1, "n_world_facts": 4,
                           "n_eval_retain_authors": 2},
                 "eval_splits": {"forget": "forget10_perturbed", "retain": "retain_perturbed"}},
        "finetune": {"objective": {"class_path": "lightning_unlearn.objectives.FineTune",
                                   "init_args": {"optimizer": sgd}},
                     "max_epochs": 3, "batch_size": 16 // processes},
        "objectives": {"ga": {
            "objective": {"class_path": "lightning_unlearn.objectives.GradAscent",
                          "init_args": {"optimizer": dict(sgd, init_args={"lr": 0.05})}},
            "max_epochs": 2, "batch_size": 2 // processes,
            "trainer": {"strategy": fsdp2, "callbacks": [{"class_path": "helpers.WaitForSignal"}]}}},
        "evaluation": {"batch_size": 8, "max_new_tokens": 4},
        "trainer": {"enable_progress_bar": False, "strategy": "ddp"},
    }  # fmt: skip
    path.parent.mkdir(parents=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _close(got: float, want: float, where: str, rel: float = 1e-5) -> None:
    assert got == pytest.approx(want, rel=rel, abs=1e-6), where


@pytest.fixture(scope="module")
def one(tmp_path_factory) -> Path:
    """The protocol in one process: what both multi-process launches must reproduce."""
    one = tmp_path_factory.mktemp("one") / "one"
    run(
        [
            sys.executable,
            "-m",
            "lightning_unlearn",
            "protocol",
            "--config",
            str(_config(one / "p.yaml", 1)),
        ],
        one,
    )
    return one


def _same_as_one_process(one: Path, two: Path) -> None:
    """report.json and every saved model of the run in ``two`` equal the 1-process run's."""
    want, got = (json.loads((d / "runs" / "mini" / "report.json").read_text()) for d in (one, two))
    assert list(got) == list(want) == ["finetuned", "retain", "ga"]
    for model in want:
        assert got[model]["generations"] == want[model]["generations"]
        assert got[model]["metrics"].keys() == want[model]["metrics"].keys()
        for name, value in want[model]["metrics"].items():
            _close(got[model]["metrics"][name], value, f"{model} {name}")
        for name, values in want[model]["per_sample"].items():
            for k, value in enumerate(values):
                rel = 1e-3 if name.endswith("min_k_plus_plus") else 1e-5  # see the module docstring
                _close(got[model]["per_sample"][name][k], value, f"{model} {name}[{k}]", rel)
    # GA moved the target (so equal numbers are not two untouched copies), and every model's
    # weights equal the 1-process ones.
    assert want["ga"]["metrics"]["forget_Q_A_Prob"] < 0.9 * want["finetuned"]["metrics"]["forget_Q_A_Prob"]
    for model in want:
        a, b = (
            load_file(str(d / "runs" / "mini" / "models" / model / "model.safetensors")) for d in (one, two)
        )
        for key in a:
            error = (b[key] - a[key]).abs().max().item()
            assert error <= 1e-5 * a[key].abs().max().item(), f"{model} {key}: {error:.1e}"


def test_protocol_under_torchrun_resumes_fsdp2_stage_and_equals_one_process(one, tmp_path):
    """Two ranks: rank 0 alone prints and writes, the other rank reads what it wrote (the target
    the stages after it load); SIGTERM to rank 1 at step 3 of GA (epoch 0 of 2) stops both with
    GA's sharded checkpoint of step 3 and one line naming torchrun's command; that command keeps
    the finished stages and resumes GA; report.json and the GA model equal the 1-process run's."""
    two = tmp_path / "two"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "lightning_unlearn", "protocol", "--config", str(_config(two / "p.yaml", 2))]  # fmt: skip
    done = signal_at(command, two, step=3, rank=1)
    assert done.returncode != 0, done.stderr[-3000:]  # torchrun's status for failed workers: 1
    assert "exitcode  : 143" in done.stderr  # the workers' own: preempted
    assert preempted_line(done.stderr).endswith(f"rerun: cd {shlex.quote(str(two))} && {shlex.join(command)}")
    run_dir = two / "runs" / "mini"
    checkpoint = run_dir / "preempted" / "ga.ckpt"
    assert checkpoint.is_dir() and (checkpoint / "meta.pt").is_file()  # sharded: a directory
    assert torch.load(checkpoint / "meta.pt", weights_only=True)["global_step"] == 3
    assert not (run_dir / "models" / "ga").exists() and (run_dir / "models" / "finetuned").is_dir()

    rerun = run(command, two)
    for line in ("[mini] finetuned: done before, kept", "[mini] ga: resuming from"):
        assert rerun.stdout.count(line) == 1, rerun.stdout[-3000:]  # said once, by rank 0
    assert rerun.stdout.count("| ga |") == 1 and not checkpoint.exists()

    _same_as_one_process(one, two)


def test_protocol_under_srun_equals_one_process(one, tmp_path):
    """Two tasks started as ``srun --ntasks 2`` starts them on one node: the same command in each,
    told its place only by SLURM's variables (no RANK/WORLD_SIZE: Lightning's SLURMEnvironment
    reads them); the report and models equal the 1-process run's."""
    two = tmp_path / "two"
    config = _config(two / "p.yaml", 2)
    command = [sys.executable, "-m", "lightning_unlearn", "protocol", "--config", str(config)]
    with socket.socket() as s:  # a free port for the rendezvous, as MASTER_PORT in an sbatch script
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    tasks = []
    for task in range(2):
        slurm = {"SLURM_NTASKS": "2", "SLURM_NNODES": "1", "SLURM_NTASKS_PER_NODE": "2",
                 "SLURM_PROCID": str(task), "SLURM_LOCALID": str(task), "SLURM_NODEID": "0",
                 "SLURM_JOB_NAME": "unlearn", "SLURM_JOB_ID": "4242", "SLURM_NODELIST": "127.0.0.1",
                 "MASTER_PORT": port}  # fmt: skip
        log = (two / f"task{task}.log").open("w+")
        tasks.append((subprocess.Popen(command, cwd=two, env=_env(**slurm), stdout=log, stderr=log), log))
    for process, log in tasks:
        code = process.wait(timeout=300)
        log.seek(0)
        output = log.read()
        log.close()
        assert code == 0, output[-3000:]
    _same_as_one_process(one, two)
