"""Benchmark: next-token top-5 on the offline causal LM, every way side by side.

In-process ways (no service):
(a) one forward per request, the way the course snippet does it (full logits,
    no batching), served one request at a time;
(b) torch fp32: padded batched forwards with the service's own task function
    (c prompts per forward at concurrency c), the old "ceiling";
ONNX Runtime fp32: the same weights exported once (cached), padded batches;
torch bf16: (b) on a bfloat16 copy.

The service end to end (the asyncio client, the queue, a worker process):
c_exact: the default, fp32 (on ONNX Runtime once its engine is built);
c_fp32_torch: fp32 on torch (LMBOT_ENGINE=torch), the service as it was;
c_bf16: inference.dtype = "bfloat16";
(d) with --ray, the same client on Ray Serve (one replica on a local Ray instance, given the
    machine's cores as the local worker has them), in trials alternating with a (c) of its own,
    with the Ray path's breakdown in ms (where a request's time goes) and the ratios d/c;
    --ray-only runs just that part. Run it in a loopback-only namespace:
    unshare -n sh -c 'ip link set lo up && python bench/inference.py --ray'.

All ways but (a) and (d) run in one process tree in interleaved trials (the order
rotates each trial) and the median trial is shown, so ratios compare like with like
on a shared machine. Then an open loop (Poisson arrivals at --rate req/s) against one
worker, two workers with default threads (cores ÷ workers) and two with 2 threads
each, with two workers' RSS/PSS; then each way's fidelity against fp32 torch
(max |Δp|, top-1 agreement). The last line is one JSON object with every figure.

    python bench/inference.py [--rounds 1] [--trials 3] [--concurrency 1 8 64] [--rate 20]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The same OpenMP spin as the service's workers, so (a), (b) and (c) run torch alike.
os.environ.setdefault("GOMP_SPINCOUNT", "20000")

SUBJECTS = ["France", "Japan", "Brazil", "Kenya", "Canada", "Norway", "Egypt", "India"]
TEMPLATES = [
    "The capital of {} is",
    "The most popular sport in {} is",
    "A traveller visiting {} for the first time should",
    "The official language of {} is",
    "In winter, the weather in {} is usually",
    "The currency used in {} is called the",
    "One famous dish from {} is",
    "Students in {} usually start school at the age of",
]
PROMPTS = [t.format(s) for t in TEMPLATES for s in SUBJECTS]  # 64 distinct prompts


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def closed_loop(call: Callable[[str], Awaitable[object]], concurrency: int, rounds: int) -> dict[str, float]:
    """``concurrency`` clients, each sending its next prompt as soon as the last one is answered."""
    work = [p for _ in range(rounds) for p in PROMPTS]
    latencies: list[float] = []

    async def client() -> None:
        while work:
            prompt = work.pop()
            started = time.perf_counter()
            await call(prompt)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    return {
        "req_s": len(latencies) / elapsed,
        "p50_ms": 1000 * percentile(latencies, 0.5),
        "p99_ms": 1000 * percentile(latencies, 0.99),
    }


def way_a(model, tokenizer, concurrency: int, rounds: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """The course snippet per request; one model serves one request at a time."""
    import torch

    lock = threading.Lock()

    def one(prompt: str) -> list[tuple[int, float]]:
        with lock, torch.no_grad():
            inputs = tokenizer(prompt, return_tensors="pt")
            logits = model(**inputs).logits[:, -1, :]
            probs = torch.nn.functional.softmax(logits, dim=-1)
            top = torch.topk(probs, 5)
            return list(zip(top.indices[0].tolist(), top.values[0].tolist(), strict=True))

    async def call(prompt: str) -> object:
        return await asyncio.to_thread(one, prompt)

    return asyncio.run(closed_loop(call, concurrency, rounds))


def median_trial(trials: list[dict[str, float]]) -> dict[str, float]:
    """The trial with the median throughput (its latencies come with it)."""
    return sorted(trials, key=lambda t: t["req_s"])[len(trials) // 2]


def raw_batches(run: Callable[[list[str]], object], concurrency: int, rounds: int) -> dict[str, float]:
    """Padded batches of ``concurrency`` prompts through ``run``, in-process, nothing else."""
    import torch

    work = [p for _ in range(rounds) for p in PROMPTS]
    latencies: list[float] = []
    started = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(work), concurrency):
            batch_started = time.perf_counter()
            chunk = work[i : i + concurrency]
            run(chunk)
            latencies += [time.perf_counter() - batch_started] * len(chunk)
    elapsed = time.perf_counter() - started
    return {
        "req_s": len(work) / elapsed,
        "p50_ms": 1000 * percentile(latencies, 0.5),
        "p99_ms": 1000 * percentile(latencies, 0.99),
    }


def task_runner(model, tokenizer) -> Callable[[list[str]], object]:  # type: ignore[no-untyped-def]
    """The service's own next-token task on a model in this process: ways (b) and bf16."""
    from bot.inference.protocol import NextToken
    from bot.worker.tasks import next_token

    return lambda texts: next_token(model, tokenizer, [NextToken(t, k=5) for t in texts])


