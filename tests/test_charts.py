"""Charts: token labels in any script, drawn as PNGs."""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
import shutil
import threading
import unicodedata
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib import font_manager
from matplotlib.collections import PolyCollection
from matplotlib.figure import Figure
from matplotlib.text import Text

from bot import charts
from bot.commands import Image, Reply
from bot.render import save_images
from tests.conftest import examples
from tests.fake_tasks import until


@dataclass
class Drawn:
    """A text the Agg renderer drew: what, where (pixels), and the size of the canvas."""

    text: str
    x0: float
    y0: float
    x1: float
    y1: float
    width: float
    height: float
    families: tuple[str, ...] = ()

    def inside(self) -> bool:
        return self.x0 >= -0.5 and self.y0 >= -0.5 and self.x1 <= self.width + 0.5 and self.y1 <= self.height + 0.5


@contextmanager
def drawn_texts() -> Iterator[list[Drawn]]:
    """Every text the charts draw while inside, with its extent as the renderer measures it."""
    renderer = charts.renderer_class()  # the Agg renderer every chart draws with
    drawn: list[Drawn] = []
    draw_text = renderer.draw_text

    def record(self: Any, gc: Any, x: float, y: float, s: str, prop: Any, angle: float, *args: Any, **kw: Any) -> Any:
        mtext = kw.get("mtext") or (args[1] if len(args) > 1 else None)
        if mtext is not None and s.strip():
            box = mtext.get_window_extent(self)
            drawn.append(
                Drawn(s, box.x0, box.y0, box.x1, box.y1, self.width, self.height, tuple(mtext.get_fontfamily()))
            )
        return draw_text(self, gc, x, y, s, prop, angle, *args, **kw)

    renderer.draw_text = record
    try:
        yield drawn
    finally:
        renderer.draw_text = draw_text


def test_font_families_start_with_matplotlibs_own_and_hold_only_installed_fonts() -> None:
    families = charts.font_families()
    installed = {font.name for font in font_manager.fontManager.ttflist}
    assert families[0] == "DejaVu Sans"
    assert set(families) <= installed


def test_show_token_makes_spaces_and_newlines_visible() -> None:
    assert charts.show_token(" Paris") == "␣Paris"
    assert charts.show_token("a\n") == "a⏎"
    assert charts.show_token("  ") == "␣␣"
    assert charts.show_token("") == "∅"


def test_cjk_tokens_are_drawn_with_a_fallback_font(monkeypatch: pytest.MonkeyPatch) -> None:
    _need_fallback_fonts()

    def draw() -> bytes:
        return charts.bar_chart(["東京", "␣Paris"], [0.6, 0.4], title="tokens", xlabel="probability").data

    with_fallback = draw()
    monkeypatch.setattr(charts, "font_families", lambda: ("DejaVu Sans",))
    boxes = draw()  # DejaVu has no CJK glyphs: the same chart with boxes for 東京
    assert with_fallback.startswith(b"\x89PNG") and with_fallback != boxes


def _need_fallback_fonts() -> None:
    """The CJK and emoji fonts that scripts/install.sh --test installs (Debian's fonts-noto-cjk and
    fonts-symbola); only a host without apt-get may lack them."""
    missing = {"Noto Sans CJK JP", "Symbola"} - set(charts.font_families())
    if missing and shutil.which("apt-get") is None:
        pytest.skip(f"no apt-get on this host to install {sorted(missing)} (fonts-noto-cjk, fonts-symbola)")
    assert not missing, f"{sorted(missing)} missing: run `apt-get install fonts-noto-cjk fonts-symbola` as root"


# Emoji from Unicode 6 to 14: Symbola has those up to Unicode 9; later ones (🥰 11, 🥲 13, 🫠 14) no font here has.
EMOJI = ["🙂", "🦜", "👍🏽", "❤️", "👨‍👩‍👧", "🥰", "🧠", "🥲", "🫠"]


