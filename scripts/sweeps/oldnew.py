"""Old (session 3 final, commit 5cc2154) vs new page top-T kernels in decode_targets.py's harness (aqua_cli.bench.time_us:
CUDA-graph replays timed with events), same H100 run, with and without sink/recent pages and 2 vs 3 exact-pass stages.

    git show 5cc2154:aqua_cli/kernels/decode.py > aqua_cli/kernels/decode_old.py
    PYTHONPATH=$PWD OUT=docs/results/sweeps python3 scripts/sweeps/oldnew.py   (GPU; then delete decode_old.py)

Output: docs/results/sweeps/oldnew-h100.json (the file name in $OUT drops the -h100 suffix). Ran at commit 8fdc2a1.
"""
# ruff: noqa: E731, E702
import json, os, statistics, torch
from aqua_cli.kernels import decode as new, decode_old as old
from aqua_cli.bench import _decode_inputs, _rotating, random_projection, time_us
from aqua_cli.models import PRESETS
from aqua_cli.kernels.reference import dense_decode
dev = torch.device("cuda"); shape = PRESETS["llama-3.1-8b"]
proj = random_projection(8, 128, torch.Generator().manual_seed(0)).to(dev)
rows = []
for batch, seq in ((8, 32768), (1, 131072), (1, 32768)):
    sets = _decode_inputs(shape, batch, seq, proj, torch.bfloat16, dev, 1)
    res = {}
    for rep in range(3):
        res.setdefault("dense", []).append(time_us(_rotating(lambda x: dense_decode(x.q, x.k, x.v), sets), dev, 3, 20))
        for name, mod, over in (("old", old, {}), ("new", new, {}), ("new-s2", new, {"attend_stages": 2}), ("old-s3", old, {"attend_stages": 3})):
            cfg = mod.DecodeConfig(64, token_ratio=1 / 16, granularity="pages", **over)
            res.setdefault(name, []).append(time_us(_rotating(lambda x, c=cfg, m=mod: m.aqua_decode(x.q, x.k, x.v, x.kd, proj, c), sets), dev, 3, 20))
            res.setdefault(name + "-sink1-recent8", []).append(time_us(_rotating(lambda x, c=cfg, m=mod: m.aqua_decode(x.q, x.k, x.v, x.kd, proj, c, sink_pages=1, recent_pages=8), sets), dev, 3, 20))
    for k, ts in res.items():
        r = dict(batch=batch, seq=seq, variant=k, us=statistics.median(ts), all=ts); rows.append(r); print(r, flush=True)
    del sets; torch.cuda.empty_cache()
json.dump(rows, open(os.path.join(os.environ.get("OUT", "."), "oldnew.json"), "w"), indent=1)
