"""What every launch of the fused decode step occupies on an H100/H200 SM, without a GPU.

    PYTHONPATH=$PWD python3 scripts/kernel_resources.py --batch 8,1 --seq 32k,128k --k 0.25,0.5,0.75 --tokens 1/16 \
        --json docs/results/kernel-resources-sm90.json > docs/results/kernel-resources-sm90.txt

(the committed files ran so under Triton 3.6, the version of the device tool's H100 image, in a venv of their own:
``pip install torch==2.13.0 triton==3.6.0 && pip install -e .``). For each ``aqua bench`` implementation (the same
catalog and configs as a timed run) the step's launchers run on ``meta`` tensors with the kernels recorded instead
of launched, and each launch is compiled for sm_90 offline, as Triton's JIT would specialize it
(``aqua_cli.bench.launch_resources``, ``aqua_cli.kernels.resources``). Printed per launch: grid, warps, stages,
shared memory a program, registers and local (spilled) bytes a thread, asynchronous copies in the PTX (0: the loads
were not pipelined through shared memory), programs an SM can hold, and whether two programs of the launch fit on
one SM (``x2``: a one-program-per-SM layout relies on the scheduler spreading them) and whether one fits beside a
program of the launch before it (``beside prev``: what programmatic dependent launch can overlap). The compiled
code is that of the installed Triton: name the version with the numbers.
"""

from __future__ import annotations

import argparse
import json
import sys


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama-3.1-8b", help="a preset of aqua bench, a Hub id or a local model")
    parser.add_argument("--batch", default="8", help="batch sizes, e.g. 8,1")
    parser.add_argument("--seq", default="32k", help="sequence lengths (aqua bench's --seq syntax)")
    parser.add_argument("--k", default="0.5,0.75", help="kept-dim ratios")
    parser.add_argument("--tokens", default="1/16", help="T/L ratios of the top-T rows ('' for none)")
    parser.add_argument("--rerank", type=int, default=4)
    parser.add_argument("--sms", type=int, default=132, help="SMs of the GPU the launchers plan for (H100/H200: 132)")
    parser.add_argument("--capability", type=int, default=90, help="compute capability to compile for (90: Hopper)")
    parser.add_argument("--json", dest="json_out", default=None, help="write the rows here")
    args = parser.parse_args()

    import triton

    from aqua_cli.bench import BenchConfig, launch_resources, parse_seq
    from aqua_cli.cli import number_list, ratio_list
    from aqua_cli.errors import AquaError
    from aqua_cli.kernels.resources import HOPPER, Resources, fit_together
    from aqua_cli.models import resolve_shape

    try:
        shape = resolve_shape(args.model)
        seqs = parse_seq(args.seq)
        batches = number_list(args.batch, int, "--batch")
        ks = ratio_list(args.k, "k")
        ratios = ratio_list(args.tokens, "--tokens") if args.tokens else []
    except AquaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows = []
    for batch in batches:
        config = BenchConfig(seqs=seqs, batch=batch, ks=ks, token_ratios=ratios, hybrid=False, rerank=args.rerank,
                             dtype="bfloat16")
        for seq in seqs:
            rows += launch_resources(config, shape, seq, args.sms, args.capability)
    fields = [f.name for f in Resources.__dataclass_fields__.values()]
    prev = None
    for r in rows:  # pairs: two programs of one launch, and a program beside one of the launch before it
        res = Resources(**{k: r[k] for k in fields})
        r["two_per_sm"] = fit_together(res, res)
        same_step = prev is not None and (prev[0]["impl"], prev[0]["k"], prev[0]["seq"], prev[0]["batch"]) == (
            r["impl"], r["k"], r["seq"], r["batch"])
        r["beside_previous"] = fit_together(prev[1], res) if same_step else None
        prev = (r, res)
    head = f"{'B':>2} {'seq':>7} {'impl':<17} {'k':>4} {'kernel':<22} {'grid':<10} {'w':>2} {'st':>2} " \
           f"{'smem KB':>7} {'reg':>4} {'spill':>5} {'cp.async':>8} {'/SM':>3} {'x2':>3} {'beside prev':>11}"
    print(f"triton {triton.__version__}, sm_{args.capability}, {args.sms} SMs, {shape.name} "
          f"({shape.num_heads} q / {shape.num_kv_heads} kv heads, d={shape.head_dim}), bf16")
    print(head)
    for r in rows:
        beside = "" if r["beside_previous"] is None else ("yes" if r["beside_previous"] else "no")
        print(f"{r['batch']:>2} {r['seq']:>7} {r['impl']:<17} {r['k']:>4} {r['kernel'].strip('_'):<22} "
              f"{'x'.join(map(str, r['grid'])):<10} {r['num_warps']:>2} {r['num_stages'] or '':>2} "
              f"{r['shared'] / 1024:>7.1f} {r['registers'] if r['registers'] is not None else '?':>4} "
              f"{r['local'] if r['local'] is not None else '?':>5} {r['async_copies']:>8} {r['ctas_per_sm']:>3} "
              f"{'yes' if r['two_per_sm'] else 'no':>3} {beside:>11}")
    if args.json_out:
        info = {"triton": triton.__version__, "capability": args.capability, "sms": args.sms, "sm_limits": vars(HOPPER),
                "shape": vars(shape), "command": " ".join(sys.argv), "rows": rows}
        with open(args.json_out, "w") as f:
            json.dump(info, f, indent=1)
        print(f"wrote {args.json_out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
