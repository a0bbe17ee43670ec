"""The model card (README.md) of an artifact: Hub metadata as YAML front matter, provenance, spectrum, usage.

Written beside the tensors by ``Artifact.save`` and rendered afresh for the target repo by ``aqua push``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .models import describe_fingerprint


def model_card(artifact: Any, hub_repo: str | None = None) -> str:
    """The README.md of an artifact: Hub metadata (YAML front matter), provenance, spectrum and usage.

    ``hub_repo`` (``org/repo``) is set when the card is rendered for a push: usage then names ``hf://org/repo``.
    Eval results the artifact carries (``extra["eval_results"]``: dicts with ``task``, ``dataset``, ``metric``,
    ``value`` and optionally ``k``, ``mode``, ``name``) become the card's ``model-index``.
    """
    import re

    from huggingface_hub import EvalResult, ModelCardData

    from .spectrum import DEFAULT_RATIOS, energy_summary, layer_rows

    meta = artifact.metadata
    fp = artifact.fingerprint
    summary = energy_summary(artifact)
    hub_id = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
    model_id = str(meta["model_id"])
    data_name = str(meta.get("data_id") or "").split(":")[0]
    evals = [r for r in (meta.get("extra") or {}).get("eval_results", []) if isinstance(r, dict) and "value" in r]
    eval_results = [
        EvalResult(
            task_type=str(r.get("task", "text-generation")),
            dataset_type=str(r.get("dataset", data_name or "unknown")),
            dataset_name=str(r.get("dataset", data_name or "unknown")),
            metric_type=str(r.get("metric", "perplexity")),
            metric_value=r["value"],
            metric_name=r.get("name") or " ".join(
                [str(r.get("metric", "perplexity"))] + [f"{key}={r[key]}" for key in ("k", "mode") if key in r]
            ),
        )
        for r in evals
    ]
    card_data = ModelCardData(
        base_model=model_id if hub_id.fullmatch(model_id) and not Path(model_id).exists() else None,
        library_name="aqua_cli",
        tags=["aqua", "attention", "projection", fp["architecture"]],
        datasets=[data_name] if hub_id.fullmatch(data_name) and not Path(data_name).exists() else None,
        model_name=(hub_repo or artifact.name) if eval_results else None,  # only model-index uses it
        eval_results=eval_results or None,
    )
    front = "---\n" + card_data.to_yaml() + "\n---"
    rows = "\n".join(f"| {r:.2f} | {summary[r]['min']:.4f} | {summary[r]['mean']:.4f} |" for r in sorted(summary))
    layers = "\n".join(
        f"| {row['layer']} | " + " | ".join(f"{row[f'energy_{r:g}_min']:.3f} / {row[f'energy_{r:g}_mean']:.3f}" for r in DEFAULT_RATIOS)
        + f" | {row['orthogonality_error']:.1e} |"
        for row in layer_rows(artifact)
    )
    layer_head = " | ".join(f"k={r:g}d" for r in DEFAULT_RATIOS)
    command = " ".join(meta.get("command") or []) or "(Python API)"
    name = f"hf://{hub_repo}" if hub_repo else artifact.name
    results = "\n".join(
        f"| {r.get('task', 'text-generation')} | {r.get('dataset', data_name)} | {r.get('metric', 'perplexity')} | {r.get('k', '')} | {r.get('mode', '')} | {r['value']} |"
        for r in evals
    )
    results_section = (
        f"\n## Evaluation\n\n| task | dataset | metric | k | mode | value |\n|---|---|---|---|---|---|\n{results}\n" if evals else ""
    )
    body = f"""
# AQUA projections for {meta['model_id']}

Per-layer, per-KV-group orthogonal projections for [AQUA attention](https://arxiv.org/abs/2509.11155)
(Attention via QUery mAgnitudes), made by `aqua_cli` {meta.get('tool_version', '')}.

| | |
|---|---|
| model | {meta['model_id']} (revision: {meta.get('model_revision') or 'unknown'}) |
| shape | {describe_fingerprint(fp)} |
| calibration data | {meta.get('data_id')} |
| tokens | {meta.get('tokens')} (windows of {meta.get('seq_len')}, seed {meta.get('seed')}) |
| basis | {meta.get('basis')} |
| model dtype | {meta.get('dtype')} |
| created | {meta.get('created')} |
| sha256 (tensors) | `{meta.get('tensors_sha256')}` |

Made with: `{command}`

## Spectrum: fraction of query/key energy in the first k projected dimensions

| k / d | min over layers and groups | mean |
|---|---|---|
{rows}

<details><summary>Per layer (min / mean over KV groups), as <code>aqua inspect</code> shows it</summary>

| layer | {layer_head} | max abs(PᵀP − I) |
|---|{'---|' * len(DEFAULT_RATIOS)}---|
{layers}

</details>
{results_section}
## Use

```bash
aqua eval {meta['model_id']} --artifact {name} --k 0.75 --mode dynamic
```

```python
import aqua_cli
handle = aqua_cli.patch(model, "{name}", k=0.75, mode="dynamic")
```
"""
    return front + "\n" + body
