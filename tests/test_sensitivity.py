"""Per-layer loss sensitivity and the sensitivity k-policy."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_artifact
from tiny_models import VOCAB, assert_no_single_move_improves, tiny_model

from aqua_cli.errors import ConfigError
from aqua_cli.methods import patch
from aqua_cli.policy import allocate, layer_costs, resolve_policy, sensitivity_budgets
from aqua_cli.sensitivity import LayerInputs, decoder_parts, measure, resume_logits


@pytest.mark.parametrize("arch", ["llama", "gemma3", "qwen2"])
def test_resuming_from_a_layer_is_the_full_forward_pass(arch):
    model = tiny_model(arch)
    art = tiny_artifact(model, arch)
    ids = torch.randint(3, VOCAB, (1, 24), generator=torch.Generator().manual_seed(2))
    parts = decoder_parts(model)
    assert parts is not None
    with torch.no_grad(), patch(model, art, k=1.0, mode="dense") as handle:
        keeper = LayerInputs(parts[0])
        dense = model(ids, use_cache=False).logits
        keeper.remove()
        for layer in range(art.num_layers):
            assert torch.allclose(resume_logits(model, parts, keeper.inputs, layer), dense, atol=1e-5)
        # AQUA at one layer: resuming equals a full pass with only that layer patched
        last = art.num_layers - 1
        handle.hooks[last].mode, handle.hooks[last].k = "dynamic", 4
        full = model(ids, use_cache=False).logits
        assert torch.allclose(resume_logits(model, parts, keeper.inputs, last), full, atol=1e-5)
        assert not torch.allclose(full, dense, atol=1e-5)


def test_measure_gives_non_negative_curves_that_vanish_at_full_k():
    model = tiny_model("llama")
    art = tiny_artifact(model, "llama")
    windows = torch.randint(3, VOCAB, (2, 32), generator=torch.Generator().manual_seed(3))
    result = measure(model, art, windows, ratios=(0.25, 0.5, 0.75, 1.0))
    kl = torch.tensor(result["kl"])
    assert kl.shape == (art.num_layers, 3) and result["dims"] == [4, 8, 12]
    assert (kl >= -1e-7).all() and result["predicted_tokens"] == 62
    strided = measure(model, art, windows[:1], ratios=(0.5,), stride=4)
    assert strided["predicted_tokens"] == 8 and strided["stride"] == 4  # positions 0, 4, ..., 28 of 31
    assert model.config._attn_implementation != "aqua"  # restored


class Art:
    def __init__(self, kl, dims, head_dim=8, groups=2):
        self.head_dim, self.num_groups, self.num_layers, self.name = head_dim, groups, len(kl), "fake"
        self.metadata = {"extra": {"sensitivity": {"kl": kl, "dims": dims}}}


def test_sensitivity_budgets_conserve_cost_and_follow_the_damage():
    # layer 0 is hurt a lot by small k, layer 2 not at all: budget moves from 2 to 0
    art = Art([[1.0, 0.5, 0.1], [0.2, 0.1, 0.05], [0.0, 0.0, 0.0]], dims=[2, 4, 6])
    for k in range(2, 9):
        budgets = sensitivity_budgets(art, k)
        assert sum(map(sum, budgets)) == 3 * 2 * k
        assert all(len(set(b)) == 1 and 2 <= b[0] <= 8 for b in budgets)  # never below the measured range
    with pytest.raises(ConfigError, match="below the smallest budget"):
        sensitivity_budgets(art, 1)
    b = [row[0] for row in sensitivity_budgets(art, 4)]
    assert b[0] > 4 and b[2] < 4
    # the DP is optimal: no single-dimension move between layers lowers the summed cost
    cost = layer_costs(art.metadata["extra"]["sensitivity"], 8)
    assert_no_single_move_improves(cost, b, 2, 8)


def test_costs_are_monotone_and_zero_at_full_dim():
    cost = layer_costs({"kl": [[0.3, 0.35, 0.1]], "dims": [2, 4, 6]}, 8)  # noisy: 0.35 > 0.3
    assert bool(torch.isinf(cost[0, :2]).all())  # below the measured range
    row = cost[0, 2:]
    assert float(cost[0, 8]) == 0.0 and bool((row[:-1] >= row[1:] - 1e-12).all())


def test_auto_policy_and_missing_curves():
    art = Art([[0.1, 0.0]], dims=[2, 4], head_dim=4, groups=1)
    assert resolve_policy(art, "auto") == "uniform"
    art.metadata["extra"]["default_policy"] = "sensitivity"
    assert resolve_policy(art, "auto") == "sensitivity"
    assert allocate(art, 2, "auto") == sensitivity_budgets(art, 2)
    art.metadata["extra"] = {}
    with pytest.raises(ConfigError, match="aqua sensitivity"):
        sensitivity_budgets(art, 2)


def test_cli_sensitivity_then_eval_with_the_policy(capsys, model_dir, tmp_path):
    import json

    from test_cli import assert_one_line_error, calibrate_tiny, run, tiny_eval_args

    art = tmp_path / "art"
    calibrate_tiny(capsys, model_dir, art)
    common = tiny_eval_args(model_dir, art)
    code, _, err = run(capsys, *common, "--k-policy", "uniform,sensitivity")
    assert_one_line_error(code, err, "aqua sensitivity")
    code, out, err = run(capsys, "sensitivity", str(model_dir), "--artifact", str(art), "--tokens", "128", "--seq-len", "64",
                         "--ratios", "0.25,0.5,0.75", "--device", "cpu", "--json", str(tmp_path / "s.json"))
    assert code == 0, err
    report = json.loads((tmp_path / "s.json").read_text())
    assert len(report["kl"]) == 2 and report["dims"] == [4, 8, 12] and report["data_part"] == "calibration"
    code, out, err = run(capsys, *common, "--k-policy", "uniform,sensitivity", "--json", str(tmp_path / "e.json"))
    assert code == 0, err
    result = json.loads((tmp_path / "e.json").read_text())
    assert {r["policy"] for r in result["rows"]} == {"uniform", "sensitivity"}
    assert result["calibration_overlap"] == 0
    assert {r["k_dims"] for r in result["rows"]} == {8.0}  # equal cost
    assert result["policy_comparison"][0]["policy"] == "sensitivity"
    # auto without a recorded default is uniform; with one, the recorded policy
    code, out, err = run(capsys, *common, "--k-policy", "auto", "--json", str(tmp_path / "a.json"))
    assert code == 0, err
    assert {r["policy"] for r in json.loads((tmp_path / "a.json").read_text())["rows"]} == {"uniform"}
    code, _, err = run(capsys, "sensitivity", str(model_dir), "--artifact", str(art), "--reuse",
                       "--set-default-policy", "sensitivity", "--evidence", "e.json")
    assert code == 0, err
    code, out, err = run(capsys, *common, "--k-policy", "auto", "--json", str(tmp_path / "b.json"))
    assert code == 0, err
    assert {r["policy"] for r in json.loads((tmp_path / "b.json").read_text())["rows"]} == {"sensitivity"}
