"""`aqua list`: the artifacts this machine has, in the registry, shipped with aqua and in the HF cache."""

from __future__ import annotations

from rich.table import Table

from ..cli import JsonOpt, app, check_outputs, out, write_json


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@app.command(name="list")
def list_command(json_out: JsonOpt = None) -> None:
    """List local artifacts with their model, revision, calibration tokens and size (read from headers only);
    an entry whose header fails verification is listed as broken."""
    from ..registry import list_artifacts, listed_as_dict

    check_outputs(json_out)
    rows = list_artifacts()
    table = Table(title="aqua artifacts")
    for column in ("name", "where", "model", "revision", "tokens", "size", "status"):
        table.add_column(column, justify="right" if column in ("tokens", "size") else "left")
    for row in rows:  # cells are printed literally (the console parses no markup)
        table.add_row(row.name, row.where, row.model, row.revision, "" if row.tokens is None else f"{row.tokens:,}", _size(row.size),
                      row.status, style="red" if row.status != "ok" else None)
    out.print(table)
    write_json(json_out, [listed_as_dict(row) for row in rows])
