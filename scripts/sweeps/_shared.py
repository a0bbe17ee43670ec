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


def variant_rows(batch: int, seq: int, dense: float, errs: dict, times: dict) -> list[dict]:
    """The session-9 sweeps' rows: one per ``(dims, variant)`` of ``errs`` (its error against the sweep's baseline, or
    why it did not run) with the median of its ``times`` and the ratio to dense; each printed as it is made."""
    import statistics

    rows = []
    for (dims, name), err in errs.items():
        ts = times.get((dims, name))
        r = dict(batch=batch, seq=seq, dims=dims, variant=name, dense_us=dense, err_vs_split=err,
                 us_median=statistics.median(ts) if ts else None, us_all=ts,
                 x=dense / statistics.median(ts) if ts else None, device=torch.cuda.get_device_name())
        rows.append(r)
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k not in ("us_all", "device")}, flush=True)
    return rows
