"""`aqua inspect`: what an artifact holds and how much energy each k keeps."""

from __future__ import annotations

from rich.table import Table

from ..cli import ArtifactArg, JsonOpt, PlotOpt, app, check_outputs, err, out, write_json


@app.command()
def inspect(
    artifact: ArtifactArg = None,
    json_out: JsonOpt = None,
    plot: PlotOpt = None,
) -> None:
    """Show an artifact's metadata, per-layer spectral energy kept at k/d = 0.25, 0.5, 0.75, and P's orthogonality."""
    from ..registry import load_artifact
    from ..models import describe_fingerprint
    from ..spectrum import DEFAULT_RATIOS, layer_rows

    check_outputs(json_out, plot)  # an output inside the artifact would corrupt it
    art = load_artifact(artifact)
    meta = art.metadata
    rows = layer_rows(art)
    info = Table(title=f"artifact {art.path}", show_header=False)
    for key in ("model_id", "model_revision", "data_id", "tokens", "seq_len", "seed", "basis", "dtype", "created", "tool_version", "tensors_sha256"):
        info.add_row(key, str(meta.get(key, "")))
    info.add_row("shape", describe_fingerprint(art.fingerprint))
    out.print(info)
    table = Table(title="energy kept by the first k projected dims (min / mean over KV groups)")
    table.add_column("layer", justify="right")
    for r in DEFAULT_RATIOS:
        table.add_column(f"k={r:g}d", justify="right")
    table.add_column("|PᵀP−I|max", justify="right")
    for row in rows:
        cells = [f"{row[f'energy_{r:g}_min']:.3f} / {row[f'energy_{r:g}_mean']:.3f}" for r in DEFAULT_RATIOS]
        table.add_row(str(row["layer"]), *cells, f"{row['orthogonality_error']:.1e}")
    out.print(table)
    if plot is not None:
        from ..spectrum import plot_energy

        err.print(f"wrote {plot_energy(art, plot)}")
    write_json(json_out, {"artifact": str(art.path), "metadata": meta, "layers": rows})
