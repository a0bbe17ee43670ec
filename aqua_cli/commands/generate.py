"""`aqua generate`: run an AQUA-patched model on a prompt, streaming, optionally beside dense."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table
from rich.text import Text

from ..cli import (
    ArtifactOpt,
    DeviceOpt,
    DtypeOpt,
    JsonOpt,
    RevisionOpt,
    app,
    check_outputs,
    check_seed,
    err,
    out,
    ratio_list,
    status,
    write_json,
)
from ..errors import AquaError


@app.command()
def generate(
    args: Annotated[Optional[list[str]], typer.Argument(help="[MODEL] PROMPT. MODEL as for calibrate (default SmolLM2); PROMPT text ('-' or none: standard input).", show_default=False)] = None,
    artifact: ArtifactOpt = None,
    k: Annotated[str, typer.Option("--k", help="Dimensions kept: a ratio of head_dim (0.75) or a count (48).")] = "0.75",
    mode: Annotated[str, typer.Option("--mode", help="dynamic (top-k |q| dims, the paper), static (first k dims) or dense.")] = "dynamic",
    prompt_file: Annotated[Optional[Path], typer.Option("--prompt-file", help="Read the prompt from this file.")] = None,
    chat: Annotated[bool, typer.Option("--chat/--no-chat", help="Wrap the prompt in the model's chat template.")] = False,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", help="Tokens to generate.")] = 64,
    temperature: Annotated[float, typer.Option("--temperature", help="0 = greedy (deterministic).")] = 0.0,
    top_p: Annotated[float, typer.Option("--top-p", help="Nucleus sampling (with --temperature > 0).")] = 1.0,
    seed: Annotated[int, typer.Option("--seed", help="Sampling seed.", callback=check_seed)] = 0,
    compare: Annotated[bool, typer.Option("--compare", help="Also run dense attention and show both, first difference marked.")] = False,
    tokens: Annotated[Optional[str], typer.Option("--tokens", help="Dims + top-T: the share T/L of cached tokens (in pages) each decode step attends to, e.g. 1/16 (implies --decode).")] = None,
    sink_pages: Annotated[int, typer.Option("--sink-pages", help="With --tokens: first pages (64 tokens each) always kept (attention sinks).")] = 1,
    recent_pages: Annotated[int, typer.Option("--recent-pages", help="With --tokens: last pages always kept (the recent window; 8 = 512 tokens, measured on SmolLM2: docs/decode.md).")] = 8,
    page_score: Annotated[str, typer.Option("--page-score", help="With --tokens: how pages are ranked: max (their tokens' best approximate score; best quality) or bound (Quest's bound from each page's min and max: reads far less, coarser; docs/decode.md).")] = "max",
    rerank: Annotated[int, typer.Option("--rerank", help="With --page-score bound: rank the RERANK x budget best pages by bound again by max (4: between the two in speed and quality; 0: off).")] = 0,
    key_planes: Annotated[bool, typer.Option("--key-planes", help="With --tokens: store the projected keys as float16 byte planes and score pages (by max) on the high byte only: half the scoring bytes, the same cache size, near max's quality (docs/decode.md).")] = False,
    decode: Annotated[Optional[bool], typer.Option("--decode/--no-decode", help="Projected KV cache and, on CUDA, the fused kernels in every decode step (default: on for CUDA or with --tokens).")] = None,
    revision: RevisionOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    json_out: JsonOpt = None,
) -> None:
    """Generate text with AQUA attention, streamed as it is produced.

    Examples: `aqua generate "The capital of France is"`, `aqua generate --chat --k 0.5 "Explain RoPE"`,
    `echo "def fib(n):" | aqua generate --compare`, `aqua generate ./model.gguf --artifact runs/mine "Hello"`.
    """
    from transformers import TextStreamer

    from ..budgets import parse_k
    from ..generation import (
        SamplingConfig,
        attention_flops_saved,
        first_divergence,
        generate_text,
    )

    from ..methods import load_patched, parse_mode

    check_outputs(json_out)
    model_name, prompt = _split_args(args or [], prompt_file)
    config = SamplingConfig(max_new_tokens, temperature, top_p, seed, chat)
    parse_mode(mode)
    k_value = parse_k(k)
    ratios = ratio_list(tokens, "--tokens")
    if len(ratios) > 1:
        raise AquaError("--tokens takes one ratio, e.g. 1/16")
    token_ratio = ratios[0] if ratios else None
    from ..kernels.paged import check_page_score

    check_page_score(page_score)
    if (page_score != "max" or rerank) and token_ratio is None:
        raise AquaError("--page-score and --rerank rank top-T's pages: give --tokens too, e.g. --tokens 1/16")
    if rerank < 0 or (rerank and page_score != "bound"):
        raise AquaError(f"--rerank takes a count >= 0 with --page-score bound, got {rerank}")
    if key_planes and token_ratio is None:
        raise AquaError("--key-planes halves what top-T's page scoring reads: give --tokens too, e.g. --tokens 1/16")
    with status("loading model and artifact ..."):
        model, tokenizer, handle = load_patched(model_name, artifact, k=k_value, mode=mode, revision=revision, device=device, dtype=dtype)
    if decode if decode is not None else (token_ratio is not None or next(model.parameters()).is_cuda):
        from ..methods import AquaDecode

        handle.remove()
        handle = AquaDecode(handle.artifact, k_value, mode, token_ratio=token_ratio, sink_pages=sink_pages,
                            recent_pages=recent_pages, page_score=page_score, rerank=rerank, key_planes=key_planes)(model)
    elif token_ratio is not None:
        raise AquaError("--tokens needs the decode path: drop --no-decode")
    dims = handle.dims
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if not compare else None
    result = generate_text(model, tokenizer, prompt, config, streamer, handle.new_cache())
    saved = attention_flops_saved(model.config, dims, result.prompt_tokens, len(result.new_ids)) if mode != "dense" else 0.0
    payload = {
        "model": handle.artifact.model_id, "artifact": str(handle.artifact.path), "k": k, "dims": dims, "mode": mode,
        "prompt_tokens": result.prompt_tokens, "new_tokens": len(result.new_ids), "tokens_per_s": round(result.tokens_per_s, 2),
        "attention_flops_saved": round(saved, 4), "method": handle.name, "token_ratio": token_ratio, "text": result.text,
    }
    if compare:
        handle.remove()
        dense = generate_text(model, tokenizer, prompt, config)
        where = first_divergence(result.new_ids, dense.new_ids)
        payload.update(dense_text=dense.text, dense_tokens_per_s=round(dense.tokens_per_s, 2), first_divergence=where)
        out.print(_side_by_side(tokenizer, result.new_ids, dense.new_ids, where, k, mode))
    err.print(
        f"[{len(result.new_ids)} tokens, {result.tokens_per_s:.1f} tok/s, prompt {result.prompt_tokens} tokens, "
        f"k={dims}/{handle.artifact.head_dim} {mode}: attention FLOPs saved at this length {saved:+.1%}]",
        highlight=False,
    )
    write_json(json_out, payload)


def _split_args(args: list[str], prompt_file: Path | None) -> tuple[str | None, str]:
    if len(args) > 2:
        raise AquaError(f"expected [MODEL] PROMPT, got {len(args)} arguments: quote the prompt")
    model = args[0] if len(args) == 2 else None
    text = args[-1] if args else None
    if prompt_file is not None:
        if text is not None and len(args) == 2:
            raise AquaError("give the prompt as text or with --prompt-file, not both")
        model = args[0] if args else None
        try:
            text = prompt_file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise AquaError(f"cannot read --prompt-file {prompt_file}: {exc}") from exc
    elif text is None or text == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise AquaError("no prompt: give it as an argument, with --prompt-file, or on standard input")
        text = sys.stdin.read()
    return model, text


def _side_by_side(tokenizer, aqua_ids: list[int], dense_ids: list[int], where: int | None, k: str, mode: str) -> Table:
    table = Table(title="first difference marked" if where is not None else "identical outputs", show_lines=True)
    table.add_column(f"AQUA ({mode}, k={k})", ratio=1)
    table.add_column("dense", ratio=1)
    table.add_row(_marked(tokenizer, aqua_ids, where), _marked(tokenizer, dense_ids, where))
    return table


def _marked(tokenizer, ids: list[int], where: int | None) -> Text:
    if where is None or where >= len(ids):
        return Text(tokenizer.decode(ids, skip_special_tokens=True))
    text = Text(tokenizer.decode(ids[:where], skip_special_tokens=True))
    text.append(tokenizer.decode(ids[where : where + 1], skip_special_tokens=True), style="bold reverse red")
    text.append(tokenizer.decode(ids[where + 1 :], skip_special_tokens=True))
    return text
