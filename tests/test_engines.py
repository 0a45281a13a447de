"""Engines and precisions: the ONNX Runtime engine's numbers against transformers (fp32 within
1e-5, batched and alone), its fallback to torch, the labels that say what answered, the bf16
mode's bound against fp32, the disk copy workers share, and threads per worker."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import transformers

from bot.inference.protocol import NextToken, Score
from bot.inference.registry import BUILTIN_ROLES, runs_as
from bot.inference.settings import WorkerSettings
from bot.worker import engines, loading, tasks
from tests.conftest import ROLES, make_config

TOL = 1e-5
PROMPTS = [
    "The capital of France is",
    "Hi",
    "A much longer prompt, so that the others need padding: one two three four five",
    "  spaces, émojis 🙂 and 東京",
]
# bf16 keeps 8 mantissa bits; on SmolLM2 the issue measured max |Δp| 0.033 over 64 prompts.
BF16_MAX_ABS_DP = 0.05


def engine_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where exports are kept: LMBOT_TEST_MODEL_CACHE when set (SmolLM2's export takes ~40 s)."""
    kept = os.environ.get("LMBOT_TEST_MODEL_CACHE")
    return Path(kept) if kept else tmp_path_factory.mktemp("engines")


def load(path: Path) -> tuple[torch.nn.Module, transformers.PreTrainedTokenizerBase]:
    tok = transformers.AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), tok


@pytest.fixture(scope="module", params=["tiny_gpt2", "tiny_llama", "smollm_dir"])
def with_engine(request, tmp_path_factory):  # type: ignore[no-untyped-def]
    model, tok = load(request.getfixturevalue(request.param))
    engine = engines.build_onnx_engine(model, tok, engine_cache(tmp_path_factory), threads=1)
    assert engine is not None, "the ONNX Runtime engine should build and verify on this model"
    # A worker's pool threads must not spin between runs: they would take the bot process's CPU.
    options = engine.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    engines.attach(model, engine)
    yield model, tok, engine
    engines.attach(model, None)


def count_engine_calls(engine, monkeypatch) -> list[int]:  # type: ignore[no-untyped-def]
    calls: list[int] = []
    original = engine.logits

    def counted(enc, keep):  # type: ignore[no-untyped-def]
        calls.append(keep)
        return original(enc, keep)

    monkeypatch.setattr(engine, "logits", counted)
    return calls


