"""`aqua push`: publish a verified artifact to the Hugging Face Hub, as `hf upload` would."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from ..cli import ArtifactArg, JsonOpt, TokenOpt, app, check_outputs, out, write_json

BranchOpt = Annotated[Optional[str], typer.Option("--revision", help="Branch to push to (created from main if missing). Default: main.")]
RepoArg = Annotated[str, typer.Argument(help="Hub repo id, org/repo (created if missing).")]


@app.command()
def push(
    artifact: ArtifactArg = None,
    repo_id: RepoArg = ...,
    revision: BranchOpt = None,
    private: Annotated[bool, typer.Option("--private", help="Create the repo private (an existing repo keeps its visibility).")] = False,
    token: TokenOpt = None,
    message: Annotated[Optional[str], typer.Option("--message", "-m", help="Commit message.")] = None,
    json_out: JsonOpt = None,
) -> None:
    """Verify an artifact, render its model card, and upload both to a Hub repo in one commit; prints the commit URL.

    Examples: `aqua push artifacts/HuggingFaceTB--SmolLM2-135M-Instruct my-org/smollm2-aqua`,
    `aqua push runs/notes my-org/notes-aqua --revision calib-v2 --private`.
    """
    from ..hub import HF_SCHEME, check_push_target
    from ..hub import push as push_artifact
    from ..registry import resolve_artifact

    check_outputs(json_out)
    check_push_target(repo_id, token)  # a malformed target or no token fails before anything is read
    source = artifact if (artifact or "").startswith(HF_SCHEME) else resolve_artifact(artifact)
    pushed = push_artifact(source, repo_id, revision=revision, private=private, token=token, message=message)
    out.print(pushed.commit_url, highlight=False)
    write_json(json_out, {"repo_id": pushed.repo_id, "revision": pushed.revision, "commit": pushed.commit,
                          "commit_url": pushed.commit_url, "tensors_sha256": pushed.tensors_sha256})
