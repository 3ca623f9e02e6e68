"""Preemption: a scheduler's SIGTERM (Kubernetes, SLURM's end of job or ``scancel``) or SLURM's
requeue signal (``--signal=USR1@90``) stops a command with its state saved, exit status 143 and
one line on stderr naming the exact command to rerun.

Inside ``fit`` the signal only sets a flag. At the end of the next optimiser step every rank
learns whether any rank was signalled (one boolean all-reduce per step, so a signal to one rank
stops all of them at the same step), all ranks write Lightning's checkpoint of that step together
(trainable weights, optimiser, schedule, loop counters and, mid-epoch, the train loader's position:
``data/resumable.py``) and the rerun continues with the next batch. Lightning's own SIGTERM
handling is replaced: it stops without saving, exits 0 (``SIGTERMException`` is a ``SystemExit``
without a code) and, under ddp, broadcasts from inside the signal handler.

Everywhere else (data preparation, evaluation, the influence solve, which is one step) nothing is
held that a rerun cannot rebuild from files already written, so the signal raises ``Preempted`` at
once; atomic writes (``io.py``) leave nothing half-written.

With the requeue signal under SLURM (and Lightning's ``SLURMEnvironment(auto_requeue=True)``, its
default) rank 0 also runs ``scontrol requeue <job>`` after saving; the requeued job runs the same
batch script, i.e. the same command, which resumes.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType

from lightning import Callback, LightningModule, Trainer
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.trainer.connectors.signal_connector import _SignalConnector

from lightning_unlearn.io import remove_path

PREEMPTED_EXIT = 143  # 128 + SIGTERM: what schedulers read as "terminated by a signal"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

_received: int | None = None  # the first preemption signal this process received
_deferring = 0  # > 0 while a fit that saves at its next step is running
_command: list[str] | None = None  # the command line's arguments (after the program)
_forwarders: list = []  # callables that pass the first signal on (a ddp launcher to its children)


class Preempted(SystemExit):
    """A stop on a preemption signal; exits with status 143 if nobody catches it. ``saved``: what
    was written for the rerun (None: nothing was needed); ``announce``: this rank prints the line."""

    def __init__(self, signum: int, saved: str | None = None, extra: Sequence[str] = (),
                 announce: bool = True, requeue: bool = True) -> None:  # fmt: skip
        super().__init__(PREEMPTED_EXIT)
        self.signum, self.saved, self.extra = signum, saved, list(extra)
        self.announce, self.requeue = announce, requeue

    def message(self) -> str:
        """The one line: signal, what was saved and the command to rerun."""
        name = signal.Signals(self.signum).name
        saved = f"state saved to {self.saved}" if self.saved else "nothing to save"
        return f"lightning-unlearn: preempted by {name}; {saved}; rerun: {rerun_command(self.extra)}"


def received() -> int | None:
    """The preemption signal this process received, if any."""
    return _received


def set_command(argv: Sequence[str]) -> None:
    """The arguments (after the program) that ``rerun_command`` repeats."""
    global _command
    _command = list(argv)


def rerun_command(extra: Sequence[str] = ()) -> str:
    """The exact command that continues this one: the same program and arguments (plus ``extra``)
    from the same directory; under torchrun, torchrun's own command (it starts every rank)."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    program = [sys.executable, "-m", spec.name.removesuffix(".__main__")] if spec else [sys.argv[0]]
    argv = _command if _command is not None else sys.argv[1:]
    launcher = _torchrun_command()
    command = [*launcher, *extra] if launcher else [*program, *argv, *extra]  # extra: after the script's
    return f"cd {shlex.quote(os.getcwd())} && {shlex.join(command)}"


def _torchrun_command() -> list[str] | None:
    """The command line of the torchrun agent that started this process (its parent), which a
    rerun must repeat to start every rank again; None when torchrun did not start it (or the
    parent's command line cannot be read: not Linux)."""
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return None
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return None
    return [part.decode() for part in raw.split(b"\0") if part] or None


