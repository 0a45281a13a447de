"""Helpers that install throwaway plugins as real distributions on sys.path."""

from __future__ import annotations

import textwrap
from pathlib import Path


def install_plugin(root: Path, module: str, source: str, *, dist: str | None = None, version: str = "1.2.3") -> Path:
    """Write ``module.py`` and a ``.dist-info`` whose entry point names it in the ``lmbot`` group.

    With ``root`` on sys.path, ``importlib.metadata.entry_points(group="lmbot")``
    finds it exactly as it finds a plugin installed with pip.
    """
    dist = dist or module.replace("_", "-")
    (root / f"{module}.py").write_text(textwrap.dedent(source), encoding="utf-8")
    info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n", encoding="utf-8")
    (info / "entry_points.txt").write_text(f"[lmbot]\n{module} = {module}\n", encoding="utf-8")
    return root


ECHO_PLUGIN = """
    from bot import Reply, Text, command, hookimpl

    @command("echo", "Repeat the text back", options=[Text("text", "What to repeat")])
    async def echo(ctx, text):
        return Reply(text, data={"echo": text})

    @hookimpl
    def register_commands(register):
        register(echo)
"""

BROKEN_IMPORT = """
    raise RuntimeError("this plugin is broken on purpose")
"""
