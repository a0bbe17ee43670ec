"""Every ```bash block of docs/quickstart.md runs, in order, on the default model."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

DOC = Path(__file__).parent.parent / "docs" / "quickstart.md"


def bash_blocks() -> list[str]:
    return re.findall(r"```bash\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)


def test_quickstart_has_commands():
    assert len(bash_blocks()) >= 5


def test_quickstart_runs(smollm2, tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "HF_HUB_OFFLINE": "1"}
    for block in bash_blocks():
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{block}\n{result.stderr[-2000:]}"
    assert (tmp_path / "runs" / "quick" / "projections.safetensors").is_file()
    assert (tmp_path / "runs" / "spectrum.png").read_bytes()[:4] == b"\x89PNG"
