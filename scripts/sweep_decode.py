"""Launch-parameter sweep of the fused decode kernels (GPU): correctness first, then a table of variants.

    PYTHONPATH=$PWD python3 scripts/sweep_decode.py --out sweep.json [--quick]

Llama-3.1-8B attention shape (32 q / 8 KV heads, d=128), bf16, random inputs and projection. Every timing is
a CUDA-graph replay timed with CUDA events over rotating input sets (``aqua_cli.bench.time_us``), next to dense
SDPA in the same run. ``TB/s`` is the bytes the variant must read (``dims_bytes``/``topt_bytes``) over its time:
compare with the ~3.0 TB/s device copy limit. Output: a JSON list of rows and a table on stdout.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time

import torch


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="sweep.json")
    parser.add_argument("--quick", action="store_true", help="fewer variants")
    parser.add_argument("--select-only", action="store_true", help="checks, the selection and the default dims path only")
    args = parser.parse_args()

    import triton

    from aqua_cli.bench import _decode_inputs, _rotating, random_projection, time_us
    from aqua_cli.models import PRESETS
    from aqua_cli import cost
    from aqua_cli.kernels import decode as dk
    from aqua_cli.kernels.reference import aqua_decode_reference, dense_decode, project_queries, select_dims

    dev = torch.device("cuda")
    shape = PRESETS["llama-3.1-8b"]
    print(f"torch {torch.__version__} triton {triton.__version__} {torch.cuda.get_device_name()} sms={dk._sms(dev)}", flush=True)
    gen = torch.Generator().manual_seed(0)
    proj = random_projection(shape.num_kv_heads, shape.head_dim, gen).to(dev)
    rows: list[dict] = []
    began = time.time()

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    def sets_for(batch, seq):
        set_bytes = 2 * batch * shape.num_kv_heads * seq * shape.head_dim * 2
        return _decode_inputs(shape, batch, seq, proj, torch.bfloat16, dev, max(1, min(8, -(-(256 << 20) // set_bytes))))

    def timed(fn, sets):
        return time_us(_rotating(fn, sets), dev, 3, 20) / len(sets)

    # -- correctness: fused selection vs torch.topk (mass), outputs vs reference ---------------------------
    for batch, seq in ((8, 32768), (1, 4097)):
        x = sets_for(batch, seq)[0]
        qp = project_queries(x.q, proj).to(x.q.dtype).float()
        score = qp.abs().sum(2)  # (B, Hkv, D)
        for dims in (64, 96):
            qsel, idx, cnt = dk.launch_select_dims(x.q, proj, dims)
            got = score.flatten(0, 1).gather(-1, idx[:, :dims].long()).sum(-1)
            want = score.flatten(0, 1).topk(dims, -1).values.sum(-1)
            ref_idx = select_dims(qp.to(x.q.dtype), dims, "group")[0].flatten(0, 1)
            same = float((idx[:, :dims] == ref_idx).all(-1).float().mean())
            sorted_ok = bool((idx[:, 1:dims] > idx[:, : dims - 1]).all())
            ref = aqua_decode_reference(x.q, x.k, x.v, x.kd, proj, dims)
            out = dk.aqua_decode(x.q, x.k, x.v, x.kd, proj, dk.DecodeConfig(dims))
            out_t = dk.aqua_decode(x.q, x.k, x.v, x.kd, proj, dk.DecodeConfig(dims, fused_select=False))
            ref16 = aqua_decode_reference(x.q, x.k, x.v, x.kd, proj, dims, "group", 1 / 16, 512)
            out16 = dk.aqua_decode(x.q, x.k, x.v, x.kd, proj, dk.DecodeConfig(dims, "group", 1 / 16, 512))
            row = {"kind": "check", "batch": batch, "seq": seq, "dims": dims,
                   "mass_rel_diff": float(((got - want).abs() / want).max()), "same_set_frac": same, "sorted": sorted_ok,
                   "err_dims": rel(out, ref), "err_dims_torch_select": rel(out_t, ref), "err_topt16": rel(out16, ref16),
                   "count_ok": bool((cnt == dims).all())}
            rows.append(row)
            print(json.dumps(row), flush=True)

    # -- timings ---------------------------------------------------------------------------------------
    def dims_rows(batch, seq, dims_list, grid):
        sets = sets_for(batch, seq)
        dense = timed(lambda x: dense_decode(x.q, x.k, x.v), sets)
        rows.append({"kind": "dense", "batch": batch, "seq": seq, "us": dense,
                     "tb_s": 2 * batch * shape.num_kv_heads * seq * shape.head_dim * 2 / dense / 1e6})
        x0 = sets[0]
        for dims in dims_list:
            ref = aqua_decode_reference(x0.q, x0.k, x0.v, x0.kd, proj, dims) if seq <= 32768 else None
            nbytes = cost.dims_bytes(batch, shape.num_kv_heads, seq, dims, shape.head_dim)
            # selection alone: torch ops vs the one-launch kernel
            for fused in (False, True):
                cfg = dk.DecodeConfig(dims, fused_select=fused)
                us = timed(lambda x, c=cfg: dk.select_for_kernels(x.q, proj, c), sets)
                rows.append({"kind": "select", "batch": batch, "seq": seq, "dims": dims, "fused": fused, "us": us})
            for bn, warps, stages, waves, fused in grid:
                cfg = dk.DecodeConfig(dims, block_n=bn, num_warps=warps, num_stages=stages, waves=waves, fused_select=fused)
                try:
                    fn = lambda x, c=cfg: dk.aqua_decode(x.q, x.k, x.v, x.kd, proj, c)  # noqa: E731
                    out = fn(x0)
                    us = timed(fn, sets)
                except Exception as exc:  # a variant that does not compile (shared memory) is skipped
                    print(f"skip dims bn={bn} w={warps} s={stages}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                    continue
                rows.append({"kind": "dims", "batch": batch, "seq": seq, "dims": dims, "block_n": bn, "warps": warps,
                             "stages": stages, "waves": waves, "fused_select": fused, "us": us, "x_dense": dense / us,
                             "tb_s": nbytes / us / 1e6, "err": rel(out, ref) if ref is not None else None})
        return dense

    def topt_rows(batch, seq, dims, ratio, grid):
        sets = sets_for(batch, seq)
        dense = timed(lambda x: dense_decode(x.q, x.k, x.v), sets)
        x0 = sets[0]
        ref = aqua_decode_reference(x0.q, x0.k, x0.v, x0.kd, proj, dims, "group", ratio, 512) if seq <= 32768 else None
        nbytes = cost.topt_bytes(batch, shape.num_kv_heads, seq, dims, shape.head_dim, ratio)
        for sw, tbn, tw, ts, waves in grid:
            cfg = dk.DecodeConfig(dims, "group", ratio, 512, select_warps=sw, tokens_block_n=tbn, tokens_warps=tw,
                                  tokens_stages=ts, waves=waves)
            try:
                fn = lambda x, c=cfg: dk.aqua_decode(x.q, x.k, x.v, x.kd, proj, c)  # noqa: E731
                out = fn(x0)
                us = timed(fn, sets)
                sel_us = timed(lambda x, c=cfg: dk.launch_select(dk.select_for_kernels(x.q, proj, c)[0], x.kd, ratio, 512, sw, True), sets)
            except Exception as exc:
                print(f"skip topt {sw} {tbn} {tw} {ts}: {type(exc).__name__}: {str(exc)[:120]}", flush=True)
                continue
            rows.append({"kind": "topt", "batch": batch, "seq": seq, "dims": dims, "ratio": ratio, "select_warps": sw,
                         "tokens_block_n": tbn, "tokens_warps": tw, "tokens_stages": ts, "waves": waves, "us": us,
                         "select_plus_score_us": sel_us, "x_dense": dense / us, "tb_s": nbytes / us / 1e6,
                         "err": rel(out, ref) if ref is not None else None, "dense_us": dense})

    if args.select_only:
        try:
            for cache in dk._select_dims_kernel.device_caches.values():
                for compiled in cache[0].values():
                    print(f"select kernel: regs={compiled.n_regs} spills={compiled.n_spills}", flush=True)
        except Exception as exc:  # introspection differs between Triton versions
            print(f"no register report: {exc}", flush=True)
        default = [(128, 4, 3, 4.0, True), (128, 4, 3, 4.0, False)]
        dims_rows(8, 32768, (64, 96), default)
        dims_rows(1, 32768, (64,), default)
        grid8 = gridt = None
    elif args.quick:
        grid8 = list(itertools.product((64, 128), (4, 8), (3,), (4.0,), (True,)))
    else:
        grid8 = list(itertools.product((64, 128), (4, 8), (2, 3, 4), (2.0, 4.0, 8.0), (True,)))
        grid8 += [(64, 4, 3, 4.0, False)]  # the old launch parameters with the old torch selection
    if grid8 is not None:
        dims_rows(8, 32768, (64, 96), grid8)
        print(f"[{time.time() - began:.0f}s] B8 dims done", flush=True)
        grid1 = list(itertools.product((64, 128), (4, 8), (3,), (4.0, 8.0, 16.0), (True,))) + [(64, 4, 3, 4.0, False)]
        dims_rows(1, 32768, (64,), grid1)
        dims_rows(1, 131072, (64,), grid1)
        print(f"[{time.time() - began:.0f}s] B1 dims done", flush=True)
        gridt = list(itertools.product((4, 8, 16), (32, 64), (4, 8), (3,), (4.0,)))
        topt_rows(8, 32768, 64, 1 / 16, gridt)
        print(f"[{time.time() - began:.0f}s] topt done", flush=True)

    with open(args.out, "w") as fh:
        json.dump(rows, fh, indent=1)
    # best variants, then the table
    print("\nkind  B  L  dims  params  us  x_dense  TB/s  err")
    for kind in ("dims", "topt"):
        keys = sorted({(r["batch"], r["seq"], r["dims"]) for r in rows if r["kind"] == kind})
        for key in keys:
            sub = sorted((r for r in rows if r["kind"] == kind and (r["batch"], r["seq"], r["dims"]) == key), key=lambda r: r["us"])
            for r in sub[:6]:
                params = {k: r[k] for k in r if k in ("block_n", "warps", "stages", "waves", "fused_select", "select_warps",
                                                      "tokens_block_n", "tokens_warps", "tokens_stages")}
                err = f"{r['err']:.1e}" if r.get("err") is not None else "-"
                print(f"{kind} {key} {params} {r['us']:.1f} {r['x_dense']:.3f} {r['tb_s']:.2f} {err}")
            old = [r for r in sub if r.get("fused_select") is False]
            for r in old:
                print(f"{kind} {key} TORCH-SELECT {r['us']:.1f} {r['x_dense']:.3f} {r['tb_s']:.2f}")
    for r in rows:
        if r["kind"] in ("dense", "select"):
            print(r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
