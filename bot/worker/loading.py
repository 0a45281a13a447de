"""Loading models inside a worker process (imports torch and transformers).

Models are loaded lazily, once per worker, and kept in a least-recently-used
cache bounded by a memory budget. The packaged GGUF causal LM is dequantised
once and cached on disk as safetensors, so later starts load it in seconds.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import warnings
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers

from bot.inference.protocol import NoModelForRole
from bot.inference.registry import ModelSource, resolve
from bot.inference.settings import WorkerSettings
from bot.worker import engines

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    role: str
    label: str  # what replies show: the model, its precision and the engine that answers
    model: Any
    tokenizer: Any
    nbytes: int
    load_seconds: float
    base_label: str = ""
    precision: str = "fp32"
    engine: str = "torch"
    wanted_engine: str = "torch"
    pending_engine: Future[Any] | None = field(default=None, repr=False)
    batches: int = 0

    def relabel(self) -> None:
        self.label = model_label(self.base_label or self.label, self.precision, self.engine)


def model_label(base: str, precision: str, engine: str) -> str:
    """The model line of every reply: which weights, in which precision, on which engine."""
    return f"{base} · {precision}, {engine}"


def pick_device(setting: str) -> torch.device:
    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("inference.device is 'cuda' but no CUDA device is available")
    return torch.device(setting)


def pick_dtype(setting: str, device: torch.device) -> torch.dtype:
    """``auto`` is fp32 on every CPU, even one with native bf16.

    bf16 keeps 8 bits of mantissa: SmolLM2's next-token probabilities move by up to
    0.03 and the top token changes on a few percent of prompts (README, Performance).
    This bot exists to show a model's real numbers, so that trade is made only when
    someone asks for it (``inference.dtype = "bfloat16"``), and every reply then says so.
    """
    if setting != "auto":
        dtype: torch.dtype = getattr(torch, setting)
        if device.type == "cpu" and dtype == torch.bfloat16 and not engines.cpu_has_native_bf16():
            log.warning(
                "inference.dtype is bfloat16 but this CPU has no native bf16 (AVX512_BF16/AMX): "
                "torch emulates it, which is slower than float32 here"
            )
        return dtype
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


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def _weight_dtypes(folder: Path) -> set[str] | None:
    """The dtypes of the floating-point tensors in a folder's safetensors files (headers only)."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    found: set[str] = set()
    for path in files:
        with open(path, "rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        found |= {v["dtype"] for k, v in header.items() if k != "__metadata__" and v["dtype"].startswith(("F", "BF"))}
    return found


def _precision_copy(folder: Path, model_class: Any, dtype: torch.dtype, cache_dir: Path) -> Path:
    """A copy of a local model whose weights are stored in ``dtype``, converted once and cached.

    transformers maps safetensors files into memory, so a model stored in the dtype it
    runs in is shared by every worker through the page cache; converting at load time
    would give each worker a private copy instead. Returns ``folder`` itself when its
    weights are already in ``dtype``.
    """
    wanted = _SAFETENSORS_DTYPES.get(dtype)
    found = _weight_dtypes(folder)
    if wanted is None or found == {wanted}:
        return folder
    stamp = hashlib.sha256(str(folder.resolve()).encode())
    for path in sorted(folder.glob("*")):
        if path.is_file():
            stat = path.stat()
            stamp.update(f"{path.name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    target = cache_dir / "precision" / f"{folder.name}-{engines.precision_name(dtype)}-{stamp.hexdigest()[:12]}"
    if (target / "config.json").exists():
        return target
    print(
        f"lmbot: storing {folder.name} in {dtype} once, so workers can share it ({target})", file=sys.stderr, flush=True
    )
    model = model_class.from_pretrained(folder, dtype=dtype, local_files_only=True)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    try:
        partial.rename(target)
    except OSError:  # another worker stored it first
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
        if local_only and device.type == "cpu":
            location = _precision_copy(Path(location), model_class, dtype, Path(settings.cache_dir))
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
    precision = engines.precision_name(dtype)
    wanted = engines.wanted_engine(getattr(settings, "engine", "auto"), device, dtype, auto_class)
    label = model_label(source.label, precision, "torch")
    return LoadedModel(
        source.role, label, model, tokenizer, nbytes, elapsed, source.label, precision, "torch", wanted_engine=wanted
    )


# Batches a role serves on torch before its faster engine is built (unless preloaded).
ENGINE_AFTER_BATCHES = 32


class ModelCache:
    """Loaded models by role, least recently used first out when over budget."""

    def __init__(self, settings: WorkerSettings) -> None:
        quiet_libraries()
        self.settings = settings
        self.loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self.budget = settings.memory_budget_mb * 2**20
        # Threads per worker: inference.threads, else cores ÷ workers (see engines.default_threads).
        self.threads = engines.configure_threads(settings.threads, getattr(settings, "workers", 1))

    def get(self, role: str) -> LoadedModel:
        if role in self.loaded:
            self.loaded.move_to_end(role)
            entry = self.loaded[role]
            self._advance_engine(entry)
            return entry
        spec = self.settings.roles.get(role)
        if spec is None:
            raise NoModelForRole(role, "no plugin declares this role")
        source = resolve(spec, self.settings.models.get(role), self.settings.offline)
        entry = load_source(source, spec.auto_class, self.settings)
        self.loaded[role] = entry
        self._advance_engine(entry)
        self._evict(keep=role)
        return entry

    def _advance_engine(self, entry: LoadedModel) -> None:
        """Build a role's faster engine in the background, and switch to it once ready.

        The build starts at once for a preloaded role (a bot expecting traffic), else
        once the role has served :data:`ENGINE_AFTER_BATCHES` batches: exporting costs
        tens of seconds of CPU the first time, which a one-shot ``lmbot ask`` or a
        handful of requests would never earn back. Torch answers until then. Called
        between batches (a worker runs one batch at a time), so each batch is answered
        by one engine and its label names that one.
        """
        entry.batches += 1
        if entry.wanted_engine == entry.engine:
            return
        if entry.pending_engine is None:
            if entry.role in self.settings.preload or entry.batches > ENGINE_AFTER_BATCHES:
                entry.pending_engine = engines.build_in_background(
                    entry.model, entry.tokenizer, Path(self.settings.cache_dir), self.threads
                )
            return
        if entry.pending_engine.done():
            engine = entry.pending_engine.result()
            entry.pending_engine = None
            if engine is None:
                entry.wanted_engine = "torch"  # verified unusable: stay on torch for good
                return
            engines.attach(entry.model, engine)
            entry.engine = engine.name
            entry.relabel()

    def wait_for_engine(self, role: str, timeout: float = 600) -> str:
        """Build a role's engine now and switch to it (benchmarks, ``lmbot models --load``)."""
        entry = self.get(role)
        if entry.wanted_engine != entry.engine and entry.pending_engine is None:
            entry.batches = max(entry.batches, ENGINE_AFTER_BATCHES)
            self._advance_engine(entry)
        if entry.pending_engine is not None:
            entry.pending_engine.result(timeout)
            self._advance_engine(entry)
        return entry.label

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
            r: {
                "label": m.label,
                "mb": round(m.nbytes / 2**20, 1),
                "load_s": round(m.load_seconds, 2),
                "precision": m.precision,
                "engine": m.engine,
                "engine_pending": m.pending_engine is not None,
                "threads": self.threads,
            }
            for r, m in self.loaded.items()
        }
