"""Charts: token labels in any script, drawn as PNGs."""

from __future__ import annotations

import asyncio
import logging
import shutil
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from matplotlib import font_manager
from matplotlib.figure import Figure

from bot import charts
from bot.commands import Image, Reply
from bot.render import save_images
from tests.conftest import examples


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


@pytest.mark.parametrize("text", ["東京", "🙂", "東京 🙂 Paris"])
def test_cjk_and_emoji_draw_with_no_missing_glyph(text: str) -> None:
    _need_fallback_fonts()
    # The chart functions hide missing-glyph warnings (a box is drawn); draw here without that
    # filter, in the same fonts, so a glyph no installed font has would show up as a warning.
    with (
        matplotlib.rc_context({"font.family": list(charts.font_families()), "text.parse_math": False}),
        warnings.catch_warnings(record=True) as caught,
    ):
        warnings.simplefilter("always")
        image = charts._bar_panels(
            [(f"Next token after “{text}”", [text, "x"], [0.6, 0.4])],
            xlabel=text,
            filename="t.png",
            value_format="{:.1%}",
            xmax=None,
        )
    assert image.data.startswith(b"\x89PNG")
    assert not [str(w.message) for w in caught if "missing from font" in str(w.message)]


def test_a_glyph_no_font_has_draws_a_box_without_a_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        image = charts.bar_chart(["\U0001d11e\U00013000"], [1.0], title="rare scripts", xlabel="probability")
    assert image.data.startswith(b"\x89PNG")


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


def test_a_title_with_newlines_is_drawn_on_one_line(figures: list[Figure]) -> None:
    prompt = "Dear team,\n\nthe meeting\r\nis at\tnoon " + "and more " * 20
    image = charts.bar_chart(["a\nb", "x"], [0.5, 0.5], title=f"Next token after “{prompt}”", xlabel="p\nq")
    ax = figures[-1].axes[0]
    title = ax.get_title(loc="left")
    assert "\n" not in title and "\r" not in title and "\t" not in title
    assert title.startswith("Next token after “Dear team,⏎⏎the meeting⏎is at noon")
    assert len(title) <= 80 and title.endswith("…")
    assert all("\n" not in t.get_text() for t in ax.get_yticklabels())
    assert "\n" not in ax.get_xlabel()
    assert "\n" not in image.description


def test_line_chart_titles_and_legends_are_one_line(figures: list[Figure]) -> None:
    charts.line_chart([("a\nb", [1, 2], [1, 4], "o-")], title="x\ny", xlabel="n\n", ylabel="t\n", log=False)
    ax = figures[-1].axes[0]
    assert ax.get_title(loc="left") == "x⏎y"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["a⏎b"]


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
    def slow() -> Image:
        threading.Event().wait(0.5)
        return Image("x.png", b"\x89PNG")

    task = asyncio.ensure_future(charts.render(slow))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


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

    def slow_chart() -> Image:
        release.wait(30)
        return Image("slow.png", b"\x89PNG", "slow")

    # More draws than asyncio's default pool has threads (min(32, cores + 4)).
    drawing = [asyncio.create_task(charts.render(slow_chart)) for _ in range(40)]
    await asyncio.sleep(0.1)
    try:
        # Other replies' thread work (a tokenizer, the quiz database) still runs at once.
        assert await asyncio.wait_for(asyncio.to_thread(lambda: "done"), timeout=10) == "done"
    finally:
        release.set()
    images = await asyncio.gather(*drawing)
    assert [image.filename for image in images] == ["slow.png"] * 40
