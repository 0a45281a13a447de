"""/round: beat the model at guessing the next word, as a group.

The bot posts a prompt (the starter's own, or a sentence from a topic card cut before one of its
words) and opens a round for a set time. Every member presses Guess once and types the word they
think comes next; guesses stay hidden (each player sees only their own, privately). When the time
is up, or the starter ends the round early, one message shows the model's top choices and, for
each player, the model's probability of their guess (a guess of several tokens gets the product
of its tokens' probabilities, each given the prompt and the tokens before it), its rank, its
surprisal in bits and points from a log score. All guesses of a round are scored in one batched
forward on the inference worker.

Outside a server (the console, ``lmbot ask``, a direct message) a round has one player: the
guess is given as an option and the results come at once.

Fair play: a round's id is random and names no guess; the guess itself arrives from the text box,
never from a button's id; the database takes one guess per player per round (its primary key);
a round is revealed by exactly one caller (its state changes from open to closed once). Rounds
live in the score database: after a restart, the first guess or End press on a round that is
still open finishes it (at its time, or at once if that has passed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import re
import secrets
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

from bot import (
    Boolean,
    Button,
    Command,
    Context,
    Field,
    Integer,
    Reply,
    Request,
    Table,
    Text,
    TokenProb,
    UserError,
    command,
    hookimpl,
)
from bot.render import plural, probability
from plugins._scores import STORE_ENVIRONMENT, ScoresUnavailable, add_review_card
from plugins.study import scope_of, scores_for

log = logging.getLogger(__name__)

MIN_SECONDS, DEFAULT_SECONDS, MAX_SECONDS = 10, 30, 300
TOP_K = 5
MAX_GUESS = 40  # characters: a word or a short phrase
MAX_PROMPT = 300
BASE_BITS = 20.0  # points = BASE_BITS − surprisal, at least 0
FAR_OFF_BITS = 12.0  # a guess the model found rarer than 1 in 4,096 becomes a review card
SHOWN_PLAYERS = 20  # rows of the results table; the rest are counted
CELL = 16  # characters of a name or guess in the results table
ROUND_ID = re.compile(r"^[A-Za-z0-9_-]{8,24}$")
MEDALS = ("🥇", "🥈", "🥉")

POINTS_LINE = (
    f"points = {BASE_BITS:.0f} − bits, never below 0 (a log score: each halving of the model's "
    "probability costs a point, so guessing what is truly likely pays best)"
)
COLUMNS_LINE = (
    "p: the model's probability of your whole guess (the product of its tokens' probabilities) · "
    "rank: where its first token stands among the model's choices · bits: surprisal, −log₂ p · "
    "tok: how many tokens the model reads it as"
)


# --------------------------------------------------------------------------- the worker task


@dataclass(frozen=True)
class RoundScore(Request):
    """The next-token distribution after ``prompt`` and the probability of each continuation."""

    prompt: str
    continuations: tuple[str, ...]  # each guess as it follows the prompt (its leading space included)
    k: int = TOP_K
    task: ClassVar[str] = "plugins.round:round_scores"

    def texts(self) -> list[str]:
        return [self.prompt + c for c in self.continuations] or [self.prompt]


@dataclass(frozen=True)
class ContinuationScore:
    tokens: list[str]  # the continuation's tokens, as the model reads them
    logprob: float  # natural log of the product of its tokens' conditional probabilities
    rank: int  # 1 + how many tokens the model likes more than its first token


@dataclass(frozen=True)
class RoundScoreResult:
    model: str
    top: list[TokenProb]
    scores: list[ContinuationScore] = field(default_factory=list)


def round_scores(model: Any, tokenizer: Any, batch: Sequence[RoundScore]) -> list[RoundScoreResult]:
    """Runs in the worker: one left-padded forward over every continuation of every request in the
    batch (position ids count real tokens only, so each row gets the numbers it gets alone)."""
    import inspect

    import torch

    from bot.worker.tasks import token_bytes

    rows: list[list[int]] = []
    firsts: list[int] = []  # each request's first row
    guess_ids: list[list[list[int]]] = []
    for request in batch:
        # The prompt is read as /nexttoken reads it; each guess's tokens follow it.
        prompt_ids = list(tokenizer(request.prompt)["input_ids"])
        ids = [list(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in request.continuations]
        firsts.append(len(rows))
        guess_ids.append(ids)
        rows.extend([prompt_ids + g for g in ids] or [prompt_ids])
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=model.device)
    attention_mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=model.device)
    kwargs: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask}
    if "position_ids" in inspect.signature(model.forward).parameters:
        kwargs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    with torch.inference_mode():
        logp = torch.log_softmax(model(**kwargs).logits.float(), dim=-1)
    results = []
    for request, first, ids in zip(batch, firsts, guess_ids, strict=True):
        # Row r's prompt ends at column width - len(guess) - 1, which predicts the guess's first token.
        next_logp = logp[first, width - (len(ids[0]) if ids else 0) - 1]
        values, top_ids = torch.topk(next_logp, min(request.k, next_logp.shape[-1]))
        top_list = [int(i) for i in top_ids.tolist()]
        top = [
            TokenProb(i, tokenizer.decode([i]), math.exp(float(v)), raw)
            for v, i, raw in zip(values.tolist(), top_list, token_bytes(tokenizer, top_list), strict=True)
        ]
        scores = []
        for offset, guess in enumerate(ids):
            row, n = first + offset, len(guess)
            predicting = logp[row, width - n - 1 : width - 1]
            chosen = predicting.gather(-1, torch.tensor(guess, device=model.device).unsqueeze(-1)).squeeze(-1)
            first_logp = predicting[0, guess[0]]
            rank = 1 + int((predicting[0] > first_logp).sum())
            pieces = [raw.decode("utf-8", "replace") for raw in token_bytes(tokenizer, guess)]
            scores.append(ContinuationScore(pieces, float(chosen.double().sum()), rank))
        results.append(RoundScoreResult("", top, scores))
    return results


# --------------------------------------------------------------------------- guesses and points


def continuation(prompt: str, guess: str) -> str:
    """A guess as it follows the prompt: a word after a word gets its space (the model's tokens
    for " Paris" and "Paris" differ), punctuation or a prompt ending in a space does not."""
    guess = " ".join(guess.split())
    if not prompt or prompt[-1].isspace() or unicodedata.category(guess[0]).startswith("P"):
        return guess
    return " " + guess


def bits_of(logprob: float) -> float:
    return -logprob / math.log(2)


def points_of(logprob: float) -> float:
    """The log score, shifted so that a sure guess earns BASE_BITS and a hopeless one 0."""
    return round(max(0.0, BASE_BITS - bits_of(logprob)), 1)


def cell(text: str, width: int = CELL) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def shown_token(token: str) -> str:
    return f"“{token}”"


# --------------------------------------------------------------------------- prompts from the cards

SENTENCE = re.compile(r"[^.!?]+[.!?]")


def card_prompt(ctx: Context) -> tuple[str, str, str]:
    """(prompt, the word the card goes on with, the card's slug): a sentence of a topic card's key
    idea, cut before one of its later words."""
    topics = list(ctx.app.registry.topics.values())
    candidates: list[tuple[str, list[str], int]] = []
    for topic in topics:
        for sentence in SENTENCE.findall(topic.key_idea):
            words = sentence.split()
            if len(words) >= 7:
                candidates.extend((topic.slug, words, cut) for cut in range(4, len(words)))
    if not candidates:
        raise UserError("There are no topic cards to draw a prompt from; give one with `prompt:`.")
    slug, words, cut = random.choice(candidates)
    truth = words[cut].strip(".,;:!?()“”\"'")
    return " ".join(words[:cut]), truth or words[cut], slug


# --------------------------------------------------------------------------- the reveal

# Rounds this process is timing: id -> the event its starter's End button sets.
_live: dict[str, asyncio.Event] = {}


@dataclass(frozen=True)
class Played:
    user: str
    name: str
    guess: str
    logprob: float
    rank: int
    tokens: int

    @property
    def points(self) -> float:
        return points_of(self.logprob)


async def reveal(ctx: Context, round_id: str, truth: str = "") -> Reply:
    """Close a round and show its results; a round someone else revealed says so."""
    store = scores_for(ctx)
    _live.pop(round_id, None)
    info = await store.round_info(round_id)
    guesses = await store.close_round(round_id)
    if info is None or guesses is None:
        return Reply("This round's results were posted already.", title="Round over", data={"round": round_id})
    prompt = info[2]
    result: RoundScoreResult = await ctx.inference.submit(
        RoundScore(prompt, tuple(continuation(prompt, g) for _, _, g in guesses))
    )
    played = sorted(
        (
            Played(user, name, guess, score.logprob, score.rank, len(score.tokens))
            for (user, name, guess), score in zip(guesses, result.scores, strict=True)
        ),
        key=lambda p: (-p.points, -p.logprob, p.name),
    )
    try:
        await store.score_round(round_id, [(p.user, p.points) for p in played])
    except ScoresUnavailable as exc:
        log.warning("round %s: points not saved: %s", round_id, exc)
    for p in played:
        if bits_of(p.logprob) >= FAR_OFF_BITS:
            await _review_card(ctx, round_id, prompt, p, result.top)
    return results_reply(round_id, prompt, played, result.top, truth)


async def _review_card(ctx: Context, round_id: str, prompt: str, p: Played, top: list[TokenProb]) -> None:
    best = ", ".join(f"{shown_token(t.token)} {probability(t.prob)}" for t in top[:3])
    front = f"What did the model expect after “{cell(prompt, 200)}”? (You guessed “{p.guess}”.)"
    guessed = probability(math.exp(p.logprob))
    back = f"Its top choices: {best}. Your guess had p = {guessed} ({bits_of(p.logprob):.1f} bits)."
    with contextlib.suppress(ScoresUnavailable):
        await add_review_card(scores_for(ctx), p.user, f"round.{round_id}", front, back)


def results_reply(round_id: str, prompt: str, played: list[Played], top: list[TokenProb], truth: str) -> Reply:
    """The results screen: who won, the model's top choices, every guess scored, how points work."""
    model_line = " · ".join(f"{shown_token(t.token)} {probability(t.prob)}" for t in top)
    fields = [Field(f"the model's top {len(top)}", model_line, inline=False)]
    data: dict[str, Any] = {
        "round": round_id,
        "prompt": prompt,
        "top": [{"token": t.token, "id": t.id, "prob": t.prob} for t in top],
        "players": [
            {
                "user": p.user,
                "name": p.name,
                "guess": p.guess,
                "prob": math.exp(p.logprob),
                "logprob": p.logprob,
                "rank": p.rank,
                "bits": bits_of(p.logprob),
                "points": p.points,
                "tokens": p.tokens,
            }
            for p in played
        ],
    }
    if truth:
        fields.append(Field("the card goes on", f"“{truth}”", inline=False))
        data["card_word"] = truth
    if not played:
        text = f"“{prompt} …”\nNobody guessed this time, so the model wins by default. Start another with /round."
        return Reply(text, title="Round over: no guesses", fields=fields, data=data)
    best = played[0]
    tops = sum(1 for p in played if p.rank == 1)
    headline = f"🏆 {best.name} wins with {best.points:.1f} points"
    if len(played) > 1:
        headline += f" out of {len(played)} players"
    matched = (
        f"{tops} of {len(played)} guessed the model's own first choice."
        if tops
        else "Nobody guessed the model's own first choice."
    )
    rows = []
    for n, p in enumerate(played[:SHOWN_PLAYERS]):
        place = MEDALS[n] if n < len(MEDALS) else str(n + 1)
        rows.append(
            [
                place,
                cell(p.name),
                cell(p.guess),
                probability(math.exp(p.logprob)),
                str(p.rank) if p.rank < 100_000 else f"{p.rank:.0e}",
                f"{bits_of(p.logprob):.1f}",
                f"{p.points:.1f}",
                str(p.tokens),
            ]
        )
    more = len(played) - SHOWN_PLAYERS
    tail = f"\n… and {plural(more, 'more player')} (see /leaderboard)." if more > 0 else ""
    fields.append(Field("how points work", POINTS_LINE, inline=False))
    fields.append(Field("the columns", COLUMNS_LINE, inline=False))
    return Reply(
        f"“{prompt} …”\n{headline}! {matched}{tail}",
        title="Round over: the results",
        table=Table(["#", "player", "guess", "p", "rank", "bits", "points", "tok"], rows, align="lllrrrrr"),
        fields=fields,
        buttons=[Button("New round", "round", "seconds", str(DEFAULT_SECONDS))],
        data=data,
    )


# --------------------------------------------------------------------------- the command


def _round_id(text: str) -> str:
    text = text.strip()
    if not ROUND_ID.match(text):
        raise UserError("That is not a round of this bot; start one with /round.")
    return text


async def _own_round(ctx: Context, round_id: str) -> tuple[str, str, str, float, str]:
    info = await scores_for(ctx).round_info(round_id)
    if info is None or info[0] != scope_of(ctx):  # a round of another server is not one here
        raise UserError("That is not a round here; start one with /round.")
    return info


def _timed(ctx: Context, round_id: str, closes_at: float, truth: str = "") -> Callable[[], Any]:
    """The later message of a round: its results, when its time is up or its starter ends it."""
    event = _live.setdefault(round_id, asyncio.Event())

    async def results() -> Reply:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), max(0.0, closes_at - time.time()))
        return await reveal(ctx, round_id, truth)

    return results