def _handler(signum: int, frame: FrameType | None) -> None:
    global _received
    first = _received is None
    _received = signum
    if first:
        for forward in list(_forwarders):
            forward(signum)
    if not _deferring:
        raise Preempted(signum)


@contextlib.contextmanager
def handle_signals(signals: Sequence[int] = SIGNALS) -> Iterator[None]:
    """Route the preemption signals to ``_handler`` in this block (main thread only)."""
    main = threading.current_thread() is threading.main_thread()
    before = {s: signal.signal(s, _handler) for s in signals} if main else {}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """In this block a signal only sets the flag (``received``): the code inside checks it at its
    safe points (``check``) and saves before stopping. For a caller with its own loop (a sweep
    between trials)."""
    global _deferring
    _deferring += 1
    try:
        yield
    finally:
        _deferring -= 1


def check(saved: str | None = None, extra: Sequence[str] = ()) -> None:
    """Raise ``Preempted`` if a preemption signal arrived: call at a point where ``saved`` (if
    any) holds everything a rerun needs."""
    if _received is not None:
        raise Preempted(_received, saved, extra, announce=_rank() == 0)


def _rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")))


def requeue_slurm_job() -> None:
    """``scontrol requeue`` this SLURM job (the array task when it is one), as Lightning's
    SLURMEnvironment auto-requeue does; a failure is reported, not raised: the state is saved
    either way and the job can be resubmitted by hand."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID") is not None:
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if job is None:
        return
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    except FileNotFoundError:
        print("lightning-unlearn: scontrol not found, job not requeued", file=sys.stderr)
        return
    if done.returncode != 0:
        print(f"lightning-unlearn: scontrol requeue {job} failed: {done.stderr.strip()}", file=sys.stderr)


def exit_preempted(err: Preempted) -> None:
    """What every command does with ``Preempted``: requeue (SLURM's requeue signal, rank 0), print
    the one line (rank 0) and exit 143. The sweep command calls this too."""
    if err.announce and err.requeue and err.signum == signal.SIGUSR1 and "SLURM_JOB_ID" in os.environ:
        requeue_slurm_job()
    if err.announce:
        print(err.message(), file=sys.stderr, flush=True)
    sys.exit(PREEMPTED_EXIT)


class PreemptionSignals(_SignalConnector):
    """The Trainer's signal connector, replaced: SIGTERM and the requeue signal go to ``_handler``
    (a flag while fit trains, see ``Preemption``), never to Lightning's handlers, and Lightning's
    ``received_sigterm`` stays False so its loops do not stop on their own."""

    def register_signal_handlers(self) -> None:
        self.received_sigterm = False
        self._original_handlers = self._get_current_signal_handlers()
        environment = self.trainer._accelerator_connector.cluster_environment
        requeue = signal.SIGUSR1
        if isinstance(environment, SLURMEnvironment) and environment.requeue_signal is not None:
            requeue = environment.requeue_signal
        for signum in {signal.SIGTERM, requeue}:
            self._register_signal(signum, _handler)


class Preemption(Callback):
    """Stops fit at the first optimiser step after a preemption signal reached any rank (the
    last step of an epoch: after that epoch's end), with
    Lightning's checkpoint of that step written to ``checkpoint_path`` (set by the command that
    builds the Trainer; ``<default_root_dir>/preempted.ckpt`` otherwise). ``extra``: what the
    rerun command needs appended to find it (nothing when the command resumes by itself). With
    ``SequentialForgetting`` the checkpoint goes to its ``dirpath`` (its ledger holds the finished
    requests) and ``SafeTrainer.fit`` resumes the interrupted request from it by itself."""

    def __init__(self, checkpoint_path: str | Path | None = None, extra: Sequence[str] = ()) -> None:
        self.checkpoint_path = None if checkpoint_path is None else Path(checkpoint_path)
        self.extra = list(extra)
        self._deferring = False

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        global _deferring
        # Lightning 2.6 hands the train loaders their saved position (mid-epoch resume) only when
        # it builds them after restoring the checkpoint; a schedule sized by
        # estimated_stepping_batches builds them before, in configure_optimizers, and the position
        # would be dropped. No batch has been drawn yet here, so loading it now is in time.
        trainer.fit_loop._load_combined_loader_states()
        from lightning_unlearn.callbacks.sequential import SequentialForgetting

        sequential = next((c for c in trainer.callbacks if isinstance(c, SequentialForgetting)), None)
        if sequential is not None:  # its run directory holds the step; the same fit resumes from it
            self.checkpoint_path, self.extra = sequential.checkpoint_path, []
        if getattr(pl_module, "saves_mid_epoch", True):
            launcher = trainer.strategy.launcher
            if trainer.is_global_zero and launcher is not None and hasattr(launcher, "kill"):
                _forwarders.append(launcher.kill)  # a signal to the launching rank reaches the others
            _deferring += 1
            self._deferring = True
        check()  # a signal during set-up: nothing trained yet, nothing to save

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, *args) -> None:
        if not self._deferring:
            return
        loop = trainer.fit_loop.epoch_loop
        if loop._should_accumulate():  # gradients of a partial accumulation are in no checkpoint
            return
        if loop.batch_progress.is_last_batch or loop._num_ready_batches_reached():
            # Lightning resumes a checkpoint of an epoch's last batch without running that epoch's
            # end (validation, on_train_epoch_end: a sequential request's save and fusion), so the
            # stop waits for the end of the epoch.
            return
        self._stop(trainer)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # After the epoch-end work of the callbacks before this one (evaluation, a sequential
        # request's save and fusion); the rerun starts the next epoch. After the last epoch there
        # is nothing left to train: the fit finishes.
        if self._deferring and trainer.current_epoch + 1 < trainer.fit_loop.max_epochs:
            self._stop(trainer)

    def _stop(self, trainer: Trainer) -> None:
        """If any rank was signalled: save this step (every rank) and raise ``Preempted``."""
        if not trainer.strategy.reduce_boolean_decision(_received is not None, all=False):
            return
        path = self.checkpoint_path or Path(trainer.default_root_dir) / "preempted.ckpt"
        _save_atomically(trainer, path)
        environment = trainer._accelerator_connector.cluster_environment
        requeue = not isinstance(environment, SLURMEnvironment) or environment.auto_requeue
        raise Preempted(_received or signal.SIGTERM, str(path), self.extra, trainer.is_global_zero, requeue)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        global _deferring
        if self._deferring:
            _deferring -= 1
            self._deferring = False
        launcher = trainer.strategy.launcher
        if launcher is not None and getattr(launcher, "kill", None) in _forwarders:
            _forwarders.remove(launcher.kill)


def _save_atomically(trainer: Trainer, path: Path) -> None:
    """``trainer.save_checkpoint`` to a temporary name beside ``path``, then renamed by rank 0: a
    SIGKILL after the grace period, in the middle of the write, leaves the previous checkpoint (or
    none), never a truncated one. A sharded checkpoint (a directory) is renamed the same way."""
    temporary = path.with_name(f".{path.name}.partial")
    if trainer.is_global_zero:  # a leftover of a save that was itself killed
        remove_path(temporary)
    trainer.strategy.barrier("preemption checkpoint")
    trainer.save_checkpoint(temporary)  # every rank writes its part; ends with a barrier
    if trainer.is_global_zero:
        if path.is_dir() or temporary.is_dir():
            remove_path(path)  # a directory is not replaced by a rename, nor a file by a directory
        os.replace(temporary, path)
    trainer.strategy.barrier("preemption checkpoint")


def install(trainer: Trainer) -> None:
    """Give ``trainer`` our signal handling and a ``Preemption`` callback (unless it has one)."""
    trainer._signal_connector = PreemptionSignals(trainer)
    if not any(isinstance(c, Preemption) for c in trainer.callbacks):
        trainer.callbacks.append(Preemption())


def preemption_callback(trainer: Trainer) -> Preemption:
    return next(c for c in trainer.callbacks if isinstance(c, Preemption))
