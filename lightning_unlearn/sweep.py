"""``lightning-unlearn sweep``: hyper-parameter search for one objective of a protocol config.

Each trial unlearns the protocol's target with the objective entry's settings changed at the
space's dotted keys, evaluating during training (``UnlearningEvaluation``); the target and the
retain model are trained once (``Protocol.prepare_models``). Trials come from a grid (every
combination, enqueued into an Optuna study) or from Optuna's TPE sampler (Bergstra et al., 2011,
"Algorithms for Hyper-Parameter Optimization"). The study lives in a journal file under the run
directory, so rerunning after a kill keeps finished trials and reruns only the interrupted ones.
"""

from __future__ import annotations

import fcntl
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_unlearn.callbacks import UnlearningEvaluation
from lightning_unlearn.callbacks.evaluation import BEST_EVALUATION, beats
from lightning_unlearn.errors import UserError
from lightning_unlearn.io import atomic_directory, remove_path, write_text_atomic
from lightning_unlearn.models import ModelSpec, load_adapter, load_model
from lightning_unlearn.objectives import InfluenceStep
from lightning_unlearn.pareto import pareto_front
from lightning_unlearn.plots import sweep_pareto
from lightning_unlearn.protocol import Protocol, Stage
from lightning_unlearn.protocol_config import protocol_from_config, stage_entry
from lightning_unlearn.report import _fmt
from lightning_unlearn.resume import settings_fingerprint
from lightning_unlearn.search_space import Dimension, apply, grid, parse_space, without

STUDY = "sweep"
LOCK = ".lock"  # held while a process runs the sweep
# Trial attribute for a trial that ended in an error of its own (a diverged loss): finished, not
# rerun on resume, unlike a trial a kill interrupted.
ERROR = "error"
CONTINUES = "continues"  # a trial that resumed a preempted one: that trial's name
POINT = "point"  # a grid trial's settings


@dataclass
class BestRule:
    """The sweep's answer: the evaluation (any trial, any step) with the highest ``metric``
    (lowest with ``mode: min``) among those whose every ``min_ratio`` metric is at least that
    fraction of the target's, the target being each trial's step-0 evaluation (the model before
    any update). ``metric`` is any report key, e.g. ``forget_quality`` or, where the evaluation
    reports it, ``forget_quality_holdout``. A tie goes to the higher first ``min_ratio`` metric, then the earlier trial and step."""

    metric: str = "forget_quality"
    mode: str = "max"
    min_ratio: dict[str, float] = field(default_factory=lambda: {"model_utility": 0.95})

    def __post_init__(self) -> None:
        if self.mode not in ("max", "min"):
            raise UserError(f"best.mode must be 'max' or 'min', got {self.mode!r}")

    def allows(self, evaluation: dict[str, float], start: dict[str, float]) -> bool:
        return all(
            _number(evaluation.get(m)) and evaluation[m] >= r * start[m] for m, r in self.min_ratio.items()
        )

    def beats(self, evaluation: dict[str, float], best: dict[str, float] | None) -> bool:
        """Better by ``metric``; a tie goes to the higher first ``min_ratio`` metric (``beats``)."""
        return beats(evaluation, best, self.metric, self.mode, next(iter(self.min_ratio), None))


def choose_best(trials: list[dict], rule: BestRule) -> dict | None:
    """The rule's evaluation over finished trials (``state`` COMPLETE) as ``{"trial": number,
    "name", "settings", "evaluation"}``, or None when no evaluation meets the constraints. A
    trial's first evaluation, the model before unlearning, is the constraints' reference only."""
    best = None
    for trial in sorted(trials, key=lambda t: t["number"]):
        evaluations = trial.get("evaluations") or []
        if trial["state"] != "COMPLETE" or not evaluations:
            continue
        for evaluation in evaluations[1:]:  # the first is the model before unlearning
            held = None if best is None else best["evaluation"]
            if (
                _number(evaluation.get(rule.metric))
                and rule.allows(evaluation, evaluations[0])
                and rule.beats(evaluation, held)
            ):
                best = {k: trial[k] for k in ("number", "name", "settings")} | {"evaluation": evaluation}
    return best


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and not math.isnan(v)


