"""Counts and probabilities read truthfully in every command's reply: "1 token", never "1 tokens";
a probability above 0 never shown as "0%" (which reads as "impossible"), below 1 never as "100%".

Every command runs through the real App on tiny models, one of them a GPT-2 with one layer and one
head, with inputs that make its counts 1 and its probabilities tiny.
"""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path

import pytest
import torch
import transformers

from bot.commands import Reply
from bot.inference.offline import gpt2_tokenizer_dir
from bot.render import decimal_probability, plural, probability
from plugins.review import when

# Words ending in "s" that are singular or verbs: "1 is", "1 class", "temperature 1 sharpens".
_SINGULAR_S = """is was has does its this his us as plus minus thus class process bonus loss yes
divides leaves keeps sharpens flattens needs holds makes means gives"""
SINGULAR_S = frozenset(_SINGULAR_S.split())
# Words that may stand between "1" and a plural that does not belong to it: "1 of 2 tokens", "1 in 10^6".
_NOT_A_MODIFIER = "of in to and or for from at on by with the a an than per is was token word"
NOT_A_MODIFIER = frozenset(_NOT_A_MODIFIER.split())
# "1 tokens", and "1 WordPiece tokens" / "1 more players": one word between.
ONE_PLURAL = re.compile(r"(?<![\d.,/^])\b1 (?:([A-Za-z-]+) )?([A-Za-z]+s)\b")
ZERO_PERCENT = re.compile(r"(?<![\d.,])0(?:\.0+)?%")
HUNDRED_PERCENT = re.compile(r"(?<![\d.,])100\.0+%")

# Each command with options that make its counts 1 (one token, one word, one layer, one length, one player…).
LINES = {
    "nexttoken": ["/nexttoken prompt:The k:1", "/nexttoken prompt:The k:5 temperature:0.05"],
    "sample": ["/sample prompt:The n:1 top_k:1 seed:0", "/sample prompt:The n:1 temperature:0.05 seed:0"],
    "tokenize": ["/tokenize text:a", "/tokenize text:a compare:true"],
    "compare": ["/compare text:The cat k:1"],
    "mask": ["/mask sentence:Paris is the [MASK]. k:1"],
    "maskrecipe": ["/maskrecipe sentence:Hi"],
    "ngram": [
        '/ngram context:the text:"the cat." sentence:"the cat."',
        '/ngram context:the n:2 sentence:"the cat"',
        "/ngram context:. n:2",
    ],
    "surprise": ["/surprise text:a ngram:true", "/surprise text:The cat"],
    "nsp": ['/nsp sentence_a:"A cat." sentence_b:"It purred."'],
    "summarize": ["/summarize text:Hi. max_length:5"],
    "sentiment": ["/sentiment text:Great"],
    "complexity": ["/complexity lengths:8 width:16"],
    "adapt": ["/adapt text:Great"],
    "attention": ["/attention text:a", "/attention text:The cat layer:1 head:1"],
    "lens": ["/lens prompt:a", "/lens prompt:The cat knockout:head layer:1 head:1"],
    "tokencost": ["/tokencost texts:a|b"],
    "topic": ["/topic", "/topic name:1"],
    "quiz": ["/quiz", "/quiz leaderboard:true"],
    "leaderboard": ["/leaderboard", "/leaderboard mine:true"],
    "review": ["/review"],
    "round": ["/round prompt:The cat guess:sat"],
}


@pytest.fixture(scope="module")
def one_layer_gpt2(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Path:
    """A causal LM with one layer and one head (its replies say "1 layer", "1 head")."""
    folder = tmp_path_factory.mktemp("one-layer-gpt2")
    torch.manual_seed(3)
    tok = transformers.GPT2TokenizerFast.from_pretrained(gpt2_tokenizer_dir(cache_dir))
    config = transformers.GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=16, n_layer=1, n_head=1)
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def shown(reply: Reply) -> str:
    """All the text a reply shows: title, text, fields, table, code, buttons, the charts' descriptions."""
    parts = [reply.title or "", reply.text, *(f"{f.name}: {f.value}" for f in reply.fields)]
    if reply.table is not None:
        parts += [" ".join(reply.table.headers), *(" ".join(map(str, row)) for row in reply.table.rows)]
    if reply.code is not None:
        parts.append(reply.code.plain)
    parts += [b.label for b in reply.buttons]
    parts += [image.description for image in reply.images]
    return "\n".join(parts)


def wrong_plurals(text: str) -> list[str]:
    found = []
    for match in ONE_PLURAL.finditer(text):
        between, noun = match.group(1), match.group(2)
        if noun.lower() in SINGULAR_S or (between and between.lower() in NOT_A_MODIFIER):
            continue
        found.append(match.group(0))
    return found


