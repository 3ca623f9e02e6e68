"""``lightning-unlearn sweep``: the grid is the product of the values, a killed sweep reruns only
its unfinished trials, the Pareto front equals a brute-force one, the best-trial rule, and bad
space keys as one-line errors naming the file and the key."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import TINY_LLAMA
from helpers import record_fits

from lightning_unlearn.callbacks import UnlearningEvaluation
from lightning_unlearn.cli import main
from lightning_unlearn.errors import UserError
from lightning_unlearn.pareto import pareto_front
from lightning_unlearn.protocol import Protocol
from lightning_unlearn.search_space import grid, parse_space
from lightning_unlearn.sweep import BestRule, Sweep, choose_best, sweep_table

ADAMW = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3}}


def _protocol_file(tmp_path) -> str:
    """A protocol small enough that target, retain model and a trial take about a second each."""
    config = {
        "name": "mini",
        "model": {"config": dict(TINY_LLAMA)},
        "data": {
            "world": {
                "seed": 1,
                "n_authors": 5,
                "n_forget_authors": 1,
                "n_world_facts": 4,
                "n_eval_retain_authors": 2,
            },
            "eval_splits": {"forget": "forget20_perturbed", "retain": "retain_perturbed"},
            "forget_split": "forget20",
            "retain_split": "retain80",
            "max_length": 48,
        },
        "finetune": {
            "objective": {
                "class_path": "lightning_unlearn.objectives.FineTune",
                "init_args": {"optimizer": ADAMW},
            },
            "max_epochs": 2,
            "batch_size": 16,
        },
        "objectives": {
            "ga": {
                "objective": {
                    "class_path": "lightning_unlearn.objectives.GradAscent",
                    "init_args": {"optimizer": ADAMW},
                },
                "max_epochs": 2,
                "batch_size": 4,
            }
        },
        "evaluation": {"batch_size": 32, "max_new_tokens": 2},
        "trainer": {"enable_progress_bar": False},
    }
    path = tmp_path / "protocol.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def _sweep(tmp_path, **overrides) -> Sweep:
    settings = {
        "protocol": _protocol_file(tmp_path),
        "objective": "ga",
        "space": {"objective.init_args.optimizer.init_args.lr": [1e-4, 1e-2], "max_epochs": [1, 2]},
        "name": "sw",
        "out_dir": str(tmp_path / "runs"),
        "best": BestRule(metric="forget_quality", min_ratio={"model_utility": 0.5}),
        "config_file": "sweeps/mini.yaml",
        **overrides,
    }
    return Sweep(**settings)


# -- grid -------------------------------------------------------------------------------------------
def test_grid_is_the_product_of_the_values():
    space = {"a.b": [1, 2], "c": ["x", "y", "z"], "d": [0.5]}
    points = grid(parse_space(space, "f.yaml"), "f.yaml")
    expected = [{"a.b": a, "c": c, "d": d} for a in (1, 2) for c in ("x", "y", "z") for d in (0.5,)]
    assert points == expected  # every combination once, the last key fastest


def test_grid_refuses_a_range():
    with pytest.raises(UserError, match="f.yaml: a grid sweep needs a list of values for space key 'lr'"):
        grid(parse_space({"lr": {"low": 1e-5, "high": 1e-3, "log": True}}, "f.yaml"), "f.yaml")


# -- resume -----------------------------------------------------------------------------------------
class Killed(BaseException):
    """Stands for SIGKILL: neither Lightning nor Optuna gets to record an end."""


def test_killed_sweep_reruns_only_unfinished_trials(tmp_path, monkeypatch):
    trained: list[str] = []
    unlearn = Protocol._unlearn

    def counting(self, name, *args, **kwargs):
        trained.append(name)
        return unlearn(self, name, *args, **kwargs)

    monkeypatch.setattr(Protocol, "_unlearn", counting)
    evaluate = UnlearningEvaluation.evaluate

    def dies_in_third_trial(self, trainer, pl_module):
        if len(trained) == 3 and trainer.global_step > 0:
            raise Killed
        return evaluate(self, trainer, pl_module)

    monkeypatch.setattr(UnlearningEvaluation, "evaluate", dies_in_third_trial)
    with pytest.raises(Killed):
        _sweep(tmp_path).run()
    first = json.loads((tmp_path / "runs/sw/sweep.json").read_text())
    done_before = {t["name"]: t for t in first["trials"] if t["state"] == "COMPLETE"}
    assert len(done_before) == 2

    monkeypatch.setattr(UnlearningEvaluation, "evaluate", evaluate)
    trained.clear()
    summary = _sweep(tmp_path).run()
    assert len(trained) == 2  # the killed trial again and the one never started

    complete = [t for t in summary["trials"] if t["state"] == "COMPLETE"]
    assert len(complete) == 4 and len(summary["trials"]) == 5  # + the killed one, failed
    product = [
        {"objective.init_args.optimizer.init_args.lr": lr, "max_epochs": e}
        for lr in (1e-4, 1e-2)
        for e in (1, 2)
    ]
    assert sorted(map(json.dumps, (t["settings"] for t in complete))) == sorted(map(json.dumps, product))
    for name, before in done_before.items():  # kept, not rerun: the very same records
        after = next(t for t in summary["trials"] if t["name"] == name)
        assert after["evaluations"] == before["evaluations"] and after["wall_time_s"] == before["wall_time_s"]
    for t in complete:  # the step-0 evaluation, then one per epoch (the entry has no cadence)
        assert [e["step"] for e in t["evaluations"]][0] == 0
        assert len(t["evaluations"]) == t["settings"]["max_epochs"] + 1

    best = summary["best"]
    assert best == {
        **choose_best(summary["trials"], _sweep(tmp_path).best),
        "dir": str(tmp_path / "runs/sw/best"),
    }
    exported = json.loads((tmp_path / "runs/sw/best/sweep_best.json").read_text())
    assert exported["name"] == best["name"] and exported["evaluation"]["step"] == best["evaluation"]["step"]
    assert (tmp_path / "runs/sw/best/model.safetensors").is_file()
    assert (tmp_path / "runs/sw/pareto.png").stat().st_size > 0
    assert (tmp_path / "runs/sw/sweep.md").read_text().count("\n| trial") == 5

    trained.clear()
    again = _sweep(tmp_path).run()  # nothing left to run
    assert trained == [] and again["best"] == summary["best"]

    # A grid grows: a new learning rate adds its two points; the finished trials are kept as they were.
    lr = "objective.init_args.optimizer.init_args.lr"
    grown = _sweep(tmp_path, space={lr: [1e-4, 1e-2, 3e-3], "max_epochs": [1, 2]}).run()
    assert len(trained) == 2 and grown["trials"][: len(again["trials"])] == again["trials"]
    assert sorted((t["settings"][lr], t["settings"]["max_epochs"]) for t in grown["trials"][-2:]) == [
        (3e-3, 1),
        (3e-3, 2),
    ]
    other_keys = _sweep(tmp_path, space={lr: [1e-4, 1e-2]}).fingerprint()
    assert other_keys != _sweep(tmp_path).fingerprint()  # other keys: another sweep


def test_changed_sweep_settings_are_refused(tmp_path):
    (tmp_path / "runs/sw").mkdir(parents=True)
    (tmp_path / "runs/sw/sweep.fingerprint").write_text("0123456789abcdef\n")
    with pytest.raises(UserError, match="holds a run of other settings"):
        _sweep(tmp_path).run()


# -- Pareto front -----------------------------------------------------------------------------------
def _brute_force_front(points):
    def dominates(p, q):
        return p[0] >= q[0] and p[1] >= q[1] and (p[0] > q[0] or p[1] > q[1])

    ok = [i for i, p in enumerate(points) if not any(math.isnan(v) for v in p)]
    return [i for i in ok if not any(dominates(points[j], points[i]) for j in ok if j != i)]


def test_pareto_front_on_known_points():
    points = [
        (0.6, 0.9),
        (0.7, 0.5),
        (0.65, 0.5),
        (0.7, 0.5),
        (0.5, 0.95),
        (0.4, 0.95),
        (0.8, 0.01),
        (math.nan, 1.0),
    ]
    # (0.65, 0.5) is beaten by (0.7, 0.5); (0.4, 0.95) by (0.5, 0.95); the equal pair both stay.
    assert pareto_front(points) == [0, 1, 3, 4, 6]


def test_pareto_front_equals_brute_force():
    rng = random.Random(0)
    for n in (1, 2, 5, 30, 200):
        # few distinct values, so equal coordinates and equal points are common
        points = [(rng.randint(0, 6) / 6, rng.randint(0, 6) / 6) for _ in range(n)]
        assert pareto_front(points) == _brute_force_front(points)


# -- best rule --------------------------------------------------------------------------------------
def _trial(number, state, evaluations):
    return {
        "number": number,
        "name": f"trial{number:03d}",
        "state": state,
        "settings": {"lr": number},
        "evaluations": evaluations,
    }


def _eval(step, fq, mu, **extra):
    return {"step": step, "epoch": step, "forget_quality": fq, "model_utility": mu, **extra}


HANDMADE = [
    # trial 0: its best allowed evaluation is step 2 (step 3 has higher forget quality but 0.5x utility)
    _trial(0, "COMPLETE", [_eval(0, 0.01, 0.70), _eval(2, 0.60, 0.68), _eval(3, 0.99, 0.35)]),
    # trial 1 failed: its 0.95 does not count
    _trial(1, "FAIL", [_eval(0, 0.01, 0.70), _eval(2, 0.95, 0.70)]),
    # trial 2: reaches 0.80 at 0.667 = 0.953x the target's utility, allowed
    _trial(2, "COMPLETE", [_eval(0, 0.01, 0.70), _eval(2, 0.30, 0.69), _eval(4, 0.80, 0.667)]),
    # trial 3: 0.80 too, with more utility than trial 2's: the tie goes to trial 3
    _trial(3, "COMPLETE", [_eval(0, 0.01, 0.70), _eval(1, 0.80, 0.70)]),
    # trial 5: 0.80 at 0.70, a tie with trial 3 on both: the earlier trial keeps it
    _trial(5, "COMPLETE", [_eval(0, 0.01, 0.70), _eval(1, 0.80, 0.70)]),
    # trial 4: 0.90 at 0.66 = 0.943x, refused under 0.95x
    _trial(4, "COMPLETE", [_eval(0, 0.01, 0.70), _eval(2, 0.90, 0.66)]),
]


def test_best_rule_on_a_handmade_sweep(tmp_path):
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"trials": HANDMADE}))
    trials = json.loads(path.read_text())["trials"]
    best = choose_best(trials, BestRule(metric="forget_quality", min_ratio={"model_utility": 0.95}))
    assert (best["name"], best["evaluation"]["step"]) == ("trial003", 1)
    # no constraint: the highest forget quality anywhere in a finished trial
    best = choose_best(trials, BestRule(metric="forget_quality", min_ratio={}))
    assert (best["name"], best["evaluation"]["step"]) == ("trial000", 3)
    # mode min over another report key; a looser constraint admits trial 4
    best = choose_best(trials, BestRule(metric="model_utility", mode="min", min_ratio={"model_utility": 0.9}))
    assert (best["name"], best["evaluation"]["step"]) == ("trial004", 2)
    # nothing meets a constraint above the target itself
    assert choose_best(trials, BestRule(min_ratio={"model_utility": 1.01})) is None


def test_best_rule_takes_a_holdout_monitor():
    """A metric that needs no retain model (``forget_quality_holdout``) works as any report key."""
    trials = [
        _trial(
            0,
            "COMPLETE",
            [_eval(0, 0.0, 0.7, forget_quality_holdout=0.02), _eval(1, 0.0, 0.7, forget_quality_holdout=0.4)],
        ),
        _trial(
            1,
            "COMPLETE",
            [_eval(0, 0.0, 0.7, forget_quality_holdout=0.02), _eval(1, 0.0, 0.7, forget_quality_holdout=0.7)],
        ),
    ]
    best = choose_best(trials, BestRule(metric="forget_quality_holdout"))
    assert (best["name"], best["evaluation"]["step"]) == ("trial001", 1)


def test_table_marks_the_choice():
    summary = {
        "space": {"lr": [0, 1]},
        "rule": {"metric": "forget_quality", "mode": "max", "min_ratio": {"model_utility": 0.95}},
        "trials": [{**t, "wall_time_s": 1.0} for t in HANDMADE],
        "best": {"name": "trial002"},
        "target": {"forget_quality": 0.01, "model_utility": 0.7},
    }
    rows = sweep_table(summary).splitlines()
    assert rows[0] == "| trial | lr | step | epoch | forget_quality | model_utility | wall s | state |"
    assert rows[4] == "| trial002 * | 2 | 4 | 4 | 0.8000 | 0.6670 | 1 | complete |"
    assert rows[3].startswith("| trial001 | 1 | 2 | 2 | 0.9500 |") and rows[3].endswith("| fail |")


# -- bad input --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "values", "says"),
    [
        ("objective.init_args.betaa", [0.1], "Option 'betaa' is not accepted"),
        ("objective.init_args.optimizer.init_args.lrr", [0.1], "Option 'lrr' is not accepted"),
        ("max_epochz", [1], "'max_epochz' is not a setting of an objective entry"),
        ("trainer.gradient_clip_vall", [1.0], "not a lightning Trainer argument"),
        ("max_epochs.x", [1], "'max_epochs' is 2, not a group of settings"),
        ("max_epochs", [0], "max_epochs must be at least 1"),
    ],
)
def test_bad_space_key_is_one_line_naming_file_and_key(tmp_path, key, values, says):
    with pytest.raises(UserError) as err:
        _sweep(tmp_path, space={key: values})
    message = str(err.value)
    assert message.startswith(f"sweeps/mini.yaml: space key '{key}'") and says in message
    assert "\n" not in message
    assert not (tmp_path / "runs").exists()  # nothing written


def test_bad_space_key_from_the_command_line(tmp_path, capsys):
    config = tmp_path / "bad_sweep.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "protocol": _protocol_file(tmp_path),
                "objective": "ga",
                "out_dir": str(tmp_path / "runs"),
                "space": {"objective.init_args.nope": [1, 2]},
            }
        )
    )
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", "--config", str(config)])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        f"lightning-unlearn: error: {config}: space key 'objective.init_args.nope' = 1: "
        f"{_protocol_file(tmp_path)}: objectives.trial: objective: Option 'nope' is not accepted"
    ]


def test_unknown_objective_and_tpe_without_trials(tmp_path):
    with pytest.raises(
        UserError, match=r"sweeps/mini.yaml: objective 'npo' is not among .*protocol.yaml's objectives \(ga\)"
    ):
        _sweep(tmp_path, objective="npo")
    with pytest.raises(UserError, match="a tpe sweep needs n_trials"):
        _sweep(tmp_path, sampler="tpe")


def test_space_values_must_be_lists_or_ranges():
    for spec, says in [
        ([], "empty list"),
        ({"low": 1}, "needs a list of values"),
        ({"low": 2, "high": 1}, "low < high"),
        ([[1]], "values must be"),
    ]:
        with pytest.raises(UserError, match=says):
            parse_space({"lr": spec}, "f.yaml")


def test_tpe_sweep_extends_and_evaluates_every_n_steps(tmp_path, monkeypatch):
    trained: list[str] = []
    unlearn = Protocol._unlearn
    monkeypatch.setattr(
        Protocol, "_unlearn", lambda self, name, *a, **k: trained.append(name) or unlearn(self, name, *a, **k)
    )
    space = {
        "objective.init_args.optimizer.init_args.lr": {"low": 1e-4, "high": 1e-2, "log": True},
        "max_epochs": [1, 2],
    }
    settings = {"space": space, "sampler": "tpe", "startup_trials": 1, "eval_every_n_steps": 2}
    first = _sweep(tmp_path, n_trials=2, **settings).run()
    summary = _sweep(tmp_path, n_trials=3, **settings).run()  # raising n_trials adds trials
    assert trained == ["trial000", "trial001", "trial002"]
    assert summary["trials"][:2] == first["trials"]
    for t in summary["trials"]:
        assert (
            t["state"] == "COMPLETE"
            and 1e-4 <= t["settings"]["objective.init_args.optimizer.init_args.lr"] <= 1e-2
        )
        steps = [e["step"] for e in t["evaluations"]]
        last = steps[-1]  # the end of fit is evaluated too
        assert steps == [0, *range(2, last + 1, 2)] + ([last] if last % 2 else [])


def test_preempted_sweep_continues_its_trial_from_the_saved_step(tmp_path):
    """SIGTERM in the middle of a trial's fit: exit 143 with its step saved; the rerun's trial of
    the same settings continues from that step (it says so), and its evaluations, best step and
    best weights equal those of a sweep never interrupted."""
    from safetensors.torch import load_file
    from test_preemption import preempted_line, run, signal_at

    def sweep_dir(name: str):
        directory = tmp_path / name
        directory.mkdir()
        protocol = yaml.safe_load(Path(_protocol_file(directory)).read_text())
        protocol["objectives"]["ga"]["trainer"] = {"callbacks": [{"class_path": "helpers.WaitForSignal"}]}
        (directory / "protocol.yaml").write_text(yaml.safe_dump(protocol))
        sweep = {"name": "sw", "protocol": "protocol.yaml", "objective": "ga", "out_dir": "runs",
                 "space": {"objective.init_args.optimizer.init_args.lr": [1e-2]}, "eval_every_n_steps": 2,
                 "best": {"metric": "forget_Q_A_Prob", "mode": "min", "min_ratio": {}}}  # fmt: skip
        (directory / "sweep.yaml").write_text(yaml.safe_dump(sweep))
        return directory

    command = [sys.executable, "-m", "lightning_unlearn", "sweep", "--config", "sweep.yaml"]
    whole = sweep_dir("whole")
    run(command, whole)
    cut = sweep_dir("cut")
    done = signal_at(command, cut, step=3)
    assert done.returncode == 143, done.stderr[-3000:]
    assert preempted_line(done.stderr).endswith("sweep --config sweep.yaml")
    saved = cut / "runs/sw/preempted/trial000.ckpt"
    assert torch.load(saved, weights_only=False)["global_step"] == 3
    rerun = run(command, cut)
    assert "trial001: continues trial000, preempted" in rerun.stdout
    assert "trial001: resuming from" in rerun.stdout  # the fit starts at step 3, not again at 0

    want, got = (json.loads((d / "runs/sw/sweep.json").read_text()) for d in (whole, cut))
    assert [t["state"] for t in got["trials"]] == ["FAIL", "COMPLETE"] and got["trials"][1][
        "continues"
    ] == "trial000"
    assert len(got["trials"][0]["evaluations"]) == 2  # steps 0 and 2 were evaluated before the signal
    trial = got["trials"][1]
    assert [e["step"] for e in trial["evaluations"]] == [e["step"] for e in want["trials"][0]["evaluations"]]
    for a, b in zip(trial["evaluations"], want["trials"][0]["evaluations"], strict=True):
        assert a == pytest.approx(b, rel=1e-6, abs=1e-9)
    assert got["best"]["evaluation"]["step"] == want["best"]["evaluation"]["step"]
    a, b = (load_file(str(d / "runs/sw/best/model.safetensors")) for d in (whole, cut))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (cut / "runs/sw/preempted/trial000.ckpt").exists()


# -- one target for several sweeps ------------------------------------------------------------------
def test_models_from_links_the_target_of_an_earlier_run(tmp_path, monkeypatch):
    """A sweep with ``models_from`` trains and evaluates no target or retain model of its own: its
    trials start from the earlier run's target (the same file), and its step-0 reference is that
    run's target report; a protocol of other fine-tune settings is refused in one line."""
    first = _sweep(tmp_path, name="first", space={"max_epochs": [1]})
    first.run()
    source = tmp_path / "runs" / "first"
    assert (source / "models.fingerprint").read_text().strip() == first.protocol.models_fingerprint()

    fitted = record_fits(monkeypatch)
    second = _sweep(tmp_path, name="second", space={"max_epochs": [2]}, models_from=str(source))
    summary = second.run()
    assert fitted == ["GradAscent"]  # only the trial trained: no FineTune of target or retain model
    linked = tmp_path / "runs" / "second" / "models" / "finetuned"
    assert linked.is_symlink() and linked.resolve() == (source / "models" / "finetuned").resolve()
    target = json.loads((source / "reports" / "finetuned" / "report.json").read_text())["metrics"]
    assert summary["target"]["forget_quality"] == target["forget_quality"]
    assert summary["trials"][0]["evaluations"][0]["step"] == 0

    # The same protocol with another fine-tune learning rate: its target would differ.
    config = json.loads(json.dumps(yaml.safe_load(Path(second.protocol_file).read_text())))
    config["finetune"]["objective"]["init_args"]["optimizer"]["init_args"]["lr"] = 2e-3
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump(config))
    with pytest.raises(UserError, match=r"sweeps/mini.yaml: models_from: .*first was made with other"):
        _sweep(tmp_path, name="third", protocol=str(other), models_from=str(source))
    assert not (tmp_path / "runs" / "third").exists()  # refused when built: nothing written


