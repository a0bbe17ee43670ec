"""Where an AquaDecode decode step spends its time inside a model (GPU): hook path counts and the top
operators of a few steps under torch.profiler, next to dense on the same static cache.

    python scripts/profile_decode.py --seq 32768 --batch 1 --layers 4 [--tokens 0.0625]
"""

from __future__ import annotations

import argparse
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seq", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=float, default=None)
    parser.add_argument("--k", type=float, default=0.5)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rows", type=int, default=12)
    parser.add_argument("--only", choices=("dense", "aqua"), default=None)
    args = parser.parse_args()
    from aqua_cli.e2e import StaticKVCache, _fill, _sdpa_context, build_model, e2e_config, random_artifact, time_decode
    from aqua_cli.methods import AquaDecode
    from aqua_cli.models import attention_shape

    device = torch.device("cuda")
    config = e2e_config("llama-3.1-8b", args.layers)
    shape = attention_shape(config)
    model = build_model(config, device, torch.bfloat16)
    art = random_artifact(config)
    gen = torch.Generator(device=device).manual_seed(0)
    cap = args.seq + 64
    for name in (args.only,) if args.only else ("dense", "aqua"):
        method = None if name == "dense" else AquaDecode(art, k=args.k, token_ratio=args.tokens, max_tokens=cap, hybrid=False)(model)
        cache = method.new_cache() if method else StaticKVCache(shape["num_layers"], cap)
        _fill(cache, shape["num_layers"], args.batch, shape["num_kv_heads"], shape["head_dim"], args.seq, torch.bfloat16, device, gen)
        step = time_decode(model, cache, args.batch, args.seq, args.steps, 4, device, _sdpa_context(device))
        print(f"{name}: {step * 1e3:.2f} ms/step", flush=True)
        if method:
            print("hook calls:", [h.calls for h in method.hooks][:2], flush=True)
        tok = torch.randint(3, 1000, (args.batch, 1), device=device)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof, \
                _sdpa_context(device)():
            for i in range(3):
                model(input_ids=tok, position_ids=torch.full((args.batch, 1), args.seq + 64 - 8 + i, device=device) * 0 + cache.get_seq_length(),
                      past_key_values=cache, use_cache=True)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows), flush=True)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows), flush=True)
        if method:
            method.remove()
        del cache
        time.sleep(0.1)


if __name__ == "__main__":
    main()