def test_plural_and_probability_read_right() -> None:
    assert [plural(n, "token") for n in (0, 1, 2, 2048)] == ["0 tokens", "1 token", "2 tokens", "2,048 tokens"]
    assert plural(1, "query", "queries") == "1 query" and plural(3, "query", "queries") == "3 queries"
    shown = [probability(p) for p in (1.0, 0.99996, 0.773, 0.0005, 1 / 121_996, 9.2e-13, 1e-300, 0.0)]
    assert shown == ["100%", ">99.9%", "77.3%", "1 in 2,000", "1 in 121,996", "1 in 10^12", "1 in 10^300", "0"]
    decimals = [decimal_probability(p) for p in (0.45123, 0.00012, 0.00004, 3e-9, 0.0, 0.99999, 1.0)]
    assert decimals == ["0.4512", "0.0001", "1 in 25,000", "1 in 10^9", "0.0000", ">0.9999", "1.0000"]
    assert decimal_probability(0.9996, 3) == ">0.999" and decimal_probability(0.0004, 3) == "1 in 2,500"
    now = datetime.datetime(2026, 12, 6, tzinfo=datetime.UTC)
    assert [when(now + datetime.timedelta(seconds=s), now) for s in (60, 3600, 86400 * 1.6, 86400 * 2.2)] == [
        "in 1 minute",
        "in 1 hour",
        "in 38 hours",
        "in 2 days (2026-12-08)",
    ]
    text = "1 tokens, 1 token, 11 tokens, 0.1 seconds, 1 class, 1 layers × 1 heads, 1 WordPiece tokens, 1 of 2 words"
    assert wrong_plurals(text) == ["1 tokens", "1 layers", "1 heads", "1 WordPiece tokens"]


async def test_every_command_says_1_thing_not_1_things(  # type: ignore[no-untyped-def]
    shared_app, one_layer_gpt2: Path, tiny_bert_mlm: Path
) -> None:
    app = shared_app({"causal_lm": one_layer_gpt2, "masked_lm": tiny_bert_mlm})
    plugin_commands = {name for name, cmd in app.registry.commands.items() if cmd.plugin.startswith("plugins.")}
    assert plugin_commands <= set(LINES), f"add a line for {sorted(plugin_commands - set(LINES))}"
    found: dict[str, list[str]] = {}
    for lines in LINES.values():
        for line in lines:
            reply = await app.execute_line(line)
            text = shown(reply)
            assert "Traceback" not in text, (line, text)
            if bad := wrong_plurals(text):
                found[line] = bad
            if line.startswith("/adapt"):
                # Zero-shot and few-shot times differ by the prompt's length: the reply says so.
                name, timing = next((f.name, f.value) for f in reply.fields if f.name.startswith("prompting time"))
                assert "3 new tokens each" in name and "longer prompt costs more" in timing, timing
    assert found == {}, json.dumps(found, indent=1)


@pytest.mark.parametrize(
    "line",
    [
        "/nexttoken prompt:The k:5 temperature:0.05",
        "/nexttoken prompt:The k:5 temperature:5",
        "/sample prompt:The n:1 temperature:0.05 top_k:5 top_p:1 seed:0",
        "/lens prompt:The capital of France is",
        "/surprise text:Zyx qwv plomb frax.",
        "/compare text:The cat sat on the mat k:3",
        # A hidden word of many rare tokens: the product of their probabilities is below float32's range.
        "/compare text:The password is Zxqvjklwpfmgbtzxqvjklwpfmgbtzxqvjkl k:3",
        "/attention text:The quick brown fox jumps over the lazy dog and runs far away from it",
    ],
)
async def test_no_probability_above_0_reads_as_0_percent(  # type: ignore[no-untyped-def]
    shared_app, one_layer_gpt2: Path, smollm_dir: Path, tiny_bert_mlm: Path, line: str
) -> None:
    """These replies hold probabilities (and attention shares) far below 0.5%, some that underflow a
    float32 to 0: each is above 0, so none may read "0%", "0.0%", "0.0000" (impossible) or "100.0%"
    (certain)."""
    # SmolLM2's logits spread far enough for float32 to round its small probabilities to 0 (a random tiny
    # model's are all alike); the one-layer model's attention spreads thin over a long text, and at
    # temperature 5 its 50,257 tokens all get about 0.00002 (four decimals read 0.0000).
    thin = line.startswith("/attention") or "temperature:5" in line
    causal = one_layer_gpt2 if thin else smollm_dir
    app = shared_app({"causal_lm": causal, "masked_lm": tiny_bert_mlm})
    reply = await app.execute_line(line)
    assert not reply.error, reply.text
    # A causal model's attention to later tokens is exactly 0 (its mask), so that share truly is 0%.
    text = shown(reply).replace("(the causal model: 0%)", "")
    assert ZERO_PERCENT.findall(text) == [], text
    assert HUNDRED_PERCENT.findall(text) == [], text
    # A row (or list) with a rival above 0 cannot have a token at 100%.
    for row in reply.table.rows if reply.table else []:
        cell = " ".join(row)
        assert not (re.search(r"(?<![\d.>])(?:100%|1\.0+\b)", cell) and "1 in" in cell), cell
    cells = [cell for row in (reply.table.rows if reply.table else []) for cell in row]
    assert [c for c in cells if re.fullmatch(r"0(?:\.0+)?%?", c)] == [], cells
