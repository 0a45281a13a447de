"""Topic "Sequence-to-sequence": an encoder reads, a decoder writes."""

from __future__ import annotations

import re
import time
import unicodedata
from collections.abc import Callable, Sequence

from bot import (
    Command,
    Context,
    Field,
    Generate,
    Integer,
    ModelRole,
    NoModelForRole,
    Reply,
    Seq2Seq,
    Text,
    Topic,
    UserError,
    command,
    hookimpl,
)

TOPIC = Topic.load("plugins", "seq2seq")  # plugins/data/topics/seq2seq.toml

PREFIX = "summarize: "
PROMPT = "Summarize the following text in one or two sentences.\n\n{text}"
# The service refuses a request over `inference.max_input_chars` (2,000 by default), counting the
# instruction around the text; the option's limit leaves room for it, so one limit holds.
MAX_TEXT = 1900
NUMBER = re.compile(r"\d+(?:[.,:]\d+)*")
WORD = re.compile(r"[^\W\d_][\w'’-]*")
# Capitalised only because a sentence starts with them: not names to check.
_STARTERS = """a an the this that these those it its he she they we you i in on at of for to from by with as
there here overall summary however also and but so then when while after before both one some many most all each"""
SENTENCE_STARTERS = frozenset(_STARTERS.split())
# Words that carry grammar rather than content: a summary may use them freely.
_FUNCTION = """a an the this that these those it its it's he she they them their his her we our you your i me my
is are was were be been being am has have had do does did will would can could shall should may might must
in on at of for to from by with as into onto over under about after before between through during without within
and or but nor so yet if then than because while when where which who whom whose what how why there here
not no all any both each every few more most other some such only own same too very just also again once
up down out off one ones s t"""
FUNCTION_WORDS = frozenset(_FUNCTION.split()) | SENTENCE_STARTERS
CHECK_COVERS = (
    "It compares words only: every number, name and content word of the summary (words other than ones "
    "like “the”, “under”) must appear in your text, allowing common word endings (cuts, cutting, cut). It "
    "does not check meaning: it cannot tell whether they are put together truthfully (a negation, who did "
    "what to whom, a wrong link between two true facts), nor whether the summary leaves out what matters."
)
# The commonest words of languages a T5-style model writes (T5 was also trained to translate English
# into German, French and Romanian, and may do so when asked to summarize).
COMMON_WORDS = {
    "English": "the a an and is are was were of to in that it for on with as be this by not from at have has which",
    "German": "der die das und ist nicht ein eine zu den mit von sich auf für im dem des auch es wird werden sind "
    "als wurde bei oder aus nach hat wie",
    "French": "le la les et est un une des du de en que qui dans pour pas sur au avec il elle ce sont par plus ne "
    "se été aux",
    "Spanish": "el la los las y es un una de del que en por con para no se su al lo como más fue son está",
    "Italian": "il lo la gli le e è un una di del della che in per non con si sono al alla come più anche",
    "Portuguese": "o a os as e é um uma de do da que em para não com se por no na são mais como foi",
    "Dutch": "de het een en is van in dat niet op te met voor zijn er aan ook als bij door",
    "Romanian": "și şi este un o de la în că cu pe din care nu se a fost mai sunt pentru",
}
_HOLDERS: dict[str, int] = {}
for _words in COMMON_WORDS.values():
    for _word in set(_words.split()):
        _HOLDERS[_word] = _HOLDERS.get(_word, 0) + 1


def text_limit(ctx: Context) -> int:
    """The most characters of text /summarize accepts on this server."""
    room = ctx.config.inference.max_input_chars - max(len(PREFIX), len(PROMPT.format(text="")))
    return max(1, min(MAX_TEXT, room))


def _number(token: str) -> str:
    return token.replace(",", "")  # 1,789 and 1789 are the same number


