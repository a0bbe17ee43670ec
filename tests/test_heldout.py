"""Held out by default: calibration and evaluation parts never share a token, windows start with BOS,
the artifact records its windows, and ``aqua eval`` counts (and refuses) overlap."""

from __future__ import annotations

import json

import pytest
import torch

from aqua_cli.data import (
    EVAL_FRACTION,
    DataSpec,
    WindowSet,
    cut_windows,
    load_window_set,
    part_bounds,
    stream_hash,
    window_hash,
)
from aqua_cli.errors import ConfigError, DataError
from aqua_cli.heldout import check_overlap


class Tok:
    """A whitespace 'tokenizer' over a fixed vocabulary, with or without BOS."""

    def __init__(self, bos: int | None = 1, vocab: int = 10**9):
        self.bos_token_id = bos
        self.size = vocab - 3
        self.eos_token_id = 2
        self.vocab: dict[str, int] = {}

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [self.vocab.setdefault(w, 3 + len(self.vocab) % self.size) for w in text.split()]}


def window_set(stream: torch.Tensor, part: str, seq_len: int = 16, tokens: int | None = None, seed: int = 0, prefix=(1,)):
    lo, hi = part_bounds(stream.numel(), part)
    windows, starts = cut_windows(stream, seq_len, tokens, seed, list(prefix), lo, hi)
    return WindowSet(windows, starts, seq_len - len(prefix), list(prefix), "x", part, seed, stream.numel(), stream_hash(stream))


def test_parts_are_disjoint_and_cover_the_stream():
    n = 10_000
    cal, ev, every = (part_bounds(n, p) for p in ("calibration", "evaluation", "all"))
    assert cal == (0, int(n * (1 - EVAL_FRACTION))) and ev == (cal[1], n) and every == (0, n)


@pytest.mark.parametrize("seq_len", [16, 33, 64])
def test_calibration_and_evaluation_windows_share_no_token(seq_len):
    stream = torch.arange(5000) + 3
    cal = window_set(stream, "calibration", seq_len)
    ev = window_set(stream, "evaluation", seq_len)
    cal_tokens = set(cal.windows[:, 1:].reshape(-1).tolist())
    ev_tokens = set(ev.windows[:, 1:].reshape(-1).tolist())
    assert cal_tokens.isdisjoint(ev_tokens)
    assert ev.overlap(cal.record()) == 0 and cal.overlap(ev.record()) == 0
    # the whole text overlaps the calibration part, and the count is exact
    everything = window_set(stream, "all", seq_len)
    expected = sum(any(not set(w[1:].tolist()).isdisjoint(cal_tokens) for _ in [0]) for w in everything.windows)
    assert everything.overlap(cal.record()) == expected > 0
    # another window length still sees the overlap (ranges, not only hashes)
    other = window_set(stream, "all", seq_len + 5)
    assert other.overlap(cal.record()) > 0


def test_windows_start_with_bos_only_where_defined():
    stream = torch.arange(400) + 3
    with_bos = window_set(stream, "all", 16, prefix=(1,))
    assert (with_bos.windows[:, 0] == 1).all() and with_bos.windows.shape[1] == 16
    assert torch.equal(with_bos.windows[0, 1:], stream[with_bos.starts[0] : with_bos.starts[0] + 15])
    without = window_set(stream, "all", 16, prefix=())
    assert torch.equal(without.windows[0], stream[without.starts[0] : without.starts[0] + 16])


def test_hashes_catch_the_same_text_from_another_source():
    stream = torch.arange(3000) + 3
    cal = window_set(stream, "calibration")
    record = cal.record() | {"stream_sha256": "another stream", "starts": []}
    same = WindowSet(cal.windows[:3], cal.starts[:3], cal.text_len, cal.prefix, "copy.txt", "all", 0, 1, "z")
    assert same.overlap(record) == 3
    assert window_hash(cal.windows[0]) == cal.hashes[0] != cal.hashes[1]
    assert same.overlap(None) is None


