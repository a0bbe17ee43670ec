"""Data-parallel calibration: two gloo processes on loopback give the single-process artifact, and a
failing rank ends the run with one clear error and no artifact."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import torch

from aqua_cli.artifact import Artifact

ARGS = ["--tokens", "2048", "--seq-len", "64", "--batch-size", "3", "--device", "cpu"]


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", AQUA_DIST_TIMEOUT_S="120", **extra)
    return env


GLOO_EXIT_ABORT = "terminate called without an active exception"


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    """torchrun with two ranks on loopback. Once in a few dozen runs on this 2-core machine, a gloo rank
    aborts in its C++ teardown with GLOO_EXIT_ABORT (seen in a clean-clone CI run, not reproduced in 12
    local tries); that one signature gets a second launch, any other failure fails the test."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *args]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    if result.returncode != 0 and GLOO_EXIT_ABORT in result.stderr:
        cmd[cmd.index("--master_port") + 1] = str(_free_port())
        result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    return result


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_ranks_equal_one(model_dir, tmp_path):
    single = subprocess.run(
        [sys.executable, "-m", "aqua_cli", "calibrate", str(model_dir), *ARGS, "--out", str(tmp_path / "one")],
        env=_env(), capture_output=True, text=True, timeout=600,
    )
    assert single.returncode == 0, single.stderr
    launched = _torchrun(["-m", "aqua_cli", "calibrate", str(model_dir), *ARGS, "--out", str(tmp_path / "two"), "--force"])
    assert launched.returncode == 0, launched.stderr[-3000:]
    one, two = Artifact.load(tmp_path / "one"), Artifact.load(tmp_path / "two")
    assert one.metadata["tokens"] == two.metadata["tokens"] == 2048
    assert two.metadata["extra"]["world_size"] == 2
    for a, b in zip(one.projections, two.projections):
        assert torch.allclose(a, b, atol=1e-4)
    for a, b in zip(one.singular_values, two.singular_values):
        assert torch.allclose(a, b, rtol=1e-5)
    # the table is printed once, by rank 0
    assert launched.stdout.count("aqua calibrate") == 1


def test_failed_rank_stops_every_rank_and_writes_nothing(model_dir, tmp_path):
    port = str(_free_port())
    procs = []
    for rank, data in ((0, "pydoc"), (1, str(tmp_path / "missing.txt"))):
        env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "aqua_cli", "calibrate", str(model_dir), *ARGS, "--data", data, "--out", str(tmp_path / "art")],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
        )
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [1, 1]
    assert "failed on rank 1" in results[0][1] and "Traceback" not in results[0][1]
    assert "data file not found" in results[1][1]
    assert not (tmp_path / "art").exists()
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_two_rank_perplexity_equals_one(model_dir, tmp_path):
    """`aqua eval` under torchrun: each rank scores its shard, the sums are all-reduced."""
    import json

    from conftest import tiny_artifact
    from transformers import AutoModelForCausalLM

    art = tiny_artifact(AutoModelForCausalLM.from_pretrained(model_dir), "llama").save(tmp_path / "art")
    args = ["eval", str(model_dir), "--artifact", str(art), "--tokens", "768", "--seq-len", "64", "--k", "0.5,1.0",
            "--mode", "dense,dynamic", "--retention-windows", "0", "--device", "cpu"]
    one = subprocess.run([sys.executable, "-m", "aqua_cli", *args, "--json", str(tmp_path / "one.json")],
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    two = _torchrun(["-m", "aqua_cli", *args, "--json", str(tmp_path / "two.json")])
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one.json").read_text())["rows"]
    b = json.loads((tmp_path / "two.json").read_text())["rows"]
    assert len(a) == len(b) == 3
    for x, y in zip(a, b):
        assert (x["mode"], x["k"], x["tokens"]) == (y["mode"], y["k"], y["tokens"])
        assert abs(x["ppl"] - y["ppl"]) <= 1e-4 * x["ppl"]