def unsupported(summary: str, text: str) -> tuple[list[str], list[str]]:
    """Numbers and capitalised names in the summary that the text does not contain.

    A sentence's first word counts as a name only when it is not a common sentence opener.
    """
    numbers = {_number(n) for n in NUMBER.findall(text)}
    words = {w.casefold() for w in WORD.findall(text)}
    new_numbers = list(dict.fromkeys(n for n in NUMBER.findall(summary) if _number(n) not in numbers))
    names: list[str] = []
    for sentence in re.split(r"(?<=[.!?])\s+|\n+", summary):
        for n, word in enumerate(WORD.findall(sentence)):
            if not word[0].isupper() or word.casefold() in words or word in names:
                continue
            if n == 0 and word.casefold() in SENTENCE_STARTERS:
                continue
            names.append(word)
    return new_numbers, names


VOWELS = frozenset("aeiou")


def _forms(word: str) -> set[str]:
    """A word and the plain forms it may take in the text: cats/cat, changed/change, team's/team,
    cutting/cut and running/run (a doubled last consonant), making/make, studies/study, taller/tall.
    Both sides' forms are compared, so a summary's "cut" matches a text's "cutting" and back."""
    word = word.casefold().replace("’", "'")
    if word.endswith("'s"):
        word = word[:-2]
    forms = {word}
    if len(word) >= 5 and word.endswith(("ies", "ied")):
        forms.add(word[:-3] + "y")  # studies, studied → study
    for suffix in ("s", "es", "ed", "d", "ing", "er", "est", "ly"):
        stem = word[: -len(suffix)]
        if not word.endswith(suffix) or len(stem) < 3:  # "thing" is not a form of "the"
            continue
        forms.add(stem)
        if suffix in ("ed", "ing", "er", "est"):
            if len(stem) >= 3 and stem[-1] == stem[-2] and stem[-1] not in VOWELS:
                forms.add(stem[:-1])  # cutting → cut, running → run, bigger → big
            forms.add(stem + "e")  # making → make, later → late
    return forms


def unsupported_words(summary: str, text: str, skip: Sequence[str] = ()) -> list[str]:
    """Content words of the summary (not function words such as "the", "under") that the text
    does not contain in any plain form; ``skip`` words are already reported (as names)."""
    known: set[str] = set()
    for word in WORD.findall(text):
        known |= _forms(word)
    skipped = {w.casefold() for w in skip}
    found: list[str] = []
    for word in WORD.findall(summary):
        low = word.casefold()
        if low in FUNCTION_WORDS or low in skipped or _forms(word) & known or low in (f.casefold() for f in found):
            continue
        found.append(word)
    return found


def language_of(text: str) -> str | None:
    """A rough guess at the language of ``text``: its script where that is not Latin ("Cyrillic script"),
    else the language whose commonest words it uses most (a word several languages share counts for
    each a share). None when the text is too short or too mixed to tell."""
    scripts: dict[str, int] = {}
    for ch in text:
        if ch.isalpha():
            script = unicodedata.name(ch, "UNKNOWN").split()[0]
            script = "Chinese/Japanese characters" if script in ("CJK", "HIRAGANA", "KATAKANA") else script
            scripts[script] = scripts.get(script, 0) + 1
    if not scripts:
        return None
    script = max(scripts, key=lambda s: scripts[s])
    if script != "LATIN":
        return script if "/" in script else f"{script.title()} script"
    scores = dict.fromkeys(COMMON_WORDS, 0.0)
    for word in WORD.findall(text.casefold()):
        for language, words in COMMON_WORDS.items():
            if word in words.split():
                scores[language] += 1 / _HOLDERS[word]
    ranked = sorted(scores.items(), key=lambda item: -item[1])
    (best, top), (_, second) = ranked[0], ranked[1]
    return best if top >= 1.5 and top >= 1.5 * second else None