def test_fingerprint_ignores_the_entrys_values_of_swept_keys(tmp_path):
    """A tuned learning rate written back into the protocol entry keeps the lr sweep resumable; any
    other change to the entry (here its max_epochs, not swept) is a different sweep."""
    space = {"objective.init_args.optimizer.init_args.lr": [1e-4, 1e-2]}
    before = _sweep(tmp_path, space=space).fingerprint()
    path = Path(_protocol_file(tmp_path))
    config = json.loads(json.dumps(yaml.safe_load(path.read_text())))  # unshare YAML's aliases
    config["objectives"]["ga"]["objective"]["init_args"]["optimizer"]["init_args"]["lr"] = 5e-3
    (tmp_path / "tuned.yaml").write_text(yaml.safe_dump(config))
    assert _sweep(tmp_path, space=space, protocol=str(tmp_path / "tuned.yaml")).fingerprint() == before
    config["objectives"]["ga"]["max_epochs"] = 3
    (tmp_path / "longer.yaml").write_text(yaml.safe_dump(config))
    assert _sweep(tmp_path, space=space, protocol=str(tmp_path / "longer.yaml")).fingerprint() != before


def test_protocol_overrides_set_dotted_protocol_keys(tmp_path):
    """Overrides reach the protocol the trials run (here its generation budget and data cap) and
    so the sweep's fingerprint; a key under a plain value is refused in one line."""
    plain = _sweep(tmp_path)
    tuned = _sweep(tmp_path, protocol_overrides={"evaluation.max_new_tokens": 3, "data.eval_limit": 7})
    assert (plain.protocol.evaluation.max_new_tokens, tuned.protocol.evaluation.max_new_tokens) == (2, 3)
    assert tuned.protocol.data.eval_limit == 7
    assert tuned.fingerprint() != plain.fingerprint()
    with pytest.raises(UserError, match="sweeps/mini.yaml: protocol_overrides: .*'name' is 'mini'"):
        _sweep(tmp_path, protocol_overrides={"name.x": 1})


def test_a_tie_on_the_metric_goes_to_the_higher_constrained_metric():
    """The callback and the sweep break ties alike: by the first min_ratio metric, else the one held."""
    from lightning_unlearn.callbacks.evaluation import beats

    held = {"forget_quality": 0.77, "model_utility": 0.35}
    assert beats(
        {"forget_quality": 0.77, "model_utility": 0.38}, held, "forget_quality", "max", "model_utility"
    )
    assert not beats(
        {"forget_quality": 0.77, "model_utility": 0.35}, held, "forget_quality", "max", "model_utility"
    )
    assert not beats({"forget_quality": 0.77, "model_utility": 0.38}, held, "forget_quality", "max", None)
    assert beats(
        {"forget_quality": 0.76, "model_utility": 0.1}, held, "forget_quality", "min", "model_utility"
    )