@pytest.mark.parametrize("text", ["東京", *EMOJI, "東京 🙂 Paris 🫠"])
def test_cjk_and_emoji_draw_with_no_missing_glyph(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _need_fallback_fonts()
    # The chart functions hide missing-glyph warnings; unhide them here, so a glyph no chart font
    # has (a box) shows up as a warning.
    monkeypatch.setattr(charts, "HIDDEN_WARNING", "no warning is hidden in this test")
    with warnings.catch_warnings(record=True) as caught, drawn_texts() as drawn:
        warnings.simplefilter("always")
        image = charts.bar_chart([text, "x"], [0.6, 0.4], title=f"Next token after “{text}”", xlabel=text)
    assert image.data.startswith(b"\x89PNG")
    assert not [str(w.message) for w in caught if "missing from font" in str(w.message)]
    label = next(d.text for d in drawn if d.text.endswith(text) or "⟦" in d.text)
    for ch in text:  # every character is drawn, or named where no font has it
        assert ch in label or unicodedata.name(ch).lower() in label or unicodedata.category(ch) in ("Mn", "Cf", "Sk")


def test_an_emoji_no_font_has_is_named_not_boxed() -> None:
    _need_fallback_fonts()
    assert not charts.has_glyph("🫠")
    assert charts.drawable("so 🫠!") == "so ⟦melting face⟧!"
    assert charts.drawable("東京 🙂") == "東京 🙂"


def test_a_glyph_no_font_has_draws_no_box_and_no_warning() -> None:
    with warnings.catch_warnings(), drawn_texts() as drawn:
        warnings.simplefilter("error")
        image = charts.bar_chart(["\U0001d11e\U00013000\U0001fae0"], [1.0], title="rare scripts", xlabel="probability")
    assert image.data.startswith(b"\x89PNG")
    assert all(charts.has_glyph(ch) for d in drawn for ch in d.text if ch != "\n")


@pytest.mark.parametrize("text", ["Pay $5 (20% off) instead of $6", "$$0", " $$", r"$\frac{1}{0}$", "a_b^c $x"])
def test_dollar_signs_are_literal_text_never_mathtext(text: str) -> None:
    image = charts.bar_chart([text, "x"], [0.5, 0.5], title=f"Next token after “{text}”", xlabel=text)
    assert image.data.startswith(b"\x89PNG")


def test_show_bytes_shows_text_or_hex_for_part_of_a_character() -> None:
    assert charts.show_bytes(b" Paris") == "␣Paris"
    assert charts.show_bytes("東".encode()[:2]) == "⟨E6 9D⟩"
    assert charts.show_bytes("東".encode()) == "東"


# ----------------------------------------------------------------------------- drawn figures


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Figure]]:
    """Every figure a chart function saves, to look at what it drew."""
    drawn: list[Figure] = []
    savefig = Figure.savefig

    def keep(self: Figure, *args: Any, **kwargs: Any) -> Any:
        drawn.append(self)
        return savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    yield drawn


def drawn_title(fig: Figure) -> str:
    return next(t.get_text() for t in fig.findobj(Text) if t.get_gid() == "title")


def test_a_title_with_newlines_shows_them_and_wraps_at_words(figures: list[Figure]) -> None:
    prompt = "Dear team,\n\nthe meeting\r\nis at\tnoon " + "and more " * 40
    image = charts.bar_chart(["a\nb", "x"], [0.5, 0.5], title=f"Next token after “{prompt}”", xlabel="p\nq")
    title = drawn_title(figures[-1])
    lines = title.split("\n")
    assert len(lines) == 2 and "\r" not in title and "\t" not in title
    assert title.startswith("Next token after “Dear team,⏎⏎the meeting⏎is at noon")
    assert title.endswith("and…") or title.endswith("more…")
    labels = [t.get_text() for t in figures[-1].findobj(Text) if t.get_gid() == "label"]
    assert labels == ["a⏎b", "x"]
    assert "\n" not in image.description


def test_line_chart_titles_and_legends_are_one_line(figures: list[Figure]) -> None:
    charts.line_chart([("a\nb", [1, 2], [1, 4], "o-")], title="x\ny", xlabel="n\n", ylabel="t\n", log=False)
    assert drawn_title(figures[-1]) == "x⏎y"
    assert [t.get_text() for t in figures[-1].axes[0].get_legend().get_texts()] == ["a⏎b"]


