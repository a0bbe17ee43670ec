"""Bad input across every command, through the real CLI: exit status 1, one line that names the problem
and what to do, no traceback. (Signals, races, disk full and overflow: tests/test_reliability.py.)"""

from __future__ import annotations


import pytest
import torch
from safetensors.torch import save_file

from aqua_cli.artifact import TENSOR_FILE, provenance_sha256, tensors_sha256
from aqua_cli.commands import main

from conftest import tiny_artifact
from tiny_models import tiny_model


@pytest.fixture(scope="module")
def files(model_dir, tmp_path_factory):
    """A workspace of broken inputs, built once."""
    root = tmp_path_factory.mktemp("bad")
    art = tiny_artifact(tiny_model("llama"), "llama")
    good = art.save(root / "good")
    qwen = tiny_artifact(tiny_model("qwen2"), "qwen2").save(root / "qwen")
    raw = (good / TENSOR_FILE).read_bytes()

    def artifact_dir(name: str, content: bytes) -> str:
        (root / name).mkdir()
        (root / name / TENSOR_FILE).write_bytes(content)
        return str(root / name)

    def rewritten(name: str, mutate) -> str:
        from safetensors import safe_open

        with safe_open(str(good / TENSOR_FILE), "pt") as fh:
            meta = fh.metadata()
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        mutate(tensors, meta)
        (root / name).mkdir()
        save_file(tensors, str(root / name / TENSOR_FILE), metadata=meta)
        return str(root / name)

    def reseal(t, m):  # both hashes recomputed: only the structural checks can catch the change
        m["tensors_sha256"] = tensors_sha256(t)
        m["provenance_sha256"] = provenance_sha256(m)

    def reshape(t, m):
        t["layers.0.projection"] = t["layers.0.projection"][:, :8, :8].contiguous()
        reseal(t, m)

    def retype(t, m):
        t["layers.0.projection"] = t["layers.0.projection"].half()
        reseal(t, m)

    paths = {
        "model": str(model_dir),
        "good": str(good),
        "qwen": str(qwen),
        "truncated": artifact_dir("truncated", raw[: len(raw) // 3]),
        "empty": artifact_dir("empty", b""),
        "text": artifact_dir("text", b"this is not a tensor file at all, just some text" * 4),
        "tampered": rewritten("tampered", lambda t, m: t["layers.1.projection"].mul_(1.01)),
        "shape": rewritten("shape", reshape),
        "dtype": rewritten("dtype", retype),
        "empty_txt": str(root / "empty.txt"),
        "binary": str(root / "binary.txt"),
        "short": str(root / "short.txt"),
        "ds": str(root / "ds"),
        "afile": str(root / "afile"),
    }
    (root / "pickle").mkdir()
    torch.save({"layers.0.projection": torch.eye(4)}, root / "pickle" / TENSOR_FILE)
    paths["pickle"] = str(root / "pickle")
    (root / "empty.txt").write_text("")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 8)
    (root / "short.txt").write_text("a few words")
    (root / "afile").write_text("x")
    import datasets

    datasets.Dataset.from_dict({"body": ["some text " * 50] * 4}).save_to_disk(str(root / "ds"))
    return paths


CASES = [
    # models
    (["calibrate", "nobody/no-such-model-aqua"], "not in the local Hugging Face cache"),
    (["calibrate", "/no/such/model/dir"], "model not found"),
    (["calibrate", "/no/such/model.gguf"], "GGUF file not found"),
    (["calibrate", "{afile}"], "not a .gguf model"),
    (["eval", "{model}", "--artifact", "{good}", "--k", "0.5", "--dtype", "int4"], "unknown dtype"),
    # artifacts for another model, broken artifacts
    (["eval", "{model}", "--artifact", "{qwen}", "--tokens", "128", "--seq-len", "64"], "calibrated for tiny/qwen2"),
    (["generate", "{model}", "hi", "--artifact", "HuggingFaceTB--SmolLM2-135M-Instruct"], "calibrated for HuggingFaceTB/SmolLM2-135M-Instruct"),
    (["inspect", "{truncated}"], "truncated or corrupt"),
    (["inspect", "{empty}"], "empty or truncated"),
    (["inspect", "{text}"], "not a safetensors file"),
    (["inspect", "{tampered}"], "sha256"),
    (["inspect", "{pickle}"], "not a safetensors file"),
    (["inspect", "{shape}"], "shape"),
    (["inspect", "{dtype}"], "dtype"),
    (["inspect", "no-such-artifact"], "not found"),
    (["generate", "{model}", "hi", "--artifact", "{tampered}"], "sha256"),
    # k and modes
    (["eval", "{model}", "--artifact", "{good}", "--k", "0"], "k"),
    (["eval", "{model}", "--artifact", "{good}", "--k", "-0.5"], "k"),
    (["eval", "{model}", "--artifact", "{good}", "--k", "1.5"], "outside (0, 1]"),
    (["generate", "{model}", "hi", "--artifact", "{good}", "--k", "17"], "more than head_dim = 16"),
    (["eval", "{model}", "--artifact", "{good}", "--mode", "fast"], "unknown mode"),
    # sequence ranges
    (["bench", "--seq", "4096..64"], "--seq"),
    (["bench", "--seq", "0"], "--seq"),
    (["bench", "--seq", "abc"], "--seq"),
    (["bench", "--seq", "64..99999999999"], "--seq"),
    (["bench", "--seq", "64..4096:x1"], "--seq"),
    (["bench", "--model", "no-such-preset"], "unknown model"),
    # data
    (["calibrate", "{model}", "--data", "{empty_txt}"], "holds no text"),
    (["calibrate", "{model}", "--data", "{binary}"], "binary"),
    (["calibrate", "{model}", "--data", "{short}", "--seq-len", "64"], "fewer than one window"),
    (["calibrate", "{model}", "--data", "{ds}"], "no column 'text'"),
    (["eval", "{model}", "--artifact", "{good}", "--data", "{short}", "--seq-len", "64"], "fewer than one window"),
    # outputs
    (["calibrate", "{model}", "--tokens", "1024", "--seq-len", "64", "--out", "{afile}/art"], "cannot create the output directory"),
    (["calibrate", "{model}", "--tokens", "1024", "--seq-len", "64", "--out", "{good}"], "--force"),
    (["calibrate", "{model}", "--tokens", "0"], "--tokens must be at least 1"),
    (["generate", "{model}", "hi", "--artifact", "{good}", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "{model}", "hi", "--tokens", "1/16", "--page-score", "mean"], "page score must be one of"),
    (["generate", "{model}", "hi", "--page-score", "bound"], "give --tokens too"),
    (["generate", "{model}", "hi", "--tokens", "1/16", "--rerank", "4"], "--rerank takes"),
    (["generate", "{model}", "hi", "--key-planes"], "--key-planes halves"),
    (["bench", "--phase", "e2e", "--page-score", "best"], "--page-score takes a comma list of max, bound and planes"),
    (["bench", "--bound-page", "48"], "bound_page must be a power of two"),
    (["bench", "--rerank", "-1"], "--rerank must be"),
    # hub
    (["pull", "hf://not a repo"], "not a Hub artifact name"),
]


@pytest.mark.parametrize("args, needle", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_bad_input(capsys, files, args, needle):
    argv = [a.format(**files) for a in args]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert exc.value.code == 1, err
    assert len(lines) == 1 and lines[0].startswith("Error:"), err
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err


def test_at_least_thirty_cases():
    assert len(CASES) >= 30


def test_debug_flag_gives_the_traceback(files):
    with pytest.raises(Exception, match="sha256"):
        main(["--debug", "inspect", files["tampered"]])
