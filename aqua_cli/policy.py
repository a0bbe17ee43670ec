"""Per-layer (and per-KV-group) k budgets from the calibration spectrum: an open question of the paper.

The paper uses one ``k`` for every layer and head. Layers differ, though: ``aqua inspect`` shows some
layers whose first quarter of projected dimensions holds nearly all the query/key energy and others
that are close to isotropic. A *k-policy* spends the same total attention dot-product budget as
uniform ``k`` but moves dimensions to where the spectrum says they matter.

Cost model: every query head of a KV group uses the group's ``k``, and every group has the same
number of query heads, so the dot-product cost of a layer is proportional to the sum of its groups'
``k``. A policy must return integer budgets ``k[l][g]`` in ``1..D`` with
``sum k[l][g] == layers * groups * k_uniform`` exactly (tested), so "equal cost" is literal.

Policies:

* ``uniform``: the paper's choice, ``k`` everywhere.
* ``energy``: maximise the total static energy kept, ``sum_lg E_lg(k_lg)`` where ``E_lg(k)`` is the
  fraction of calibration energy in the first ``k`` projected dims. ``E`` is concave (singular values
  are sorted), so taking dimensions greedily by their marginal energy share ``s_j^2 / sum s^2`` is
  optimal. Tends to starve already-concentrated layers and feed flat ones.
* ``equal-energy``: the smallest ``k_lg`` reaching a common energy target ``tau``, with ``tau``
  chosen (bisection) so that the budget is met; the remainder goes greedily. Equalises the worst
  case rather than the sum.

Both use the static energy as a proxy for what dynamic selection keeps; whether that proxy helps on
real text is what ``aqua eval --k-policy uniform,energy`` measures (docs/eval.md has the answer for
SmolLM2: it does not).

* ``sensitivity``: from what the loss depends on. ``aqua sensitivity`` stores in the artifact each
  layer's measured damage ``KL_l(k)`` (:mod:`aqua_cli.sensitivity`: KL of the model's next-token
  distribution, AQUA at that layer only, on calibration text); the budgets minimise
  ``sum_l KL_l(k_l)`` subject to ``sum_l k_l = layers * k`` exactly, by dynamic programming over
  integer budgets on the piecewise-linear interpolation of the curves (``KL_l(D) = 0``), each layer's k
  kept within the measured range (never below the smallest measured k: extrapolating the curves there
  let the optimiser starve a layer to 1 dimension on Gemma 3). Every KV group of a layer gets the layer's k.
* ``auto``: the artifact's ``extra["default_policy"]`` (set only where held-out evaluation showed the
  policy beating uniform, with the evidence named beside it), else ``uniform``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from .errors import ConfigError
from .spectrum import energy_curves

Budgets = list[list[int]]


def uniform_budgets(curves: torch.Tensor, k: int) -> Budgets:
    layers, groups, _ = curves.shape
    return [[k] * groups for _ in range(layers)]


def energy_budgets(curves: torch.Tensor, k: int, floor: int = 1) -> Budgets:
    """Greedy marginal-energy allocation (optimal for a concave objective), every budget >= ``floor``."""
    layers, groups, d = curves.shape
    total = layers * groups * k
    floor = min(floor, k)
    marginal = torch.diff(curves.double(), dim=-1, prepend=torch.zeros(layers, groups, 1, dtype=torch.float64))
    # dims below the floor are taken first (score +inf); ties broken by (layer, group, dim) order
    score = marginal.clone()
    score[..., :floor] = float("inf")
    flat = score.reshape(-1)
    order = torch.argsort(flat, descending=True, stable=True)[:total]
    # take the top ``total`` marginal dims; concavity means each (l, g) takes a prefix of its dims
    counts = torch.zeros(layers * groups, dtype=torch.long)
    counts.index_add_(0, order // d, torch.ones_like(order))
    return counts.view(layers, groups).tolist()


def equal_energy_budgets(curves: torch.Tensor, k: int, floor: int = 1) -> Budgets:
    """Smallest k per (layer, group) reaching a common energy target, then the remainder greedily."""
    layers, groups, d = curves.shape
    total = layers * groups * k
    c = curves.double()

    def needed(tau: float) -> torch.Tensor:
        # first k (1-based) with curve >= tau, at least ``floor``
        reach = (c < tau).sum(-1) + 1
        return reach.clamp(min=min(floor, k), max=d)

    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if int(needed(mid).sum()) <= total:
            lo = mid
        else:
            hi = mid
    base = needed(lo)
    spare = total - int(base.sum())
    if spare > 0:  # hand the rest out by marginal energy of the next dimension
        marginal = torch.diff(c, dim=-1, prepend=torch.zeros(layers, groups, 1, dtype=torch.float64))
        rank = torch.arange(d).expand(layers, groups, d)
        score = torch.where(rank >= base.unsqueeze(-1), marginal, torch.full_like(marginal, -1.0))
        order = torch.argsort(score.reshape(-1), descending=True, stable=True)[:spare]
        extra = torch.zeros(layers * groups, dtype=torch.long)
        extra.index_add_(0, order // d, torch.ones_like(order))
        base = base + extra.view(layers, groups)
    return base.tolist()


POLICIES: dict[str, Callable[[torch.Tensor, int], Budgets]] = {
    "uniform": uniform_budgets,
    "energy": energy_budgets,
    "equal-energy": equal_energy_budgets,
}


ARTIFACT_POLICIES = ("sensitivity", "auto")  # policies that read more than the spectrum from the artifact


def parse_policy(name: str) -> str:
    if name not in POLICIES and name not in ARTIFACT_POLICIES:
        raise ConfigError(f"unknown k-policy '{name}': use one of {', '.join([*POLICIES, *ARTIFACT_POLICIES])}")
    return name


def sensitivity_record(artifact: Any) -> dict[str, Any] | None:
    record = (artifact.metadata.get("extra") or {}).get("sensitivity")
    return record if isinstance(record, dict) and record.get("kl") else None


def resolve_policy(artifact: Any, policy: str) -> str:
    """``auto`` -> the artifact's recorded default policy (or ``uniform``); other names unchanged."""
    parse_policy(policy)
    if policy != "auto":
        return policy
    chosen = (artifact.metadata.get("extra") or {}).get("default_policy") or "uniform"
    return chosen if (chosen != "sensitivity" or sensitivity_record(artifact)) else "uniform"


