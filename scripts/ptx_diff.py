"""Whether the fused decode kernels of the work tree compile to the same code as at a git revision, without a GPU.

    PYTHONPATH=$PWD python3 scripts/ptx_diff.py --base HEAD~3 [--batch 8,1 --seq 32k --k 0.25,0.5,0.75 --tokens 1/16]

For a refactor of the kernels ("the same stores in the same order"), the cheapest proof is that every launch of
every ``aqua bench`` implementation compiles to the same instructions as before; a GPU call that times both and
compares outputs bit for bit costs minutes of a metered device. Both trees' launchers run on ``meta`` tensors with
their kernels recorded (``aqua_cli.kernels.resources``, copied into the base tree so that old revisions can be read
too), each launch is compiled for sm_90 offline, and its PTX is compared without debug sections, source locations
and label numbers (``normalized_ptx``). Prints one line a launch that differs -- in its kernel or grid, in its PTX,
or only in the order of the same PTX lines (a scheduling change, same instructions) -- or was added or dropped, and
a count; exits 0 when every launch is the same, 1 when some differ, 2 on a bad argument or revision.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import types


HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def child(spec: dict) -> list[dict]:
    """In the tree on ``sys.path``: every launch of the fused catalog, with a hash of its normalized PTX."""
    import dataclasses

    import torch

    from aqua_cli import bench
    from aqua_cli.budgets import k_dims
    from aqua_cli.kernels import resources
    from aqua_cli.models import resolve_shape

    shape = resolve_shape(spec["model"])
    meta = torch.device("meta")
    proj = bench.random_projection(shape.num_kv_heads, shape.head_dim, torch.Generator().manual_seed(0)).to(meta)
    cuda = types.SimpleNamespace(type="cuda")  # older trees run their kernels' catalog on CUDA devices only
    out = []
    for batch in spec["batches"]:
        for seq in spec["seqs"]:
            t = dict(q=torch.empty(batch, shape.num_heads, shape.head_dim, device=meta, dtype=torch.bfloat16),
                     k=torch.empty(batch, shape.num_kv_heads, seq, shape.head_dim, device=meta, dtype=torch.bfloat16))
            t["v"] = torch.empty_like(t["k"])
            t["kd"] = torch.empty(batch, shape.num_kv_heads, shape.head_dim, seq, device=meta, dtype=torch.bfloat16)
            t["bounds"] = torch.empty(batch, shape.num_kv_heads, 2, shape.head_dim, -(-seq // 64), device=meta,
                                      dtype=torch.bfloat16)
            t["planes"] = torch.empty(batch, shape.num_kv_heads, 2 * shape.head_dim, seq, device=meta, dtype=torch.uint8)
            fields = {f.name for f in dataclasses.fields(bench._Inputs)}
            inputs = bench._Inputs(**{name: value for name, value in t.items() if name in fields})
            config = bench.BenchConfig(seqs=[seq], batch=batch, ks=spec["ks"], token_ratios=spec["ratios"], hybrid=False)
            for k in spec["ks"]:
                dims = k_dims(k, shape.head_dim)
                for name, (fn, _) in bench.decode_impls(config, shape, dims, proj, cuda, seq).items():
                    if not name.startswith("aqua-"):
                        continue
                    for i, launch in enumerate(resources.record_launches(lambda fn=fn: fn(inputs))):
                        ptx = resources.normalized_ptx(resources.compile_kernel(launch))
                        out.append(dict(batch=batch, seq=seq, impl=name, k=k, index=i, kernel=launch.kernel,
                                        grid=list(launch.grid), ptx=_hash(ptx),
                                        lines=_hash("\n".join(sorted(ptx.splitlines())))))
    return out


def _hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_tree(tree: str, spec: dict) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": tree}
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", json.dumps(spec)], capture_output=True,
                          text=True, env=env, cwd=tree)
    if proc.returncode != 0:
        raise RuntimeError(f"compiling the kernels of {tree} failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def base_tree(rev: str, into: str) -> str:
    """``aqua_cli`` at ``rev`` under ``into``, with this tree's ``kernels/resources.py`` (the recorder) beside its
    kernels."""
    try:
        archive = subprocess.run(["git", "-C", ROOT, "archive", rev, "aqua_cli"], capture_output=True, check=True).stdout
    except subprocess.CalledProcessError as exc:
        raise ValueError(f"no such revision: {rev} ({exc.stderr.decode().strip()})") from None
    subprocess.run(["tar", "-x", "-C", into], input=archive, check=True)
    shutil.copy(os.path.join(ROOT, "aqua_cli", "kernels", "resources.py"), os.path.join(into, "aqua_cli", "kernels"))
    return into


def compare(base: list[dict], work: list[dict]) -> list[str]:
    key = lambda r: (r["batch"], r["seq"], r["impl"], r["k"], r["index"])  # noqa: E731
    a, b = {key(r): r for r in base}, {key(r): r for r in work}
    lines = []
    for k in sorted(set(a) | set(b), key=str):
        ra, rb = a.get(k), b.get(k)
        where = f"B{k[0]} x {k[1]} {k[2]} k={k[3]} launch {k[4]}"
        if ra is None or rb is None:
            lines.append(f"{where}: {'added' if ra is None else 'dropped'} ({(rb or ra)['kernel']})")
        elif ra["kernel"] != rb["kernel"] or ra["grid"] != rb["grid"]:
            lines.append(f"{where}: {ra['kernel']} {ra['grid']} -> {rb['kernel']} {rb['grid']}")
        elif ra["ptx"] != rb["ptx"]:
            same = ra["lines"] == rb["lines"]
            lines.append(f"{where} ({ra['kernel']}): " + ("the same instructions in another order" if same else "PTX differs"))
    return lines


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        print(json.dumps(child(json.loads(sys.argv[2]))))
        return 0
    from _catalog import add_catalog_args, catalog  # beside this script

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", default="HEAD", help="the git revision to compare with (default HEAD)")
    parser.add_argument("--head", default=None, help="a git revision to compare instead of the work tree")
    add_catalog_args(parser, batch="8,1", k="0.25,0.5,0.75")
    args = parser.parse_args()

    sys.path.insert(0, ROOT)
    from aqua_cli.errors import AquaError

    try:
        spec = catalog(args)
        with tempfile.TemporaryDirectory() as tmp_base, tempfile.TemporaryDirectory() as tmp_head:
            base = run_tree(base_tree(args.base, tmp_base), spec)
            work = run_tree(base_tree(args.head, tmp_head) if args.head else ROOT, spec)
    except (AquaError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    lines = compare(base, work)
    for line in lines:
        print(line)
    print(f"{len(work)} launches compiled for sm_90 in each tree; {len(lines)} differ from {args.base}")
    return 1 if lines else 0


if __name__ == "__main__":
    sys.exit(main())
