"""The ``aqua`` commands, one module a command; importing this package registers them all on
:data:`aqua_cli.cli.app`, and :func:`main` runs the CLI (the console script ``aqua``)."""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

from rich.text import Text

from ..cli import app, err
from ..errors import AquaError, AquaWarning, first_line


def _register_commands() -> None:
    """Import every command module; each adds its command to ``app``."""
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        importlib.import_module(f"{__name__}.{info.name}")


# -- entry point ----------------------------------------------------------------------------------
def _show_warning(message: Any, category: type, filename: str, lineno: int, file: Any = None, line: Any = None) -> None:
    """aqua's own warnings are one ``Warning:`` line on stderr; others keep Python's format."""
    if issubclass(category, AquaWarning):
        err.print(Text.assemble(("Warning:", "yellow"), f" {message}"), highlight=False)
    else:
        _python_showwarning(message, category, filename, lineno, file, line)


_python_showwarning = warnings.showwarning


def main(argv: list[str] | None = None) -> None:
    """Run the CLI; map errors to one line on stderr and an exit status. User text in a message is printed
    literally (``Text``, not markup): ``[/]`` in a path cannot crash this handler."""
    args = [*(sys.argv[1:] if argv is None else argv)]  # (`list` here is the command module)
    debug = "--debug" in args or os.environ.get("AQUA_DEBUG", "") not in ("", "0")
    warnings.showwarning = _show_warning
    try:
        from ..network import check_env

        check_env()  # huggingface_hub would fail at import on a malformed timeout variable
        app(args=args, prog_name="aqua")  # click handles usage errors (exit 2) and Ctrl-C itself
        code = 0
    except AquaError as exc:
        if debug:
            raise
        err.print(Text.assemble(("Error:", "red"), f" {exc}"), highlight=False)
        code = 1
    except Exception as exc:  # an unexpected failure still gets one line
        if debug:
            raise
        err.print(
            Text.assemble(("Error:", "red"), f" unexpected {type(exc).__name__}: {first_line(exc)} (rerun with --debug for the traceback)"),
            highlight=False,
        )
        code = 1
    sys.exit(code)


_register_commands()