async def _start(ctx: Context, prompt: str | None, guess: str | None, seconds: int) -> Reply:
    truth = slug = ""
    if prompt is None:
        prompt, truth, slug = card_prompt(ctx)
    prompt = " ".join(prompt.split())
    store = scores_for(ctx)
    round_id = secrets.token_urlsafe(9)
    solo = ctx.guild_id is None
    await store.open_round(round_id, scope_of(ctx), ctx.user.id, prompt, time.time() + seconds)
    if solo and guess is not None:
        await store.guess(round_id, ctx.user.id, ctx.user.name, " ".join(guess.split()))
        return await reveal(ctx, round_id, truth)
    source = f" (from the “{ctx.app.registry.topics[slug].title}” card)" if slug else ""
    guess_button = Button("Guess", "round", "round", round_id, text_option="guess")
    if solo:
        text = f"“{prompt} …”{source}\nWhat word comes next? Guess it and see how likely the model finds it."
        return Reply(text, title="Beat the model", buttons=[guess_button], data={"round": round_id, "prompt": prompt})
    text = (
        f"“{prompt} …”{source}\n"
        f"What word comes next? Press Guess and type it: one guess each, hidden until the results in "
        f"{seconds} s. The likelier the model finds your guess, the more points."
    )
    return Reply(
        text,
        title=f"Beat the model: a round started by {ctx.user.name}",
        buttons=[guess_button, Button("End round", "round", "end", round_id)],
        data={"round": round_id, "prompt": prompt, "seconds": seconds},
        followup=_timed(ctx, round_id, time.time() + seconds, truth),
        followup_in_s=seconds,
    )


