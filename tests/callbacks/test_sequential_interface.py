"""SequentialForgetting's typed interfaces, checked in setup: a data module or objective lacking a
member fails there, naming it and the class; any class with the members is accepted."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from lightning import LightningModule

from lightning_unlearn.callbacks import ForgetRequest, SequentialForgetting
from lightning_unlearn.errors import UserError
from lightning_unlearn.models import LoraSpec
from lightning_unlearn.objectives import GradDiff

RECORDS = [{"id": f"r{i}", "question": f"Q{i}?", "answer": f"A{i}."} for i in range(4)]


class NoLoader:
    """A data module that is no UnlearningDataModule, with RequestData's members but one."""

    def __init__(self) -> None:
        self.epoch_offset, self.forget, self.stages = 0, None, []

    def setup(self, stage: str) -> None:
        self.stages.append(stage)

    def records_by_id(self, ids: list[str]) -> list[dict]:
        return [next(r for r in RECORDS if r["id"] == i) for i in ids]

    def set_forget(self, records: list[dict]) -> None:
        self.forget = records


class ListData(NoLoader):
    """The same with every member of RequestData."""

    def reference_loader(self, name: str, rank: int, world_size: int):
        return []


def _trainer(datamodule) -> SimpleNamespace:
    """What SequentialForgetting.setup reads of a Trainer."""
    return SimpleNamespace(
        datamodule=datamodule, is_global_zero=True, callbacks=[], fit_loop=SimpleNamespace(max_epochs=None),
        reload_dataloaders_every_n_epochs=0,
    )  # fmt: skip


def _callback(tmp_path) -> SequentialForgetting:
    requests = [ForgetRequest("a", ids=["r2", "r0"]), ForgetRequest("b", ids=["r1"])]
    return SequentialForgetting(str(tmp_path / "run"), requests, epochs_per_request=3)


def _objective(tiny_spec) -> GradDiff:
    return GradDiff(
        model=tiny_spec, adapter=LoraSpec(r=2, alpha=4), optimizer=lambda p: torch.optim.SGD(p, lr=0.1)
    )


def test_a_conforming_data_module_of_any_class_is_scheduled(tmp_path, tiny_spec):
    data, callback = ListData(), _callback(tmp_path)
    trainer = _trainer(data)
    callback.setup(trainer, _objective(tiny_spec), "fit")
    assert data.stages == ["fit"]
    assert data.forget == [RECORDS[2], RECORDS[0]]  # request a's records, in the request's order
    assert trainer.fit_loop.max_epochs == 6 and trainer.reload_dataloaders_every_n_epochs == 1


def test_a_data_module_lacking_a_member_is_refused_by_name(tmp_path, tiny_spec):
    with pytest.raises(UserError) as err:
        _callback(tmp_path).setup(_trainer(NoLoader()), _objective(tiny_spec), "fit")
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("SequentialForgetting: the data module NoLoader has no 'reference_loader'")
    assert "RequestData needs epoch_offset, records_by_id, reference_loader, set_forget, setup" in message
    with pytest.raises(UserError, match="needs a data module"):
        _callback(tmp_path).setup(_trainer(None), _objective(tiny_spec), "fit")


def test_an_objective_lacking_a_member_is_refused_by_name(tmp_path, tiny_spec):
    class Plain(LightningModule):
        model = torch.nn.Linear(2, 2)

    with pytest.raises(
        UserError, match=r"^SequentialForgetting: the objective Plain has no 'adapter_spec' \("
    ):
        _callback(tmp_path).setup(_trainer(ListData()), Plain(), "fit")
    without_adapter = GradDiff(model=tiny_spec, optimizer=lambda p: torch.optim.SGD(p, lr=0.1))
    with pytest.raises(UserError, match="give the objective an adapter"):
        _callback(tmp_path).setup(_trainer(ListData()), without_adapter, "fit")
