"""Calibration throughput of a big model with random weights (no download needed), one or many GPUs.

Builds a decoder from a named shape (random bf16 weights, straight on the GPU), streams random token
windows through `aqua_cli.calibration.calibrate_windows`, and reports tokens/s of the accumulation and
the time of the final all-reduce. Run under torchrun for data-parallel:

    python scripts/calibrate_throughput.py --shape llama-3.1-8b --tokens 200000 --json out.json
    torchrun --nproc_per_node 2 scripts/calibrate_throughput.py --shape llama-3.1-8b --tokens 200000 \
        --json out.json --save-artifact art2

Tokens/s excludes start-up (imports, building the model); `startup_s` is reported beside it.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

START = time.perf_counter()

import torch  # noqa: E402

SHAPES = {
    "llama-3.1-8b": dict(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    ),
    "tiny": dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=128, max_position_embeddings=512),
}


def build(shape: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(**SHAPES[shape])
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    parser.add_argument("--tokens", type=int, default=200_000)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--json", type=Path, default=None, help="append a result row to this JSON file (rank 0)")
    parser.add_argument("--save-artifact", type=Path, default=None)
    args = parser.parse_args()

    from aqua_cli.calibration import calibrate_windows
    from aqua_cli.distributed import init_from_env, shutdown

    dist = init_from_env("auto")
    device = dist.device() if dist else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build(args.shape, device, getattr(torch, args.dtype))
    vocab = model.config.vocab_size
    windows = torch.randint(0, vocab, (args.tokens // args.seq_len, args.seq_len), generator=torch.Generator().manual_seed(0))
    # warm-up: kernels and allocator, not counted
    calibrate_windows(model, windows[: max(1, dist.world_size if dist else 1)], model_id=f"random/{args.shape}", batch_size=1, dist=dist)
    startup = time.perf_counter() - START
    artifact = calibrate_windows(model, windows, model_id=f"random/{args.shape}", data_id="random-tokens", batch_size=args.batch_size, dist=dist)
    extra = artifact.metadata["extra"]
    row = {
        "gpus": dist.world_size if dist else 1,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "shape": args.shape,
        "dtype": args.dtype,
        "tokens": artifact.metadata["tokens"],
        "seq_len": args.seq_len,
        "batch_size_per_rank": args.batch_size,
        "seconds": extra["seconds"],
        "tokens_per_s": extra["tokens_per_s"],
        "all_reduce_s": extra["all_reduce_s"],
        "startup_s": round(startup, 2),
    }
    if dist is None or dist.is_main:
        print(json.dumps(row))
        if args.json:
            rows = json.loads(args.json.read_text())["rows"] if args.json.exists() else []
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"rows": rows + [row]}, indent=2) + "\n")
        if args.save_artifact:
            artifact.save(args.save_artifact, force=True)
    shutdown(dist)


if __name__ == "__main__":
    main()
