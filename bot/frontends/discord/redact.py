"""Secrets never reach a log: the bot token and interaction tokens are redacted from every record.

An interaction token lets whoever holds it answer (or edit the answer to) that
interaction for 15 minutes. At DEBUG, discord.py logs every gateway event (an
INTERACTION_CREATE carries its token) and every REST URL (callbacks and
webhooks carry it in the path), so the redaction works on any record, from any
logger, whatever handler prints it: it is installed in the log-record factory,
where every record is made, and is also a :class:`logging.Filter` for handlers.
"""

from __future__ import annotations

import logging
import re
import threading
from typing import Any

REDACTED = "<redacted>"
# Interaction callbacks and webhooks carry the token as the path segment after the id.
TOKEN_IN_URL = re.compile(r"(\b(?:interactions|webhooks)/\d+/)[^/\s?'\"]+")
# A payload printed as JSON or as a Python dict: "token": "..." / 'token': '...' (interaction
# tokens are long; a short value, such as a model's token " Paris", is left alone).
TOKEN_IN_PAYLOAD = re.compile(r"""(["']token["']\s*:\s*["'])[\w.=-]{20,}""")
# The shape of a Discord bot token (three base64url parts), wherever it appears.
BOT_TOKEN_SHAPE = re.compile(r"\b[\w-]{23,28}\.[\w-]{6,7}\.[\w-]{27,}\b")


class RedactSecrets(logging.Filter):
    """Rewrites a record's message (and traceback) with every known or recognisable token hidden."""

    def __init__(self) -> None:
        super().__init__()
        self.secrets: set[str] = set()
        self._lock = threading.Lock()

    def add_secret(self, secret: str) -> None:
        if len(secret) >= 4:  # a shorter "secret" would redact ordinary words
            with self._lock:
                self.secrets.add(secret)

    def redact(self, text: str) -> str:
        text = TOKEN_IN_URL.sub(rf"\g<1>{REDACTED}", text)
        text = TOKEN_IN_PAYLOAD.sub(rf"\g<1>{REDACTED}", text)
        text = BOT_TOKEN_SHAPE.sub(REDACTED, text)
        for secret in sorted(self.secrets, key=len, reverse=True):
            text = text.replace(secret, REDACTED)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: leave it for logging's own error report
            return True
        clean = self.redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = self.redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


REDACTOR = RedactSecrets()
_installed = False
_install_lock = threading.Lock()


def install(secret: str | None = None) -> RedactSecrets:
    """Redact every log record made from now on in this process; remember ``secret`` too."""
    global _installed
    if secret:
        REDACTOR.add_secret(secret)
    with _install_lock:
        if not _installed:
            make_record = logging.getLogRecordFactory()

            def redacted_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
                record = make_record(*args, **kwargs)
                REDACTOR.filter(record)
                return record

            logging.setLogRecordFactory(redacted_record)
            _installed = True
    return REDACTOR
