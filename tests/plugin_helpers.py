"""Shared checks for plugin tests."""

from __future__ import annotations

from bot.commands import Reply

# Discord's limits (content, embed title, field value, fields per embed).
CONTENT, TITLE, FIELD_VALUE, FIELDS = 2000, 256, 1024, 25


def assert_fits_discord(reply: Reply) -> None:
    assert isinstance(reply, Reply)
    assert len(reply.text) <= CONTENT
    assert reply.title is None or len(reply.title) <= TITLE
    assert len(reply.fields) <= FIELDS
    for field in reply.fields:
        assert 0 < len(field.value) <= FIELD_VALUE, field
    for image in reply.images:
        assert image.data.startswith(b"\x89PNG")
