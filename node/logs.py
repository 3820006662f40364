"""One line per event, with a level, as ``key=value`` text or JSON.

Callers log an event name and fields: ``log.info("user.login", user="alice")``.
Nothing here inspects values, so the rule is kept by the callers: never log message
content, keys, passwords or tokens (a test reads the logs to check).
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from typing import Any, TextIO

_RESERVED = frozenset(vars(logging.makeLogRecord({})))


def _text_value(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' "=\n'):
        return json.dumps(text)
    return text


class EventFormatter(logging.Formatter):
    def __init__(self, fmt: str) -> None:
        super().__init__()
        self.json = fmt == "json"

    def format(self, record: logging.LogRecord) -> str:
        fields = {k: v for k, v in vars(record).items() if k not in _RESERVED and k != "fields"}
        fields.update(getattr(record, "fields", {}))
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"
        if record.exc_info and record.exc_info[1] is not None:
            # One line per event: the exception, and where it was raised (the innermost
            # frame). Of a group (a nursery's), the first exception in it that is not one.
            exc: BaseException = record.exc_info[1]
            while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
                exc = exc.exceptions[0]
            fields["exc"] = "".join(traceback.format_exception_only(exc)).strip().splitlines()[-1]
            frames = traceback.extract_tb(exc.__traceback__) if exc.__traceback__ else []
            if frames:
                last = frames[-1]
                fields["at"] = f"{os.path.basename(last.filename)}:{last.lineno}:{last.name}"
        if self.json:
            return json.dumps(
                {"ts": stamp, "level": record.levelname.lower(), "logger": record.name, "event": record.getMessage(), **fields},
                default=str,
            )
        parts = [stamp, record.levelname.lower(), record.name, record.getMessage()]
        parts += [f"{k}={_text_value(v)}" for k, v in fields.items()]
        return " ".join(parts)


class EventLogger:
    """A thin wrapper over a stdlib logger that takes fields as keywords."""

    def __init__(self, name: str) -> None:
        self._logger = logging.getLogger(name)

    def _log(self, level: int, event: str, fields: dict[str, Any], exc_info: bool = False) -> None:
        if self._logger.isEnabledFor(level):
            self._logger.log(level, event, extra={"fields": fields}, exc_info=exc_info)

    def debug(self, event: str, **fields: Any) -> None:
        self._log(logging.DEBUG, event, fields)

    def info(self, event: str, **fields: Any) -> None:
        self._log(logging.INFO, event, fields)

    def warning(self, event: str, **fields: Any) -> None:
        self._log(logging.WARNING, event, fields)

    def error(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields)

    def exception(self, event: str, **fields: Any) -> None:
        self._log(logging.ERROR, event, fields, exc_info=True)


def get_logger(name: str) -> EventLogger:
    return EventLogger(name)


def configure_logging(fmt: str = "text", level: str = "info", stream: TextIO | None = None) -> None:
    """Route every logger (ours and the libraries') through one event formatter."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(EventFormatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # Libraries that log per request at info would drown the node's own events.
    # Chatty at debug, and websockets' debug lines print request headers (session
    # tokens): never below WARNING, whatever the node's level.
    for noisy in ("hypercorn.access", "httpx", "httpcore", "alembic.runtime.migration", "alembic.runtime.plugins", "websockets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