def language_line(text: str, summary: str) -> str:
    """A warning when the summary seems to be in another language than the text, else ""."""
    source, written = language_of(text), language_of(summary)
    if source is None or written is None or source == written:
        return ""
    return (
        f"The summary looks like {written}, your text like {source} (a rough guess from their commonest "
        "words): the model may have translated instead of summarizing, so this is not a summary of your text "
        "in its own language."
    )


def generated_tokens(kind: str, token_ids: Sequence[int]) -> int:
    """Tokens the model wrote (an encoder-decoder's output starts with its decoder-start token,
    which it did not write; the end-of-text token is already stripped)."""
    return max(0, len(token_ids) - 1) if kind == "seq2seq" else len(token_ids)


@command(
    "summarize",
    "Summarize text with an encoder-decoder model (T5)",
    topic=TOPIC.slug,
    options=[
        Text("text", "The text to summarize", max_length=MAX_TEXT),
        Integer("max_length", "Longest summary, in tokens", default=60, min_value=5, max_value=200),
    ],
)
async def summarize(ctx: Context, text: str, max_length: int) -> Reply:
    limit = text_limit(ctx)
    if len(text) > limit:  # the same words as the option's own check (clean_text)
        raise UserError(f"`text` is too long: {len(text):,} characters, the limit is {limit:,}.")
    started = time.perf_counter()
    try:
        result = await ctx.inference.submit(Seq2Seq(PREFIX + text, max_new_tokens=max_length))
        kind, note = "seq2seq", f"T5-style text-to-text with the task prefix `{PREFIX.strip()}`."
    except NoModelForRole as missing:
        result = await ctx.inference.submit(Generate(PROMPT.format(text=text), max_new_tokens=max_length, chat=True))
        kind = "causal_lm_prompt"
        note = f"Not seq2seq: an instruction-tuned causal LM asked to summarize, because {missing}"
    seconds = time.perf_counter() - started
    summary = result.text.rstrip("\ufffd").strip()  # a cut at the token limit can split a character
    numbers, names = unsupported(summary, text)
    new_words = unsupported_words(summary, text, skip=names)
    written = generated_tokens(kind, result.token_ids)
    # Without its end-of-text token the model did not finish: it was stopped at the limit.
    cut = written >= max_length
    if not summary:
        check = "Nothing to check: the model produced no text."
    elif numbers or names or new_words:
        check = "Not in your text, so check them: " + ", ".join([*numbers, *names, *new_words])
    else:
        check = "Every number, name and content word of the summary also appears in your text."
    language = language_line(text, summary)
    length = f"{written} of at most {max_length} tokens (`max_length` counts the model's tokens, not words)" + (
        ": cut off at the limit, so the summary is unfinished" if cut else ""
    )
    return Reply(
        title=f"Summary ({result.model})",
        text=(summary or "(the model produced no text)")
        + ("\n\n(Cut off: the model reached `max_length` tokens before it finished.)" if cut else "")
        + (f"\n\n{language}" if language else "")
        + "\n\nThis summary was generated by a model and may be wrong: check it against your text.",
        fields=[
            Field("check", check[:1024], inline=False),
            Field("what the check covers", CHECK_COVERS, inline=False),
            Field("length", length, inline=False),
            Field("how", note[:1024], inline=False),
            Field("time", f"{seconds * 1000:.0f} ms"),
        ],
        data={
            "kind": kind,
            "model": result.model,
            "summary": result.text,
            "seconds": seconds,
            "not_in_text": {"numbers": numbers, "names": names, "words": new_words},
            "tokens_written": written,
            "max_length_tokens": max_length,
            "cut_at_max_length": cut,
            "language": {"text": language_of(text), "summary": language_of(summary)},
        },
    )


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(summarize)


@hookimpl
def register_models(register: Callable[[ModelRole | str], None]) -> None:
    register("seq2seq")
    register("causal_lm")


@hookimpl
def register_topics(register: Callable[[Topic], None]) -> None:
    register(TOPIC)
