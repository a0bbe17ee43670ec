"""What an artifact says about its model: how much query/key energy the first k projected dimensions
hold (the static-AQUA budget curve), and whether the projections are orthogonal.

Energy kept at k is ``sum(s[:k]**2) / sum(s**2)`` per layer and KV group, where ``s`` are the singular
values of the calibration matrix of stacked post-RoPE queries and keys (the Gram eigenvalues).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

DEFAULT_RATIOS = (0.25, 0.5, 0.75)


def energy_curves(artifact: Any) -> torch.Tensor:
    """``[layers, groups, D]`` cumulative energy fraction after 1..D dimensions."""
    s2 = torch.stack([s.double() ** 2 for s in artifact.singular_values])
    total = s2.sum(-1, keepdim=True).clamp_min(1e-300)
    return (s2.cumsum(-1) / total).float()


def energy_at(artifact: Any, ratio: float) -> torch.Tensor:
    """``[layers, groups]`` energy fraction kept by the first ``round(ratio * D)`` dimensions."""
    d = artifact.head_dim
    k = max(1, min(d, round(ratio * d)))
    return energy_curves(artifact)[..., k - 1]


def energy_summary(artifact: Any, ratios: tuple[float, ...] = DEFAULT_RATIOS) -> dict[float, dict[str, float]]:
    """Over all layers and groups: min and mean energy kept at each ratio."""
    out = {}
    for r in ratios:
        e = energy_at(artifact, r)
        out[r] = {"min": float(e.min()), "mean": float(e.mean())}
    return out


def layer_rows(artifact: Any, ratios: tuple[float, ...] = DEFAULT_RATIOS) -> list[dict[str, Any]]:
    """One row per layer: min/mean over groups of the energy kept at each ratio, and P's orthogonality error."""
    energies = {r: energy_at(artifact, r) for r in ratios}
    rows = []
    for i in range(artifact.num_layers):
        row: dict[str, Any] = {"layer": i, "orthogonality_error": orthogonality_error(artifact.projections[i])}
        for r in ratios:
            row[f"energy_{r:g}_min"] = float(energies[r][i].min())
            row[f"energy_{r:g}_mean"] = float(energies[r][i].mean())
        rows.append(row)
    return rows


def orthogonality_error(projection: torch.Tensor) -> float:
    """``max |P^T P - I|`` over a layer's groups (float64)."""
    p = projection.double()
    eye = torch.eye(p.shape[-1], dtype=torch.float64)
    return float((p.transpose(-1, -2) @ p - eye).abs().max())


def plot_energy(artifact: Any, path: str | Path) -> Path:
    """Energy-vs-k curves, one line per layer (mean over groups), coloured by depth."""
    from .plotting import pyplot, save_figure

    plt = pyplot()

    curves = energy_curves(artifact).mean(1)  # [layers, D]
    d = artifact.head_dim
    x = torch.arange(1, d + 1) / d
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    cmap = plt.get_cmap("viridis")
    for i, curve in enumerate(curves):
        ax.plot(x, curve, color=cmap(i / max(1, artifact.num_layers - 1)), lw=1, label=f"layer {i}" if i in (0, artifact.num_layers - 1) else None)
    ax.plot([0, 1], [0, 1], ls="--", color="grey", lw=0.8, label="isotropic")
    for r in DEFAULT_RATIOS:
        ax.axvline(r, color="lightgrey", lw=0.6)
    ax.set_xlabel("k / head_dim (first k projected dimensions)")
    ax.set_ylabel("fraction of q/k energy kept")
    ax.set_title(f"AQUA spectrum: {artifact.model_id}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(loc="lower right", fontsize=8)
    return save_figure(fig, path)
