"""Stats: /stats for owners, the Prometheus endpoint, `lmbot stats`, `lmbot models`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from bot.commands import Context, User
from bot.inference.protocol import NextToken


async def test_stats_is_owner_only_and_counts_requests(app_factory, tiny_gpt2: Path) -> None:  # type: ignore[no-untyped-def]
    app = app_factory({"causal_lm": tiny_gpt2})
    stranger = Context(User("42", "someone"), app, transport="test")
    refused = await app.execute("stats", {}, stranger)
    assert refused.error and "owners only" in refused.text
    await asyncio.gather(*(app.inference.submit(NextToken(f"hello {i}")) for i in range(5)))
    reply = await app.execute_line("/stats")
    assert not reply.error
    row = reply.data["tasks"]["next_token"]
    assert row["ok"] == 5
    assert row["batch_size_mean"] >= 1
    assert reply.table is not None and reply.table.rows[0][0] == "next_token"
    # Each column is said in words: p50/p95 are a request's whole time, compute is a batch's.
    for column in reply.table.headers[3:]:
        assert f"{column} = " in reply.text or f"{column}/" in reply.text
    assert "loading a model" in reply.text


async def test_prometheus_endpoint_and_lmbot_stats(  # type: ignore[no-untyped-def]
    config_factory, tiny_gpt2: Path, tmp_path: Path, held_port
) -> None:
    from bot.inference.client import LocalInferenceClient
    from tests.conftest import ROLES

    port = held_port()
    client = LocalInferenceClient(config_factory({"causal_lm": tiny_gpt2}, metrics_port=port), ROLES)
    await client.start()
    try:
        await asyncio.gather(*(client.submit(NextToken(f"x {i}")) for i in range(3)))
        url = f"http://127.0.0.1:{port}/metrics"
        text = await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=5).read().decode())
        assert 'lmbot_requests_total{outcome="ok",task="next_token"} 3.0' in text
        assert "lmbot_batch_size_bucket" in text
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "bot.frontends.cli", "stats", "--port", str(port), "--json"],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["tasks"]["next_token"]["ok"] == 3
    finally:
        await client.close()


# `lmbot models` fits its table to COLUMNS when set (it may be, in a test run): wide enough for one row a line.
WIDE = dict(os.environ, COLUMNS="1000")


def test_lmbot_models_lists_roles_and_where_they_resolve(tmp_path: Path, cache_dir: Path, tiny_gpt2: Path) -> None:
    (tmp_path / "config.toml").write_text(
        f'[inference]\ncache_dir = "{cache_dir}"\noffline = "always"\n[models]\ncausal_lm = "{tiny_gpt2}"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "bot.frontends.cli", "models"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, env=WIDE
    )
    assert done.returncode == 0, done.stderr
    lines = {line.split()[0]: line for line in done.stdout.splitlines()[2:]}
    assert "tiny-gpt2" in lines["causal_lm"]
    assert "all-MiniLM-L6-v2 (offline stand-in" in lines["embedder"]
    assert "missing: offline, and bert-base-uncased is not on this machine" in lines["masked_lm"]
    # The engine and precision each role will run in (CPU here: fp32 on ONNX Runtime once built).
    assert "fp32, onnxruntime once warm" in lines["causal_lm"] and "fp32, torch" in lines["embedder"]
    (tmp_path / "config.toml").write_text(
        f'[inference]\ncache_dir = "{cache_dir}"\noffline = "always"\ndevice = "cpu"\ndtype = "bfloat16"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "bot.frontends.cli", "models"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, env=WIDE
    )
    assert done.returncode == 0, done.stderr
    lines = {line.split()[0]: line for line in done.stdout.splitlines()[2:]}
    assert "bf16, torch" in lines["causal_lm"] and "onnxruntime" not in done.stdout


async def test_lmbot_health_reports_a_running_service(  # type: ignore[no-untyped-def]
    config_factory, tiny_gpt2: Path, tmp_path: Path, held_port
) -> None:
    from bot.inference.client import LocalInferenceClient
    from tests.conftest import ROLES

    def health(port: int) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "bot.frontends.cli", "health", "--port", str(port)],
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )

    port = held_port()
    client = LocalInferenceClient(config_factory({"causal_lm": tiny_gpt2}, metrics_port=port), ROLES)
    await client.start()
    try:
        await client.wait_ready()
        done = await asyncio.to_thread(health, port)
        assert done.returncode == 0, done.stdout
        assert done.stdout.startswith("healthy: config valid, 1 worker(s) alive, 0 queued")
    finally:
        await client.close()
    # The metrics endpoint outlives the workers it reports on: stopped workers are unhealthy.
    done = await asyncio.to_thread(health, port)
    assert done.returncode == 1 and "no inference worker is alive" in done.stdout
    nobody = await asyncio.to_thread(health, held_port())
    assert nobody.returncode == 1 and "no bot answers" in nobody.stdout


def test_a_packaged_quantised_stand_in_says_its_weights_are_quantised() -> None:
    """SmolLM2 ships as a Q4_1 GGUF file, widened to fp32 when loaded: the label every reply shows
    says the weights are quantised, so no student takes its numbers for the full-precision model's."""
    from bot.inference.registry import BUILTIN_ROLES, resolve

    causal = next(role for role in BUILTIN_ROLES if role.name == "causal_lm")
    source = resolve(causal, None, "always")
    assert source.kind == "packaged", source
    assert "from Q4_1 quantised weights (offline stand-in for gpt2)" in source.label, source.label
