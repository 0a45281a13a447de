"""Faster engines behind the same transformers model (worker side; imports torch).

transformers stays the single source of models: a role is always loaded with
``from_pretrained`` first, and an engine is built *from that loaded model*. The
ONNX Runtime engine exports the model's decoder body (everything up to the final
hidden states) once, caches the export on disk, and runs it through ONNX
Runtime's CPU kernels, which on small batches avoid most of the per-operator
Python cost of eager torch. The vocabulary projection stays in torch on the
model's own ``lm_head`` and only for the positions a task needs.

An engine is used only after it has proved itself: on probe batches (padded and
alone) its next-token probabilities must match the torch model's within
:data:`VERIFY_PROB_TOL`, else the role stays on torch and the log says why. It is
built in a background thread while torch answers, so no request waits for an
export, and the role's label says which engine answered each reply.

Only the tasks that need logits of the last positions (``next_token``,
``score``) use it; ``generate``, plugins' own tasks and training use the torch
model as before.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import inspect
import json
import logging
import os
import shutil
import threading
import time
import warnings
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch

from bot.inference.registry import onnxruntime_applies

log = logging.getLogger(__name__)

# Bumped whenever the exported graph's inputs or outputs change, so old exports are not reused.
EXPORT_FORMAT = 1
OPSET = 18
# Probabilities an engine may differ from torch by on its probe batches (fp32 rounding order only).
VERIFY_PROB_TOL = 5e-6
_ENGINE_ATTR = "_lmbot_engine"
_PROBE_TEXTS = (
    "The capital of France is",
    "Hello",
    "A short story about a robot who learns to paint, told in three sentences:",
)


def cpu_cores() -> int:
    """Cores this process may run on (the affinity mask, not the host's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def default_threads(threads: int, workers: int) -> int:
    """Torch (and ONNX Runtime) threads per worker: ``inference.threads``, else cores ÷ workers.

    Two workers of two threads each on two cores fight for them: every parallel
    region waits for the thread that was descheduled, so latency goes up tenfold.
    """
    if threads > 0:
        return threads
    return max(1, cpu_cores() // max(1, workers))


def configure_threads(threads: int, workers: int) -> int:
    n = default_threads(threads, workers)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def precision_name(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, str(dtype))


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512_BF16 or AMX); without it
    torch emulates bf16 matmuls, which is many times slower than fp32."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # pragma: no cover - builds without oneDNN
        return False


def engine_of(model: Any) -> Any | None:
    """The engine attached to a loaded model, if it has one."""
    return getattr(model, _ENGINE_ATTR, None)


def attach(model: Any, engine: Any | None) -> None:
    # A plain attribute: nn.Module keeps non-module values in __dict__, and
    # plugins that receive the model (peft, hooks) never see the engine.
    model.__dict__[_ENGINE_ATTR] = engine


def wanted_engine(setting: str, device: torch.device, dtype: torch.dtype, auto_class: str) -> str:
    """The engine a role should run on: ``onnxruntime`` where it applies, else ``torch``.

    ``setting`` is ``auto``, ``torch`` or ``onnxruntime`` (``LMBOT_ENGINE`` in the
    environment overrides it). ONNX Runtime applies to causal LMs in fp32 on the CPU.
    """
    setting = os.environ.get("LMBOT_ENGINE", setting) or "auto"
    if setting == "torch":
        return "torch"
    if onnxruntime_applies(device.type == "cpu", dtype == torch.float32, auto_class):
        return "onnxruntime"
    if setting == "onnxruntime":
        log.warning(
            "inference engine onnxruntime does not apply here (%s, %s, %s); using torch", device, dtype, auto_class
        )
    return "torch"


# ---------------------------------------------------------------------------- export


def _accepts(module: Any, name: str) -> bool:
    return name in inspect.signature(module.forward).parameters


def _position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


class _Body(torch.nn.Module):
    """The model's decoder up to its final hidden states (final norm included)."""

    def __init__(self, base: torch.nn.Module, with_positions: bool) -> None:
        super().__init__()
        self.base = base
        self.with_positions = with_positions

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "use_cache": False}
        if self.with_positions:
            kwargs["position_ids"] = rest[0]
        return self.base(**kwargs).last_hidden_state