@settings(max_examples=examples(200), deadline=None)
@given(text=st.text(), limit=st.integers(1, 100))
def test_one_line_is_one_short_line(text: str, limit: int) -> None:
    line = charts.one_line(text, limit)
    assert len(line) <= limit
    assert not any(ch in line for ch in "\n\r\x0b\x0c\x85\u2028\u2029\t")


def test_split_bars_show_each_part(figures: list[Figure]) -> None:
    image = charts.split_bar_chart(
        ["characters", "word list"],
        [("known", [10, 2]), ("[UNK]", [0, 3])],
        title="tokens",
        xlabel="tokens",
    )
    assert image.data.startswith(b"\x89PNG")
    ax = figures[-1].axes[0]
    known, unknown = ax.containers
    assert [bar.get_width() for bar in known] == [10, 2]
    assert [bar.get_width() for bar in unknown] == [0, 3]
    assert [bar.get_x() for bar in unknown] == [10, 2]  # stacked after the known part
    assert all(bar.get_hatch() for bar in unknown)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["known", "[UNK]"]


# ----------------------------------------------------------------------------- a chart never breaks a reply


async def test_render_logs_a_failed_chart_and_returns_an_empty_image(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(self: Figure, *args: Any, **kwargs: Any) -> None:
        raise ValueError("simulated drawing failure")

    monkeypatch.setattr(Figure, "savefig", broken)
    with caplog.at_level(logging.ERROR, logger="bot.charts"):
        image = await charts.render(charts.bar_chart, ["a"], [1.0], title="t", xlabel="p", filename="n.png")
    assert image.data == b"" and image.filename == "n.png"
    assert "could not be drawn" in caplog.text and "simulated drawing failure" in caplog.text
    assert Reply(text="x", images=[image]).images == []


async def test_render_does_not_swallow_cancellation() -> None:
    drawing, release = threading.Event(), threading.Event()

    def slow() -> Image:
        drawing.set()
        release.wait(60)
        return Image("x.png", b"\x89PNG")

    task = asyncio.ensure_future(charts.render(slow))
    try:
        await asyncio.wait_for(until(drawing.is_set), 60)  # cancelled while the chart is being drawn
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    finally:
        release.set()


def test_a_reply_keeps_images_with_data_only() -> None:
    png = Image("a.png", b"\x89PNG...")
    assert Reply(images=[Image("b.png", b""), png]).images == [png]


# ----------------------------------------------------------------------------- chart files


def test_saved_chart_files_never_overwrite_each_other(tmp_path: Path) -> None:
    first = Reply(images=[Image("nexttoken.png", b"first")])
    second = Reply(images=[Image("nexttoken.png", b"second"), Image("nexttoken.png", b"third")])
    stem = "nexttoken-20261128-121853"  # two replies in the same second
    paths = save_images(first, tmp_path, stem) + save_images(second, tmp_path, stem)
    assert len(set(paths)) == 3
    assert [Path(p).read_bytes() for p in paths] == [b"first", b"second", b"third"]
    assert [Path(p).name for p in paths] == [
        "nexttoken-20261128-121853-nexttoken.png",
        "nexttoken-20261128-121853-nexttoken-2.png",
        "nexttoken-20261128-121853-nexttoken-3.png",
    ]


def test_saved_chart_files_are_unique_across_threads(tmp_path: Path) -> None:
    paths: list[str] = []
    lock = threading.Lock()

    def save(n: int) -> None:
        got = save_images(Reply(images=[Image("c.png", str(n).encode())]), tmp_path, "same-second")
        with lock:
            paths.extend(got)

    threads = [threading.Thread(target=save, args=(n,)) for n in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(paths)) == 16
    assert sorted(int(Path(p).read_bytes()) for p in paths) == list(range(16))


def test_an_image_without_data_is_not_saved(tmp_path: Path) -> None:
    reply = Reply(images=[Image("a.png", b"png")])
    reply.images.append(Image("broken.png", b""))  # appended after the reply was made
    assert [Path(p).name for p in save_images(reply, tmp_path, "s")] == ["s-a.png"]


async def test_charts_being_drawn_never_hold_up_other_thread_work() -> None:
    """A burst of slow charts waits in the chart threads, not in asyncio's shared pool."""
    release = threading.Event()
    loop, drawing_started = asyncio.get_running_loop(), asyncio.Event()

    def slow_chart() -> Image:
        loop.call_soon_threadsafe(drawing_started.set)
        release.wait(30)
        return Image("slow.png", b"\x89PNG", "slow")

    # More draws than asyncio's default pool has threads (min(32, cores + 4)).
    drawing = [asyncio.create_task(charts.render(slow_chart)) for _ in range(40)]
    try:
        await asyncio.wait_for(drawing_started.wait(), timeout=30)  # a chart is being drawn, 39 wait
        # Other replies' thread work (a tokenizer, the quiz database) still runs at once.
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "done"), timeout=10) == "done"
    finally:
        release.set()
    images = await asyncio.gather(*drawing)
    assert [image.filename for image in images] == ["slow.png"] * 40