def peer_runner(engine, tokenizer) -> Callable[[list[str]], object]:  # type: ignore[no-untyped-def]
    """ONNX Runtime on the same weights (the cached export), padded batches, top-5 of the last logits."""
    import torch

    def run(texts: list[str]) -> object:
        enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
        probs = engine.logits({k: enc[k] for k in ("input_ids", "attention_mask")}, 1)[:, -1, :].softmax(-1)
        return torch.topk(probs, 5)

    return run


# The services compared: (config overrides, engine). "c_fp32_torch" is the service as it was
# before the ONNX Runtime engine (LMBOT_ENGINE=torch), the figure the bf16 target is set against.
SERVICES: dict[str, tuple[dict[str, object], str, str | None]] = {
    "c_exact": ({}, "auto", "onnxruntime"),
    "c_fp32_torch": ({}, "torch", None),
    "c_bf16": ({"dtype": "bfloat16"}, "auto", None),
}


async def start_service(overrides: dict[str, object], engine: str):  # type: ignore[no-untyped-def]
    """A service with the causal LM preloaded; ``engine`` goes to its workers as LMBOT_ENGINE."""
    from bot.config import parse_config
    from bot.inference.client import create_client
    from bot.inference.registry import BUILTIN_ROLES

    inference = {"offline": "always", "preload": ["causal_lm"], **overrides}
    config = parse_config({"inference": inference, "bot": {"log_level": "WARNING"}})
    client = create_client(config, {r.name: r for r in BUILTIN_ROLES})
    before = os.environ.get("LMBOT_ENGINE")
    os.environ["LMBOT_ENGINE"] = engine  # workers are spawned with a copy of this environment
    try:
        await client.start()
    finally:
        if before is None:
            os.environ.pop("LMBOT_ENGINE", None)
        else:
            os.environ["LMBOT_ENGINE"] = before
    return client


async def warm(client, want: str | None, timeout: float = 1200) -> str:  # type: ignore[no-untyped-def]
    """Send bursts until every answer comes from the wanted engine (each worker builds its own)."""
    from bot.inference.protocol import NextToken

    deadline = time.monotonic() + timeout
    while True:
        results = await asyncio.gather(*(client.submit(NextToken(p, k=5), timeout=600) for p in PROMPTS[:16]))
        labels = {r.model for r in results}
        if want is None or all(want in label for label in labels):
            return sorted(labels)[-1]
        if time.monotonic() > deadline:
            raise RuntimeError(f"the service never switched to {want}: {labels}")
        await asyncio.sleep(2)


def call_of(client) -> Callable[[str], Awaitable[object]]:  # type: ignore[no-untyped-def]
    from bot.inference.protocol import NextToken

    async def call(prompt: str) -> object:
        return await client.submit(NextToken(prompt, k=5), timeout=600)

    return call


async def open_loop(call: Callable[[str], Awaitable[object]], rate: float, count: int, seed: int) -> dict[str, float]:
    """Poisson arrivals at ``rate`` req/s, whatever the service's pace: p50/p99 and served req/s."""
    rng = random.Random(seed)
    latencies: list[float] = []

    async def one(prompt: str) -> None:
        sent = time.perf_counter()
        await call(prompt)
        latencies.append(time.perf_counter() - sent)

    started = time.perf_counter()
    due = 0.0
    tasks = []
    for i in range(count):
        due += rng.expovariate(rate)
        await asyncio.sleep(max(0.0, started + due - time.perf_counter()))
        tasks.append(asyncio.create_task(one(PROMPTS[i % len(PROMPTS)])))
    await asyncio.gather(*tasks)
    elapsed = time.perf_counter() - started
    return {
        "offered_req_s": rate,
        "served_req_s": count / elapsed,
        "p50_ms": 1000 * percentile(latencies, 0.5),
        "p99_ms": 1000 * percentile(latencies, 0.99),
    }


