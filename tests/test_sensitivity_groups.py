"""Per-KV-group sensitivity curves and the sensitivity-group / sensitivity-joint k-policies."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_artifact
from tiny_models import VOCAB, assert_no_single_move_improves, tiny_model

from aqua_cli.errors import ConfigError
from aqua_cli.methods import patch
from aqua_cli.policy import (
    allocate,
    check_available,
    group_costs,
    resolve_policy,
    sensitivity_budgets,
    sensitivity_group_budgets,
    sensitivity_joint_budgets,
)
from aqua_cli.sensitivity import _kl_sum, measure

GROUP_POLICIES = ("sensitivity-group", "sensitivity-joint")


class Art:
    """What the sensitivity policies read: shape numbers and the ``extra["sensitivity"]`` record."""

    def __init__(self, kl, dims, kl_groups=None, head_dim=8):
        self.head_dim, self.num_layers, self.name = head_dim, len(kl), "fake"
        self.num_groups = len(kl_groups[0]) if kl_groups else 2
        record = {"kl": kl, "dims": dims}
        if kl_groups is not None:
            record["kl_groups"] = kl_groups
        self.metadata = {"extra": {"sensitivity": record}}


def planted() -> Art:
    """3 layers x 3 groups, dims 2/4/6 of 8. Layer 0 is the most sensitive (as in test_sensitivity.py);
    in every layer group 1 is hurt far more than groups 0 and 2, group 2 not at all."""
    kl = [[1.0, 0.5, 0.1], [0.2, 0.1, 0.05], [0.01, 0.005, 0.001]]
    kl_groups = [
        [[0.1 * a, 0.1 * b, 0.1 * c], [0.9 * a, 0.9 * b, 0.9 * c], [0.0, 0.0, 0.0]] for a, b, c in kl
    ]
    return Art(kl, [2, 4, 6], kl_groups)


@pytest.mark.parametrize("policy", GROUP_POLICIES)
def test_equal_cost_and_bounds(policy):
    art = planted()
    for k in range(2, 9):
        budgets = allocate(art, k, policy)
        flat = [b for row in budgets for b in row]
        assert len(budgets) == 3 and all(len(row) == 3 for row in budgets)
        assert sum(flat) == 3 * 3 * k  # exactly uniform's cost
        assert all(2 <= b <= 8 for b in flat)  # never below the measured range, never above D
        if k == 8:
            assert set(flat) == {8}
    with pytest.raises(ConfigError, match="below the smallest budget"):
        allocate(art, 1, policy)


def test_group_split_keeps_the_layer_totals_and_follows_the_damage():
    art = planted()
    for k in range(2, 9):
        layer = sensitivity_budgets(art, k)
        split = sensitivity_group_budgets(art, k)
        assert [sum(row) for row in split] == [sum(row) for row in layer]  # per-layer totals unchanged
    for k in (3, 5, 7):  # one layer gets a total between 2 and 8 per group: it is split by the damage
        for row in sensitivity_group_budgets(art, k):
            if len(set(row)) > 1:  # a layer with room to move: the sensitive group 1 gets the most dims
                assert row[1] >= row[0] >= row[2] and row[1] > row[2]
        assert any(row[1] > row[2] for row in sensitivity_group_budgets(art, k))


def test_joint_dp_follows_the_damage_and_is_optimal():
    art = planted()
    k = 4
    budgets = sensitivity_joint_budgets(art, k)
    assert budgets[0][1] == max(b for row in budgets for b in row)  # layer 0, group 1: the most sensitive unit
    assert budgets[0][1] > budgets[0][2] and budgets[0][1] > budgets[2][1]
    # no single-dimension move between two units lowers the summed interpolated cost
    cost = group_costs(art.metadata["extra"]["sensitivity"], 8).reshape(9, -1)
    assert_no_single_move_improves(cost, [b for row in budgets for b in row], 2, 8)


def test_equal_groups_split_evenly():
    """Identical group curves: exact ties go to the layer's k (no arbitrary lopsided split)."""
    kl = [[0.4, 0.2, 0.1], [0.1, 0.05, 0.01]]
    art = Art(kl, [2, 4, 6], [[[a / 2, b / 2, c / 2]] * 2 for a, b, c in kl])
    for k in range(2, 9):
        assert all(len(set(row)) == 1 for row in sensitivity_group_budgets(art, k))


