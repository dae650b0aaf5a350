"""The project's named loggers, and the formatter that keeps secrets out of every line.

Loggers are declared here once so that every module logs under the same names:
``apipool_proxy.access`` (one line per proxied request), ``.pool`` (key state changes),
``.upstream`` (talking to upstreams), ``.admin`` (accounts and keys), ``.server``
(lifecycle) and ``.storage``.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
import time
from typing import TextIO

access_log = logging.getLogger("apipool_proxy.access")
pool_log = logging.getLogger("apipool_proxy.pool")
upstream_log = logging.getLogger("apipool_proxy.upstream")
admin_log = logging.getLogger("apipool_proxy.admin")
server_log = logging.getLogger("apipool_proxy.server")
storage_log = logging.getLogger("apipool_proxy.storage")

REDACTED = "[redacted]"

# Shapes of secrets we can recognise without knowing them: our own pool tokens and the
# common upstream key formats (OpenAI/OpenRouter/Groq/NVIDIA style prefixes, bearer values).
_SECRET_SHAPES = re.compile(
    r"(?:ap-[A-Za-z0-9_-]{20,}"
    r"|sk-[A-Za-z0-9_*-]{8,}"
    r"|gsk_[A-Za-z0-9]{8,}"
    r"|nvapi-[A-Za-z0-9_-]{8,}"
    r"|AIza[A-Za-z0-9_-]{20,}"
    r"|\$2[aby]?\$[0-9]{2}\$[./A-Za-z0-9]{53}"  # a bcrypt password hash
    r"|(?<=Bearer )[^\s\"',]{8,})"
)


class SecretRegistry:
    """Every upstream key value the process holds, so they can be redacted by value.

    Keys of any shape (a local vLLM may take "hunter2") are caught here, where the
    shape patterns above would miss them.
    """

    def __init__(self) -> None:
        self._values: set[str] = set()
        self._pattern: re.Pattern[str] | None = None
        self._lock = threading.Lock()
        # Short texts seen again and again (a request path, a model name) and their redacted
        # form; replaced, not edited, whenever the set of secrets changes.
        self._memo: dict[str, str] = {}

    def add(self, value: str) -> None:
        # Very short values would redact ordinary words; they are rejected at input anyway.
        if len(value) < 4:
            return
        with self._lock:
            self._values.add(value)
            self._pattern = None
            self._memo = {}

    def discard(self, value: str) -> None:
        with self._lock:
            self._values.discard(value)
            self._pattern = None
            self._memo = {}

    def redact_field(self, text: str) -> str:
        """``redact(text)`` for short, often repeated texts, remembering the answers."""
        memo = self._memo
        clean = memo.get(text)
        if clean is None:
            clean = self.redact(text)
            if len(text) > _MEMO_TEXT_LIMIT:
                return clean
            if len(memo) >= _MEMO_LIMIT:
                memo.clear()
            memo[text] = clean
        return clean

    def redact(self, text: str) -> str:
        pattern = self._compiled()
        if pattern is not None:
            text = pattern.sub(REDACTED, text)
        return _SECRET_SHAPES.sub(REDACTED, text)

    def _compiled(self) -> re.Pattern[str] | None:
        pattern = self._pattern
        if pattern is None and self._values:
            with self._lock:
                longest_first = sorted(self._values, key=len, reverse=True)
                pattern = re.compile("|".join(re.escape(v) for v in longest_first))
                self._pattern = pattern
        return pattern


_MEMO_LIMIT = 4096
_MEMO_TEXT_LIMIT = 512

secrets = SecretRegistry()


def redact(text: str) -> str:
    """Remove every known upstream key and anything shaped like a token from ``text``."""
    return secrets.redact(text)


def redact_field(text: str) -> str:
    """``redact`` for short texts that repeat (paths, model names): answers are remembered."""
    return secrets.redact_field(text)


class RedactingFormatter(logging.Formatter):
    """Formats a record as text or JSON, then strips secrets from the whole line.

    Redacting the final line (tracebacks included) rather than the arguments means no
    code path can forget to do it.
    """

    def __init__(self, fmt: str = "text") -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.json = fmt == "json"

    def format(self, record: logging.LogRecord) -> str:
        if self.json:
            line = self._format_json(record)
        else:
            line = super().format(record)
        return redact(line)

    def _format_json(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exc_info"] = self.formatException(record.exc_info)
        return json.dumps(entry, separators=(",", ":"))


class BufferedLineHandler(logging.StreamHandler):
    """Formats each record at once but writes lines in batches.

    Lines collect in memory and go out in one write when a WARNING or worse arrives, when
    64 KiB are waiting, or when :meth:`flush` is called (the server does so several times a
    second and at exit). One access line per request then costs no system call of its own,
    and no thread hand-off either.
    """

    def __init__(self, stream: TextIO, limit: int = 64 * 1024) -> None:
        super().__init__(stream)
        self.limit = limit
        self._lines: list[str] = []
        self._size = 0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + "\n"
        except Exception:
            self.handleError(record)
            return
        self._lines.append(line)
        self._size += len(line)
        if record.levelno >= logging.WARNING or self._size >= self.limit:
            self._write()

    def add_line(self, line: str, urgent: bool = False) -> None:
        """Queue a line formatted (and redacted) elsewhere."""
        with self.lock:  # type: ignore[union-attr]
            self._lines.append(line)
            self._size += len(line)
            if urgent or self._size >= self.limit:
                self._write()

    def flush(self) -> None:
        self.acquire()
        try:
            self._write()
        finally:
            self.release()

    def _write(self) -> None:
        if not self._lines:
            return
        text = "".join(self._lines)
        self._lines.clear()
        self._size = 0
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass  # stderr closed or gone: nothing sensible left to do with log lines


class AccessLog:
    """Writes the access log: one line per proxied request.

    Through ``logging`` a line cost about 30 microseconds (a LogRecord, the handler chain,
    a formatter, a regular expression over the whole line): as much as all the rest of a
    proxied request. So when the server's own handler is the only place lines go, which is
    how ``apipool serve`` runs, the line is formatted here and queued on that handler
    directly. Its caller-supplied parts (method, path, model) are redacted one by one by the
    caller, through ``redact_field``, whose answers are remembered; everything else in it
    is numbers and identifiers. Anywhere else (an embedding application, tests capturing
    logs) the line goes through ``access_log`` like any record.
    """

    def __init__(self) -> None:
        self._handler: BufferedLineHandler | None = None
        self._json = False
        self._second = -1
        self._stamp = ""

    def attach(self, handler: BufferedLineHandler, fmt: str) -> None:
        self._handler = handler
        self._json = fmt == "json"

    def write(self, message: str, fields: dict[str, object] | None, at: float) -> None:
        """Write one access line for a request answered at ``at`` (a time.time() value)."""
        handler = self._handler
        if handler is None or not self._direct(handler):
            access_log.info(message, extra={"fields": fields} if fields else None)
            return
        now = at
        if self._json:
            entry = {
                "time": self._timestamp(now, utc=True),
                "level": "INFO",
                "logger": access_log.name,
                "message": message,
                **(fields or {}),
            }
            handler.add_line(json.dumps(entry, separators=(",", ":")) + "\n")
        else:
            handler.add_line(
                f"{self._timestamp(now, utc=False)} INFO {access_log.name}: {message}\n"
            )

    def _direct(self, handler: BufferedLineHandler) -> bool:
        # Only while the line would reach our handler and nothing else.
        handlers = _ROOT.handlers
        return (
            len(handlers) == 1
            and handlers[0] is handler
            and not access_log.handlers
            and access_log.propagate
            and access_log.isEnabledFor(logging.INFO)
        )

    def _timestamp(self, now: float, utc: bool) -> str:
        # The same spellings RedactingFormatter writes, with the seconds part made once a second.
        second = int(now)
        if second != self._second:
            if utc:
                self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
            else:
                self._stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(second))
            self._second = second
        millis = int((now - second) * 1000)
        return f"{self._stamp}.{millis:03d}Z" if utc else f"{self._stamp},{millis:03d}"


_ROOT = logging.getLogger()
access_lines = AccessLog()


def setup_logging(level: str = "INFO", fmt: str = "text") -> BufferedLineHandler:
    """Send the project's loggers (and aiohttp's) to stderr through the redacting formatter.

    Returns the handler: call its ``flush()`` periodically and at exit.
    """
    # Records need no caller frame, thread, process or task names: collecting those costs
    # more than the rest of an access line.
    for flag, value in (
        ("_srcfile", None),
        ("logThreads", False),
        ("logProcesses", False),
        ("logMultiprocessing", False),
        ("logAsyncioTasks", False),  # Python 3.12+
    ):
        setattr(logging, flag, value)
    handler = BufferedLineHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # aiohttp's own access log duplicates ours.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    # At DEBUG aiosqlite logs every statement with its parameters: password hashes, token
    # hashes, encrypted keys. The project's storage logger reports what an operator needs.
    logging.getLogger("aiosqlite").setLevel(logging.INFO)
    access_lines.attach(handler, fmt)
    return handler
