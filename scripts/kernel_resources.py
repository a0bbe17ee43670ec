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
    from _catalog import add_catalog_args, catalog  # beside this script

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_catalog_args(parser, batch="8", k="0.5,0.75")
    parser.add_argument("--rerank", type=int, default=4)
    parser.add_argument("--sms", type=int, default=132, help="SMs of the GPU the launchers plan for (H100/H200: 132)")
    parser.add_argument("--capability", type=int, default=90, help="compute capability to compile for (90: Hopper)")
    parser.add_argument("--json", dest="json_out", default=None, help="write the rows here")
    args = parser.parse_args()

    import triton

    from aqua_cli.bench import BenchConfig, launch_resources
    from aqua_cli.errors import AquaError
    from aqua_cli.kernels.resources import HOPPER
    from aqua_cli.models import resolve_shape

    try:
        spec = catalog(args)
    except AquaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    shape = resolve_shape(spec["model"])
    rows = []
    for batch in spec["batches"]:
        config = BenchConfig(seqs=spec["seqs"], batch=batch, ks=spec["ks"], token_ratios=spec["ratios"], hybrid=False,
                             rerank=args.rerank, dtype="bfloat16")
        for seq in spec["seqs"]:
            rows += launch_resources(config, shape, seq, args.sms, args.capability)
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
