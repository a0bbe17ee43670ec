"""Nothing is lost or half-written: interrupted, killed and concurrent calibrations; bad output paths;
overflowing activations. Through the real CLI (subprocesses where a signal or a race is involved)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from aqua_cli.artifact import TENSOR_FILE, Artifact
from aqua_cli.commands import main

from tiny_models import tiny_model

LONG = ["--tokens", "400000", "--seq-len", "32", "--batch-size", "1", "--device", "cpu"]  # slow enough that a signal lands mid-run
SHORT = ["--tokens", "2048", "--seq-len", "64", "--device", "cpu"]


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _aqua(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "aqua_cli", "calibrate", *args], env=env or _env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def assert_whole_or_absent(target: Path) -> None:
    """The guarantee: the artifact is complete and verifies, or it does not exist; no temporary debris."""
    if target.exists():
        Artifact.load(target)
    debris = [p.name for p in target.parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name]
    assert not debris, debris


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
PROGRESS = re.compile(r"calibrating\D*?(\d+)/(\d+) tokens")


def _as_from_a_shell() -> None:
    """In the child before exec: SIGINT delivered and handled by default, as a shell starts a command. A child
    inherits its parent's signal mask and ignored signals, and after earlier tests in the same pytest process
    the main thread had SIGINT blocked: the run then finished (exit 0) with the signal pending."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_and_wait_for_progress(target: Path, model_dir: Path) -> tuple[subprocess.Popen, str]:
    """Start a long calibration with its progress bar on (AQUA_PROGRESS=1; TTY_COMPATIBLE=1 makes rich
    redraw it through a pipe) and return once a bar line shows tokens done but not all: the work is under
    way, so a signal sent now interrupts it. Returns the process and the stderr read so far."""
    env = {**_env(), "AQUA_PROGRESS": "1", "TTY_COMPATIBLE": "1", "NO_COLOR": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "aqua_cli", "calibrate", str(model_dir), *LONG, "--out", str(target)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_as_from_a_shell,
    )
    seen = b""
    while True:
        chunk = proc.stderr.read1(65536)
        if not chunk:
            proc.wait(timeout=60)
            pytest.fail(f"calibration ended (exit {proc.returncode}) before any progress was seen: {seen[-2000:]!r}")
        seen += chunk
        # only the newest output counts (parsing all of it each time fell behind the bar on a loaded machine, and a
        # stale "under half" line sent the signal to a run that had already finished)
        found = PROGRESS.findall(ANSI.sub("", seen[-8192:].decode(errors="replace")))
        if found and 0 < int(found[-1][0]) < int(found[-1][1]) // 2 and proc.poll() is None:
            return proc, seen.decode(errors="replace")


def test_sigint_leaves_no_partial_artifact(model_dir, tmp_path):
    """Ctrl-C in the middle of the calibration: exit 130, no traceback, nothing written; a later run works."""
    target = tmp_path / "art"
    proc, _ = start_and_wait_for_progress(target, model_dir)
    rest: list[bytes] = []
    reader = threading.Thread(target=lambda: rest.append(proc.stderr.read()), daemon=True)
    reader.start()  # keep draining stderr: a child blocked on a full pipe cannot act on the signal
    for _ in range(10):  # Ctrl-C, and again if the first press has not ended it within 3 s
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=3)
            break
        except subprocess.TimeoutExpired:
            continue
    reader.join(timeout=60)
    err = b"".join(rest).decode(errors="replace")
    assert proc.wait(timeout=120) == 130, err[-2000:]
    assert "Traceback" not in err
    assert not target.exists()
    assert_whole_or_absent(target)
    # a later run works
    done = _aqua(str(model_dir), *SHORT, "--out", str(target), "--force")
    assert done.wait(timeout=600) == 0
    assert_whole_or_absent(target)
    assert target.exists()


def test_kill_during_run_then_rerun_works(model_dir, tmp_path):
    target = tmp_path / "art"
    proc, _ = start_and_wait_for_progress(target, model_dir)
    proc.kill()
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not target.exists()
    assert_whole_or_absent(target)
    assert _aqua(str(model_dir), *SHORT, "--out", str(target), "--force").wait(timeout=600) == 0
    Artifact.load(target)


def test_stale_debris_of_a_killed_writer_is_cleaned(tmp_path):
    from conftest import tiny_artifact

    art = tiny_artifact(tiny_model("llama"), "llama")
    (tmp_path / ".art.tmp-dead").mkdir()
    (tmp_path / ".art.tmp-dead" / TENSOR_FILE).write_bytes(b"half")
    art.save(tmp_path / "art")
    assert_whole_or_absent(tmp_path / "art")
    # killed between moving the old artifact aside and moving the new one in: the old one comes back
    os.replace(tmp_path / "art", tmp_path / ".art.old-123")
    art.save(tmp_path / "other")  # unrelated save does not touch it
    assert (tmp_path / ".art.old-123").exists()
    with pytest.raises(Exception, match="already exists"):
        art.save(tmp_path / "art")  # restored first, then refused without --force
    art.save(tmp_path / "art", force=True)
    assert_whole_or_absent(tmp_path / "art")


def test_concurrent_calibrations_end_with_one_complete_artifact(model_dir, tmp_path):
    target = tmp_path / "art"
    procs = [_aqua(str(model_dir), *SHORT, "--seed", str(seed), "--out", str(target), "--force") for seed in (1, 2)]
    assert [p.wait(timeout=600) for p in procs] == [0, 0]
    assert_whole_or_absent(target)
    seed = Artifact.load(target).metadata["seed"]
    assert seed in (1, 2)


def run(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    return exc.value.code, capsys.readouterr().err


def test_output_under_a_file_is_refused_before_calibrating(capsys, model_dir, tmp_path):
    (tmp_path / "afile").write_text("x")
    code, err = run(capsys, "calibrate", str(model_dir), *SHORT, "--out", str(tmp_path / "afile" / "art"))
    assert code == 1 and "cannot create the output directory" in err and "Traceback" not in err


def test_disk_full_during_write(capsys, model_dir, tmp_path, monkeypatch):
    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    code, err = run(capsys, "calibrate", str(model_dir), *SHORT, "--out", str(tmp_path / "art"))
    assert code == 1 and "No space left on device" in err
    assert not (tmp_path / "art").exists()
    assert_whole_or_absent(tmp_path / "art")


def test_float16_overflow_is_detected(capsys, tmp_path, model_dir):
    """Huge q/k weights overflow in float16: the run stops with a one-line hint, and writes nothing."""
    model = tiny_model("llama")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(2e5)
    path = tmp_path / "hot"
    model.save_pretrained(path)
    for name in os.listdir(model_dir):
        if name.startswith(("tokenizer", "special_tokens")):
            (path / name).write_bytes((model_dir / name).read_bytes())
    code, err = run(capsys, "calibrate", str(path), *SHORT, "--dtype", "float16", "--out", str(tmp_path / "art"))
    assert code == 1 and "non-finite" in err and "--dtype float32" in err
    assert not (tmp_path / "art").exists()