def worker_memory(pids: list[int]) -> list[dict[str, float]]:
    """RSS, PSS and the part shared with other processes (file pages: mmap'd weights), MB."""
    out = []
    for pid in pids:
        fields = {}
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                if rest.strip().endswith("kB"):
                    fields[key] = int(rest.split()[0]) / 1024
        out.append(
            {
                "rss_mb": round(fields.get("Rss", 0), 1),
                "pss_mb": round(fields.get("Pss", 0), 1),
                "shared_mb": round(fields.get("Shared_Clean", 0) + fields.get("Shared_Dirty", 0), 1),
                "private_mb": round(fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0), 1),
            }
        )
    return out


async def service_probs(client) -> list[list[tuple[int, float]]]:  # type: ignore[no-untyped-def]
    from bot.inference.protocol import NextToken

    results = await asyncio.gather(*(client.submit(NextToken(p, k=5), timeout=600) for p in PROMPTS))
    return [[(t.id, t.prob) for t in r.top] for r in results]


async def side_by_side(models, levels: list[int], rounds: int, trials: int) -> dict[str, object]:  # type: ignore[no-untyped-def]
    """Every way at every concurrency in interleaved trials (medians), all in this process tree."""
    fp32, bf16, tokenizer, engine = models
    raw = {
        "b": task_runner(fp32, tokenizer),
        "onnxruntime": peer_runner(engine, tokenizer),
        "torch_bf16": task_runner(bf16, tokenizer),
    }
    clients = {}
    try:
        for name, (overrides, engine_setting, _) in SERVICES.items():
            clients[name] = await start_service(overrides, engine_setting)
        for name, (_, _, want) in SERVICES.items():
            label = await warm(clients[name], want)
            print(f"{name}: {label}", flush=True)
        figures: dict[str, dict[str, dict[str, float]]] = {}
        for n in levels:
            trial_rows: dict[str, list[dict[str, float]]] = {}
            for trial in range(trials):
                order = [*raw, *clients]
                order = order[trial % len(order) :] + order[: trial % len(order)]  # rotate who goes first
                for way in order:
                    if way in raw:
                        row = await asyncio.to_thread(raw_batches, raw[way], n, rounds)
                    else:
                        row = await closed_loop(call_of(clients[way]), n, rounds)
                    trial_rows.setdefault(way, []).append(row)
            figures[str(n)] = {way: median_trial(rows) for way, rows in trial_rows.items()}
            print(
                f"concurrency {n}: " + ", ".join(f"{w} {r['req_s']:.1f}" for w, r in figures[str(n)].items()),
                flush=True,
            )
        service_top5 = {name: await service_probs(client) for name, client in clients.items()}
    finally:
        for client in clients.values():
            await client.close()
    return {"closed": figures, "service_top5": service_top5}