def test_group_costs_are_geometric_convex_and_vanish_at_full_dim():
    record = {"kl": [[1.0, 0.1, 0.05]], "dims": [2, 4, 6], "kl_groups": [[[0.8, 0.08, 0.04], [0.3, 0.35, 0.0]]]}
    cost = group_costs(record, 8)
    assert cost.shape == (1, 2, 9) and bool(torch.isinf(cost[..., :2]).all()) and bool((cost[..., 8] == 0).all())
    row = cost[0, 0, 2:]
    assert float(row[1]) < 0.44  # geometric between positive points (0.8 -> 0.08: ~0.25 at k = 3, not 0.44)
    assert float(row[0]) == pytest.approx(0.8) and float(row[2]) == pytest.approx(0.08)
    for unit in cost[0]:
        y = unit[2:]
        assert bool((y[:-1] >= y[1:] - 1e-12).all())  # non-increasing (the noisy 0.35 > 0.3 is flattened)
        slopes = y[1:] - y[:-1]
        assert bool((slopes[1:] >= slopes[:-1] - 1e-12).all())  # convex: decreasing returns per dimension


@pytest.mark.parametrize("policy", GROUP_POLICIES)
def test_refused_without_the_group_curves(policy):
    layer_only = Art([[0.1, 0.0]], [2, 4], head_dim=4)
    with pytest.raises(ConfigError, match="aqua sensitivity --groups") as info:
        allocate(layer_only, 2, policy)
    assert "\n" not in str(info.value) and "--k-policy sensitivity" in str(info.value)
    with pytest.raises(ConfigError, match="aqua sensitivity --groups"):
        check_available(layer_only, ("uniform", policy))
    layer_only.metadata["extra"]["default_policy"] = policy
    assert resolve_policy(layer_only, "auto") == "uniform"  # a recorded default it cannot run falls back
    bare = Art([[0.1, 0.0]], [2, 4], head_dim=4)
    bare.metadata["extra"] = {}
    with pytest.raises(ConfigError, match="--k-policy uniform"):
        allocate(bare, 2, policy)


def test_shape_mismatch_is_refused():
    art = planted()
    art.num_groups = 2
    with pytest.raises(ConfigError, match="per-group sensitivity curves"):
        sensitivity_group_budgets(art, 4)


def test_measure_groups_on_a_tiny_model():
    model = tiny_model("llama")  # 2 KV groups, head_dim 16
    art = tiny_artifact(model, "llama")
    with torch.no_grad():  # sharper next-token distributions: KL well above float32 rounding
        model.lm_head.weight.mul_(30)
    windows = torch.randint(3, VOCAB, (2, 32), generator=torch.Generator().manual_seed(3))
    result = measure(model, art, windows, ratios=(0.25, 0.5), groups=True)
    kl_groups = torch.tensor(result["kl_groups"])
    assert kl_groups.shape == (art.num_layers, art.num_groups, 2)
    assert (kl_groups > 0).all()
    assert result["kl"] == measure(model, art, windows, ratios=(0.25, 0.5))["kl"]  # layer curves unchanged
    # one point against a full forward pass with only that group of that layer under AQUA
    ids = windows[:1]
    with torch.no_grad(), patch(model, art, k=1.0, mode="dense") as handle:
        ref = torch.log_softmax(model(ids, use_cache=False).logits[0, :-1].float(), dim=-1)
        hook = handle.hooks[0]
        hook.mode, hook.k = "dynamic", torch.tensor([16, 4])  # group 1 of layer 0 at k = 4
        one = _kl_sum(ref, model(ids, use_cache=False).logits[0, :-1]) / ref.shape[0]
    single = measure(model, art, windows[:1], ratios=(0.25,), groups=True)
    assert single["kl_groups"][0][1][0] == pytest.approx(one, rel=1e-3)
    assert single["kl_groups"][0][0][0] != pytest.approx(one, rel=1e-2)  # not the other group's
    assert model.config._attn_implementation != "aqua"  # restored


