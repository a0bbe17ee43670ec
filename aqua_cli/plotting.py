"""The steps every `--plot` shares: the file name (checked before any work; no suffix means ``.png``), a
headless pyplot, and an atomic save that makes the folder, frees the figure (a long eval or bench run
draws many) and returns the path it wrote."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .errors import AquaError

# matplotlib's Agg-backed formats (fig.canvas.get_supported_filetypes()), without importing matplotlib
FORMATS = ("png", "pdf", "svg", "svgz", "eps", "ps", "jpg", "jpeg", "tif", "tiff", "webp", "pgf", "raw", "rgba")


def plot_path(path: str | Path) -> Path:
    """The file a ``--plot`` value names: as given, with ``.png`` added when it has no suffix (what
    matplotlib would write); an unknown image suffix is one line."""
    out = Path(path).expanduser()
    if not out.suffix:
        return out.with_name(out.name + ".png")
    if out.suffix[1:].lower() not in FORMATS:
        raise AquaError(f"--plot {path}: unknown image format '{out.suffix}': use .png, .pdf or .svg")
    return out


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend: CI and servers have no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path, **kwargs: Any) -> Path:
    """Write ``fig`` to :func:`plot_path` of ``path`` (through a temporary file) and return that path."""
    plt = pyplot()
    tmp = None
    try:
        out = plot_path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.tight_layout()
        tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
        fig.savefig(tmp, format=out.suffix[1:].lower(), **kwargs)
        os.replace(tmp, out)
    except OSError as exc:
        raise AquaError(f"cannot write the plot {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(fig)
        if tmp is not None and tmp.exists():
            tmp.unlink()
    return out
