"""What the session-5 sweeps share: a random projection, graph-replay timing and input sets in the Llama-3.1-8B
attention shape (32 query / 8 KV heads, head_dim 128, bf16) on the GPU. The sweeps ran with this set-up written out
in each script; it was moved here afterwards, unchanged."""
import torch
import triton

from aqua_cli.bench import random_projection
from aqua_cli.kernels.reference import dense_decode, project_keys

DEV = torch.device("cuda")
PROJ = random_projection(8, 128, torch.Generator().manual_seed(0)).to(DEV)


def us(fn) -> float:
    """Microseconds of one replay of ``fn`` captured in a CUDA graph (``do_bench_cudagraph``, 80 ms of replays)."""
    return triton.testing.do_bench_cudagraph(fn, rep=80) * 1e3


def input_sets(batch: int, seq: int, n: int = 2) -> tuple[list, float]:
    """``n`` sets of (q, k, v, projected keys), timed alternately so that no set is served from L2 alone, and
    dense SDPA's time per set over the same sets (the baseline of every ratio)."""
    sets = []
    for _ in range(n):
        q = torch.randn(batch, 32, 128, device=DEV, dtype=torch.bfloat16)
        k = torch.randn(batch, 8, seq, 128, device=DEV, dtype=torch.bfloat16)
        sets.append((q, k, torch.randn_like(k), project_keys(k, PROJ).to(torch.bfloat16)))
    dense = us(lambda: [dense_decode(q, k, v) for q, k, v, _ in sets]) / n
    return sets, dense