def test_one_group_per_layer_reuses_the_layer_curves():
    model = tiny_model("qwen2")  # 1 KV group
    art = tiny_artifact(model, "qwen2")
    windows = torch.randint(3, VOCAB, (1, 24), generator=torch.Generator().manual_seed(4))
    steps = []
    result = measure(model, art, windows, ratios=(0.5,), groups=True, on_step=lambda done, total: steps.append(total))
    assert result["kl_groups"] == [[row] for row in result["kl"]]
    assert steps[-1] == art.num_layers  # no extra passes


def test_round_trip_through_the_artifact_file(tmp_path):
    from aqua_cli.artifact import Artifact

    model = tiny_model("llama")
    art = tiny_artifact(model, "llama")
    windows = torch.randint(3, VOCAB, (1, 32), generator=torch.Generator().manual_seed(5))
    with pytest.raises(ConfigError, match="--groups"):
        check_available(art, GROUP_POLICIES)
    art.metadata["extra"] = {**(art.metadata.get("extra") or {}),
                             "sensitivity": measure(model, art, windows, ratios=(0.25, 0.5, 0.75), groups=True)}
    before = {p: allocate(art, 8, p) for p in ("sensitivity", *GROUP_POLICIES)}
    path = art.save(tmp_path / "art")
    loaded = Artifact.load(path)
    assert loaded.metadata["extra"]["sensitivity"]["kl_groups"] == art.metadata["extra"]["sensitivity"]["kl_groups"]
    for policy, budgets in before.items():
        assert allocate(loaded, 8, policy) == budgets
        assert sum(map(sum, budgets)) == 8 * loaded.num_layers * loaded.num_groups


def test_cli_sensitivity_groups_then_eval(capsys, model_dir, tmp_path):
    import json

    from test_cli import assert_one_line_error, calibrate_tiny, run, tiny_eval_args

    art = tmp_path / "art"
    calibrate_tiny(capsys, model_dir, art)
    common = tiny_eval_args(model_dir, art)
    sens = ["sensitivity", str(model_dir), "--artifact", str(art), "--tokens", "64", "--seq-len", "64",
            "--ratios", "0.25,0.5,0.75", "--stride", "4", "--device", "cpu"]
    code, _, err = run(capsys, *sens)  # layer curves only
    assert code == 0, err
    code, _, err = run(capsys, *common, "--k-policy", "uniform,sensitivity-group")
    assert_one_line_error(code, err, "aqua sensitivity --groups")
    code, _, err = run(capsys, "sensitivity", str(model_dir), "--artifact", str(art), "--reuse", "--groups")
    assert_one_line_error(code, err, "--reuse")
    code, out, err = run(capsys, *sens, "--groups", "--json", str(tmp_path / "s.json"))
    assert code == 0, err
    report = json.loads((tmp_path / "s.json").read_text())
    assert len(report["kl_groups"]) == 2 and len(report["kl_groups"][0]) == 2 and "per KV group" in out
    code, out, err = run(capsys, *common, "--k-policy", "uniform,sensitivity,sensitivity-group,sensitivity-joint",
                         "--json", str(tmp_path / "e.json"))
    assert code == 0, err
    result = json.loads((tmp_path / "e.json").read_text())
    assert {r["policy"] for r in result["rows"]} == {"uniform", "sensitivity", "sensitivity-group", "sensitivity-joint"}
    assert {r["k_dims"] for r in result["rows"]} == {8.0}  # equal cost
    assert result["calibration_overlap"] == 0
