"""Benchmark: next-token top-5 on the offline causal LM, three ways, side by side.

(a) one forward per request, the way the course snippet does it (full logits,
    no batching), served one request at a time;
(b) the raw ceiling: padded batched forwards of the same prompts, in-process,
    with the service's own task function (c prompts per forward at concurrency c),
    in trials alternating with (c) so both see the same machine (medians shown);
(c) the service end to end: the asyncio client, the queue, a worker process;
(d) with --ray, the same client on Ray Serve (one replica on a local Ray instance, given the
    machine's cores as the local worker has them), in trials alternating with a (c) of its own,
    with the Ray path's breakdown in ms (where a request's time goes) and the ratios d/c;
    --ray-only runs just that part. Run it in a loopback-only namespace:
    unshare -n sh -c 'ip link set lo up && python bench/inference.py --ray'.

Prints req/s and p50/p99 latency for each way at concurrency 1, 8 and 64, the
ratios c/a and c/b, and the bot process's RSS without models. The last line is
one JSON object with every figure.

    python bench/inference.py [--rounds 2] [--concurrency 1 8 64]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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


def load_model():  # type: ignore[no-untyped-def]
    from bot.config import parse_config
    from bot.inference.loading import load_source
    from bot.inference.registry import BUILTIN_ROLES, resolve
    from bot.inference.settings import WorkerSettings

    config = parse_config({"inference": {"offline": "always"}})
    role = next(r for r in BUILTIN_ROLES if r.name == "causal_lm")
    settings = WorkerSettings.from_config(config, {"causal_lm": role})
    loaded = load_source(resolve(role, None, "always"), role.auto_class, settings)
    return loaded.model, loaded.tokenizer, loaded.label


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


def way_b(model, tokenizer, concurrency: int, rounds: int) -> dict[str, float]:  # type: ignore[no-untyped-def]
    """Padded batches of ``concurrency`` prompts, nothing else: the ceiling for (c)."""
    import torch

    from bot.inference.protocol import NextToken
    from bot.inference.tasks import next_token

    work = [NextToken(p, k=5) for _ in range(rounds) for p in PROMPTS]
    latencies = []
    started = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(work), concurrency):
            batch_started = time.perf_counter()
            chunk = work[i : i + concurrency]
            next_token(model, tokenizer, chunk)
            latencies += [time.perf_counter() - batch_started] * len(chunk)
    elapsed = time.perf_counter() - started
    return {
        "req_s": len(work) / elapsed,
        "p50_ms": 1000 * percentile(latencies, 0.5),
        "p99_ms": 1000 * percentile(latencies, 0.99),
    }


def median_trial(trials: list[dict[str, float]]) -> dict[str, float]:
    """The trial with the median throughput (its latencies come with it)."""
    return sorted(trials, key=lambda t: t["req_s"])[len(trials) // 2]


async def ways_b_and_c(model, tokenizer, levels: list[int], rounds: int, trials: int):  # type: ignore[no-untyped-def]
    """(b) and (c) in alternating trials, so both see the same machine; medians of each."""
    from bot.config import parse_config
    from bot.inference.client import create_client
    from bot.inference.protocol import NextToken
    from bot.inference.registry import BUILTIN_ROLES

    config = parse_config({"inference": {"offline": "always"}, "bot": {"log_level": "WARNING"}})
    client = create_client(config, {r.name: r for r in BUILTIN_ROLES})
    await client.start()
    b: dict[int, dict[str, float]] = {}
    c: dict[int, dict[str, float]] = {}
    try:
        for prompt in PROMPTS[:8]:  # warm up (and load the model in the worker)
            await client.submit(NextToken(prompt, k=5))

        async def call(prompt: str) -> object:
            return await client.submit(NextToken(prompt, k=5))

        for n in levels:
            b_trials, c_trials = [], []
            for _ in range(trials):
                c_trials.append(await closed_loop(call, n, rounds))
                b_trials.append(await asyncio.to_thread(way_b, model, tokenizer, n, rounds))
            b[n], c[n] = median_trial(b_trials), median_trial(c_trials)
    finally:
        await client.close()
    return b, c


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
    parser.add_argument("--rounds", type=int, default=2, help="times each of the 64 prompts is sent per trial")
    parser.add_argument("--trials", type=int, default=3, help="alternating trials of (b) and (c); medians shown")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--ray", action="store_true", help="also (d): the service on a local Ray Serve, against (c)")
    parser.add_argument("--ray-only", action="store_true", help="only (d) against (c), with the Ray breakdown")
    args = parser.parse_args()
    levels = args.concurrency
    ray_figures = asyncio.run(ray_vs_local(levels, args.rounds, args.trials)) if args.ray or args.ray_only else {}
    if args.ray_only:
        print(json.dumps(ray_figures))
        return

    print(
        f"{len(PROMPTS)} prompts; (b) and (c): median of {args.trials} alternating trials of {args.rounds} rounds; "
        f"(a): 1 round; next-token top-5; "
        f"concurrency {levels}",
        flush=True,
    )
    model, tokenizer, label = load_model()
    print(f"model: {label}", flush=True)
    way_a(model, tokenizer, 1, 1)  # warm up
    # (a) serves one request at a time whatever the concurrency; one round keeps the run short.
    a = {n: way_a(model, tokenizer, n, 1) for n in levels}
    b, c = asyncio.run(ways_b_and_c(model, tokenizer, levels, args.rounds, args.trials))
    rss = bot_rss_mb()

    figures: dict[str, object] = {"model": label, "prompts": len(PROMPTS), "rounds": args.rounds, "rss_mb": rss}
    print(f"\n{'conc':>4}  {'way':<22} {'req/s':>7} {'p50 ms':>8} {'p99 ms':>8}")
    for n in levels:
        ways = [("a) one forward each", a[n]), ("b) padded batch", b[n]), ("c) service", c[n])]
        for name, row in ways:
            print(f"{n:>4}  {name:<22} {row['req_s']:7.1f} {row['p50_ms']:8.1f} {row['p99_ms']:8.1f}")
        ratios = {
            "c_over_a": c[n]["req_s"] / a[n]["req_s"],
            "c_over_b": c[n]["req_s"] / b[n]["req_s"],
            "c_p50_over_a_p50": c[n]["p50_ms"] / a[n]["p50_ms"],
        }
        print(
            f"      throughput c/a {ratios['c_over_a']:.2f}x, c/b {ratios['c_over_b']:.2f}x; "
            f"p50 latency c/a {ratios['c_p50_over_a_p50']:.2f}x"
        )
        figures[str(n)] = {"a": a[n], "b": b[n], "c": c[n], **ratios}
    print(f"\nbot process RSS without models: {rss:.0f} MB (torch not imported)")
    targets = {
        "c >= 0.9 b at 64": figures.get("64", {}).get("c_over_b", 0) >= 0.9 if "64" in figures else None,
        "c >= 4 a at 64": figures.get("64", {}).get("c_over_a", 0) >= 4 if "64" in figures else None,
        "c latency <= 1.15 a at 1": figures.get("1", {}).get("c_p50_over_a_p50", 9) <= 1.15 if "1" in figures else None,
        "rss < 250 MB": rss < 250,
    }
    for name, met in targets.items():
        if met is not None:
            print(f"target {name}: {'met' if met else 'NOT met'}")
    figures["targets_met"] = targets
    figures.update(ray_figures)  # "ray": (c) and (d) per concurrency, d/c, the breakdown, its targets
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
