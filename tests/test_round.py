"""/round: a round's numbers equal transformers' own on the same model (several-token guesses
included, batched and alone); one guess per player; the results screen; the leaderboard."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from bot.app import App
from bot.commands import Context, User
from bot.frontends.discord.render import render_reply
from plugins.round import BASE_BITS, RoundScore, continuation, round_scores
from tests import study_fixtures
from tests.conftest import make_config
from tests.plugin_helpers import assert_fits_discord
from tests.test_surprise import load  # the model and tokenizer, loaded as transformers' users do

PROMPTS = ["The capital of France is", "Once upon a", "東京 🙂 and"]
# One-token and several-token guesses, punctuation, a word the model has never put together.
GUESSES = ("Paris", "the", "Zzyzx-Quibble", ",", "a time", "🙂")
LOGP_TOL = 1e-4

app = study_fixtures.app  # the fixture: an app on the tiny GPT-2, its scores in the test's folder


@torch.inference_mode()
def reference(model, tok, prompt: str, guess: str) -> tuple[float, int, list[float]]:  # type: ignore[no-untyped-def]
    """ln p of the guess (sum over its tokens, each given everything before it), its first
    token's rank, and the next-token probabilities after the prompt: one unpadded forward."""
    prompt_ids = tok(prompt)["input_ids"]
    guess_ids = tok(continuation(prompt, guess), add_special_tokens=False)["input_ids"]
    logits = model(torch.tensor([prompt_ids + guess_ids])).logits[0].float()
    logp = torch.log_softmax(logits, -1)
    total = sum(logp[len(prompt_ids) - 1 + j, t].item() for j, t in enumerate(guess_ids))
    after_prompt = logp[len(prompt_ids) - 1]
    rank = 1 + int((after_prompt > after_prompt[guess_ids[0]]).sum())
    return total, rank, after_prompt.exp().tolist()


@pytest.fixture(scope="module", params=["tiny_gpt2", "tiny_llama", "smollm_dir"])
def causal(request):  # type: ignore[no-untyped-def]
    return load(request.getfixturevalue(request.param))


@torch.inference_mode()
def test_guess_probabilities_equal_transformers_batched_and_alone(causal) -> None:  # type: ignore[no-untyped-def]
    model, tok = causal
    batch = [RoundScore(p, tuple(continuation(p, g) for g in GUESSES), k=5) for p in PROMPTS]
    together = round_scores(model, tok, batch)
    assert any(len(s.tokens) > 1 for r in together for s in r.scores)  # several-token guesses are in it
    for request, got in zip(batch, together, strict=True):
        for guess, score in zip(GUESSES, got.scores, strict=True):
            alone = round_scores(model, tok, [RoundScore(request.prompt, (continuation(request.prompt, guess),))])[0]
            want, rank, probs = reference(model, tok, request.prompt, guess)
            assert score.logprob == pytest.approx(want, rel=LOGP_TOL, abs=1e-5)
            assert alone.scores[0].logprob == pytest.approx(want, rel=LOGP_TOL, abs=1e-5)
            assert score.rank == alone.scores[0].rank == rank
            assert "".join(score.tokens) == continuation(request.prompt, guess)
        _, _, probs = reference(model, tok, request.prompt, GUESSES[0])
        best = sorted(range(len(probs)), key=lambda i: -probs[i])[:5]
        assert [t.id for t in got.top] == best
        assert [t.prob for t in got.top] == pytest.approx([probs[i] for i in best], rel=LOGP_TOL)
    # A round nobody guessed in still gets the model's top choices.
    empty = round_scores(model, tok, [RoundScore(PROMPTS[0], ())])[0]
    assert empty.scores == [] and [t.id for t in empty.top] == [t.id for t in together[0].top]


def guild_ctx(app: App, user: int, guild: str = "4242") -> Context:
    return Context(user=User(str(user), f"player{user}"), app=app, guild_id=guild, transport="discord")


async def test_one_player_in_the_console_gets_results_at_once(app: App, tiny_gpt2: Path) -> None:
    reply = await app.execute_line('/round prompt:"Once upon a" guess:time')
    assert not reply.error, reply.text
    (player,) = reply.data["players"]
    want, rank, _ = reference(*load(tiny_gpt2), "Once upon a", "time")
    assert player["logprob"] == pytest.approx(want, rel=LOGP_TOL)
    assert player["rank"] == rank
    assert player["bits"] == pytest.approx(-want / math.log(2), rel=LOGP_TOL)
    assert player["points"] == pytest.approx(max(0.0, BASE_BITS + want / math.log(2)), abs=0.051)
    assert "points = 20 − bits" in " ".join(f.value for f in reply.fields)
    assert_fits_discord(reply)
    # Without a guess: the prompt and a Guess button that asks for one; guessing gives the results.
    asked = await app.execute_line("/round")
    (button,) = asked.buttons
    assert button.text_option == "guess" and asked.data["prompt"]
    done = await app.execute_text(button.command, {button.option: button.value, "guess": "model"}, app.local_context())
    assert [p["guess"] for p in done.data["players"]] == ["model"]
    again = await app.execute_text(button.command, {button.option: button.value, "guess": "x"}, app.local_context())
    assert again.error and "ended" in again.text


