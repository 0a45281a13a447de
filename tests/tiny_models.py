"""Moved to :mod:`bot.testing.models` (the plugin testing kit); kept for old imports."""

from bot.testing.models import *  # noqa: F403