# ----------------------------------------------------------------------------- legibility: every chart type

LONG_TITLE = "Next token after “" + "the quick brown fox jumps over the lazy dog and " * 8 + "🙂 東京”"
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct (ONNX Runtime, fp32, from torch 2.5 weights, batch of 8)"
TOKENS = ["␣Paris", "␣the", "␣a", "␣very-long-token-label-that-goes-on", "🙂", "東京"]


def chart_calls() -> dict[str, Callable[[], Image]]:
    """Every chart type, with long titles and labels, emoji and CJK (partials: they travel to a drawing process)."""
    flat = [0.0021, 0.0018, 0.0016, 0.0015, 0.0013, 0.0012]
    n = len(TOKENS)
    weights = [[1.0 / (i + 1) if j <= i else 0.0 for j in range(n)] for i in range(n)]
    return {
        "bar_chart": functools.partial(
            charts.bar_chart, TOKENS, flat, title=LONG_TITLE, xlabel=f"probability ({MODEL})"
        ),
        "bar_panels": functools.partial(
            charts.bar_panels,
            [(LONG_TITLE, TOKENS, flat), ("BERT " + LONG_TITLE, TOKENS[:2], [0.9, 0.1])],
            xlabel=f"probability ({MODEL})",
        ),
        "line_chart": functools.partial(
            charts.line_chart,
            [
                ("GRU 6·n·d²", [8, 64, 4096], [3e3, 2e5, 1.6e7], "s-"),
                ("attention " + "🙂" * 3, [8, 64, 4096], [4e3, 1e6, 1e9], "o-"),
            ],
            title=LONG_TITLE,
            xlabel="sequence length (tokens) " * 6,
            ylabel="milliseconds per forward pass " * 3,
        ),
        "split_bar_chart": functools.partial(
            charts.split_bar_chart,
            TOKENS[:4],
            [("known", [10, 2, 5, 7]), ("[UNK]: unknown, information lost", [0, 3, 0, 1])],
            title=LONG_TITLE,
            xlabel=MODEL,
        ),
        "heatmap": functools.partial(
            charts.heatmap,
            [(LONG_TITLE, TOKENS, weights, True), ("masked\n" + LONG_TITLE, TOKENS, weights, False)],
            colorbar=MODEL,
        ),
        "shaded_text": functools.partial(
            charts.shaded_text,
            [(LONG_TITLE, [f" {t}" for t in TOKENS * 6], [float(i) for i in range(n * 6)])],
            colorbar=MODEL,
            bounds=(2, 6, 12),
        ),
        "grouped_bars": functools.partial(
            charts.grouped_bars,
            TOKENS,
            [("model", flat), ("temperature 5", flat[::-1]), ("after top-k and top-p (drawn from)", flat)],
            title=LONG_TITLE,
            xlabel=f"probability ({MODEL})",
            notes=["cut by top-k"] * n,
        ),
        "probability_grid": functools.partial(
            charts.probability_grid,
            ["embeddings", *(f"layer {k}" for k in range(1, 8))],
            TOKENS[:5],
            [[min(1.0, (k + 1) * (c + 1) / 40) for c in range(5)] for k in range(8)],
            title=LONG_TITLE,
            row_name="after layer " * 20,
            column_name=MODEL,
        ),
    }


