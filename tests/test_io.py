"""Atomic writes: nothing half-written on failure, and ordinary permissions on success."""

from __future__ import annotations

import os
import stat

import pytest

from lightning_unlearn.io import atomic_directory, write_text_atomic


def test_write_text_atomic_replaces_and_uses_umask(tmp_path):
    old = os.umask(0o022)
    try:
        path = write_text_atomic(tmp_path / "a" / "r.json", "one")
        write_text_atomic(path, "two")
        with atomic_directory(tmp_path / "d") as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert path.read_text() == "two"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "d"]
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["r.json"]


def test_failed_directory_write_leaves_previous_content(tmp_path):
    with atomic_directory(tmp_path / "d") as tmp:
        (tmp / "f").write_text("old")
    with pytest.raises(RuntimeError), atomic_directory(tmp_path / "d") as tmp:
        (tmp / "f").write_text("new")
        raise RuntimeError("killed mid-write")
    assert (tmp_path / "d" / "f").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["d"]