class Sweep:
    """Search one objective's settings of a protocol config; writes ``<out_dir>/<name>/``.

    Args:
        protocol: the protocol YAML (e.g. ``configs/demo.yaml``): model, data, fine-tuning and
            evaluation settings, and the objective entry to tune.
        objective: the name of that entry under the protocol's ``objectives``.
        space: dotted key into the entry -> list of values, or ``{low, high, log, step}`` (tpe).
        name: the run directory's name under ``out_dir`` (the protocol's own name is not used).
        sampler: ``grid`` (every combination of the lists) or ``tpe``.
        n_trials: trials in all for ``tpe`` (raise it and rerun to extend a sweep); unset for grid.
        startup_trials: tpe's random trials before it models the results (Optuna's default 10).
        seed: the sampler's seed (the protocol's own seed drives training).
        eval_every_n_epochs / eval_every_n_steps: evaluate during training this often (default:
            the entry's ``eval_every_n_epochs``, else every epoch); the step-0 evaluation is the
            target, the reference of ``best.min_ratio``.
        best: the rule that picks the evaluation exported to ``best/``.
        models_from: a finished protocol or sweep run (its directory) of the same protocol settings
            but the objectives, whose target and retain model this sweep links instead of
            fine-tuning its own: one target for the sweeps of several objectives.
        protocol_overrides: dotted protocol keys -> values set on the protocol file's settings, as
            ``lightning-unlearn protocol --key value`` would (e.g. ``model.path``, ``data.source``
            for a local model file and data copy).
        config_file: the sweep YAML, named in error messages (the CLI fills it in).
    """

    def __init__(
        self,
        protocol: str,
        objective: str,
        space: dict[str, Any],
        name: str = "sweep",
        out_dir: str = "runs",
        sampler: str = "grid",
        n_trials: int | None = None,
        startup_trials: int = 10,
        seed: int = 0,
        eval_every_n_epochs: int | None = None,
        eval_every_n_steps: int | None = None,
        best: BestRule | None = None,
        models_from: str | None = None,
        protocol_overrides: dict[str, Any] | None = None,
        config_file: str | None = None,
    ) -> None:
        self.where = config_file or "sweep config"
        if sampler not in ("grid", "tpe"):
            raise UserError(f"{self.where}: sampler must be 'grid' or 'tpe', got {sampler!r}")
        if sampler == "tpe" and (n_trials is None or n_trials < 1):
            raise UserError(f"{self.where}: a tpe sweep needs n_trials (at least 1)")
        if sampler == "grid" and n_trials is not None:
            raise UserError(f"{self.where}: a grid sweep runs every combination: leave n_trials unset")
        for key, value in {
            "eval_every_n_epochs": eval_every_n_epochs,
            "eval_every_n_steps": eval_every_n_steps,
        }.items():
            if value is not None and value < 1:
                raise UserError(f"{self.where}: {key} must be at least 1, got {value}")
        if eval_every_n_epochs is not None and eval_every_n_steps is not None:
            raise UserError(f"{self.where}: set eval_every_n_epochs or eval_every_n_steps, not both")
        self.protocol_file, self.objective_name, self.space = protocol, objective, dict(space)
        self.overrides = dict(protocol_overrides or {})
        self.name, self.sampler, self.n_trials, self.startup_trials = name, sampler, n_trials, startup_trials
        self.seed, self.best = seed, best or BestRule()
        self.every_n_epochs, self.every_n_steps = eval_every_n_epochs, eval_every_n_steps
        self.run_dir = Path(out_dir) / name
        self.dims = parse_space(self.space, self.where)
        self.points = grid(self.dims, self.where) if sampler == "grid" else None
        self.protocol_config = self._load_protocol(out_dir)
        self.entry = self.protocol_config["objectives"][objective]
        # Trials a preemption stopped with their step saved, by settings: (their name, wall time
        # so far). The rerun's trial with the same settings continues from that step.
        self.preempted: dict[str, tuple[str, float]] = {}
        try:
            self.protocol = self._build({})
        except UserError as err:  # names the protocol file and the key
            raise UserError(f"{self.where}: {err}") from None
        for dim in self.dims:  # each key alone, with each listed value (or each end of its range)
            for value in dim.examples():
                self._check(dim, value)
        self.models_from = (
            None
            if models_from is None
            else self.protocol.models_source(models_from, f"{self.where}: models_from")
        )

    # -- settings ---------------------------------------------------------------------------------
    def _load_protocol(self, out_dir: str) -> dict[str, Any]:
        path = Path(self.protocol_file)
        if not path.is_file():
            raise UserError(f"{self.where}: protocol '{path}' does not exist")
        try:
            config = yaml.safe_load(path.read_text())
        except yaml.YAMLError as err:
            raise UserError(
                f"{self.where}: protocol '{path}' is not valid YAML ({err})".replace("\n", " ")
            ) from None
        entries = config.get("objectives") if isinstance(config, dict) else None
        if not isinstance(entries, dict) or self.objective_name not in entries:
            names = ", ".join(entries) if isinstance(entries, dict) else "none"
            raise UserError(
                f"{self.where}: objective '{self.objective_name}' is not among {path}'s objectives ({names})"
            )
        config = apply(config, self.overrides, f"{self.where}: protocol_overrides")
        return {**config, "name": self.name, "out_dir": out_dir}

    def _build(self, objectives: dict[str, dict]) -> Protocol:
        """The protocol config with ``objectives`` replaced, read as ``lightning-unlearn protocol``
        reads it (the same types, checks and defaults; a stage may name a fit config)."""
        return protocol_from_config({**self.protocol_config, "objectives": objectives}, self.protocol_file)

    def stage(self, settings: dict[str, Any]) -> Stage:
        """The objective entry with a trial's settings, as the protocol's ``Stage``."""
        return self._build({"trial": apply(self.entry, settings, self.where)}).objectives["trial"]

    def _check(self, dim: Dimension, value: Any) -> None:
        """A key that names no setting (or a value its setting refuses) is a one-line error
        naming the sweep file and the key, before anything trains."""
        parts = dim.key.split(".")
        fields = set(Stage.__dataclass_fields__)
        if parts[0] not in fields or parts[0] in ("sequential", "adapter_fit"):
            choices = ", ".join(sorted(fields - {"sequential", "adapter_fit"}))
            raise UserError(
                f"{self.where}: space key '{dim.key}': '{parts[0]}' is not a setting of an objective entry ({choices})"
            )
        if parts[0] == "trainer":
            import inspect

            import lightning as L

            if len(parts) < 2 or parts[1] not in inspect.signature(L.Trainer).parameters:
                raise UserError(f"{self.where}: space key '{dim.key}': not a lightning Trainer argument")
        try:
            stage = self.stage({dim.key: value})
        except UserError as err:
            raise UserError(f"{self.where}: space key '{dim.key}' = {value!r}: {err}") from None
        if isinstance(stage.objective, InfluenceStep) or stage.sequential is not None:
            raise UserError(
                f"{self.where}: objective '{self.objective_name}' is sequential or an InfluenceStep: "
                "a sweep tunes an objective trained in one fit with evaluation during it"
            )

    def fingerprint(self) -> str:
        """What the trials depend on; ``n_trials`` is left out so a tpe sweep can be extended, and
        a grid's values so it can grow (its keys stay)."""
        return settings_fingerprint(
            {
                "protocol": self.protocol.settings(objectives=False),
                # The entry's values of the swept keys never reach a trial: a tuned value written
                # back into the protocol file leaves the sweep resumable.
                "entry": without(
                    stage_entry(self.entry, f"objectives.{self.objective_name}", self.protocol.seed),
                    list(self.space),
                ),
                # A grid may grow: more values for its keys add points, the finished ones stay
                # valid (each trial records its own settings). TPE models the space it was given.
                "space": sorted(self.space) if self.sampler == "grid" else self.space,
                "sampler": self.sampler,
                "startup_trials": self.startup_trials,
                "seed": self.seed,
                "every": [self.every_n_epochs, self.every_n_steps],
                "best": asdict(self.best),
            }
        )

    def _claim_run_dir(self) -> None:
        marker = self.run_dir / "sweep.fingerprint"
        fingerprint = self.fingerprint()
        if marker.is_file() and marker.read_text().strip() == fingerprint:
            print(f"[{self.name}] resuming {self.run_dir}: finished trials are kept", flush=True)
            return
        if any(p.name != LOCK for p in self.run_dir.iterdir()):
            raise UserError(
                f"{self.where}: {self.run_dir} holds a run of other settings: give the sweep another "
                "name or out_dir, or delete that directory"
            )
        write_text_atomic(marker, fingerprint + "\n")

    # -- running ----------------------------------------------------------------------------------
    def run(self) -> dict:
        """Run the missing trials, write sweep.json, sweep.md, pareto.png and best/; returns the
        sweep.json content."""
        optuna = _optuna()
        start = time.perf_counter()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / LOCK, "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UserError(f"{self.run_dir} is in use by another sweep process") from None
            self._claim_run_dir()
            if self.models_from is not None:
                self.protocol.adopt_models(self.models_from)
            self.target, self.reports = self.protocol.prepare_models()
            self._check_rule(self.reports["finetuned"].metrics)
            study = self._study(optuna)
            remaining = self._requeue(study, optuna)
            print(f"[{self.name}] {remaining} trial(s) to run", flush=True)
            if remaining:
                study.optimize(
                    self._objective,
                    n_trials=remaining,
                    catch=(UserError,),
                    callbacks=[lambda s, _: self.write(s, optuna, final=False)],
                )
            summary = self.write(study, optuna, final=True)
        print(
            f"[{self.name}] done in {time.perf_counter() - start:.0f} s; sweep: {self.run_dir / 'sweep.json'}"
        )
        return summary

    def _check_rule(self, metrics: dict[str, float]) -> None:
        for key, metric in [("best.metric", self.best.metric)] + [
            (f"best.min_ratio.{m}", m) for m in self.best.min_ratio
        ]:
            if not _number(metrics.get(metric)):
                raise UserError(
                    f"{self.where}: {key}: '{metric}' is not a metric of the target's report "
                    f"({', '.join(sorted(metrics))})"
                )

    def _study(self, optuna):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        storage = JournalStorage(JournalFileBackend(str(self.run_dir / "optuna.journal")))
        if self.sampler == "tpe":
            sampler = optuna.samplers.TPESampler(seed=self.seed, n_startup_trials=self.startup_trials)
        else:  # every trial is enqueued with its grid point; the sampler is never asked
            sampler = optuna.samplers.RandomSampler(seed=self.seed)
        direction = "maximize" if self.best.mode == "max" else "minimize"
        return optuna.create_study(
            study_name=STUDY, storage=storage, sampler=sampler, direction=direction, load_if_exists=True
        )

    def _requeue(self, study, optuna) -> int:
        """Mark trials a kill left running as failed and enqueue their settings again (grid: every
        point not yet done or queued); returns how many trials this run must run."""
        state = optuna.trial.TrialState
        covered: set[str] = set()
        interrupted = []
        for trial in study.get_trials(deepcopy=False):
            if trial.state == state.RUNNING:  # only this process runs the study (the lock)
                study._storage.set_trial_state_values(trial._trial_id, state=state.FAIL)
            params = trial.params or trial.system_attrs.get("fixed_params", {})
            done = trial.state == state.COMPLETE or (trial.state == state.FAIL and ERROR in trial.user_attrs)
            if done or trial.state == state.WAITING:
                covered.add(_key(params))
            else:
                interrupted.append(params)
                name = _trial_name(trial.number)
                if self._checkpoint(name).exists():  # preempted: its step was saved
                    self.preempted[_key(params)] = (name, trial.user_attrs.get("wall_time_s", 0.0))
                else:  # killed: start that point again
                    self._discard(trial.number)
        queue = self.points if self.points is not None else interrupted
        for params in queue:
            if _key(params) not in covered:
                # A grid trial takes its point as given: Optuna's distributions are fixed per
                # study, a grid's values are not (it may grow). TPE's suggest records the params.
                study.enqueue_trial(params, user_attrs={POINT: params} if self.points is not None else None)
                covered.add(_key(params))
        trials = study.get_trials(deepcopy=False)
        if self.points is not None:
            return sum(t.state == state.WAITING for t in trials)
        finished = sum(
            t.state == state.COMPLETE or (t.state == state.FAIL and ERROR in t.user_attrs) for t in trials
        )
        return max(self.n_trials - finished, 0)

    def _files(self, name: str) -> list[Path]:
        """A trial's files: its evaluations and best model, final model, logs, preempted step."""
        run = self.run_dir
        return [run / "trials" / name, run / "models" / name, run / "logs" / name, self._checkpoint(name)]

    def _checkpoint(self, name: str) -> Path:
        """Where the protocol saves a preempted trial's step (a directory when sharded)."""
        return self.run_dir / "preempted" / f"{name}.ckpt"

    def _discard(self, number: int) -> None:
        """A killed trial's files (its rerun gets a new number)."""
        for path in self._files(_trial_name(number)):
            remove_path(path)

    def _adopt(self, earlier: str, name: str) -> None:
        """Give trial ``name`` the files of the preempted trial ``earlier`` of the same settings:
        the protocol then resumes its saved step (the checkpoint also holds the evaluations so far
        and the best one's entry; best/ and history.json move with it)."""
        for old, new in zip(self._files(earlier), self._files(name), strict=True):
            if old.exists():
                old.rename(new)
        print(f"[{self.name}] {name}: continues {earlier}, preempted", flush=True)

    def _objective(self, trial) -> float:
        if POINT in trial.user_attrs:  # a grid point
            settings = dict(trial.user_attrs[POINT])
        else:
            settings = {dim.key: dim.suggest(trial) for dim in self.dims}
        name = _trial_name(trial.number)
        print(f"[{self.name}] {name}: {settings}", flush=True)
        earlier, spent = self.preempted.pop(_key(settings), (None, 0.0))
        if earlier is not None:
            self._adopt(earlier, name)
            trial.set_user_attr(CONTINUES, earlier)
        directory = self.run_dir / "trials" / name
        during = UnlearningEvaluation(
            every_n_epochs=self.every_n_epochs or 1,
            every_n_steps=self.every_n_steps,
            monitor=self.best.metric,
            mode=self.best.mode,
            min_ratio=self.best.min_ratio,
            best_dirpath=str(directory / "best"),
            history_path=str(directory / "history.json"),
            start=self.reports["finetuned"].metrics,  # the target's: not evaluated again per trial
        )
        start = time.perf_counter()
        try:
            stage = self.stage(settings)  # a value its setting refuses fails this trial alone
            if self.every_n_epochs is None and self.every_n_steps is None:
                during.every_n_epochs = stage.eval_every_n_epochs or 1
            self.protocol._unlearn(name, stage, self.target, during)
        except UserError as err:  # e.g. a diverged loss: this trial's result, not the sweep's end
            trial.set_user_attr(ERROR, str(err))
            raise
        finally:
            trial.set_user_attr("evaluations", during.history)
            trial.set_user_attr("wall_time_s", round(spent + time.perf_counter() - start, 2))
        shutil.rmtree(self.run_dir / "models" / name, ignore_errors=True)  # the final model: best/ is kept
        if during.best is None:
            return -math.inf if self.best.mode == "max" else math.inf
        trial.set_user_attr("best_step", during.best["step"])
        return during.best[self.best.metric]

    # -- outputs ----------------------------------------------------------------------------------
    def write(self, study, optuna, final: bool) -> dict:
        """sweep.json after every trial; at the end also sweep.md, pareto.png and best/."""
        trials = [
            {
                "number": t.number,
                "name": _trial_name(t.number),
                "state": t.state.name,
                "settings": t.params or t.system_attrs.get("fixed_params", {}),
                "value": t.value
                if t.state == optuna.trial.TrialState.COMPLETE and math.isfinite(t.value)
                else None,
                "wall_time_s": t.user_attrs.get("wall_time_s"),
                "evaluations": t.user_attrs.get("evaluations", []),
                **({ERROR: t.user_attrs[ERROR]} if ERROR in t.user_attrs else {}),
                **({CONTINUES: t.user_attrs[CONTINUES]} if CONTINUES in t.user_attrs else {}),
            }
            for t in study.get_trials(deepcopy=False)
        ]
        best = choose_best(trials, self.best)
        summary = {
            "name": self.name,
            "protocol": self.protocol_file,
            "objective": self.objective_name,
            "sampler": self.sampler,
            "space": self.space,
            "rule": asdict(self.best),
            "target": self.reports["finetuned"].metrics,
            "retain": self.reports["retain"].metrics,
            "trials": trials,
            "best": best,
        }
        if final:
            if best is not None:
                summary["best"]["dir"] = str(self._export_best(best))
            table = sweep_table(summary)
            write_text_atomic(self.run_dir / "sweep.md", table + "\n")
            self._plot(summary)
            print(table)
        write_text_atomic(self.run_dir / "sweep.json", json.dumps(summary, indent=1) + "\n")
        return summary

    def _export_best(self, best: dict) -> Path:
        """The chosen trial's kept model (its callback kept the rule's evaluation within the trial)
        as a plain model directory: an adapter is merged into the target."""
        kept = self.run_dir / "trials" / best["name"] / "best"
        chosen = best["evaluation"]["step"]
        recorded = kept / BEST_EVALUATION  # the step the callback kept (a trial of older code: none)
        if recorded.is_file():
            kept_step = json.loads(recorded.read_text())["step"]
        else:
            trial = json.loads((self.run_dir / "trials" / best["name"] / "history.json").read_text())
            kept_step = _kept_step(trial, self.best)
        if kept_step != chosen:  # the rule within one trial is the callback's: they must agree
            raise RuntimeError(f"{best['name']} kept step {kept_step}, the rule chose step {chosen}")
        directory = self.run_dir / "best"
        with atomic_directory(directory) as tmp:
            if (kept / "adapter_config.json").is_file():
                model = load_adapter(
                    load_model(ModelSpec(path=str(self.target))), str(kept)
                ).merge_and_unload()
                model.save_pretrained(tmp)
                for file in kept.iterdir():
                    if file.name.startswith(("tokenizer", "special_tokens")):
                        shutil.copy2(file, tmp / file.name)
            else:
                shutil.copytree(kept, tmp, dirs_exist_ok=True)
            write_text_atomic(tmp / "sweep_best.json", json.dumps(best, indent=1) + "\n")
        return directory

    def _plot(self, summary: dict) -> None:
        by_trial, every = {}, []
        for t in summary["trials"]:
            pts = [(e.get("model_utility"), e.get("forget_quality")) for e in t["evaluations"]]
            pts = [p for p in pts if _number(p[0]) and _number(p[1])]
            if pts:
                by_trial[t["name"]] = pts
                every += pts
        if not every:
            return
        front = [every[i] for i in pareto_front(every)]
        best = summary["best"]
        chosen = None
        if best is not None:
            chosen = (best["evaluation"].get("model_utility"), best["evaluation"].get("forget_quality"))
        ratio, target = self.best.min_ratio.get("model_utility"), summary["target"].get("model_utility")
        floor = ratio * target if ratio is not None and _number(target) else None
        retain = summary["retain"].get("model_utility")
        sweep_pareto(by_trial, front, self.run_dir / "pareto.png", chosen, retain, floor)


