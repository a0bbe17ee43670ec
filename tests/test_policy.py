"""k-policies: integer budgets in range that spend exactly the uniform dot-product budget."""

from __future__ import annotations

import pytest
import torch

from aqua_cli.errors import ConfigError
from aqua_cli.policy import POLICIES, allocate, energy_budgets, equal_energy_budgets, kept_energy


class FakeArtifact:
    """Just what the policies read: singular values ``[layers][groups, D]`` (sorted, decreasing)."""

    def __init__(self, singular: list[torch.Tensor]):
        self.singular_values = singular

    @property
    def num_layers(self) -> int:
        return len(self.singular_values)

    @property
    def num_groups(self) -> int:
        return self.singular_values[0].shape[0]

    @property
    def head_dim(self) -> int:
        return self.singular_values[0].shape[1]


def skewed(layers: int = 4, groups: int = 2, d: int = 16, seed: int = 0) -> FakeArtifact:
    """Layers from concentrated (fast-decaying spectrum) to flat."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for layer in range(layers):
        decay = 0.2 + 0.8 * layer / max(1, layers - 1)  # 0.2: concentrated ... 1.0: flat
        s = decay ** torch.arange(d, dtype=torch.float32) * (1 + 0.01 * torch.rand(groups, d, generator=gen))
        out.append(s.sort(-1, descending=True).values)
    return FakeArtifact(out)


@pytest.mark.parametrize("policy", list(POLICIES))
@pytest.mark.parametrize("k", [1, 3, 8, 12, 16])
def test_budget_is_conserved_and_in_range(policy, k):
    art = skewed()
    budgets = allocate(art, k, policy)
    flat = [b for layer in budgets for b in layer]
    assert len(budgets) == art.num_layers and all(len(layer) == art.num_groups for layer in budgets)
    assert sum(flat) == art.num_layers * art.num_groups * k
    assert all(1 <= b <= art.head_dim for b in flat)
    if k == art.head_dim:
        assert set(flat) == {k}


def test_uniform_is_uniform(shipped_artifact):
    assert allocate(shipped_artifact, 32, "uniform") == [[32] * shipped_artifact.num_groups] * shipped_artifact.num_layers


def test_energy_moves_dims_to_flat_layers_and_keeps_more_energy():
    art = skewed()
    budgets = energy_budgets(torch.stack([(s.double() ** 2).cumsum(-1) / (s.double() ** 2).sum(-1, keepdim=True) for s in art.singular_values]).float(), 6)
    per_layer = [sum(layer) for layer in budgets]
    assert per_layer[0] < per_layer[-1]  # the concentrated layer gives dims to the flat one
    uniform = allocate(art, 6, "uniform")
    assert kept_energy(art, allocate(art, 6, "energy")) >= kept_energy(art, uniform) - 1e-6


def test_energy_is_optimal_against_brute_force():
    """Greedy marginal energy is optimal for concave curves: check on a small case exhaustively."""
    import itertools

    art = skewed(layers=3, groups=1, d=5, seed=3)
    k = 2
    best = max(
        (kept_energy(art, [[a], [b], [c]]), (a, b, c))
        for a, b, c in itertools.product(range(1, 6), repeat=3)
        if a + b + c == 3 * k
    )
    assert kept_energy(art, allocate(art, k, "energy")) == pytest.approx(best[0], abs=1e-6)


def test_equal_energy_equalises_the_worst_layer():
    art = skewed()
    curves = torch.stack([(s.double() ** 2).cumsum(-1) / (s.double() ** 2).sum(-1, keepdim=True) for s in art.singular_values])
    k = 6

    def worst(budgets):
        idx = torch.as_tensor(budgets).unsqueeze(-1) - 1
        return float(curves.gather(-1, idx).min())

    assert worst(equal_energy_budgets(curves.float(), k)) >= worst(allocate(art, k, "uniform")) - 1e-6


def test_shipped_artifact_policies(shipped_artifact):
    for policy in POLICIES:
        budgets = allocate(shipped_artifact, 32, policy)
        assert sum(map(sum, budgets)) == 32 * shipped_artifact.num_layers * shipped_artifact.num_groups


def test_bad_policy_and_k():
    art = skewed()
    with pytest.raises(ConfigError, match="unknown k-policy"):
        allocate(art, 4, "magic")
    with pytest.raises(ConfigError, match="outside"):
        allocate(art, 17, "energy")
