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
* ``sensitivity-group``: per-KV-group refinement. ``aqua sensitivity --groups`` also records each
  group's damage ``KL_lg(k)`` (AQUA at one group of one layer, the layer's other groups and every other
  layer dense; ``kl_groups`` in the same record, same windows). Each layer keeps its ``sensitivity``
  total ``groups * k_l``; that total is split across the layer's groups minimising
  ``sum_g KL_lg(k_lg)`` (the same exact DP, per layer), so the layer totals are unchanged and the cost
  is equal to uniform's by construction.
* ``sensitivity-joint``: one DP over all (layer, group) units on the group curves alone,
  ``sum_lg KL_lg(k_lg)`` subject to ``sum_lg k_lg = layers * groups * k`` (ignores the layer curves,
  i.e. assumes the groups' damage adds up within a layer as well as across layers).

  Both keep every ``k_lg`` within ``[smallest measured k, D]``; exact ties in a group split go to the
  budget nearest the layer's k. The group curves are interpolated geometrically between measured points
  (``log KL`` linear; the curves fall about 10x per quarter of D on SmolLM2) and made convex, so a split
  can move a few dimensions rather than a whole grid step (with linear interpolation every optimum sits on
  a measured k, and on SmolLM2 the split hardly moved at all).
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


GROUP_POLICIES = ("sensitivity-group", "sensitivity-joint")  # need the per-group curves (`aqua sensitivity --groups`)
ARTIFACT_POLICIES = ("sensitivity", *GROUP_POLICIES, "auto")  # policies that read more than the spectrum from the artifact


def parse_policy(name: str) -> str:
    if name not in POLICIES and name not in ARTIFACT_POLICIES:
        raise ConfigError(f"unknown k-policy '{name}': use one of {', '.join([*POLICIES, *ARTIFACT_POLICIES])}")
    return name


def sensitivity_record(artifact: Any) -> dict[str, Any] | None:
    record = (artifact.metadata.get("extra") or {}).get("sensitivity")
    return record if isinstance(record, dict) and record.get("kl") else None


def group_record(artifact: Any) -> dict[str, Any] | None:
    """The sensitivity record when it also holds per-group curves (``kl_groups``), else None."""
    record = sensitivity_record(artifact)
    return record if record is not None and record.get("kl_groups") else None


def _missing(artifact: Any, policy: str) -> str | None:
    """Why ``policy`` cannot run on ``artifact`` (one line), or None when it can."""
    if policy == "sensitivity" and sensitivity_record(artifact) is None:
        return (f"artifact '{artifact.name}' holds no sensitivity curves: run `aqua sensitivity` on it first "
                "(or use --k-policy uniform)")
    if policy in GROUP_POLICIES and group_record(artifact) is None:
        return (f"artifact '{artifact.name}' holds no per-group sensitivity curves: run `aqua sensitivity --groups` "
                f"on it first (or use --k-policy {'sensitivity' if sensitivity_record(artifact) else 'uniform'})")
    return None


def resolve_policy(artifact: Any, policy: str) -> str:
    """``auto`` -> the artifact's recorded default policy (or ``uniform``); other names unchanged."""
    parse_policy(policy)
    if policy != "auto":
        return policy
    chosen = (artifact.metadata.get("extra") or {}).get("default_policy") or "uniform"
    return chosen if _missing(artifact, chosen) is None else "uniform"


def check_available(artifact: Any, policies: Any) -> None:
    """Fail early when a policy needs what the artifact does not hold."""
    for policy in policies:
        reason = _missing(artifact, policy)
        if reason is not None:
            raise ConfigError(reason)


def _interpolated(kl: torch.Tensor, dims: list[int], head_dim: int, geometric: bool = False) -> torch.Tensor:
    """``[units, D + 1]`` piecewise-linear ``KL(k)`` for k = 0..D from ``[units, len(dims)]`` measured
    points and ``KL(D) = 0``, made non-increasing; +inf below the smallest measured k. ``geometric``:
    between two measured points that are both positive, interpolate ``log KL`` instead (the curves fall
    roughly exponentially with k; linear interpolation of a convex curve puts every optimum on a measured
    point, so the DP could only move whole grid steps), then take the lower convex hull (decreasing returns
    per dimension; without it the joint between a geometric and the last, linear, segment can be
    non-convex and reward uneven splits of identical curves)."""
    dims = [int(x) for x in dims] + [head_dim]
    kl = torch.cat([kl.double(), torch.zeros(kl.shape[0], 1, dtype=torch.float64)], dim=1)
    # more dims never hurt in expectation: make each measured curve non-increasing (noise)
    kl = torch.flip(torch.cummax(torch.flip(kl, [1]), dim=1).values, [1])
    grid = torch.arange(head_dim + 1, dtype=torch.float64)
    x = torch.tensor(dims, dtype=torch.float64)
    out = torch.empty(kl.shape[0], head_dim + 1, dtype=torch.float64)
    for layer in range(kl.shape[0]):
        y = kl[layer]
        seg = torch.searchsorted(x, grid.clamp(min=x[0], max=x[-1]), right=True).clamp(1, len(dims) - 1)
        x0, x1, y0, y1 = x[seg - 1], x[seg], y[seg - 1], y[seg]
        t = (grid - x0) / (x1 - x0)
        out[layer] = y0 + (y1 - y0) * t
        if geometric:
            both = (y0 > 0) & (y1 > 0)
            logs = torch.exp(torch.log(y0.clamp_min(1e-300)) * (1 - t) + torch.log(y1.clamp_min(1e-300)) * t)
            out[layer] = torch.where(both, logs, out[layer])
            out[layer, dims[0]:] = _lower_hull(out[layer, dims[0]:])
    out = out.clamp_min(0.0)
    out[:, : dims[0]] = float("inf")  # not measured: never chosen
    return out


def _lower_hull(y: torch.Tensor) -> torch.Tensor:
    """The lower convex hull of the points ``(i, y[i])``, evaluated at every ``i``."""
    hull: list[int] = []
    for i in range(y.numel()):
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b when it lies on or above the chord from a to i
            if (y[b] - y[a]) * (i - a) >= (y[i] - y[a]) * (b - a):
                hull.pop()
            else:
                break
        hull.append(i)
    x = torch.arange(y.numel(), dtype=torch.float64)
    hx = torch.tensor(hull, dtype=torch.float64)
    seg = torch.searchsorted(hx, x, right=True).clamp(1, max(1, len(hull) - 1))
    if len(hull) == 1:
        return y.clone()
    x0, x1 = hx[seg - 1], hx[seg]
    y0, y1 = y[hx[seg - 1].long()], y[hx[seg].long()]
    return y0 + (y1 - y0) * (x - x0) / (x1 - x0)


def layer_costs(record: dict[str, Any], head_dim: int) -> torch.Tensor:
    """``[layers, D + 1]`` interpolated ``KL_l(k)`` for k = 0..D; +inf below the smallest measured k."""
    return _interpolated(torch.tensor(record["kl"], dtype=torch.float64), record["dims"], head_dim)


def group_costs(record: dict[str, Any], head_dim: int) -> torch.Tensor:
    """``[layers, groups, D + 1]`` interpolated ``KL_lg(k)`` (AQUA at one group of one layer), as
    :func:`layer_costs` but geometric between positive measured points (see :func:`_interpolated`)."""
    kl = torch.tensor(record["kl_groups"], dtype=torch.float64)  # [layers, groups, len(dims)]
    layers, groups, n = kl.shape
    return _interpolated(kl.reshape(layers * groups, n), record["dims"], head_dim, geometric=True).view(layers, groups, -1)


def min_cost_budgets(cost: torch.Tensor, total: int) -> list[int] | None:
    """Integer budgets ``b_u`` in ``1..D`` with ``sum_u b_u == total`` minimising ``sum_u cost[u, b_u]``
    (exact DP; ``cost`` is ``[units, D + 1]``, +inf where a budget is not allowed). None when infeasible."""
    units, d = cost.shape[0], cost.shape[1] - 1
    inf = float("inf")
    best = torch.full((total + 1,), inf, dtype=torch.float64)
    best[0] = 0.0
    choice = torch.zeros(units, total + 1, dtype=torch.long)
    for unit in range(units):
        new = torch.full_like(best, inf)
        arg = torch.zeros(total + 1, dtype=torch.long)
        for option in range(1, d + 1):
            if option > total:
                break
            cand = torch.full_like(best, inf)
            cand[option:] = best[: total + 1 - option] + cost[unit, option]
            better = cand < new
            new = torch.where(better, cand, new)
            arg = torch.where(better, torch.full_like(arg, option), arg)
        best, choice[unit] = new, arg
    if not torch.isfinite(best[total]):
        return None
    budgets, left = [], total
    for unit in reversed(range(units)):
        option = int(choice[unit, left])
        budgets.append(option)
        left -= option
    budgets.reverse()
    return budgets


def _below_range(record: dict[str, Any], k: int) -> ConfigError:
    low = int(record["dims"][0])
    return ConfigError(
        f"k = {k} dims is below the smallest budget the sensitivity was measured at ({low}): "
        "measure lower ratios with `aqua sensitivity --ratios`, or use --k-policy uniform"
    )


def _record(artifact: Any, policy: str) -> dict[str, Any]:
    reason = _missing(artifact, policy)
    if reason is not None:
        raise ConfigError(reason)
    return sensitivity_record(artifact)  # type: ignore[return-value]


def _layer_totals(artifact: Any, record: dict[str, Any], k: int) -> list[int]:
    """Per-layer k minimising the summed measured layer KL at total ``layers * k`` (exact DP)."""
    cost = layer_costs(record, artifact.head_dim)
    if cost.shape[0] != artifact.num_layers:
        raise ConfigError(f"sensitivity curves for {cost.shape[0]} layers, artifact has {artifact.num_layers}")
    budgets = min_cost_budgets(cost, artifact.num_layers * k)
    if budgets is None:
        raise _below_range(record, k)
    return budgets


def sensitivity_budgets(artifact: Any, k: int) -> Budgets:
    """Per-layer budgets minimising the summed measured KL at total ``layers * k`` (exact DP); every
    group of a layer gets the layer's k."""
    record = _record(artifact, "sensitivity")
    return [[b] * artifact.num_groups for b in _layer_totals(artifact, record, k)]


def _checked_group_costs(artifact: Any, record: dict[str, Any]) -> torch.Tensor:
    cost = group_costs(record, artifact.head_dim)
    if tuple(cost.shape[:2]) != (artifact.num_layers, artifact.num_groups):
        raise ConfigError(
            f"per-group sensitivity curves for {tuple(cost.shape[:2])} (layers, groups), artifact has "
            f"({artifact.num_layers}, {artifact.num_groups})"
        )
    return cost


def sensitivity_group_budgets(artifact: Any, k: int) -> Budgets:
    """The ``sensitivity`` layer totals, each split across the layer's KV groups minimising the summed
    measured group KL (exact DP per layer); exact ties go to the split nearest the layer's k."""
    record = _record(artifact, "sensitivity-group")
    groups = artifact.num_groups
    cost = _checked_group_costs(artifact, record)
    out = []
    for layer, k_layer in enumerate(_layer_totals(artifact, record, k)):
        c = cost[layer].clone()
        finite = c[torch.isfinite(c)]
        scale = float(finite.max()) if finite.numel() and float(finite.max()) > 0 else 1.0
        # tie-break only: a penalty ~1e-9 of the layer's largest KL, growing with |k_lg - k_layer|
        c += 1e-9 * scale / c.shape[1] * (torch.arange(c.shape[1], dtype=torch.float64) - k_layer).abs()
        split = min_cost_budgets(c, groups * k_layer)
        assert split is not None  # k_layer is within the measured range, so the even split is feasible
        out.append(split)
    return out


def sensitivity_joint_budgets(artifact: Any, k: int) -> Budgets:
    """One DP over every (layer, group) unit on the per-group curves: ``sum KL_lg(k_lg)`` minimal at total
    ``layers * groups * k``."""
    record = _record(artifact, "sensitivity-joint")
    layers, groups = artifact.num_layers, artifact.num_groups
    cost = _checked_group_costs(artifact, record)
    flat = min_cost_budgets(cost.reshape(layers * groups, -1), layers * groups * k)
    if flat is None:
        raise _below_range(record, k)
    return [flat[i * groups:(i + 1) * groups] for i in range(layers)]


ARTIFACT_BUDGETS: dict[str, Callable[[Any, int], Budgets]] = {
    "sensitivity": sensitivity_budgets,
    "sensitivity-group": sensitivity_group_budgets,
    "sensitivity-joint": sensitivity_joint_budgets,
}


def allocate(artifact: Any, k: int, policy: str = "uniform") -> Budgets:
    """Integer budgets ``[layers][groups]`` summing to ``layers * groups * k`` (``k`` in dims)."""
    policy = resolve_policy(artifact, policy)
    d = artifact.head_dim
    if not 1 <= k <= d:
        raise ConfigError(f"k = {k} dimensions is outside 1..{d}")
    if policy in ARTIFACT_BUDGETS:
        budgets = ARTIFACT_BUDGETS[policy](artifact, k)
    else:
        budgets = POLICIES[policy](energy_curves(artifact), k)
    assert sum(map(sum, budgets)) == artifact.num_layers * artifact.num_groups * k, "budget not conserved"
    return budgets


def kept_energy(artifact: Any, budgets: Budgets) -> float:
    """Mean over layers and groups of the static energy fraction the budgets keep."""
    curves = energy_curves(artifact)
    idx = torch.as_tensor(budgets, dtype=torch.long).unsqueeze(-1) - 1
    return float(curves.gather(-1, idx).mean())
