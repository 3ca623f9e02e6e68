"""Settings fingerprints (``resume.describe``): what the user chose is in, defaults are out."""

from __future__ import annotations

from lightning_unlearn.models import LoraSpec
from lightning_unlearn.objectives import GradDiff, SimNPO
from lightning_unlearn.resume import describe, settings_fingerprint


class GradDiffWithNewSetting(GradDiff):
    """GradDiff as a later release might ship it: one more setting, at a default that keeps the
    old behaviour."""

    def __init__(self, *args, new_setting: int = 0, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.new_setting = new_setting


def _untyped(objective) -> dict:
    return {k: v for k, v in describe(objective).items() if k != "type"}


def test_a_setting_added_at_its_default_leaves_the_description_unchanged():
    assert _untyped(GradDiffWithNewSetting()) == _untyped(GradDiff())
    assert _untyped(GradDiffWithNewSetting(new_setting=3)) == {**_untyped(GradDiff()), "new_setting": 3}


def test_only_settings_away_from_their_default_are_described():
    assert "retain_weight" not in describe(GradDiff())
    assert describe(GradDiff(retain_weight=2.0))["retain_weight"] == 2.0
    # A subclass's own default wins over its base's: SimNPO weighs the forget term by 0.125.
    assert "forget_weight" not in describe(SimNPO())
    assert describe(SimNPO(forget_weight=1.0))["forget_weight"] == 1.0
    # YAML's 0 for a float default is that default; a bool is never a number's default.
    assert "warmup_ratio" not in describe(GradDiff(warmup_ratio=0))
    assert describe(GradDiffWithNewSetting(new_setting=False))["new_setting"] is False
    # Dataclasses alike: LoraSpec's rank 8 is its default.
    assert "r" not in describe(LoraSpec(r=8)) and describe(LoraSpec(r=4))["r"] == 4


def test_fingerprints_tell_settings_apart():
    assert settings_fingerprint(GradDiff()) == settings_fingerprint(GradDiff(retain_weight=1.0))
    assert settings_fingerprint(GradDiff()) != settings_fingerprint(GradDiff(retain_weight=0.5))
    assert settings_fingerprint(GradDiff()) != settings_fingerprint(SimNPO())