@pytest.mark.parametrize("kind", list(chart_calls()))
def test_every_text_of_every_chart_fits_inside_it_with_no_missing_glyph(kind: str) -> None:
    with drawn_texts() as drawn:
        image = chart_calls()[kind]()
    assert image.data.startswith(b"\x89PNG") and drawn
    assert [d.text for d in drawn if not d.inside()] == []
    assert [d.text for d in drawn if not all(charts.has_glyph(ch) for ch in d.text if ch != "\n")] == []


@pytest.mark.parametrize(
    "kind", ["bar_chart", "bar_panels", "split_bar_chart", "grouped_bars", "line_chart", "shaded_text"]
)
def test_titles_are_cut_only_at_word_boundaries(kind: str, figures: list[Figure]) -> None:
    chart_calls()[kind]()
    title = drawn_title(figures[-1])
    assert 1 <= len(title.split("\n")) <= 2 and title.endswith("…")
    words = LONG_TITLE.split(" ")
    drawn_words = title.replace("\n", " ").removesuffix("…").split(" ")
    assert drawn_words == words[: len(drawn_words)]  # whole words, in order, none cut inside


def test_the_nexttoken_axis_label_is_shown_whole(figures: list[Figure]) -> None:
    xlabel = f"probability ({MODEL})"
    charts.bar_chart(TOKENS, [0.5] * len(TOKENS), title="t", xlabel=xlabel)
    shown = next(t.get_text() for t in figures[-1].texts if t.get_gid() == "xlabel")
    assert shown.replace("\n", " ") == xlabel


def test_bars_of_different_length_get_different_labels(figures: list[Figure]) -> None:
    flat = [0.0021, 0.0018, 0.0016, 0.0015, 0.0013, 0.0012]  # /nexttoken at temperature 5
    charts.bar_chart(TOKENS, flat, title="T=5", xlabel="probability")
    ax = figures[-1].axes[0]
    marks = [t.get_text() for t in ax.texts if t.get_gid() not in ("label", "tick")]
    assert len(set(marks)) == len(flat) and not any(m.strip("0.%") == "" for m in marks)
    assert [float(m.rstrip("%")) / 100 for m in marks] == pytest.approx(flat, rel=0.05)


@settings(max_examples=examples(200), deadline=None)
@given(
    values=st.lists(st.floats(0, 1), min_size=1, max_size=12), decimals=st.integers(0, 2), kind=st.sampled_from("%f")
)
def test_value_labels_tell_apart_what_the_bars_tell_apart(values: list[float], decimals: int, kind: str) -> None:
    labels = charts.value_labels(values, f"{{:.{decimals}{kind}}}")
    top = max(values)
    for value, label in zip(values, labels, strict=True):
        assert (value == 0) or any(ch in "123456789" for ch in label) or value < 1e-9
    for (a, la), (b, lb) in itertools.pairwise(sorted(zip(values, labels, strict=True))):
        if b - a > 0.005 * top and a > 1e-9:
            assert la != lb


def test_grouped_bars_label_every_nonzero_drawn_probability(figures: list[Figure]) -> None:
    flat = [2.1e-5, 1.9e-5, 1.7e-5]  # /sample at temperature 5: every drawn token was "0.0%"
    charts.grouped_bars(TOKENS[:3], [("model", [0.5, 0.3, 0.2]), ("drawn from", flat)], title="t", xlabel="p")
    marks = [t.get_text() for t in figures[-1].axes[0].texts if t.get_gid() not in ("label", "tick")]
    assert len(set(marks)) == 3 and all(any(ch in "123456789" for ch in m) for m in marks)


def test_shaded_text_bands_are_the_scale_a_text_key_describes(figures: list[Figure]) -> None:
    charts.shaded_text([("bits", [" a", " b", " c", " d"], [1.0, 3.0, 7.0, 15.0])], colorbar="bits", bounds=(2, 6, 12))
    ticks = [t.get_text() for t in figures[-1].texts if t.get_gid() == "tick"]
    assert [float(t) for t in ticks] == [0.0, 2.0, 6.0, 12.0, 15.0]
    boxes = [a for a in figures[-1].artists if isinstance(a, PolyCollection)]
    colours = boxes[0].get_facecolors()
    assert len({tuple(c) for c in colours}) == 4  # one shade per band


