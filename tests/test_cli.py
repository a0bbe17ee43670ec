"""The CLI end to end on a tiny local model: results on stdout, one-line errors, exit codes."""

from __future__ import annotations

import json

import pytest

from aqua_cli.commands import main


def run(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, needle: str) -> None:
    assert code == 1
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error:"), err
    assert needle in lines[0]
    assert "Traceback" not in err


def calibrate_tiny(capsys, model_dir, art, tokens: int = 1024) -> None:
    """Calibrate the tiny model into ``art`` through the CLI (seq-len 64, CPU): the set-up of the tests that
    then evaluate the artifact."""
    code, _, err = run(capsys, "calibrate", str(model_dir), "--tokens", str(tokens), "--seq-len", "64", "--out", str(art),
                       "--device", "cpu")
    assert code == 0, err


def tiny_eval_args(model_dir, art, mode: str = "dynamic", tokens: int = 128) -> list[str]:
    """``aqua eval`` at k = 0.5 of the tiny model, seq-len 64, CPU, no retention windows."""
    return ["eval", str(model_dir), "--artifact", str(art), "--k", "0.5", "--mode", mode, "--tokens", str(tokens),
            "--seq-len", "64", "--device", "cpu", "--retention-windows", "0"]


def test_help_lists_commands(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "calibrate" in out and "inspect" in out
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.startswith("aqua_cli ")


def test_calibrate_then_inspect(capsys, model_dir, tmp_path):
    art = tmp_path / "art"
    code, out, err = run(
        capsys, "calibrate", str(model_dir), "--tokens", "1024", "--seq-len", "64", "--batch-size", "4",
        "--out", str(art), "--json", str(tmp_path / "cal.json"), "--device", "cpu",
    )
    assert code == 0, err
    assert "tokens_per_s" in out and (art / "projections.safetensors").is_file()
    summary = json.loads((tmp_path / "cal.json").read_text())
    assert summary["tokens"] == 1024 and summary["artifact"] == str(art)
    code, out, err = run(capsys, "inspect", str(art), "--json", "-", "--plot", str(tmp_path / "e.png"))
    assert code == 0, err
    report = json.loads(out[out.index('{\n  "artifact"'):])
    assert len(report["layers"]) == 2 and report["metadata"]["tokens"] == 1024
    assert report["layers"][0]["orthogonality_error"] < 1e-5
    assert (tmp_path / "e.png").read_bytes()[:4] == b"\x89PNG"
    # an existing artifact is not overwritten without --force
    code, _, err = run(capsys, "calibrate", str(model_dir), "--tokens", "1024", "--seq-len", "64", "--out", str(art))
    assert_one_line_error(code, err, "--force")


@pytest.mark.parametrize(
    "args, needle",
    [
        (["calibrate", "/no/such/model.gguf"], "GGUF file not found"),
        (["calibrate", "nobody/no-such-model-aqua"], "not in the local Hugging Face cache"),
        (["calibrate", "{model}", "--tokens", "0"], "--tokens must be at least 1"),
        (["calibrate", "{model}", "--batch-size", "0"], "--batch-size must be at least 1"),
        (["calibrate", "{model}", "--data", "{tmp}/missing.txt"], "data file not found"),
        (["calibrate", "{model}", "--data", "{tmp}/empty.txt"], "holds no text"),
        (["calibrate", "{model}", "--data", "{tmp}/short.txt", "--out", "{tmp}/o"], "fewer than one window"),
        (["calibrate", "{model}", "--dtype", "int7"], "unknown dtype"),
        (["inspect", "{tmp}/garbage"], "not a safetensors file"),
        (["inspect", "no-such-artifact"], "not found"),
    ],
)
def test_bad_input_is_one_line(capsys, model_dir, tmp_path, args, needle):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("tiny text")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / "projections.safetensors").write_bytes(b"\x80\x04\x95garbage-pickle" * 3)
    args = [a.format(model=model_dir, tmp=tmp_path) for a in args]
    code, _, err = run(capsys, *args)
    assert_one_line_error(code, err, needle)


def test_debug_shows_traceback(capsys):
    with pytest.raises(Exception, match="GGUF file not found"):
        main(["--debug", "calibrate", "/no/such/model.gguf"])


def test_usage_error_exit_code(capsys):
    code, _, err = run(capsys, "calibrate", "--tokens", "many")
    assert code == 2 and "--tokens" in err
