"""The CLI reference (docs/cli.md), generated from the Typer app so that it cannot drift.

``python -m aqua_cli.clidoc > docs/cli.md`` rewrites it; ``tests/test_clidoc.py`` fails when the
committed file differs from what the app says.
"""

from __future__ import annotations

import os

HEADER = """# CLI reference

Generated from the Typer app by `python -m aqua_cli.clidoc > docs/cli.md`; do not edit by hand
(`tests/test_clidoc.py` checks it is current). Every command prints results on stdout, progress and
errors on stderr; a bad input ends with one `Error: ...` line and exit status 1.
"""


def render() -> str:
    import click
    import typer

    from .commands import app

    os.environ["COLUMNS"] = "100"  # help text wraps at the terminal width: fix it
    root = typer.main.get_command(app)
    parts = [HEADER]
    with click.Context(root, info_name="aqua", terminal_width=100, max_content_width=100) as ctx:
        parts.append(_section("aqua", ctx.get_help()))
        for name in root.list_commands(ctx):  # type: ignore[attr-defined]
            command = root.get_command(ctx, name)  # type: ignore[attr-defined]
            with click.Context(command, info_name=name, parent=ctx, terminal_width=100, max_content_width=100) as sub:
                parts.append(_section(f"aqua {name}", sub.get_help()))
    return "\n".join(parts)


def _section(title: str, text: str) -> str:
    return f"## `{title}`\n\n```text\n{text.rstrip()}\n```\n"


if __name__ == "__main__":
    print(render(), end="")