async def test_a_server_round_takes_one_hidden_guess_each_and_shows_everyone_at_the_end(
    app: App, tiny_gpt2: Path
) -> None:
    prompt = "The capital of France is @everyone <@&123> **bold**"
    started = await app.execute("round", {"prompt": prompt, "seconds": 300}, guild_ctx(app, 1))
    assert started.followup is not None and not started.error
    guess_button, end_button = started.buttons
    round_id = guess_button.value
    assert guess_button.text_option == "guess" and end_button.value == round_id
    guesses = {2: "Paris", 3: "the capital", 4: "banana", 5: "@everyone", 6: "Paris"}
    for user, guess in guesses.items():
        taken = await app.execute_text("round", {"round": round_id, "guess": guess}, guild_ctx(app, user))
        assert taken.ephemeral and not taken.error and guess in taken.text
    second = await app.execute_text("round", {"round": round_id, "guess": "Lyon"}, guild_ctx(app, 2))
    assert second.error and "first guess counts" in second.text
    elsewhere = await app.execute_text("round", {"round": round_id, "guess": "x"}, guild_ctx(app, 7, guild="99"))
    assert elsewhere.error and "not a round here" in elsewhere.text
    forged = await app.execute_text("round", {"round": "not-a-round-id", "guess": "x"}, guild_ctx(app, 7))
    assert forged.error
    not_starter = await app.execute_text("round", {"end": round_id}, guild_ctx(app, 2))
    assert not_starter.error and "started this round" in not_starter.text
    ending = await app.execute_text("round", {"end": round_id}, guild_ctx(app, 1))
    assert ending.ephemeral and not ending.error
    results = await started.followup()
    assert not results.error, results.text
    players = {p["user"]: p for p in results.data["players"]}
    assert set(players) == {str(u) for u in guesses}
    model, tok = load(tiny_gpt2)
    for user, guess in guesses.items():
        want, rank, _ = reference(model, tok, prompt, guess)
        assert players[str(user)]["logprob"] == pytest.approx(want, rel=LOGP_TOL)
        assert players[str(user)]["rank"] == rank
    points = [p["points"] for p in results.data["players"]]
    assert points == sorted(points, reverse=True)  # best first
    assert_fits_discord(results)
    shown = render_reply(results)
    everything = " ".join([shown.embed.description or "", *(f.value for f in shown.embed.fields)])
    assert "@everyone" not in everything.replace("@\u200beveryone", "") and "<@&123>" not in everything
    assert "\\*\\*bold\\*\\*" in everything  # the prompt's markdown is shown, not applied
    assert (await started.followup()).data == {"round": round_id}  # revealed once
    late = await app.execute_text("round", {"round": round_id, "guess": "late"}, guild_ctx(app, 8))
    assert late.error and "ended" in late.text
    # The round's points are on the server's board, and each player sees their own place privately.
    board = await app.execute("leaderboard", {"game": "round", "period": "day"}, guild_ctx(app, 2))
    on_board = {row["user"]: float(row["score"]) for row in board.data["board"]}
    assert on_board == {p["user"]: p["points"] for p in results.data["players"]}
    assert [float(row["score"]) for row in board.data["board"]] == points
    mine = await app.execute("leaderboard", {"mine": True}, guild_ctx(app, 4))
    place = [row["user"] for row in board.data["board"]].index("4") + 1
    assert mine.ephemeral and mine.data == {"place": place, "players": len(guesses)}
    elsewhere_board = await app.execute("leaderboard", {"game": "round"}, guild_ctx(app, 2, guild="99"))
    assert elsewhere_board.data["board"] == []


async def test_a_round_with_no_guesses_ends_politely(app: App) -> None:
    started = await app.execute("round", {"prompt": "Hello", "seconds": 10}, guild_ctx(app, 1))
    await app.execute_text("round", {"end": started.buttons[0].value}, guild_ctx(app, 1))
    assert started.followup is not None
    results = await started.followup()
    assert not results.error and "Nobody guessed" in results.text and results.data["players"] == []
    assert len(results.data["top"]) == 5


async def test_a_round_left_open_by_a_restart_is_finished_by_its_next_press(
    cache_dir: Path, tmp_path: Path, tiny_gpt2: Path
) -> None:
    options = {"study": {"quiz_db": str(tmp_path / "scores.sqlite3")}}
    first = App(make_config(cache_dir, {"causal_lm": tiny_gpt2}, plugin_options=options))
    started = await first.execute("round", {"prompt": "Once upon a", "seconds": 10}, guild_ctx(first, 1))
    round_id = started.buttons[0].value
    await first.execute_text("round", {"round": round_id, "guess": "time"}, guild_ctx(first, 2))
    await first.close()  # its timer is gone with it
    import plugins.round as round_module

    round_module._live.clear()
    second = App(make_config(cache_dir, {"causal_lm": tiny_gpt2}, plugin_options=options))
    try:
        results = await second.execute_text("round", {"end": round_id}, guild_ctx(second, 1))
        assert not results.error and [p["guess"] for p in results.data["players"]] == ["time"]
    finally:
        await second.close()


def test_continuations_read_as_the_next_word() -> None:
    assert continuation("The cat", "sat") == " sat"
    assert continuation("The cat ", "sat") == "sat"
    assert continuation("The cat", ",") == ","
    assert continuation("The cat", "  sat   down ") == " sat down"


def test_probabilities_read_as_people_read_them() -> None:
    from bot.render import probability

    shown = [probability(p) for p in (0.773, 0.0005, 1 / 121_996, 9.2e-13)]
    assert shown == ["77.3%", "1 in 2,000", "1 in 121,996", "1 in 10^12"]