# ----------------------------------------------------------------------------- fair under a burst


async def test_another_users_chart_is_drawn_before_a_floods_remainder(monkeypatch: pytest.MonkeyPatch) -> None:
    """One user's 21 charts are queued first, another user's one chart after them: it is drawn
    after at most one more of the flood, not after all of them. One drawing thread, held by a
    gate until everything is queued, so the order is the queue's alone."""
    from bot.commands import User, current_user

    monkeypatch.setattr(charts, "_CHARTS", charts.FairChartQueue(threads=1))
    gate = threading.Event()
    order: list[str] = []

    def draw(owner: str, wait: bool) -> Image:
        if wait:
            gate.wait(30)
        order.append(owner)  # one thread: no lock needed
        return Image("c.png", b"\x89PNG", owner)

    async def as_user(user: str, wait: bool) -> Image:
        current_user.set(User(user, user))
        return await charts.render(draw, user, wait)

    flood = [asyncio.create_task(as_user("flood", n == 0)) for n in range(21)]
    await asyncio.sleep(0)  # every flood task has queued its chart
    other = asyncio.create_task(as_user("student", False))
    await asyncio.sleep(0)
    gate.set()
    images = await asyncio.gather(other, *flood)
    assert [image.description for image in images] == ["student"] + ["flood"] * 21
    assert order.index("student") <= 2, order  # the held chart, at most one more, then the student's


def test_a_chart_queued_while_the_idle_thread_wakes_gets_the_second_thread() -> None:
    """Two charts queued back to back while the one drawing thread sleeps idle: the first wakes
    it, the second starts the other thread, so a chart that blocks does not hold up the next."""
    queue = charts.FairChartQueue(threads=2)
    queue.submit("a", lambda: Image("warm.png", b"", "warm")).result(60)  # one thread, now idle
    gate, second_drawn = threading.Event(), threading.Event()

    def blocked() -> Image:
        gate.wait(60)
        return Image("blocked.png", b"", "blocked")

    def quick() -> Image:
        second_drawn.set()
        return Image("quick.png", b"", "quick")

    try:
        first = queue.submit("a", blocked)
        queue.submit("b", quick)
        assert second_drawn.wait(60), "the second chart waited behind the blocked one"
    finally:
        gate.set()
    assert first.result(60).description == "blocked"


def test_charts_are_drawn_for_the_user_whose_command_runs() -> None:
    """Command.invoke names the user for the chart queue (and forgets them after)."""
    from bot.commands import Command, Context, Reply, User, current_user

    seen: list[object] = []

    async def handler(ctx: Context) -> Reply:
        seen.append(current_user.get())
        return Reply("ok")

    cmd = Command("who", "who is asking", handler)
    asyncio.run(cmd.invoke(Context(User("u1", "Ann"), app=None), {}))
    assert seen == [User("u1", "Ann")] and current_user.get() is None


