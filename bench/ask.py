"""Benchmark: how long `lmbot ask` takes at a terminal, from nothing and warm.

Each figure is one fresh `lmbot ask` process, timed from its start to its exit (what a
person at a terminal waits), on the packaged offline causal LM with the model already
converted and cached. Ways, interleaved round by round (the order alternates):

* cold: `lmbot ask --cold ...`: starts a worker, loads the model, answers, stops it;
* warm: `lmbot ask ...` answered by the warm lmbot an earlier ask left running;
* help: `lmbot ask /help`: no model; the floor of starting the command at all.

Before the rounds, one ordinary ask starts the warm lmbot (a cold ask's time, plus the warm
lmbot loading in the background), and the time until the next ask is answered warm is
reported. The last line is one JSON object with every figure.

    python bench/ask.py [--rounds 5] [--line '/nexttoken prompt:"The capital of France is"']
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def timed(args: list[str], cwd: Path, env: dict[str, str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "bot.frontends.cli", "ask", *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    elapsed = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"lmbot ask {args} failed ({done.returncode}): {done.stderr[-2000:]}")
    return elapsed


def summary(times: list[float]) -> dict[str, float]:
    ordered = sorted(times)
    return {
        "p50_s": round(statistics.median(ordered), 3),
        "p90_s": round(ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 3),
        "min_s": round(ordered[0], 3),
        "max_s": round(ordered[-1], 3),
        "n": len(ordered),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--line", default='/nexttoken prompt:"The capital of France is"')
    parser.add_argument("--cache-dir", default="~/.cache/lmbot", help="the model cache (default: lmbot's own)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="lmbot-bench-ask-") as tmp:
        work, run_dir = Path(tmp) / "work", Path(tmp) / "run"
        work.mkdir()
        run_dir.mkdir()
        (work / "config.toml").write_text(f'[inference]\ncache_dir = "{args.cache_dir}"\n', encoding="utf-8")
        env = dict(
            os.environ,
            HF_HUB_OFFLINE="1",
            XDG_RUNTIME_DIR=str(run_dir),
            LMBOT_ASK_KEEP_ALIVE_S="600",
            PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        )
        log_dir = run_dir / f"lmbot-{os.getuid()}"

        def answered() -> int:
            return sum(len(re.findall("answered /", p.read_text())) for p in log_dir.glob("ask-*.log"))

        timed(["--cold", args.line], work, env)  # converts the packaged model on a first-ever run
        first = timed([args.line], work, env)
        ready_after = timed([args.line], work, env)
        if answered() != 1:
            raise SystemExit("the ask after the first was not answered by a warm lmbot")
        times: dict[str, list[float]] = {"cold": [], "warm": [], "help": []}
        for n in range(args.rounds):
            order = ["cold", "warm", "help"] if n % 2 == 0 else ["help", "warm", "cold"]
            for way in order:
                line = ["--cold", args.line] if way == "cold" else [args.line] if way == "warm" else ["/help"]
                times[way].append(timed(line, work, env))
        warm_answers = answered() - 1
        timed(["--stop"], work, env)

    figures = {way: summary(t) for way, t in times.items()}
    print(f"lmbot ask {args.line!r}, {args.rounds} rounds, one process each, start to exit")
    print(f"{'way':<6} {'p50 s':>7} {'p90 s':>7} {'min s':>7} {'max s':>7}")
    for way, f in figures.items():
        print(f"{way:<6} {f['p50_s']:>7.2f} {f['p90_s']:>7.2f} {f['min_s']:>7.2f} {f['max_s']:>7.2f}")
    ratio = figures["cold"]["p50_s"] / figures["warm"]["p50_s"]
    print(f"first ask (cold, leaves a warm lmbot): {first:.2f} s; the next ask, sent at once: {ready_after:.2f} s")
    print(f"cold / warm p50: {ratio:.1f}x; asks the warm lmbot's log counts in the rounds (warm, help): {warm_answers}")
    print(
        json.dumps(
            {
                "line": args.line,
                "rounds": args.rounds,
                **figures,
                "first_ask_s": round(first, 3),
                "next_ask_right_after_s": round(ready_after, 3),
                "cold_over_warm_p50": round(ratio, 2),
                "warm_answers": warm_answers,
            }
        )
    )


if __name__ == "__main__":
    main()
