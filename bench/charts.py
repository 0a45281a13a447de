"""Benchmark: CPU time to draw each chart type, today's way beside the way before.

"Before" is bot/charts.py as it was at BASELINE (constrained layout, PNG at zlib level 6; for
a chart type added later, the first commit that has it), loaded from git into its own module,
so the comparison runs the old code itself rather than a copy kept in the tree (``--baseline
COMMIT`` compares with another commit, e.g. main before a change). Both draw the same realistic
inputs (a /nexttoken reply, /compare's two panels, a 12-token /attention, /lens on SmolLM2's 30
layers, ...), alternately, in this one process; CPU time (time.process_time) is robust to other
work on a shared machine.

    python bench/charts.py [--repeat 15] [--baseline COMMIT] [--cold] [--only NAME]

Last line: one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

BASELINE = "7693ef4"  # the last commit before fixed-margin layout


@functools.cache
def load_baseline(commit: str) -> types.ModuleType:
    """bot/charts.py as of ``commit``, imported as a module of its own."""
    source = subprocess.run(
        ["git", "-C", str(ROOT), "show", f"{commit}:bot/charts.py"], check=True, capture_output=True, text=True
    ).stdout
    module = types.ModuleType("bot_charts_before")
    module.__file__ = f"{commit}:bot/charts.py"
    exec(compile(source, module.__file__, "exec"), module.__dict__)  # our own file, from git
    return module


def cases() -> dict[str, tuple[str, tuple[Any, ...], dict[str, Any]]]:
    """Chart name -> (function name, args, kwargs): inputs shaped like the plugins' own."""
    tokens = [" Paris", " the", " a", " located", " known", " not", " one", " also", " home", " in"]
    probs = [0.41, 0.12, 0.08, 0.05, 0.04, 0.03, 0.02, 0.02, 0.01, 0.01]
    flat = [0.0021, 0.0018, 0.0016, 0.0015, 0.0013, 0.0012, 0.0011, 0.0011, 0.0010, 0.0009]
    model = "SmolLM2-135M-Instruct (ONNX Runtime, fp32, torch 2.x tokenizer)"
    words = [
        "The",
        "cat",
        "sat",
        "on",
        "the",
        "mat",
        "because",
        "it",
        "was",
        "tired",
        "of",
        "the",
        "long",
        "and",
        "winding",
        "road",
        "home",
    ]
    n = 12
    attention = [[(1.0 / (i + 1) if j <= i else 0.0) for j in range(n)] for i in range(n)]
    both = [[1.0 / n] * n for _ in range(n)]
    short = 8  # up to 10 tokens, every weight is written in its cell
    short_attention = [[(1.0 / (i + 1) if j <= i else 0.0) for j in range(short)] for i in range(short)]
    # /lens on SmolLM2-135M: the embeddings and 30 layers, the final top 5 tokens' probability at each.
    layers = ["embeddings", *(f"layer {k}" for k in range(1, 31))]
    lens = [[min(1.0, probs[c] * (k / 30) ** 2 + 1e-4 * (c + 1)) for c in range(5)] for k in range(31)]
    return {
        "nexttoken bar_chart": (
            "bar_chart",
            (tokens, probs),
            {"title": "Next token after “The capital of France is”", "xlabel": f"probability ({model})"},
        ),
        "nexttoken T=5 bar_chart": (
            "bar_chart",
            (tokens, flat),
            {"title": "Next token after “The capital of France is” at temperature 5", "xlabel": "probability"},
        ),
        "compare bar_panels": (
            "bar_panels",
            (
                [
                    ("SmolLM2 reads left to right", tokens[:5], probs[:5]),
                    ("BERT reads both sides", tokens[5:], probs[5:]),
                ],
            ),
            {"xlabel": "probability of the hidden word's first token"},
        ),
        "tokenize split_bar_chart": (
            "split_bar_chart",
            (
                ["characters", "word list", "WordPiece", "BPE (GPT-2)"],
                [("known pieces", [48, 4, 11, 9]), ("[UNK]: unknown, information lost", [0, 2, 0, 0])],
            ),
            {"title": "Tokens for the same 48-character text", "xlabel": "tokens"},
        ),
        "complexity line_chart (log)": (
            "line_chart",
            (
                [
                    ("GRU 6·n·d²", [8, 64, 512, 4096], [3e3, 2.4e4, 2e5, 1.6e6], "s-"),
                    ("attention 4·n·d² + 2·n²·d", [8, 64, 512, 4096], [4e3, 6e4, 2e6, 1e8], "o-"),
                    ("attention pairs 2·n²·d", [8, 64, 512, 4096], [2e3, 1.3e5, 8e6, 5e8], "--"),
                ],
            ),
            {
                "title": "One layer, width 16: counted, not timed",
                "xlabel": "sequence length (tokens)",
                "ylabel": "multiply-accumulates",
            },
        ),
        "adapt line_chart (linear)": (
            "line_chart",
            ([("training loss", list(range(1, 21)), [2.0 * math.exp(-s / 6) + 0.3 for s in range(1, 21)], "o-")],),
            {"title": "LoRA r=8 on 64 labelled reviews", "xlabel": "step", "ylabel": "loss", "log": False},
        ),
        "attention heatmap (2 panels)": (
            "heatmap",
            (
                [
                    ("causal: layer 1, head 1", [*tokens, " x", " y"], attention, True),
                    ("masked", [*tokens, " x", " y"], both, False),
                ],
            ),
            {"colorbar": "attention weight (square-root colour scale)"},
        ),
        "attention heatmap (8 tokens)": (
            "heatmap",
            (
                [
                    ("causal: layer 1, head 1", tokens[:short], short_attention, True),
                    ("masked", tokens[:short], [[1.0 / short] * short for _ in range(short)], False),
                ],
            ),
            {"colorbar": "attention weight (square-root colour scale)"},
        ),
        "surprise shaded_text": (
            "shaded_text",
            (
                [
                    (
                        "SmolLM2: surprisal of each token (bits)",
                        [f" {w}" for w in words],
                        [float(i % 17) for i in range(len(words))],
                    ),
                    (
                        "2-gram model: surprisal of each word (bits)",
                        [f" {w}" for w in words],
                        [float(i % 9) for i in range(len(words))],
                    ),
                ],
            ),
            {"colorbar": "surprisal (bits): −log₂ p"},
        ),
        "sample grouped_bars": (
            "grouped_bars",
            (
                tokens,
                [
                    ("model", probs),
                    ("temperature 0.7", [p * 1.2 for p in probs]),
                    ("after top-k and top-p (drawn from)", [p * 1.5 for p in probs[:6]] + [0.0] * 4),
                ],
            ),
            {
                "title": "Next token after “The capital of France is”",
                "xlabel": "probability (SmolLM2; temperature 0.7, top-k 6, top-p 0.9)",
                "notes": [""] * 6 + ["cut by top-k"] * 4,
            },
        ),
        "lens probability_grid": (
            "probability_grid",
            (layers, tokens[:5], lens),
            {
                "title": "SmolLM2-135M-Instruct: the final top 5 next tokens through the lens, layer by layer",
                "row_name": "after layer (top: embeddings; bottom: the model's real answer)",
                "column_name": "the model's final top 5 next tokens (first: its answer)",
            },
        ),
    }


