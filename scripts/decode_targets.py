"""Issue-18 sweep (GPU): every decode-kernel variant against dense SDPA in the same run, with the fixed cost.

    PYTHONPATH=$PWD python3 scripts/decode_targets.py --out targets.json [--quick]

Llama-3.1-8B attention shape (32 q / 8 KV heads, d=128), bf16, random inputs and a random orthogonal
projection. Timings: CUDA-graph replays timed with CUDA events over rotating input sets
(``aqua_cli.bench.time_us``). ``fixed_us`` = latency - model bytes / copy bandwidth, the copy bandwidth
measured in the same run (a large device-to-device copy, bytes read + written): everything but the bytes
of K and V. Each variant's relative error is checked against its PyTorch reference (<= 32K).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="targets.json")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seqs", default="1024,32768,131072")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prologue", action="store_true", help="also time the dims kernel with the selection in its prologue")
    args = parser.parse_args()

    import triton

    from types import SimpleNamespace

    from aqua_cli.bench import _decode_inputs, _rotating, random_projection, time_us
    from aqua_cli import cost
    from aqua_cli.kernels import decode as dk
    from aqua_cli.kernels.paged import aqua_decode_pages_reference
    from aqua_cli.kernels.reference import aqua_decode_reference, dense_decode

    dev = torch.device("cuda")
    shape = SimpleNamespace(num_heads=32, num_kv_heads=8, head_dim=128)  # Llama-3.1-8B attention
    hkv, d = shape.num_kv_heads, shape.head_dim
    print(f"torch {torch.__version__} triton {triton.__version__} {torch.cuda.get_device_name()} sms={dk._sms(dev)}", flush=True)
    gen = torch.Generator().manual_seed(0)
    proj = random_projection(hkv, d, gen).to(dev)
    began = time.time()

    # copy bandwidth (bytes read + written)
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    copy_us = time_us(lambda: dst.copy_(src), dev, 3, 20)
    bw = 2 * src.numel() / copy_us / 1e6  # TB/s
    del src, dst
    print(f"copy bandwidth {bw:.2f} TB/s (raised below to dense SDPA's best if that is higher)", flush=True)
    rows: list[dict] = [{"kind": "copy", "tb_s": bw}]

    def rel(a, b):
        return float((a.float() - b.float()).norm() / b.float().norm())

    def variants(seq):
        v = []  # (name, dims, ratio, bytes_fn, config or None for dense, reference fn)
        for dims in (64, 96):
            v.append((f"dims k={dims / d:g} 3-launch", dims, None, dk.DecodeConfig(dims, prologue=False)))
            if args.prologue:
                v.append((f"dims k={dims / d:g} fused", dims, None, dk.DecodeConfig(dims, prologue=True)))
        v.append(("tokens k=0.5 T/16", 64, 1 / 16, dk.DecodeConfig(64, token_ratio=1 / 16)))
        # page variants: DecodeConfig overrides on top of the defaults
        grid = [{}, {"fold_select": False}, {"page": 32}, {"waves": 2.0}, {"attend_waves": 4.0}, {"score_warps": 8, "score_block": 512}]
        if args.quick:
            grid = grid[:2]
        for dims, ratio in ((64, 1 / 16), (32, 1 / 32), (64, 1 / 32), (96, 1 / 16)):
            for over in grid if (dims, ratio) == (64, 1 / 16) else grid[:1]:
                cfg = dk.DecodeConfig(dims, token_ratio=ratio, granularity="pages", **over)
                tag = " ".join(f"{k}={v}" for k, v in over.items()) or "default"
                v.append((f"pages k={dims / d:g} T/{round(1 / ratio)} [{tag}]", dims, ratio, cfg))
        return v

    def nbytes(batch, seq, dims, ratio, cfg):
        if ratio is None:
            return cost.dims_bytes(batch, hkv, seq, dims, d)
        if cfg.granularity == "pages":
            return cost.pages_bytes(batch, hkv, seq, dims, d, ratio, cfg.page)
        return cost.topt_bytes(batch, hkv, seq, dims, d, ratio)

    for batch in [int(b) for b in args.batches.split(",")]:
        for seq in [int(s) for s in args.seqs.split(",")]:
            set_bytes = 3 * batch * hkv * seq * d * 2
            sets = _decode_inputs(shape, batch, seq, proj, torch.bfloat16, dev, max(1, min(8, -(-(256 << 20) // set_bytes))))
            x0 = sets[0]
            dense = time_us(_rotating(lambda x: dense_decode(x.q, x.k, x.v), sets), dev, 3, 20) / len(sets)
            dense_bytes = 2 * batch * hkv * seq * d * 2
            rows.append({"kind": "dense", "batch": batch, "seq": seq, "us": dense, "tb_s": dense_bytes / dense / 1e6,
                         "fixed_us": dense - dense_bytes / bw / 1e6})
            bw = max(bw, dense_bytes / dense / 1e6)
            print(f"B{batch} L{seq} dense {dense:.1f} us ({dense_bytes / dense / 1e6:.2f} TB/s)", flush=True)
            refs: dict = {}
            for name, dims, ratio, cfg in variants(seq):
                fn = (lambda x, c=cfg: dk.aqua_decode(x.q, x.k, x.v, x.kd, proj, c))
                try:
                    out = fn(x0)
                    us = time_us(_rotating(fn, sets), dev, 3, 20) / len(sets)
                except Exception as exc:  # a variant that does not compile is reported and skipped
                    print(f"skip {name}: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
                    continue
                part = {}
                if ratio is None and not cfg.prologue:
                    for w in (2, 4, 8):
                        part[f"select_w{w}_us"] = time_us(_rotating(lambda x, c=cfg, w=w: dk.launch_select_dims(x.q, proj, c.dims, num_warps=w), sets),
                                                          dev, 3, 20) / len(sets)
                elif ratio is not None and cfg.granularity == "pages":
                    part["select_score_us"] = time_us(_rotating(lambda x, c=cfg: dk.launch_page_scores(
                        x.q, proj, x.kd, c.dims, c.page, seq, c.score_block, c.score_warps, c.score_stages, c.waves or 4.0), sets), dev, 3, 20) / len(sets)
                    part["select_dims_us"] = time_us(_rotating(lambda x, c=cfg: dk.launch_select_dims(x.q, proj, c.dims), sets), dev, 3, 20) / len(sets)
                err = None
                if seq <= 32768:
                    key = (dims, ratio, cfg.granularity, cfg.page if cfg.granularity == "pages" else None)
                    if key not in refs:
                        if ratio is None:
                            refs[key] = aqua_decode_reference(x0.q, x0.k, x0.v, x0.kd, proj, dims)
                        elif cfg.granularity == "pages":
                            refs[key] = aqua_decode_pages_reference(x0.q, x0.k, x0.v, x0.kd, proj, dims, ratio, cfg.page)
                        else:
                            refs[key] = aqua_decode_reference(x0.q, x0.k, x0.v, x0.kd, proj, dims, "group", ratio, cfg.select_block)
                    err = rel(out, refs[key])
                b = nbytes(batch, seq, dims, ratio, cfg)
                row = {"kind": "aqua", "name": name, "batch": batch, "seq": seq, "dims": dims, "ratio": ratio,
                       "granularity": cfg.granularity if ratio else None, "page": cfg.page if ratio and cfg.granularity == "pages" else None,
                       "us": us, "x_dense": dense / us, "bytes": b, "byte_bound": dense_bytes / b, "tb_s": b / us / 1e6,
                       "fixed_us": us - b / bw / 1e6, "err": err, **part}
                rows.append(row)
                print(f"B{batch} L{seq} {name:44s} {us:8.1f} us {dense / us:5.2f}x (bound {dense_bytes / b:4.2f}x) "
                      f"{b / us / 1e6:4.2f} TB/s fixed {row['fixed_us']:6.1f} us err {err if err is None else round(err, 4)} "
                      f"{' '.join(f'{k2}={v2:.1f}' for k2, v2 in part.items())}", flush=True)
            del sets, x0, refs
            torch.cuda.empty_cache()
            with open(args.out, "w") as fh:
                json.dump(rows, fh, indent=1)
    for r in rows:  # fixed cost against the best bandwidth seen in this run
        if "us" in r:
            moved = r.get("bytes", 2 * r["batch"] * hkv * r["seq"] * d * 2)
            r["fixed_us"] = r["us"] - moved / bw / 1e6
    rows.append({"kind": "bandwidth_for_fixed_cost", "tb_s": bw})
    with open(args.out, "w") as fh:
        json.dump(rows, fh, indent=1)
    print(f"[{time.time() - began:.0f}s] fixed costs below use {bw:.2f} TB/s")
    print("\nbest per (batch, seq, family):")
    fams: dict = {}
    for r in rows:
        if r["kind"] != "aqua":
            continue
        fam = r["name"].split(" [")[0]
        k = (r["batch"], r["seq"], fam)
        if k not in fams or r["us"] < fams[k]["us"]:
            fams[k] = r
    for (b, s, fam), r in sorted(fams.items()):
        print(f"B{b} L{s:6d} {fam:28s} {r['x_dense']:5.2f}x bound {r['byte_bound']:4.2f}x fixed {r['fixed_us']:6.1f} us  [{r['name']}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