def _kept_step(history: list[dict], rule: BestRule) -> int | None:
    """The step ``UnlearningEvaluation`` keeps for ``rule`` in one trial's history."""
    best = choose_best(
        [{"number": 0, "name": "", "settings": {}, "state": "COMPLETE", "evaluations": history}], rule
    )
    return None if best is None else best["evaluation"]["step"]


def sweep_table(summary: dict) -> str:
    """Markdown: a row per trial with its settings, the rule's evaluation within it (step, epoch,
    the rule's metrics, forget_quality and model_utility), wall time and state; the sweep's
    choice marked with ``*``."""
    rule = summary["rule"]
    keys = list(summary["space"])
    metrics = list(dict.fromkeys([rule["metric"], *rule["min_ratio"], "forget_quality", "model_utility"]))
    header = ["trial", *keys, "step", "epoch", *metrics, "wall s", "state"]
    lines = ["| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
    chosen = summary["best"]["name"] if summary["best"] else None
    rule_obj = BestRule(**rule)
    for t in summary["trials"]:
        best = choose_best([{**t, "state": "COMPLETE"}], rule_obj) if t["evaluations"] else None
        e = best["evaluation"] if best else {}
        cells = [t["name"] + (" *" if t["name"] == chosen else "")]
        cells += [_cell(t["settings"].get(k)) for k in keys]
        cells += [_cell(e.get("step")), _cell(e.get("epoch"))]
        cells += [_fmt(e.get(m)) for m in metrics]
        cells += [_cell(t["wall_time_s"]), t["state"].lower() + (" (error)" if ERROR in t else "")]
        lines.append("| " + " | ".join(cells) + " |")
    target = summary["target"]
    lines.append(
        "| target | "
        + " | ".join(["-"] * (len(keys) + 2))
        + " | "
        + " | ".join(_fmt(target.get(m)) for m in metrics)
        + " | - | - |"
    )
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _key(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


def _trial_name(number: int) -> str:
    return f"trial{number:03d}"


def _optuna():
    try:
        import optuna
    except ImportError:
        raise UserError(
            "lightning-unlearn sweep needs optuna: pip install 'lightning-unlearn[sweep]'"
        ) from None
    return optuna