async def _guess(ctx: Context, round_id: str, guess: str | None) -> Reply:
    if guess is None:
        raise UserError(f"Type your guess: `/round round:{round_id} guess:<word>`.")
    _, _, _, closes_at, state = await _own_round(ctx, round_id)
    if state != "open":
        raise UserError("This round has ended; start a new one with /round.")
    guess = " ".join(guess.split())
    outcome = await scores_for(ctx).guess(round_id, ctx.user.id, ctx.user.name, guess)
    if outcome == "again":
        raise UserError("You have guessed in this round already; only your first guess counts.")
    if outcome == "closed":
        raise UserError("This round has ended; start a new one with /round.")
    if ctx.guild_id is None:  # one player: the results at once
        return await reveal(ctx, round_id)
    reply = Reply(
        f"Your guess “{guess}” is in. It stays hidden until the results.",
        title="Guess taken",
        ephemeral=True,
        data={"round": round_id, "guess": guess},
    )
    if round_id not in _live:  # the bot restarted since the round began: this press finishes it
        reply.followup = _timed(ctx, round_id, closes_at)
        reply.followup_in_s = max(0.0, closes_at - time.time())
    return reply


async def _end(ctx: Context, round_id: str) -> Reply:
    _, starter, _, _, state = await _own_round(ctx, round_id)
    if starter != ctx.user.id:
        raise UserError("Only whoever started this round can end it early.")
    if state != "open":
        raise UserError("This round has ended already.")
    event = _live.get(round_id)
    if event is None:  # the bot restarted since the round began: the results come with this answer
        return await reveal(ctx, round_id)
    event.set()
    return Reply("Ending the round now; the results are on their way.", ephemeral=True, data={"round": round_id})


