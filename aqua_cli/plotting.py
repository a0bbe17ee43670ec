"""The two steps every `--plot` shares: a headless pyplot, and an atomic-enough save that makes the
folder and frees the figure (a long eval or bench run draws many)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend: CI and servers have no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, **kwargs: Any) -> Path:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, **kwargs)
    pyplot().close(fig)
    return out