def model_key(model: Any) -> str:
    """A short hash naming a loaded model's weights and config (what an export depends on).

    Built from the config, every tensor's name, shape and dtype, and a strided sample of
    its values: cheap on a 500 MB model, and different weights give a different key.
    """
    digest = hashlib.sha256()
    digest.update(type(model).__name__.encode())
    digest.update(model.config.to_json_string(use_diff=False).encode())
    digest.update(f"{torch.__version__}|{EXPORT_FORMAT}|{OPSET}".encode())
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict().items()):
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // 512)
            digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
            digest.update(flat[::step].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    """One process exports a model at a time; the others wait, then reuse its export."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def export_onnx(model: Any, tokenizer: Any, cache_dir: Path) -> Path:
    """The model's body exported to ONNX once, cached under ``cache_dir/engines``; its path."""
    name = Path(str(getattr(model.config, "_name_or_path", "") or type(model).__name__)).name or "model"
    folder = cache_dir / "engines" / f"{name}-onnx-{model_key(model)}"
    target = folder / "model.onnx"
    if target.exists():
        return target
    with _file_lock(folder.with_name(folder.name + ".lock")):
        if target.exists():  # another worker exported it while this one waited
            return target
        started = time.perf_counter()
        base = model.base_model
        with_positions = _accepts(base, "position_ids")
        texts = list(_PROBE_TEXTS[:2])
        enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
        args: tuple[torch.Tensor, ...] = (enc["input_ids"], enc["attention_mask"])
        names = ["input_ids", "attention_mask"]
        if with_positions:
            args += (_position_ids(enc["attention_mask"]),)
            names.append("position_ids")
        axes = {n: {0: "batch", 1: "sequence"} for n in [*names, "hidden"]}
        partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            # The TorchScript exporter: ~10x quicker to export this kind of model than the
            # dynamo one (40 s vs 6 min for SmolLM2 on 2 cores), and its graph is as fast.
            torch.onnx.export(
                _Body(base, with_positions).eval(),
                args,
                str(partial / "model.onnx"),
                input_names=names,
                output_names=["hidden"],
                dynamic_axes=axes,
                opset_version=OPSET,
                dynamo=False,
            )
        (partial / "source.json").write_text(
            json.dumps({"model": name, "torch": torch.__version__, "format": EXPORT_FORMAT}), encoding="utf-8"
        )
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
        log.info("exported %s to ONNX in %.1f s (%s)", name, time.perf_counter() - started, folder)
    return target


# ---------------------------------------------------------------------------- engine


class OnnxCausalEngine:
    """A causal LM's body on ONNX Runtime, its vocabulary projection on the torch model."""

    name = "onnxruntime"

    def __init__(self, model: Any, path: Path, threads: int, *, spinning: bool = False) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3
        # ONNX Runtime's pool threads spin after each run by default. A worker's threads
        # take all the cores they are given (cores ÷ workers), so the spinning took the CPU
        # from the bot process just when it had a reply to route and the next batch to
        # send: off, the service went from 0.86 to 0.94 of in-process ONNX Runtime at
        # concurrency 1 and from 0.86 to 1.05 at 8 (same run, this project's 2 cores).
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.head = model.get_output_embeddings()
        self.path = path

    def logits(self, enc: dict[str, torch.Tensor], keep: int) -> torch.Tensor:
        """Logits of the last ``keep`` positions, as the torch model would give them."""
        feeds = {
            "input_ids": enc["input_ids"].cpu().numpy(),
            "attention_mask": enc["attention_mask"].cpu().numpy().astype("int64"),
        }
        if "position_ids" in self.inputs:
            feeds["position_ids"] = _position_ids(enc["attention_mask"]).cpu().numpy()
        (hidden,) = self.session.run(["hidden"], feeds)
        last = torch.from_numpy(hidden[:, -keep:, :])
        return self.head(last).float()


def verify(model: Any, tokenizer: Any, engine: OnnxCausalEngine) -> float:
    """Largest probability difference between the engine and the torch model on probe batches."""
    worst = 0.0
    with torch.inference_mode():
        for texts in (list(_PROBE_TEXTS), [_PROBE_TEXTS[2]], [_PROBE_TEXTS[1]]):
            enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
            enc = {k: enc[k] for k in ("input_ids", "attention_mask")}
            kwargs: dict[str, Any] = dict(enc)
            if _accepts(model, "position_ids"):
                kwargs["position_ids"] = _position_ids(enc["attention_mask"])
            reference = model(**kwargs).logits[:, -4:, :].float().softmax(-1)
            got = engine.logits(enc, 4).softmax(-1)
            real = enc["attention_mask"][:, -4:].bool()  # padding positions mean nothing
            worst = max(worst, float((reference - got).abs()[real].max()))
    return worst


def build_onnx_engine(
    model: Any, tokenizer: Any, cache_dir: Path, threads: int, *, spinning: bool = False
) -> OnnxCausalEngine | None:
    """Export (once), open and verify the engine; None (with a log line) if it cannot be used.

    ``spinning``: ONNX Runtime's default thread spinning, for a process that runs nothing
    else (the benchmark's in-process peer); workers run without it.
    """
    try:
        path = export_onnx(model, tokenizer, cache_dir)
        engine = OnnxCausalEngine(model, path, threads, spinning=spinning)
        worst = verify(model, tokenizer, engine)
    except Exception as exc:  # any failure leaves the role on torch, which is always correct
        log.warning("ONNX Runtime engine unavailable for %s, staying on torch: %s", type(model).__name__, exc)
        return None
    if worst > VERIFY_PROB_TOL:
        log.warning(
            "ONNX Runtime engine for %s differs from torch by %.2g in probability (limit %.0e); staying on torch",
            type(model).__name__,
            worst,
            VERIFY_PROB_TOL,
        )
        return None
    log.info("ONNX Runtime engine ready for %s (max |Δp| vs torch %.1e)", type(model).__name__, worst)
    return engine


def build_in_background(model: Any, tokenizer: Any, cache_dir: Path, threads: int) -> Future[OnnxCausalEngine | None]:
    """Start building the engine in a daemon thread; torch keeps answering meanwhile."""
    future: Future[OnnxCausalEngine | None] = Future()
    # Imported here, in the worker's own thread: module imports racing between threads are
    # where libraries with lazy imports break.
    import onnxruntime  # noqa: F401
    import torch.onnx  # noqa: F401

    def run() -> None:
        try:
            future.set_result(build_onnx_engine(model, tokenizer, cache_dir, threads))
        except BaseException as exc:  # pragma: no cover - build_onnx_engine catches Exception
            future.set_exception(exc)

    threading.Thread(target=run, name="lmbot-engine-build", daemon=True).start()
    return future
