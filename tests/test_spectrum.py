from __future__ import annotations

import torch
from conftest import tiny_artifact
from tiny_models import tiny_model

from aqua_cli.spectrum import (
    energy_at,
    energy_summary,
    layer_rows,
    orthogonality_error,
    plot_energy,
)


def test_energy_is_monotone_and_complete():
    art = tiny_artifact(tiny_model("llama"), "llama")
    e25, e50, e100 = (energy_at(art, r) for r in (0.25, 0.5, 1.0))
    assert torch.all(e25 <= e50) and torch.allclose(e100, torch.ones_like(e100))
    # random data in a trained-free model is still anisotropic after RoPE: more than the isotropic 25%
    assert float(e25.mean()) > 0.25
    summary = energy_summary(art)
    assert summary[0.5]["min"] <= summary[0.5]["mean"] <= 1.0
    rows = layer_rows(art)
    assert len(rows) == art.num_layers and rows[0]["orthogonality_error"] < 1e-5


def test_orthogonality_error_detects_non_orthogonal():
    assert orthogonality_error(torch.eye(4)[None]) == 0.0
    assert orthogonality_error((2 * torch.eye(4))[None]) == 3.0


def test_plot_is_written(tmp_path):
    art = tiny_artifact(tiny_model("qwen2"), "qwen2")
    path = plot_energy(art, tmp_path / "sub" / "e.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
