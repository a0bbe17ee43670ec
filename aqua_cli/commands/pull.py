"""`aqua pull`: fetch a Hub artifact into the HF cache, pinned to a commit and verified."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.table import Table

from ..cli import JsonOpt, TokenOpt, app, check_outputs, out, write_json

RefArg = Annotated[str, typer.Argument(help="hf://org/repo[@revision] (or org/repo).")]
RefRevisionOpt = Annotated[Optional[str], typer.Option("--revision", help="Branch, tag or commit of the artifact repo. Default: main.")]


@app.command()
def pull(
    ref: RefArg,
    revision: RefRevisionOpt = None,
    token: TokenOpt = None,
    json_out: JsonOpt = None,
) -> None:
    """Download an artifact from the Hub (or find it in the cache when HF_HUB_OFFLINE=1) and verify it.

    Examples: `aqua pull hf://my-org/smollm2-aqua`, `aqua pull hf://my-org/smollm2-aqua@calib-v2`.
    Every `--artifact` also takes hf:// names and pulls on first use.
    """
    from ..hub import pull_artifact

    check_outputs(json_out)
    pulled = pull_artifact(ref, revision=revision, token=token)
    summary = {"repo_id": pulled.repo_id, "revision": pulled.revision, "commit": pulled.commit, "path": str(pulled.path)}
    table = Table(title="aqua pull", show_header=False)
    for key, value in summary.items():
        table.add_row(key, value)
    out.print(table)
    write_json(json_out, summary)