def test_load_window_set_on_a_real_source():
    tok = Tok()
    cal = load_window_set(DataSpec("pydoc", part="calibration"), tok, 64, 2048, 0)
    ev = load_window_set(DataSpec("pydoc", part="evaluation"), tok, 64, 2048, 0)
    assert cal.windows.shape == ev.windows.shape == (32, 64)
    assert cal.stream_sha256 == ev.stream_sha256 and ev.overlap(cal.record()) == 0
    assert max(cal.starts) + cal.text_len <= min(ev.starts)
    with pytest.raises(DataError, match="unknown data part"):
        DataSpec("pydoc", part="train")


def test_datasets_hold_out_the_tail_of_the_split(tmp_path):
    import datasets

    texts = [" ".join(f"w{i}_{j}" for j in range(40)) for i in range(50)]
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": texts})}).save_to_disk(str(tmp_path / "ds"))
    tok = Tok(bos=None)
    cal = load_window_set(DataSpec(str(tmp_path / "ds"), part="calibration"), tok, 32, None, 0)
    ev = load_window_set(DataSpec(str(tmp_path / "ds"), part="evaluation"), tok, 32, None, 0)
    assert ev.overlap(cal.record()) == 0 and len(ev.starts) >= 1
    assert set(cal.windows.reshape(-1).tolist()).isdisjoint(set(ev.windows.reshape(-1).tolist()) - {2})


def test_artifact_records_its_windows_and_eval_refuses_overlap():
    from tiny_models import tiny_model

    from aqua_cli.calibration import CalibrationConfig, calibrate
    from aqua_cli.evaluate import EvalConfig
    from aqua_cli.models import ModelSource

    model = tiny_model("llama")
    tok = Tok(vocab=128)
    config = CalibrationConfig(DataSpec("pydoc", part="calibration"), tokens=512, seq_len=64, batch_size=4)
    art = calibrate(model, tok, ModelSource("tiny/llama", "tiny", "local"), config, command=["test"])
    record = art.metadata["extra"]["calibration_windows"]
    assert record["part"] == "calibration" and record["seq_len"] == 64 and len(record["starts"]) == 8
    assert len(record["window_sha256"]) == 8 and record["prefix"] == [1]
    held = load_window_set(EvalConfig().data, tok, 64, 1024, 0)
    assert EvalConfig().data.part == "evaluation"
    assert check_overlap(held, art)["calibration_overlap"] == 0
    same = load_window_set(DataSpec("pydoc", part="calibration"), tok, 64, 1024, 0)
    with pytest.raises(ConfigError, match="share tokens with the artifact's calibration windows"):
        check_overlap(same, art)
    info = check_overlap(same, art, allow_overlap=True)
    assert info["calibration_overlap"] == 8 and info["calibration_data"]["windows"] == 8
    json.dumps(info)


def test_cli_eval_reports_overlap_and_refuses_it(capsys, model_dir, tmp_path):
    from test_cli import assert_one_line_error, calibrate_tiny, run, tiny_eval_args

    art = tmp_path / "art"
    calibrate_tiny(capsys, model_dir, art, tokens=2048)
    common = tiny_eval_args(model_dir, art, mode="dense,dynamic", tokens=256)
    code, out, err = run(capsys, *common, "--json", str(tmp_path / "e.json"))
    assert code == 0, err
    report = json.loads((tmp_path / "e.json").read_text())
    assert report["calibration_overlap"] == 0 and report["data_part"] == "evaluation"
    assert "calibration overlap: 0 of 4 windows" in out
    code, _, err = run(capsys, *common, "--data-part", "calibration")
    assert_one_line_error(code, err, "--allow-overlap")
    code, out, err = run(capsys, *common, "--data-part", "calibration", "--allow-overlap", "--json", str(tmp_path / "o.json"))
    assert code == 0, err
    assert json.loads((tmp_path / "o.json").read_text())["calibration_overlap"] == 4