@torch.inference_mode()
def test_engine_next_token_equals_transformers_batched_and_alone(with_engine, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    model, tok, engine = with_engine
    calls = count_engine_calls(engine, monkeypatch)
    batch = [NextToken(p, k=5, temperature=t) for p, t in zip(PROMPTS, (1.0, 0.7, 1.3, 1.0), strict=True)]
    together = tasks.next_token(model, tok, batch)
    for request, batched in zip(batch, together, strict=True):
        alone = tasks.next_token(model, tok, [request])[0]
        logits = model(**tok(request.text, return_tensors="pt")).logits[0, -1]  # torch, as the course does it
        probs = torch.softmax(logits / request.temperature, -1)
        top = torch.topk(probs, 5)
        assert [t.id for t in batched.top] == top.indices.tolist() == [t.id for t in alone.top]
        for got_b, got_a, want in zip(batched.top, alone.top, top.values.tolist(), strict=True):
            assert abs(got_b.prob - want) < TOL and abs(got_a.prob - want) < TOL
        entropy = -(probs * probs.clamp_min(1e-30).log2()).sum().item()
        assert abs(batched.entropy_bits - entropy) < 1e-3
    assert len(calls) == 1 + len(batch), "next_token should have run on the engine"


@torch.inference_mode()
def test_engine_score_equals_transformers_batched_and_alone(with_engine, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    model, tok, engine = with_engine
    calls = count_engine_calls(engine, monkeypatch)
    batch = [Score(" Paris.", context="The capital of France is"), Score("Hello there, friend"), Score(" x")]
    together = tasks.score(model, tok, batch)
    for request, got in zip(batch, together, strict=True):
        start = tasks.document_start_id(tok)
        ctx = tok(request.context, add_special_tokens=False)["input_ids"] if request.context else [start]
        text = tok(request.text, add_special_tokens=False)["input_ids"]
        logp = torch.log_softmax(model(torch.tensor([ctx + text])).logits[0].float(), -1)
        want = [logp[len(ctx) - 1 + i, t].item() for i, t in enumerate(text)]
        assert got.logprobs == pytest.approx(want, rel=TOL, abs=TOL)
        assert tasks.score(model, tok, [request])[0].logprobs == pytest.approx(want, rel=TOL, abs=TOL)
    assert calls, "score should have run on the engine"


def test_engine_export_is_cached_and_keyed_by_the_weights(tiny_llama: Path, tmp_path: Path) -> None:
    model, tok = load(tiny_llama)
    first = engines.export_onnx(model, tok, tmp_path)
    stamp = first.stat().st_mtime_ns
    assert engines.export_onnx(model, tok, tmp_path) == first and first.stat().st_mtime_ns == stamp
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)  # lm_head is tied to the embeddings: the body changes too
    assert engines.export_onnx(model, tok, tmp_path) != first


def test_engine_that_disagrees_with_torch_is_not_used(tiny_llama: Path, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    model, tok = load(tiny_llama)
    monkeypatch.setattr(engines, "VERIFY_PROB_TOL", -1.0)  # any difference at all is too much
    assert engines.build_onnx_engine(model, tok, tmp_path, threads=1) is None


def test_engine_that_cannot_export_falls_back_to_torch(tiny_gpt2: Path, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    model, tok = load(tiny_gpt2)

    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("unsupported operator")

    monkeypatch.setattr(torch.onnx, "export", broken)
    assert engines.build_onnx_engine(model, tok, tmp_path, threads=1) is None
    settings = WorkerSettings(
        roles=ROLES, models={"causal_lm": str(tiny_gpt2)}, offline="always", cache_dir=str(tmp_path)
    )
    cache = loading.ModelCache(settings)
    assert cache.wait_for_engine("causal_lm").endswith("· fp32, torch")
    entry = cache.get("causal_lm")
    assert engines.engine_of(entry.model) is None and entry.wanted_engine == "torch"
    with torch.inference_mode():  # and it still answers, on torch
        assert tasks.next_token(entry.model, entry.tokenizer, [NextToken("Hi", k=3)])[0].top


def worker_settings(model_dir: Path, cache_dir: Path, **extra: object) -> WorkerSettings:
    config = make_config(cache_dir, {"causal_lm": model_dir}, **extra)
    return WorkerSettings.from_config(config, ROLES)


def test_model_cache_switches_engine_between_batches_and_says_so(tiny_llama: Path, tmp_path: Path) -> None:
    cache = loading.ModelCache(worker_settings(tiny_llama, tmp_path, dtype="float32"))
    entry = cache.get("causal_lm")
    assert entry.label.endswith("· fp32, torch") and entry.pending_engine is None  # a first request never waits
    for _ in range(loading.ENGINE_AFTER_BATCHES):
        cache.get("causal_lm")
    assert entry.pending_engine is not None or entry.engine == "onnxruntime"  # built in the background now
    label = cache.wait_for_engine("causal_lm")
    assert label.startswith(entry.base_label) and label.endswith("· fp32, onnxruntime")
    assert engines.engine_of(entry.model) is not None
    described = cache.describe()["causal_lm"]
    assert (described["precision"], described["engine"], described["label"]) == ("fp32", "onnxruntime", label)


def test_preloaded_role_builds_its_engine_at_once(tiny_gpt2: Path, tmp_path: Path) -> None:
    cache = loading.ModelCache(worker_settings(tiny_gpt2, tmp_path, preload=["causal_lm"]))
    entry = cache.get("causal_lm")
    assert entry.pending_engine is not None
    entry.pending_engine.result(300)


def test_engine_setting_torch_keeps_torch(tiny_gpt2: Path, tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("LMBOT_ENGINE", "torch")
    cache = loading.ModelCache(worker_settings(tiny_gpt2, tmp_path))
    assert cache.wait_for_engine("causal_lm").endswith("· fp32, torch")
    assert engines.engine_of(cache.get("causal_lm").model) is None


def test_runs_as_says_precision_and_engine_without_torch(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.delenv("LMBOT_ENGINE", raising=False)
    roles = {r.name: r for r in BUILTIN_ROLES}
    assert runs_as(roles["causal_lm"], "cpu", "auto") == "fp32, onnxruntime once warm (torch until then)"
    assert runs_as(roles["causal_lm"], "cpu", "bfloat16") == "bf16, torch"
    assert runs_as(roles["masked_lm"], "cpu", "float32") == "fp32, torch"
    assert runs_as(roles["causal_lm"], "cuda", "auto") == "bf16 or fp16 (GPU), torch"
    monkeypatch.setenv("LMBOT_ENGINE", "torch")
    assert runs_as(roles["causal_lm"], "cpu", "auto") == "fp32, torch"


def test_auto_precision_on_cpu_is_fp32() -> None:
    # Even with native bf16: the bot shows a model's real numbers unless asked otherwise.
    assert loading.pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert loading.pick_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16


def test_default_threads_divide_the_cores_between_workers(tiny_gpt2: Path, tmp_path: Path) -> None:
    cores = engines.cpu_cores()
    assert engines.default_threads(0, 1) == cores
    assert engines.default_threads(0, 2) == max(1, cores // 2)
    assert engines.default_threads(0, 64) == 1
    assert engines.default_threads(3, 2) == 3  # inference.threads wins
    before = torch.get_num_threads()
    try:
        cache = loading.ModelCache(worker_settings(tiny_gpt2, tmp_path, workers=2))
        assert cache.threads == torch.get_num_threads() == max(1, cores // 2)
        cache = loading.ModelCache(worker_settings(tiny_gpt2, tmp_path, workers=2, threads=3))
        assert cache.threads == torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


def mapped_files() -> set[str]:
    with open("/proc/self/maps") as handle:
        return {line.split(maxsplit=5)[-1].strip() for line in handle if "/" in line}


def safetensors_dtypes(folder: Path) -> set[str]:
    found: set[str] = set()
    for path in folder.glob("*.safetensors"):
        with open(path, "rb") as handle:
            header = json.loads(handle.read(int.from_bytes(handle.read(8), "little")))
        found |= {v["dtype"] for k, v in header.items() if k != "__metadata__"}
    return found


def test_bf16_copy_is_stored_once_and_mapped_not_copied(tiny_llama: Path, tmp_path: Path) -> None:
    settings = worker_settings(tiny_llama, tmp_path, dtype="bfloat16")
    role = ROLES["causal_lm"]
    from bot.inference.registry import resolve

    entry = loading.load_source(resolve(role, str(tiny_llama), "always"), role.auto_class, settings)
    copies = list((tmp_path / "precision").iterdir())
    assert len(copies) == 1 and safetensors_dtypes(copies[0]) == {"BF16"}
    assert next(entry.model.parameters()).dtype == torch.bfloat16
    assert entry.label.endswith("· bf16, torch")
    # The weights are pages of the cached file (shared by every worker), not private copies.
    assert any(name.startswith(str(copies[0].resolve())) for name in mapped_files())
    # The next load reuses the copy.
    loading.load_source(resolve(role, str(tiny_llama), "always"), role.auto_class, settings)
    assert list((tmp_path / "precision").iterdir()) == copies


def test_fp32_model_stored_in_fp32_is_used_in_place(tiny_gpt2: Path, tmp_path: Path) -> None:
    assert loading._precision_copy(tiny_gpt2, transformers.AutoModelForCausalLM, torch.float32, tmp_path) == tiny_gpt2


@torch.inference_mode()
def test_bf16_stays_within_its_bound_of_fp32_on_smollm(smollm_dir: Path, tmp_path: Path) -> None:
    role = ROLES["causal_lm"]
    from bot.inference.registry import resolve

    loaded = {}
    for dtype in ("float32", "bfloat16"):
        settings = worker_settings(smollm_dir, tmp_path, dtype=dtype)
        loaded[dtype] = loading.load_source(resolve(role, str(smollm_dir), "always"), role.auto_class, settings)
    fp32, bf16 = loaded["float32"], loaded["bfloat16"]
    assert bf16.label.endswith("· bf16, torch") and fp32.label.endswith("· fp32, torch")
    prompts = [f"The {w} of France is" for w in ("capital", "language", "currency", "flag", "largest river")]
    batch = [NextToken(p, k=5) for p in [*prompts, *PROMPTS]]
    got = tasks.next_token(bf16.model, bf16.tokenizer, batch)
    worst, agree = 0.0, 0
    for request, result in zip(batch, got, strict=True):
        enc = fp32.tokenizer(request.text, return_tensors="pt")
        want = torch.softmax(fp32.model(**enc).logits[0, -1], -1)
        worst = max(worst, max(abs(t.prob - float(want[t.id])) for t in result.top))
        agree += result.top[0].id == int(want.argmax())
    assert worst <= BF16_MAX_ABS_DP
    assert agree >= len(batch) - 1  # the top token may flip only where two are nearly tied
    assert worst > 0  # it really ran in bf16