@command(
    "round",
    "Beat the model: everyone guesses the next word of a prompt, then sees the model's odds",
    options=[
        Text(
            "prompt",
            "The text to continue (leave out for one from the topic cards)",
            required=False,
            max_length=MAX_PROMPT,
        ),
        Text("guess", "Your guess for the next word", required=False, max_length=MAX_GUESS),
        Integer(
            "seconds",
            "How long the round stays open",
            default=DEFAULT_SECONDS,
            min_value=MIN_SECONDS,
            max_value=MAX_SECONDS,
        ),
        Text("round", "The round to guess in (the Guess button fills this in)", required=False, max_length=40),
        Text("end", "End a round you started (its End round button fills this in)", required=False, max_length=40),
        Boolean("scores", "Show the round leaderboard instead", default=False),
    ],
)
async def round_command(
    ctx: Context, prompt: str | None, guess: str | None, seconds: int, round: str | None, end: str | None, scores: bool
) -> Reply:
    if scores:
        reply: Reply = await ctx.app.execute("leaderboard", {"game": "round"}, ctx)
        return reply
    try:
        if end:
            return await _end(ctx, _round_id(end))
        if round:
            return await _guess(ctx, _round_id(round), guess)
        return await _start(ctx, prompt, guess, seconds)
    except ScoresUnavailable as exc:
        raise UserError(f"The round cannot go on right now: {exc}.") from None


@hookimpl
def register_commands(register: Callable[[Command], None]) -> None:
    register(round_command)


@hookimpl
def register_environment(register: Callable[[str], None]) -> None:
    register(STORE_ENVIRONMENT)  # the score store's PostgreSQL login