def check_available(artifact: Any, policies: Any) -> None:
    """Fail early when a policy needs what the artifact does not hold."""
    if "sensitivity" in policies and sensitivity_record(artifact) is None:
        raise ConfigError(
            f"artifact '{artifact.name}' holds no sensitivity curves: run `aqua sensitivity` on it first "
            "(or use --k-policy uniform)"
        )


def layer_costs(record: dict[str, Any], head_dim: int) -> torch.Tensor:
    """``[layers, D + 1]`` interpolated ``KL_l(k)`` for k = 0..D; +inf below the smallest measured k."""
    dims = [int(x) for x in record["dims"]] + [head_dim]
    kl = torch.tensor(record["kl"], dtype=torch.float64)
    kl = torch.cat([kl, torch.zeros(kl.shape[0], 1, dtype=torch.float64)], dim=1)
    # more dims never hurt in expectation: make each measured curve non-increasing (noise)
    kl = torch.flip(torch.cummax(torch.flip(kl, [1]), dim=1).values, [1])
    grid = torch.arange(head_dim + 1, dtype=torch.float64)
    x = torch.tensor(dims, dtype=torch.float64)
    out = torch.empty(kl.shape[0], head_dim + 1, dtype=torch.float64)
    for layer in range(kl.shape[0]):
        y = kl[layer]
        seg = torch.searchsorted(x, grid.clamp(min=x[0], max=x[-1]), right=True).clamp(1, len(dims) - 1)
        x0, x1, y0, y1 = x[seg - 1], x[seg], y[seg - 1], y[seg]
        out[layer] = y0 + (y1 - y0) * (grid - x0) / (x1 - x0)
    out = out.clamp_min(0.0)
    out[:, : dims[0]] = float("inf")  # not measured: never chosen
    return out


def sensitivity_budgets(artifact: Any, k: int) -> Budgets:
    """Per-layer budgets minimising the summed measured KL at total ``layers * k`` (exact DP)."""
    record = sensitivity_record(artifact)
    if record is None:
        raise ConfigError(
            f"artifact '{artifact.name}' holds no sensitivity curves: run `aqua sensitivity` on it first "
            "(or use --k-policy uniform)"
        )
    d, layers, groups = artifact.head_dim, artifact.num_layers, artifact.num_groups
    cost = layer_costs(record, d)
    if cost.shape[0] != layers:
        raise ConfigError(f"sensitivity curves for {cost.shape[0]} layers, artifact has {layers}")
    total = layers * k
    inf = float("inf")
    best = torch.full((total + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    choice = torch.zeros(layers, total + 1, dtype=torch.long)
    for layer in range(layers):
        new = torch.full_like(best, inf)
        arg = torch.zeros(total + 1, dtype=torch.long)
        for option in range(1, d + 1):
            if option > total:
                break
            cand = torch.full_like(best, inf)
            cand[option:] = best[: total + 1 - option] + cost[layer, option]
            better = cand < new
            new = torch.where(better, cand, new)
            arg = torch.where(better, torch.full_like(arg, option), arg)
        best, choice[layer] = new, arg
    if not torch.isfinite(best[total]):
        low = int(record["dims"][0])
        raise ConfigError(
            f"k = {k} dims is below the smallest budget the sensitivity was measured at ({low}): "
            "measure lower ratios with `aqua sensitivity --ratios`, or use --k-policy uniform"
        )
    budgets, left = [], total
    for layer in reversed(range(layers)):
        option = int(choice[layer, left])
        budgets.append(option)
        left -= option
    budgets.reverse()
    return [[b] * groups for b in budgets]


def allocate(artifact: Any, k: int, policy: str = "uniform") -> Budgets:
    """Integer budgets ``[layers][groups]`` summing to ``layers * groups * k`` (``k`` in dims)."""
    policy = resolve_policy(artifact, policy)
    d = artifact.head_dim
    if not 1 <= k <= d:
        raise ConfigError(f"k = {k} dimensions is outside 1..{d}")
    if policy == "sensitivity":
        budgets = sensitivity_budgets(artifact, k)
    else:
        budgets = POLICIES[policy](energy_curves(artifact), k)
    assert sum(map(sum, budgets)) == artifact.num_layers * artifact.num_groups * k, "budget not conserved"
    return budgets


def kept_energy(artifact: Any, budgets: Budgets) -> float:
    """Mean over layers and groups of the static energy fraction the budgets keep."""
    curves = energy_curves(artifact)
    idx = torch.as_tensor(budgets, dtype=torch.long).unsqueeze(-1) - 1
    return float(curves.gather(-1, idx).mean())
