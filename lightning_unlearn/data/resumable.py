"""A train loader that resumes mid-epoch: a preempted run restarts at the next batch of the same
epoch, in the same order, instead of repeating the epoch's batches.

Lightning 2.6 saves the state of every train loader that has ``state_dict``/``load_state_dict``
(its ``_Stateful`` protocol) into the checkpoint's fit-loop state and hands it back before the
restarted epoch's first batch. The order of an epoch is already a function of (seed, epoch) alone
(the samplers below), so the state is just the epoch and how many batches of it were consumed:
the sampler drops that many batches' worth of its indices, which costs no data loading. Lightning
does not call ``on_train_epoch_start`` again when it restarts mid-epoch, so the state also carries
the paired data's epoch (which retain partners are drawn). Train loaders with a known length are
not prefetched by Lightning, so the batches consumed are the batches trained.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torch.utils.data import DataLoader, DistributedSampler


class ResumableSampler(DistributedSampler):
    """A DistributedSampler (so Lightning does not wrap it in its own) whose next iteration starts
    ``start`` positions into this rank's order. Subclasses define the order in ``order``; by
    default the DistributedSampler's own (shuffled by seed and epoch)."""

    start = 0

    def order(self) -> list[int]:
        return list(super().__iter__())

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start :])


class ResumableLoader(DataLoader):
    """A DataLoader over a ``ResumableSampler`` that Lightning checkpoints mid-epoch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.sampler, ResumableSampler):
            raise TypeError("ResumableLoader needs a ResumableSampler")
        self.consumed = 0  # batches of the current epoch handed out
        self._resume: dict[str, int] | None = None

    def __iter__(self) -> Iterator[Any]:
        # A generator: its body, and so the sampler's epoch, is read at the first batch, after
        # Lightning has set the epoch on the sampler.
        resume, self._resume = self._resume, None
        skip = resume["consumed"] if resume and resume["epoch"] == self.sampler.epoch else 0
        self.sampler.start = skip * self.batch_size
        self.consumed = skip
        for batch in super().__iter__():
            self.consumed += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        state = {"epoch": self.sampler.epoch, "consumed": self.consumed}
        if hasattr(self.dataset, "epoch"):
            state["data_epoch"] = self.dataset.epoch
        return state

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._resume = dict(state)
        if "data_epoch" in state and hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(state["data_epoch"])
