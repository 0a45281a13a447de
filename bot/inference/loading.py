"""Loading models inside a worker process (imports torch and transformers).

Models are loaded lazily, once per worker, and kept in a least-recently-used
cache bounded by a memory budget. The packaged GGUF causal LM is dequantised
once and cached on disk as safetensors, so later starts load it in seconds.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import shutil
import sys
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers

from bot.inference.protocol import NoModelForRole
from bot.inference.registry import ModelSource, resolve
from bot.inference.settings import WorkerSettings

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    role: str
    label: str
    model: Any
    tokenizer: Any
    nbytes: int
    load_seconds: float


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("inference.device is 'cuda' but no CUDA device is available")
    return torch.device(setting)


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    if setting != "auto":
        return getattr(torch, setting)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def quiet_libraries() -> None:
    """At the WARNING log level (commands at a terminal), libraries stay quiet too.

    transformers draws a "Loading weights" bar for a load that takes a second and
    warns about future API changes; neither helps a student reading an answer.
    Bars stay for work that takes seconds or more (conversion, downloads).
    """
    if logging.getLogger().getEffectiveLevel() <= logging.INFO:
        return
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)


@contextlib.contextmanager
def _progress_bars() -> Any:
    """transformers' progress bars on for slow work, back to how they were after."""
    was_enabled = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.enable_progress_bar()
    try:
        yield
    finally:
        if not was_enabled:
            transformers.utils.logging.disable_progress_bar()


def _gguf_to_safetensors(folder: Path, gguf_file: str, cache_dir: Path) -> Path:
    """Dequantise a packaged GGUF model once and keep a safetensors copy.

    transformers cannot ``save_pretrained`` a GGUF-loaded model directly (its
    quantization config is not serialisable), so the weights are moved into a
    fresh model built from a clean config first.
    """
    target = cache_dir / "models" / Path(gguf_file).stem
    if (target / "config.json").exists():
        return target
    # Said at every log level: it happens once and takes tens of seconds.
    print(
        f"lmbot: converting the packaged model {gguf_file} to safetensors (first use only; cached in {target})",
        file=sys.stderr,
        flush=True,
    )
    with _progress_bars():
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=gguf_file)
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_file, dtype=torch.float32)
        config = model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        clean = type(model)(config)
        clean.load_state_dict(model.state_dict())
        partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
        clean.save_pretrained(partial)
        tokenizer.save_pretrained(partial)
    try:
        partial.rename(target)  # atomic: another worker converting at once loses the race harmlessly
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)
    return target


def load_source(source: ModelSource, auto_class: str, settings: WorkerSettings) -> LoadedModel:
    if source.kind == "missing":
        raise NoModelForRole(source.role, source.reason)
    device = pick_device(settings.device)
    dtype = pick_dtype(settings.dtype, device)
    started = time.perf_counter()
    location: str | Path = source.location
    local_only = source.kind != "hub"
    if source.gguf_file:
        location = _gguf_to_safetensors(Path(source.location), source.gguf_file, Path(settings.cache_dir))
    model_class = getattr(transformers, auto_class)
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(location, local_files_only=local_only)
        model = model_class.from_pretrained(location, dtype=dtype, local_files_only=local_only)
    except OSError as exc:
        raise NoModelForRole(source.role, f"cannot load {source.configured}: {str(exc).splitlines()[0]}") from exc
    model.to(device).eval()
    if tokenizer.pad_token is None:
        # GPT-style tokenizers have no pad token; padding is masked out anyway.
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    elapsed = time.perf_counter() - started
    log.info("loaded %s for %s on %s in %.1f s (%.0f MB)", source.label, source.role, device, elapsed, nbytes / 2**20)
    return LoadedModel(source.role, source.label, model, tokenizer, nbytes, elapsed)


class ModelCache:
    """Loaded models by role, least recently used first out when over budget."""

    def __init__(self, settings: WorkerSettings) -> None:
        quiet_libraries()
        self.settings = settings
        self.loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self.budget = settings.memory_budget_mb * 2**20

    def get(self, role: str) -> LoadedModel:
        if role in self.loaded:
            self.loaded.move_to_end(role)
            return self.loaded[role]
        spec = self.settings.roles.get(role)
        if spec is None:
            raise NoModelForRole(role, "no plugin declares this role")
        source = resolve(spec, self.settings.models.get(role), self.settings.offline)
        entry = load_source(source, spec.auto_class, self.settings)
        self.loaded[role] = entry
        self._evict(keep=role)
        return entry

    def _evict(self, keep: str) -> None:
        while sum(m.nbytes for m in self.loaded.values()) > self.budget and len(self.loaded) > 1:
            role, entry = next((r, m) for r, m in self.loaded.items() if r != keep)
            log.info("unloading %s (%s) to stay within the memory budget", role, entry.label)
            del self.loaded[role]
            del entry
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def describe(self) -> dict[str, dict[str, Any]]:
        return {
            r: {"label": m.label, "mb": round(m.nbytes / 2**20, 1), "load_s": round(m.load_seconds, 2)}
            for r, m in self.loaded.items()
        }
