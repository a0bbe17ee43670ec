"""The ``aqua`` commands, one module a command; importing this package registers them all on
:data:`aqua_cli.cli.app`, and :func:`main` runs the CLI (the console script ``aqua``)."""

from __future__ import annotations

import os
import sys

from ..cli import app, err
from ..errors import AquaError, first_line


def _register_commands() -> None:
    """Import every command module; each adds its command to ``app``."""
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{info.name}")


# -- entry point ----------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    """Run the CLI; map errors to one line on stderr and an exit status."""
    args = [*(sys.argv[1:] if argv is None else argv)]  # (`list` here is the command module)
    debug = "--debug" in args or os.environ.get("AQUA_DEBUG", "") not in ("", "0")
    try:
        app(args=args, prog_name="aqua")  # click handles usage errors (exit 2) and Ctrl-C itself
        code = 0
    except AquaError as exc:
        if debug:
            raise
        err.print(f"[red]Error:[/red] {exc}", markup=True, highlight=False)
        code = 1
    except Exception as exc:  # an unexpected failure still gets one line
        if debug:
            raise
        err.print(
            f"[red]Error:[/red] unexpected {type(exc).__name__}: {first_line(exc)} (rerun with --debug for the traceback)",
            markup=True,
            highlight=False,
        )
        code = 1
    sys.exit(code)


_register_commands()
