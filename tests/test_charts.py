"""Charts: token labels in any script, drawn as PNGs."""

from __future__ import annotations

import warnings

import pytest
from matplotlib import font_manager

from bot import charts


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


def test_cjk_tokens_are_drawn_with_a_fallback_font_when_one_is_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    if "Noto Sans CJK JP" not in charts.font_families():
        pytest.skip("no CJK font on this host (the Docker image installs fonts-noto-cjk)")

    def draw() -> bytes:
        return charts.bar_chart(["東京", "␣Paris"], [0.6, 0.4], title="tokens", xlabel="probability").data

    with_fallback = draw()
    monkeypatch.setattr(charts, "font_families", lambda: ("DejaVu Sans",))
    boxes = draw()  # DejaVu has no CJK glyphs: the same chart with boxes for 東京
    assert with_fallback.startswith(b"\x89PNG") and with_fallback != boxes


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