def baseline_for(function: str, commit: str) -> tuple[str, types.ModuleType]:
    """``commit``'s bot/charts.py, or for a chart type it does not have yet (/lens's grid came later)
    the first commit that has it."""
    if hasattr(load_baseline(commit), function):
        return commit, load_baseline(commit)
    added = subprocess.run(
        ["git", "-C", str(ROOT), "log", "--format=%h", "--reverse", "-S", f"def {function}(", "--", "bot/charts.py"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return added[0], load_baseline(added[0])


def forget_texts(module: types.ModuleType) -> None:
    """Drop what ``module`` kept of the texts it laid out before (the next chart's texts are new)."""
    if hasattr(module, "clear_text_cache"):
        module.clear_text_cache()
    elif hasattr(module, "_MEASURE"):  # main before the text cache: a measuring renderer per thread
        module._MEASURE.__dict__.pop("renderer", None)


def cpu_ms(draw: Callable[[], Any], module: types.ModuleType, cold: bool) -> float:
    if cold:
        forget_texts(module)
    start = time.process_time()
    draw()
    return (time.process_time() - start) * 1000


def main(repeat: int, baseline: str, cold: bool = False, only: str = "") -> dict[str, Any]:
    from bot import charts

    figures: dict[str, Any] = {"baseline": baseline, "repeat": repeat, "cold": cold, "charts": {}}
    # Warm (the default): each chart drawn again as it was, as when a class sends the same prompt;
    # its texts were laid out before. Cold: every text laid out afresh, as for a new prompt.
    print("texts laid out afresh for every chart (--cold)" if cold else "the same chart drawn again (warm)")
    print(f"{'chart':32} {'before ms':>10} {'now ms':>8} {'ratio':>6} {'PNG before':>11} {'PNG now':>8}  before at")
    for name, (function, args, kwargs) in cases().items():
        if only not in name:
            continue
        commit, before = baseline_for(function, baseline)
        old = functools.partial(getattr(before, function), *args, **kwargs)
        new = functools.partial(getattr(charts, function), *args, **kwargs)
        old_png, new_png = old().data, new().data  # warm: fonts, caches
        old_ms, new_ms = [], []
        for _ in range(repeat):  # alternately, so both see the same machine
            old_ms.append(cpu_ms(old, before, cold))
            new_ms.append(cpu_ms(new, charts, cold))
        row = {
            "before_ms": statistics.median(old_ms),
            "now_ms": statistics.median(new_ms),
            "before_commit": commit,
            "before_png_bytes": len(old_png),
            "now_png_bytes": len(new_png),
        }
        row["ratio"] = row["before_ms"] / row["now_ms"]
        figures["charts"][name] = row
        print(
            f"{name:32} {row['before_ms']:10.1f} {row['now_ms']:8.1f} {row['ratio']:5.1f}× "
            f"{len(old_png) / 1024:9.0f} k {len(new_png) / 1024:6.0f} k  {commit}"
        )
    figures["max_now_ms"] = max(row["now_ms"] for row in figures["charts"].values())
    print(f"slowest chart now: {figures['max_now_ms']:.1f} ms of CPU (median of {repeat})")
    return figures


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--baseline", default=BASELINE)
    parser.add_argument("--cold", action="store_true", help="lay every text out afresh for every chart")
    parser.add_argument("--only", default="", help="only the chart types whose name has this in it")
    options = parser.parse_args()
    print(json.dumps(main(options.repeat, options.baseline, options.cold, options.only)))
