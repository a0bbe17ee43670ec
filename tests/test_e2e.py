"""The whole-model decode benchmark: its dense baseline cache is exact, its rows are complete and honest
(bytes from the tensors, one copy of the keys for AQUA), and the CLI phase runs end to end on the CPU."""

from __future__ import annotations

import json

import pytest
import torch
from test_cli import assert_one_line_error, run
from tiny_models import rel_err, tiny_model, token_ids
from transformers import DynamicCache

from aqua_cli.e2e import E2EConfig, StaticKVCache, e2e_config, random_artifact, run_e2e


def test_static_baseline_cache_equals_dynamic():
    model = tiny_model("llama")
    x = token_ids(length=12)
    with torch.no_grad():
        ref = model(x, past_key_values=DynamicCache(), use_cache=True).logits
        cache = StaticKVCache(model.config.num_hidden_layers, 16)
        got = model(x[:, :8], past_key_values=cache, use_cache=True).logits
        step = [model(x[:, t : t + 1], past_key_values=cache, use_cache=True).logits for t in range(8, 12)]
    assert rel_err(torch.cat([got, *step], dim=1), ref) <= 1e-4
    assert cache.get_seq_length() == 12 and cache.layers[0].keys.shape[2] == 16


def test_random_artifact_fits_its_config():
    config = e2e_config("smollm2-135m", layers=2)
    art = random_artifact(config)
    art.check_model(config)
    eye = torch.eye(art.head_dim).expand(art.num_groups, -1, -1)
    assert torch.allclose(art.projections[0].transpose(-1, -2) @ art.projections[0], eye, atol=1e-5)


def test_rows_on_cpu():
    rows, info = run_e2e(E2EConfig(seqs=[32], batches=[1, 2], ks=[0.5], token_ratios=[0.25], model="smollm2-135m", layers=1,
                                   device="cpu", dtype="float32", steps=2, warmup=1))
    assert [(r["batch"], r["impl"]) for r in rows] == [(b, i) for b in (1, 2) for i in ("dense", "aqua-dims", "aqua-topt")]
    for r in rows:
        dense = next(d for d in rows if d["impl"] == "dense" and d["batch"] == r["batch"])
        assert r["tokens_per_s"] > 0 and r["speedup_vs_dense"] == pytest.approx(r["tokens_per_s"] / dense["tokens_per_s"])
        assert r["kv_cache_bytes"] == dense["kv_cache_bytes"]  # kv_dims 1.0: one copy of the keys, projected
    assert rows[2]["tokens"] == 8 and info["shape"]["num_layers"] == 1 and info["cuda_graphs"] is False


def test_cli_phase_e2e(capsys, tmp_path):
    target = tmp_path / "e2e.json"
    code, out, _ = run(capsys, "bench", "--phase", "e2e", "--model", "smollm2-135m", "--layers", "1", "--seq", "32",
                       "--batch", "1", "--device", "cpu", "--repeats", "1", "--tokens", "1/4", "--kv-dims", "0.5",
                       "--page-score", "max,planes", "--json", str(target))
    assert code == 0 and "aqua-topt" in out
    rows = json.loads(target.read_text())["rows"]
    dense, dims = rows[0], rows[1]
    assert dims["kv_cache_bytes"] * 4 == dense["kv_cache_bytes"] * 3  # (1 + m/D) / 2 at m = D/2
    assert [r["impl"] for r in rows[2:]] == ["aqua-topt", "aqua-topt-planes"]
    keys = rows[2]["kv_cache_bytes"] - dense["kv_cache_bytes"] // 2  # float32 here: values are half of dense's bytes
    assert rows[3]["kv_cache_bytes"] == rows[2]["kv_cache_bytes"] - keys // 2  # key planes: 2 bytes a value (float16's)


@pytest.mark.parametrize("args, needle", [
    (["bench", "--batch", "1,8"], "one value"),
    (["bench", "--phase", "e2e", "--batch", "x"], "--batch takes integers"),
    (["bench", "--phase", "e2e", "--layers", "0", "--device", "cpu", "--model", "smollm2-135m", "--seq", "32"], "--layers"),
])
def test_bad_input(capsys, args, needle):
    code, _, err = run(capsys, *args)
    assert_one_line_error(code, err, needle)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (and Triton for the AQUA kernels)")
@pytest.mark.parametrize("impl", ["dense", "aqua-dims", "aqua-topt"])
def test_graph_replay_equals_an_eager_step_on_gpu(impl):
    """What the e2e phase times (a CUDA-graph replay of the step at ``seq`` tokens) computes what the eager
    step computes: same logits, for dense and for both fused AQUA paths."""
    from aqua_cli.e2e import _fill, _sdpa_context, build_model, capture_step
    from aqua_cli.methods import AquaDecode, Dense

    device, seq, batch = torch.device("cuda"), 3000, 2
    config = e2e_config("llama-3.2-1b", layers=2)
    model = build_model(config, device, torch.bfloat16)
    if impl == "dense":
        method = Dense()(model)
    else:
        art = random_artifact(config)
        method = AquaDecode(art, k=0.5, token_ratio=1 / 16 if impl == "aqua-topt" else None, max_tokens=seq + 8, hybrid=False)(model)
    cache = StaticKVCache(config.num_hidden_layers, seq + 8) if impl == "dense" else method.new_cache()
    gen = torch.Generator(device=device).manual_seed(0)
    _fill(cache, config.num_hidden_layers, batch, config.num_key_value_heads, config.head_dim, seq, torch.bfloat16, device, gen)
    tok = torch.randint(3, 1000, (batch, 1), device=device)
    with torch.no_grad(), _sdpa_context(device)():
        cache.crop(seq)
        eager = model(input_ids=tok, position_ids=torch.full_like(tok, seq), past_key_values=cache, use_cache=True).logits.clone()
        graph, logits = capture_step(model, cache, tok, seq, 2, _sdpa_context(device))
        logits.zero_()
        graph.replay()
        torch.cuda.synchronize()
    if impl != "dense":  # every call ran the fused kernels, the captured one included (none fell back)
        assert sum(h.calls["reference"] for h in method.hooks) == 0 and sum(h.calls["kernel"] for h in method.hooks) > 0
    method.remove()
    assert rel_err(logits.float(), eager.float()) <= 1e-3
