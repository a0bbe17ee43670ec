"""The options that pick which launches of the fused decode step a kernel script looks at (``kernel_resources.py``,
``ptx_diff.py``): the model's attention shape, batch sizes, lengths, kept-dim ratios and top-T ratios, read the way
``aqua bench`` reads them."""

from __future__ import annotations

import argparse


def add_catalog_args(parser: argparse.ArgumentParser, batch: str, k: str) -> None:
    parser.add_argument("--model", default="llama-3.1-8b", help="a preset of aqua bench, a Hub id or a local model")
    parser.add_argument("--batch", default=batch, help=f"batch sizes (default {batch})")
    parser.add_argument("--seq", default="32k", help="sequence lengths (aqua bench's --seq syntax)")
    parser.add_argument("--k", default=k, help=f"kept-dim ratios (default {k})")
    parser.add_argument("--tokens", default="1/16", help="T/L ratios of the top-T rows ('' for none)")


def catalog(args: argparse.Namespace) -> dict:
    """The parsed options as plain values (``AquaError`` on a bad one): model, batches, seqs, ks, ratios."""
    from aqua_cli.bench import parse_seq
    from aqua_cli.cli import number_list, ratio_list
    from aqua_cli.models import resolve_shape

    resolve_shape(args.model)
    return dict(model=args.model, batches=list(number_list(args.batch, int, "--batch")), seqs=parse_seq(args.seq),
                ks=ratio_list(args.k, "k"), ratios=ratio_list(args.tokens, "--tokens") if args.tokens else [])