async def workers_open_loop(rate: float, count: int, trials: int) -> dict[str, object]:
    """Open loop at ``rate`` req/s: one worker vs two (default threads) vs two with 2 threads each."""
    setups = {
        "workers_1": {"workers": 1},
        "workers_2": {"workers": 2},
        "workers_2_threads_2": {"workers": 2, "threads": 2},
    }
    clients = {}
    results: dict[str, object] = {}
    try:
        for name, overrides in setups.items():
            clients[name] = await start_service(overrides, "auto")
        for name, client in clients.items():
            print(f"{name}: {await warm(client, 'onnxruntime')}", flush=True)
        rows: dict[str, list[dict[str, float]]] = {}
        for trial in range(trials):
            for name, client in clients.items():
                rows.setdefault(name, []).append(await open_loop(call_of(client), rate, count, seed=trial))
        for name, trial_rows in rows.items():
            results[name] = sorted(trial_rows, key=lambda r: r["p50_ms"])[len(trial_rows) // 2]
        results["memory_workers_2_fp32"] = worker_memory(clients["workers_2"].worker_pids())
    finally:
        for client in clients.values():
            await client.close()
    # Two bf16 workers: their weights come from the bf16 copy cached on disk, mapped by both.
    client = await start_service({"workers": 2, "dtype": "bfloat16"}, "auto")
    try:
        await warm(client, None)
        results["memory_workers_2_bf16"] = worker_memory(client.worker_pids())
    finally:
        await client.close()
    return results


def fidelity(reference, others: dict[str, object], service_top5: dict[str, list[list[tuple[int, float]]]]):  # type: ignore[no-untyped-def]
    """Max |Δp| against fp32 torch (each prompt alone, full vocabulary) and top-1 agreement."""
    out: dict[str, dict[str, float]] = {}
    for name, probs in others.items():
        out[name] = {
            "max_abs_dp": float((probs - reference).abs().max()),  # type: ignore[operator]
            "top1_agree": float((probs.argmax(-1) == reference.argmax(-1)).float().mean()),  # type: ignore[attr-defined]
        }
    for name, rows in service_top5.items():
        worst, agree = 0.0, 0
        for i, top in enumerate(rows):
            worst = max(worst, max(abs(p - float(reference[i, t])) for t, p in top))
            agree += top[0][0] == int(reference[i].argmax())
        out[name] = {"max_abs_dp_top5": worst, "top1_agree": agree / len(rows)}
    return out


def all_probs(run_logits: Callable[[list[str]], object], batch: int) -> object:
    import torch

    with torch.inference_mode():
        rows = [run_logits(PROMPTS[i : i + batch]) for i in range(0, len(PROMPTS), batch)]
    return torch.cat(rows).float().softmax(-1)  # type: ignore[arg-type]


def load_models():  # type: ignore[no-untyped-def]
    """fp32 and bf16 copies of the offline causal LM and the ONNX Runtime engine built from fp32."""
    import torch

    from bot.config import parse_config
    from bot.inference.registry import BUILTIN_ROLES, resolve
    from bot.inference.settings import WorkerSettings
    from bot.worker import engines
    from bot.worker.loading import load_source

    role = next(r for r in BUILTIN_ROLES if r.name == "causal_lm")
    loaded = {}
    for dtype in ("float32", "bfloat16"):
        config = parse_config({"inference": {"offline": "always", "dtype": dtype}})
        settings = WorkerSettings.from_config(config, {"causal_lm": role})
        loaded[dtype] = load_source(resolve(role, None, "always"), role.auto_class, settings)
    fp32 = loaded["float32"]
    # The peer runs as ONNX Runtime's own defaults have it (threads spinning between runs).
    cache = Path(settings.cache_dir)
    engine = engines.build_onnx_engine(fp32.model, fp32.tokenizer, cache, torch.get_num_threads(), spinning=True)
    if engine is None:
        raise SystemExit("the ONNX Runtime engine could not be built (see the log)")
    return fp32, loaded["bfloat16"].model, engine


async def way_c(levels: list[int], rounds: int, backend: str = "local") -> dict[int, dict[str, float]]:
    """The service end to end; ``backend="ray"`` is way (d), the same client on Ray Serve."""
    from bot.config import parse_config
    from bot.inference.client import create_client
    from bot.inference.protocol import NextToken
    from bot.inference.registry import BUILTIN_ROLES

    inference = {"offline": "always", "backend": backend, "ray_num_cpus": 0.5}
    config = parse_config({"inference": inference, "bot": {"log_level": "WARNING"}})
    client = create_client(config, {r.name: r for r in BUILTIN_ROLES})
    await client.start()
    try:
        for prompt in PROMPTS[:8]:  # warm up (and load the model)
            await client.submit(NextToken(prompt, k=5))

        async def call(prompt: str) -> object:
            return await client.submit(NextToken(prompt, k=5))

        return {c: await closed_loop(call, c, rounds) for c in levels}
    finally:
        await client.close()


# ---------------------------------------------------------------------- (d) the service on Ray Serve (--ray)


def cpu_by_process(model_pids: set[int]) -> dict[str, float]:
    """CPU seconds so far: this (bot) process, the model's process, and every other process under this one.

    With a local Ray, everything else under this process is Ray's (GCS, raylet, Serve's
    controller, idle workers) or the other way's model process, which is idle meanwhile.
    """
    import psutil

    me = psutil.Process()
    used = {"bot": sum(me.cpu_times()[:2]), "model": 0.0, "ray_daemons": 0.0}
    for child in me.children(recursive=True):
        try:
            seconds = sum(child.cpu_times()[:2])
        except psutil.Error:  # exited meanwhile
            continue
        used["model" if child.pid in model_pids else "ray_daemons"] += seconds
    return used


async def ray_vs_local(levels: list[int], rounds: int, trials: int) -> dict[str, object]:
    """(d) the client on Ray Serve against (c) the local workers, in alternating trials.

    Both serve the same model at once; each trial of one is followed by a trial of the
    other, so the ratio d/c compares them on the same machine. The replica gets the
    machine's cores (Ray sets its torch threads from ``ray_num_cpus``), as the local
    worker has them. Each result carries the replica's timestamps, so the Ray trial also
    says where a request's time went (median ms per stage, ``RayInferenceClient.breakdown``).
    """
    import statistics
    from typing import Any

    from bot.config import parse_config
    from bot.inference.client import InferenceClient, LocalInferenceClient, create_client
    from bot.inference.protocol import NextToken
    from bot.inference.ray_backend import RayInferenceClient
    from bot.inference.registry import BUILTIN_ROLES

    roles = {r.name: r for r in BUILTIN_ROLES}
    cores = os.cpu_count() or 2

    def make(backend: str) -> InferenceClient:
        inference = {"offline": "always", "backend": backend, "ray_num_cpus": cores}
        return create_client(parse_config({"inference": inference, "bot": {"log_level": "WARNING"}}), roles)

    on_ray, local = make("ray"), make("local")
    assert isinstance(on_ray, RayInferenceClient) and isinstance(local, LocalInferenceClient)
    clients = {"c": local, "d": on_ray}
    figures: dict[str, dict[str, Any]] = {}
    try:
        for client in clients.values():
            await client.start()
            for prompt in PROMPTS[:8]:  # warm up (and load the model)
                await client.submit(NextToken(prompt, k=5))
        # Who used the CPU while each way ran: the bot process, the model's process (worker or
        # replica) and Ray's own processes (GCS, raylet, Serve's controller, ...: the rest).
        model_pids = {"c": set(local.worker_pids()), "d": set(await on_ray.replica_pids("causal_lm"))}
        print(f"\n{'conc':>4}  {'way':<22} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8}   (d vs c, alternating trials)")
        for n in levels:
            runs: dict[str, list[dict[str, float]]] = {"c": [], "d": []}
            breakdowns: list[dict[str, float]] = []
            cpu = {way: {"bot": 0.0, "model": 0.0, "ray_daemons": 0.0, "wall": 0.0} for way in clients}
            for _ in range(trials):
                for way, client in clients.items():

                    async def call(prompt: str, client: InferenceClient = client) -> object:
                        return await client.submit(NextToken(prompt, k=5))

                    before, started = cpu_by_process(model_pids[way]), time.perf_counter()
                    runs[way].append(await closed_loop(call, n, rounds))
                    after = cpu_by_process(model_pids[way])
                    cpu[way]["wall"] += time.perf_counter() - started
                    for part in ("bot", "model", "ray_daemons"):
                        cpu[way][part] += after[part] - before[part]
                    if way == "d":
                        breakdowns.append(on_ray.breakdown(last=len(PROMPTS) * rounds))
            c, d = median_trial(runs["c"]), median_trial(runs["d"])
            breakdown = breakdowns[runs["d"].index(d)]
            level = {
                "c": c,
                "d": d,
                "d_over_c": d["req_s"] / c["req_s"],
                "d_p50_added_ms": d["p50_ms"] - c["p50_ms"],
                "ray_breakdown_ms": breakdown,
                # cores in use on average while each way ran (2.0 = both cores of this machine)
                "cpu_cores": {
                    way: {part: used[part] / used["wall"] for part in ("bot", "model", "ray_daemons")}
                    for way, used in cpu.items()
                },
            }
            figures[str(n)] = level
            for way, row in (("c) local workers", c), ("d) service on Ray", d)):
                print(f"{n:>4}  {way:<22} {row['req_s']:7.1f} {row['p50_ms']:8.1f} {row['p99_ms']:8.1f}")
            print(
                f"      d/c {level['d_over_c']:.2f}x throughput; Ray adds {level['d_p50_added_ms']:+.1f} ms p50; "
                f"mean batch {breakdown.get('batch_size_mean', 0):.1f}"
            )
            stages = [k for k in breakdown if k not in ("batch_size_mean", "requests")]
            print("      Ray path, median ms: " + ", ".join(f"{k} {breakdown[k]:.1f}" for k in stages))
            for way, used in level["cpu_cores"].items():
                print(f"      cores used during ({way}): " + ", ".join(f"{k} {v:.2f}" for k, v in used.items()))
        if "1" in figures:
            # The same prompt through both, one after the other (order alternating), 64 times: the
            # median of the differences is what Ray adds, with the host's swings mostly cancelled.
            added = []
            for i, prompt in enumerate(PROMPTS):
                took = {}
                for way in ("c", "d") if i % 2 else ("d", "c"):
                    started = time.perf_counter()
                    await clients[way].submit(NextToken(prompt, k=5))
                    took[way] = time.perf_counter() - started
                added.append(1000 * (took["d"] - took["c"]))
            paired = statistics.median(added)
            figures["1"]["d_added_ms_paired"] = paired
            figures["1"]["ray_breakdown_ms_paired"] = on_ray.breakdown(last=len(PROMPTS))
            print(f"      paired, one request at a time: Ray adds {paired:+.1f} ms (median of 64 differences)")
    finally:
        for client in clients.values():
            await client.close()
    targets = {}
    if "64" in figures:
        targets["d >= 0.8 c at 64"] = figures["64"]["d_over_c"] >= 0.8
    if "1" in figures:
        targets["d adds <= 10 ms p50 at 1"] = figures["1"]["d_p50_added_ms"] <= 10
    for name, met in targets.items():
        print(f"target {name}: {'met' if met else 'NOT met'}")
    return {"ray": {**figures, "targets_met": targets, "replica_cpus": cores}}


def bot_rss_mb() -> float:
    """RSS of a bot process: config, plugins, commands and a started service, no models."""
    probe = (
        "import asyncio, sys\n"
        "from bot.app import App\nfrom bot.config import parse_config\n"
        "async def main():\n"
        "    app = App(parse_config({'bot': {'log_level': 'WARNING'}}))\n"
        "    await app.inference.start()\n"
        "    await app.execute_line('/help')\n"
        "    rss = next(l for l in open('/proc/self/status') if l.startswith('VmRSS'))\n"
        "    print(int(rss.split()[1]) / 1024, 'torch' in sys.modules)\n"
        "    await app.close()\n"
        "asyncio.run(main())\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    rss, torch_loaded = out.stdout.split()
    assert torch_loaded == "False", "the bot process imported torch"
    return float(rss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=1, help="times each of the 64 prompts is sent per trial")
    parser.add_argument("--trials", type=int, default=3, help="interleaved trials of every way; medians shown")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--rate", type=float, default=20.0, help="open loop: offered requests per second")
    parser.add_argument("--open-requests", type=int, default=200, help="open loop: requests per trial")
    parser.add_argument("--ray", action="store_true", help="also (d): the service on a local Ray Serve, against (c)")
    parser.add_argument("--ray-only", action="store_true", help="only (d) against (c), with the Ray breakdown")
    args = parser.parse_args()
    levels = args.concurrency
    ray_figures = asyncio.run(ray_vs_local(levels, args.rounds, args.trials)) if args.ray or args.ray_only else {}
    if args.ray_only:
        print(json.dumps(ray_figures))
        return
    import torch

    print(
        f"{len(PROMPTS)} prompts, next-token top-5; median of {args.trials} interleaved trials of {args.rounds} "
        f"round(s) at concurrency {levels}; (a): 1 round; open loop: {args.open_requests} requests at "
        f"{args.rate:g} req/s; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )
    fp32, bf16_model, engine = load_models()
    model, tokenizer, label = fp32.model, fp32.tokenizer, fp32.base_label
    print(f"model: {label}", flush=True)
    way_a(model, tokenizer, 1, 1)  # warm up
    # (a) serves one request at a time whatever the concurrency; one round keeps the run short.
    a = {n: way_a(model, tokenizer, n, 1) for n in levels}
    side = asyncio.run(side_by_side((model, bf16_model, tokenizer, engine), levels, args.rounds, args.trials))
    closed: dict[str, dict[str, dict[str, float]]] = side["closed"]  # type: ignore[assignment]
    print("open loop ...", flush=True)
    opened = asyncio.run(workers_open_loop(args.rate, args.open_requests, max(1, args.trials - 1)))

    def alone(m: object) -> Callable[[list[str]], object]:
        return lambda texts: m(**tokenizer(texts, return_tensors="pt")).logits[:, -1, :]  # type: ignore[operator]

    def padded(run: Callable[[list[str]], object]) -> Callable[[list[str]], object]:
        def go(texts: list[str]) -> object:
            enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="left")
            return run({k: enc[k] for k in ("input_ids", "attention_mask")})  # type: ignore[arg-type]

        return go

    from bot.worker.tasks import _causal_forward

    reference = all_probs(alone(model), 1)
    fid = fidelity(
        reference,
        {
            "b": all_probs(padded(lambda enc: _causal_forward(model, enc, 1)[:, -1, :]), 64),
            "onnxruntime": all_probs(padded(lambda enc: engine.logits(enc, 1)[:, -1, :]), 64),
            "torch_bf16": all_probs(padded(lambda enc: _causal_forward(bf16_model, enc, 1)[:, -1, :]), 64),
        },
        side["service_top5"],  # type: ignore[arg-type]
    )
    rss = bot_rss_mb()

    figures: dict[str, object] = {
        "model": label,
        "prompts": len(PROMPTS),
        "rounds": args.rounds,
        "trials": args.trials,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "native_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
        "rss_mb": rss,
        "open_loop": opened,
        "fidelity": fid,
    }
    names = {
        "a": "a) one forward each",
        "b": "b) torch fp32 batch",
        "onnxruntime": "ONNX Runtime fp32",
        "torch_bf16": "torch bf16 batch",
        "c_fp32_torch": "c) service fp32 torch",
        "c_exact": "c) service exact",
        "c_bf16": "c) service bf16",
        "d": "d) service on Ray",
    }
    print(f"\n{'conc':>4}  {'way':<24} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8}")
    for n in levels:
        rows = {"a": a[n], **closed[str(n)]}
        for way, row in rows.items():
            print(f"{n:>4}  {names[way]:<24} {row['req_s']:7.1f} {row['p50_ms']:8.1f} {row['p99_ms']:8.1f}")
        c = rows["c_exact"]
        ratios = {
            "c_exact_over_onnxruntime": c["req_s"] / rows["onnxruntime"]["req_s"],
            "c_exact_over_b": c["req_s"] / rows["b"]["req_s"],
            "c_exact_over_c_fp32_torch": c["req_s"] / rows["c_fp32_torch"]["req_s"],
            "c_bf16_over_c_fp32": rows["c_bf16"]["req_s"] / rows["c_fp32_torch"]["req_s"],
            "c_over_a": c["req_s"] / rows["a"]["req_s"],
            "c_p50_over_a_p50": c["p50_ms"] / rows["a"]["p50_ms"],
        }
        print("      " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
        figures[str(n)] = {**rows, **ratios}
    print(f"\n{'open loop':<22} {'offered':>8} {'served':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for name in ("workers_1", "workers_2", "workers_2_threads_2"):
        row: dict[str, float] = opened[name]  # type: ignore[assignment]
        served, p50, p99 = row["served_req_s"], row["p50_ms"], row["p99_ms"]
        print(f"{name:<22} {row['offered_req_s']:8.1f} {served:8.1f} {p50:8.1f} {p99:8.1f}")
    p50_ratio = opened["workers_2"]["p50_ms"] / opened["workers_1"]["p50_ms"]  # type: ignore[index]
    figures["open_loop_p50_workers_2_over_1"] = p50_ratio
    for key in ("memory_workers_2_fp32", "memory_workers_2_bf16"):
        print(f"{key}: {opened[key]}")
    print("fidelity vs torch fp32 alone:", json.dumps(fid))
    print(f"bot process RSS without models: {rss:.0f} MB (torch not imported)")

    def at(n: str, key: str) -> float:
        return float(figures[n][key]) if n in figures else float("nan")  # type: ignore[index]

    targets = {
        "c_exact >= 0.95 onnxruntime at 64": at("64", "c_exact_over_onnxruntime") >= 0.95,
        "c_exact >= 0.9 onnxruntime at 1": at("1", "c_exact_over_onnxruntime") >= 0.9,
        "c_bf16 >= 2.5 c_fp32_torch at 64": at("64", "c_bf16_over_c_fp32") >= 2.5,
        "open loop p50 workers=2 <= 1.2 workers=1": p50_ratio <= 1.2,
        "rss < 250 MB": rss < 250,
    }
    for name, met in targets.items():
        print(f"target {name}: {'met' if met else 'NOT met'}")
    figures["targets_met"] = targets
    figures.update(ray_figures)  # "ray": (c) and (d) per concurrency, d/c, the breakdown, its targets
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
