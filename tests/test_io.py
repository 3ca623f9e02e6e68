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


def test_a_killed_writers_temp_files_are_removed_by_the_next_write(tmp_path):
    """A SIGKILL between the temp write and the rename leaves ``.<name>.<8 chars>`` behind (no
    except clause runs); the next write of that path removes it, and nothing else."""
    (tmp_path / ".fused.wpvn9lgh").mkdir()
    (tmp_path / ".fused.wpvn9lgh" / "adapter_model.safetensors").write_bytes(b"half")
    (tmp_path / ".r.json.k2_9x0ab").write_text("half")
    kept = [".fused.json.abcdefgh", ".fused.toolong123", ".r.json.short", ".other.abcdefgh", "x"]
    for name in kept:
        (tmp_path / name).write_text("mine")
    with atomic_directory(tmp_path / "fused") as tmp:
        (tmp / "f").write_text("x")
    write_text_atomic(tmp_path / "r.json", "done")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, "fused", "r.json"])