def test_charts_drawn_at_once_in_threads_keep_their_own_fonts() -> None:
    """rcParams are process-wide: an emoji chart and a plain one drawn in two threads at once
    must not draw with each other's fonts (a box for the emoji)."""
    _need_fallback_fonts()
    start = threading.Barrier(2)

    def draw(label: str) -> None:
        start.wait(10)
        for _ in range(3):
            charts.bar_chart([label, "x"], [0.6, 0.4], title=label, xlabel="p")

    with drawn_texts() as drawn:
        threads = [threading.Thread(target=draw, args=(label,)) for label in ("🙂 東京", "plain")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    emoji = [d for d in drawn if "🙂" in d.text]
    assert len(emoji) == 2 * 3  # title and label, three charts
    assert all("Symbola" in d.families and "Noto Sans CJK JP" in d.families for d in emoji)


@pytest.mark.parametrize("kind", list(chart_calls()))
def test_no_two_texts_of_a_chart_overlap(kind: str) -> None:
    """Axis names, labels, values and titles each have their own room (checked by extents)."""
    with drawn_texts() as drawn:
        chart_calls()[kind]()
    boxes = list({(d.text, round(d.x0), round(d.y0)): d for d in drawn}.values())
    overlapping = [
        (a.text, b.text)
        for a, b in itertools.combinations(boxes, 2)
        if min(a.x1, b.x1) - max(a.x0, b.x0) > 1 and min(a.y1, b.y1) - max(a.y0, b.y0) > 1
    ]
    assert overlapping == []


async def test_the_drawing_processes_draw_every_chart_as_the_bot_process_does() -> None:
    """``lmbot run`` draws in processes of its own (off the event loop's GIL): the same PNG, so
    every label and value the in-process tests check, comes back for every chart type."""
    calls = chart_calls()
    here = {kind: draw() for kind, draw in calls.items()}
    charts.start_process_pool(1)
    try:
        assert await charts.render(os.getpid) != os.getpid()  # it really is another process
        # at a lower CPU priority than the bot's: the event loop and the model workers go first
        assert await charts.render(os.nice, 0) == min(19, os.nice(0) + charts.DRAWING_NICENESS)
        there = {kind: await charts.render(draw) for kind, draw in calls.items()}
    finally:
        charts.stop_process_pool()
    assert {kind: image.data for kind, image in there.items()} == {kind: image.data for kind, image in here.items()}
    assert all(image.data.startswith(b"\x89PNG") for image in there.values())
    assert await charts.render(os.getpid) == os.getpid()  # stopped: drawn here again


def test_a_chart_is_the_same_picture_with_its_texts_laid_out_before_or_afresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """The charts keep each laid-out text (charts.renderer_class) to draw it again: reusing one, or
    forgetting them all in the middle of a chart, draws the very same pixels."""
    calls = chart_calls()
    charts.clear_text_cache()
    afresh = {kind: draw().data for kind, draw in calls.items()}
    again = {kind: draw().data for kind, draw in calls.items()}
    charts.clear_text_cache()
    monkeypatch.setattr(charts, "TEXTS_KEPT", 5)  # forgotten every few texts, mid-chart
    forgetting = {kind: draw().data for kind, draw in calls.items()}
    assert afresh == again == forgetting
    assert len(charts._TEXTS) <= 5


def test_a_matplotlib_without_the_inner_parts_draws_the_same_texts_its_own_way(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """charts.renderer_class leans on a few of matplotlib's inner parts; where they are gone (a
    later matplotlib) every chart is drawn by matplotlib's own renderer, with the same texts."""
    from matplotlib.backends.backend_agg import RendererAgg

    calls = chart_calls()
    with drawn_texts() as ours:
        for draw in calls.values():
            draw()
    monkeypatch.setattr(charts, "_has_text_internals", lambda *parts: False)
    plain = charts.renderer_class.__wrapped__()
    assert plain is RendererAgg
    monkeypatch.setattr(charts, "renderer_class", lambda: plain)
    charts.clear_text_cache()
    try:
        with drawn_texts() as theirs:
            pictures = {kind: draw() for kind, draw in calls.items()}
    finally:
        charts.clear_text_cache()
    assert all(picture.data.startswith(b"\x89PNG") for picture in pictures.values())
    assert ours and sorted(text.text for text in theirs) == sorted(text.text for text in ours)


@settings(max_examples=examples(40), deadline=None)
@given(
    height=st.integers(1, 40),
    width=st.integers(1, 40),
    seed=st.integers(0, 2**32 - 1),
    flat=st.booleans(),
)
def test_the_png_encoder_keeps_every_pixel(height: int, width: int, seed: int, flat: bool) -> None:
    """charts.encode_png (PNG's Up filter, zlib): Pillow reads back exactly the RGB pixels given."""
    import io

    import numpy as np
    from PIL import Image as PILImage

    rng = np.random.default_rng(seed)
    rgba = rng.integers(0, 256, (height, width, 4), dtype=np.uint8)
    if flat:  # a chart's flat areas and rows like the one above
        rgba[:, : width // 2] = rgba[0, 0]
    png = charts.encode_png(rgba)
    decoded = PILImage.open(io.BytesIO(png))
    assert decoded.mode == "RGB" and decoded.size == (width, height)
    assert np.array_equal(np.asarray(decoded), rgba[:, :, :3])
