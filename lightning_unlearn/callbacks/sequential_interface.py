"""What ``SequentialForgetting`` needs from the data module and the objective, as typed interfaces.

The callback drives both from outside: it points the data at one request's forget records after
another and trains, saves and resets the objective's LoRA adapter between them. Any data module
or objective with these members works (``UnlearningDataModule`` and every ``UnlearningObjective``
with an ``adapter`` do); ``require`` checks them in the callback's ``setup``, so a class lacking
one fails there, naming the member, instead of with an ``AttributeError`` after the first
request has trained.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol

import torch
from typing_extensions import get_protocol_members

from lightning_unlearn.errors import UserError


class RequestData(Protocol):
    """The data module side: one request's forget records at a time, retain data unchanged."""

    epoch_offset: int
    """The fit epoch the current request started at: epochs of its data (retain pairing) count
    from there, so a request's data order does not depend on the requests before it."""

    def setup(self, stage: str) -> None:
        """Load the splits (the callback needs the forget split's records before training)."""

    def records_by_id(self, ids: list[str]) -> list[dict]:
        """The forget split's records with these ids, in this order (a request given as ids)."""

    def set_forget(self, records: list[dict]) -> None:
        """Train on these forget records from now on (the next request)."""

    def reference_loader(self, name: str, rank: int, world_size: int) -> Iterable[dict[str, torch.Tensor]]:
        """The rank's shard of sub-batch ``name``'s items, each batch with an ``index`` row id:
        the request's forget tokens the Gram matrices for RegMean fusion are taken over."""


class AdapterObjective(Protocol):
    """The objective side: a LightningModule whose ``model`` carries one peft LoRA adapter slot
    (``adapter_spec`` set), which the callback saves, fuses and (``independent``) re-initialises
    per request. Optional: ``forget_last_good()`` (drop a non-finite guard's last good step at a
    new request) and a cached reference (``reference_policy``, ``reference_cache``,
    ``build_reference_cache``), rebuilt for each request's forget records."""

    adapter_spec: Any
    model: torch.nn.Module
    device: torch.device


def require(value: object, interface: type, role: str) -> None:
    """Refuse ``value`` (the ``role``, e.g. "data module") unless it has every member of
    ``interface``: a one-line error naming the first missing member and the class."""
    missing = sorted(name for name in get_protocol_members(interface) if not hasattr(value, name))
    if missing:
        members = ", ".join(sorted(get_protocol_members(interface)))
        raise UserError(
            f"SequentialForgetting: the {role} {type(value).__name__} has no '{missing[0]}' "
            f"({interface.__name__} needs {members})"
        )
