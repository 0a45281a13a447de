"""Loopback only: importing this module makes any connection to a host other than
loopback fail in this process.

The test process imports it (``tests/conftest.py``), and the processes tests start
(the CLI, and the model workers it spawns) get this folder on ``PYTHONPATH``, where
Python imports ``sitecustomize`` at start-up.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from typing import Any


def is_loopback(host: object) -> bool:
    """True for loopback addresses and for Unix socket paths."""
    return not isinstance(host, str) or "/" in host or host.startswith("127.") or host in ("::1", "localhost")


def _guard(connect: Callable[..., Any]) -> Callable[..., Any]:
    def loopback_only(self: socket.socket, address: Any) -> Any:
        host = address[0] if isinstance(address, tuple) else address
        if not is_loopback(host):
            raise OSError(f"a test process tried to reach {host}")
        return connect(self, address)

    loopback_only.guarded = True  # type: ignore[attr-defined]
    return loopback_only


if not getattr(socket.socket.connect, "guarded", False):
    socket.socket.connect = _guard(socket.socket.connect)  # type: ignore[method-assign]
