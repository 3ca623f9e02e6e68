"""Figures are written atomically with the usual file permissions."""

import os
import stat

from lightning_unlearn.plots import truth_ratio_cdfs


def test_figure_gets_the_umask_permissions_not_mkstemps_0600(tmp_path):
    old = os.umask(0o022)
    try:
        path = truth_ratio_cdfs(
            {"retain": [0.5, 0.7, 0.9], "model": [0.2, 0.3]}, tmp_path / "tr.png", {"model": 0.1}
        )
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and list(tmp_path.iterdir()) == [path]
