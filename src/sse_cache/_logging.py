"""What the library and the proxy log, and how.

- :class:`RateLimitedLog`: a warning that repeats for every request while a backend is down
  (a failed read, a failed write) is written at most once per interval per backend, the next
  line saying how many were left out.
- :class:`RedactQueryKey`, :func:`redact_url` and :func:`redact_userinfo` (and
  :func:`unreadable_url`): credentials never reach a log line or an error message (a query
  parameter that carries one, a URL's password).
- :class:`AccessLog`: the proxy's line per request on a cached route, with the cache status,
  key prefix, bytes, duration and, for a miss that was not stored, why. It is an engine hook
  (it hears the notices of the request it is serving) and an ASGI wrapper around the cache.
- :func:`proxy_log_config`: one level and one format (time, level, process) for the
  ``sse_cache`` and ``uvicorn`` loggers, as a :func:`logging.config.dictConfig` dict (uvicorn
  applies it in every worker process).
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import re
import threading
import time
import urllib.parse
import weakref
from collections.abc import Awaitable, Callable, MutableMapping
from typing import TYPE_CHECKING, Any

from .entry import storable_status
from .errors import ConfigError

if TYPE_CHECKING:
    from ._notices import Notice

__all__ = [
    "LOG_LEVELS",
    "AccessLog",
    "CutAtShutdown",
    "ProxyFormatter",
    "RateLimitedLog",
    "RedactQueryKey",
    "backend_warnings",
    "logged_path",
    "proxy_log_config",
    "redact_url",
    "redact_userinfo",
    "unreadable_url",
    "without_controls",
]

#: The ``--log-level`` names and their numeric levels (``trace`` is uvicorn's level 5).
LOG_LEVELS = {
    "critical": logging.CRITICAL,
    "error": logging.ERROR,
    "warning": logging.WARNING,
    "info": logging.INFO,
    "debug": logging.DEBUG,
    "trace": 5,
}


class RateLimitedLog:
    """Warnings on ``logger``, at most one per ``interval`` seconds for each (owner, topic).

    ``owner`` is what the warnings are about (a backend): another backend's failures are
    never held back by this one's. Within the interval further warnings are counted, not
    written; the first one after it carries the count (``... [12 more like this in the last
    10 s]``). An owner that cannot be weakly referenced is not rate-limited.
    """

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger
        self.interval = interval
        self._clock = clock
        self._lock = threading.Lock()
        # owner -> topic -> [when the last line was written, warnings left out since]
        self._state: weakref.WeakKeyDictionary[object, dict[str, list[float]]] = (
            weakref.WeakKeyDictionary()
        )

    def warning(self, owner: object, topic: str, msg: str, *args: object) -> None:
        """Log ``msg % args`` as a warning unless one of ``topic`` for ``owner`` was written
        less than ``interval`` seconds ago."""
        self.log(logging.WARNING, owner, topic, msg, *args)

    def log(
        self,
        level: int,
        owner: object,
        topic: str,
        msg: str,
        *args: object,
        exc_info: bool = False,
    ) -> None:
        """:meth:`warning` at ``level``; ``exc_info``: with the exception being handled."""
        if not self.logger.isEnabledFor(level):
            return
        now = self._clock()
        with self._lock:
            try:
                topics = self._state.setdefault(owner, {})
            except TypeError:  # not weakly referenceable: no state to keep
                topics = {}
            last = topics.get(topic)
            if last is not None and now - last[0] < self.interval:
                last[1] += 1
                return
            left_out = int(last[1]) if last is not None else 0
            since = now - last[0] if last is not None else 0.0
            topics[topic] = [now, 0]
        if left_out:
            self.logger.log(
                level,
                msg + " [%d more like this in the last %.0f s]",
                *args,
                left_out,
                since,
                exc_info=exc_info,
            )
        else:
            self.logger.log(level, msg, *args, exc_info=exc_info)


#: Backend failures the engine and the service log (one :class:`RateLimitedLog` for all).
backend_warnings = RateLimitedLog(logging.getLogger("sse_cache"))


# A value runs to the next ``&`` or space; a ``"`` in it is part of it (a client may send
# one: ``?key=a"SECRET`` showed the rest; helper-123), unless it is the value's last
# character, as a quoted line's closing quote is (``"GET /x?key=abc HTTP/1.1"``).
# (No ``?`` in a name: a line of many ``?`` and one ``=`` was matched from each ``?`` in turn,
# quadratic: 2 s for 16,000; helper-125.)
_QUERY_PARAM = re.compile(r"([?&])([^=&#\s\"?]+)=((?:[^&\s\"]|\"(?=[^&\s]))*)")
# The words of a parameter's name that make it a credential: Gemini's ``key``, Azure's
# ``api-key``, OAuth's ``access_token``, a SAS's ``sig``, S3's ``X-Amz-Signature``... Whole
# words, so that ``monkey`` or ``keys`` stay readable.
_SECRET_WORDS = frozenset(
    [
        "key",
        "apikey",
        "token",
        "apitoken",
        "accesstoken",
        "authtoken",
        "secret",
        "password",
        "passwd",
        "pwd",
        "sig",
        "signature",
        "credential",
        "credentials",
        "auth",
        "authorization",
        "bearer",
        "jwt",
        # OAuth's authorization ``code``, a session's id, a short ``pass``: as good as a
        # credential to whoever reads the log (helper-154).
        "code",
        "pass",
        "passphrase",
        "session",
        "sessionid",
        "sid",
        "cookie",
        "otp",
        "hmac",
        "cred",
        "creds",
    ]
)
_WORD_BREAK = re.compile(r"[^a-z0-9]+")
_CAMEL = re.compile(r"([a-z0-9])([A-Z])")


def secret_name(name: str) -> bool:
    """Whether a query parameter named ``name`` (as written in the URL: it is decoded
    first, as the upstream decodes it — ``%6Bey`` is ``key``) carries a credential."""
    if "%" in name or "+" in name:
        name = urllib.parse.unquote_plus(name)
    words = _WORD_BREAK.split(_CAMEL.sub(r"\1_\2", name).lower())
    return any(word in _SECRET_WORDS for word in words)


def _redact_param(found: re.Match[str]) -> str:
    sep, name, _value = found.groups()
    return f"{sep}{name}=***" if secret_name(name) else found.group()


def redact_query_key(text: str) -> str:
    """``text`` with the value of every query parameter that carries a credential (Gemini's
    ``key=``, ``api-key=``, ``access_token=``..., see :func:`secret_name`) replaced by
    ``***``."""
    return _QUERY_PARAM.sub(_redact_param, text) if "=" in text else text


class RedactQueryKey(logging.Filter):
    """Replaces the value of every query parameter that carries a credential (Gemini's
    ``key=``, an ``api-key=``, an ``access_token=``...) in log records with ``***``: in the
    message and in its arguments (uvicorn's access log passes the path as an argument, its
    ``trace`` level a request's whole ASGI scope, with its ``query_string``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str):
            record.msg = redact_query_key(record.msg)
        if isinstance(record.args, tuple):
            record.args = tuple(_redacted(a) for a in record.args)
        return True


def _redacted(arg: object) -> object:
    if isinstance(arg, str):
        return redact_query_key(arg)
    if isinstance(arg, dict) and isinstance(arg.get("query_string"), bytes):
        query = "?" + arg["query_string"].decode("latin-1")
        return {**arg, "query_string": redact_query_key(query)[1:].encode("latin-1")}
    return arg


class CutAtShutdown(logging.Filter):
    """uvicorn logs a task it cancels at the end of its graceful shutdown (a stream still in
    flight after ``--graceful-timeout``) as an "Exception in ASGI application" with the
    CancelledError's traceback: this makes it one warning line saying what happened. Its
    "Cancel 0 running task(s)" error, when the deadline came as the last stream ended (it
    looks every 0.1 s), cancels nothing: an info line says so (helper-142: an alert on
    error lines fired with nothing cut)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("uvicorn"):
            return True
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, asyncio.CancelledError):
            record.msg = "sse_cache: a response still in flight was cut by the shutdown (%s)"
            record.args = (str(exc) or "cancelled",)
            record.exc_info = record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        elif record.msg == _CANCELLING and record.args == (0,):
            record.msg = "sse_cache: the graceful shutdown's deadline passed: nothing to cut"
            record.args = ()
            record.levelno, record.levelname = logging.INFO, "INFO"
        else:
            return True
        # (A handler's filter runs after its logger's level check: a line made less severe
        # is dropped here when its logger would not have written it; helper-144.)
        return record.levelno >= logging.getLogger(record.name).getEffectiveLevel()


#: uvicorn's line as its graceful shutdown's deadline passes (0.51-0.55).
_CANCELLING = "Cancel %s running task(s), timeout graceful shutdown exceeded"


def logged_path(scope: Scope) -> str:
    """A request's path fit for a log line: as sent (``raw_path``: escapes kept, as uvicorn's
    access line has it), never with a control character. Decoded, ``%0a`` wrote a forged log
    line of the client's choosing and ``%1b`` raw terminal escapes (helper-83). Without its
    query, which ASGI keeps apart (``query_string``; a server that leaves it in ``raw_path``
    too would have it logged twice)."""
    raw = scope.get("raw_path")
    path = raw.split(b"?", 1)[0].decode("latin-1") if raw else scope.get("path", "")
    return without_controls(path)


def without_controls(text: str) -> str:
    """``text`` with each control character (C0, DEL, C1) written as ``\\xNN``."""
    return _CONTROL.sub(_escaped, text) if _CONTROL.search(text) else text


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _escaped(found: re.Match[str]) -> str:
    return f"\\x{ord(found.group()):02x}"


def redact_url(url: str) -> str:
    """``url`` fit for a log line: a password in it and the values of query parameters that
    look like credentials (``key``, ``password``, ``secret``, ``token``...) become ``***``."""
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    # Replaced in place, not rebuilt: urlunsplit would turn sqlite:///./x.db into sqlite:/./x.db.
    if "@" in parts.netloc:
        userinfo, _, hostport = parts.netloc.rpartition("@")
        user, sep, _password = userinfo.partition(":")
        netloc = f"{user}:***@{hostport}" if sep else parts.netloc
        url = url.replace(parts.netloc, netloc, 1)
    if parts.query:
        pairs = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
        query = "&".join(f"{name}={'***' if secret_name(name) else value}" for name, value in pairs)
        url = url.replace("?" + parts.query, "?" + query, 1)
    return url


def redact_userinfo(url: str) -> str:
    """``url`` fit for an error message: whatever precedes its last ``@`` (a user and a
    password, even one with an unencoded ``/`` or ``?`` in it) becomes ``***``. Unlike
    :func:`redact_url`, which keeps the user name and needs a URL it can parse, it reads
    nothing but the ``://`` and the last ``@``: for URLs that may be unparsable."""
    head, sep, rest = url.partition("://")
    if not sep:
        head, rest = "", url
    if "@" not in rest:
        return url
    return f"{head}{sep}***@{rest.rpartition('@')[2]}"


def unreadable_url(exc: ValueError) -> str:
    """Why ``urlsplit`` could not read a URL, said without quoting it (its own message may
    quote the netloc, password and all)."""
    return "an unclosed [ ] around an IPv6 address" if "IPv6" in str(exc) else "unparsable"


class ProxyFormatter(logging.Formatter):
    """``2025-01-31T12:00:00.123Z INFO [pid] message``: UTC time to the millisecond, the level
    and the process (several workers write to one stream)."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s [%(process)d] %(message)s")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        return f"{stamp}.{int(record.msecs):03d}Z"


def proxy_log_config(level: str) -> dict[str, Any]:
    """A :func:`logging.config.dictConfig` dict: the ``sse_cache`` and ``uvicorn`` loggers at
    ``level`` (a :data:`LOG_LEVELS` name, else :class:`~sse_cache.errors.ConfigError`), one
    line format, to stderr, ``key=`` redacted."""
    number = LOG_LEVELS.get(level)
    if number is None:
        raise ConfigError(f"log level must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    handler = {"handlers": ["stderr"], "level": number, "propagate": False}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "filters": {
            "redact": {"()": f"{__name__}.RedactQueryKey"},
            "cut": {"()": f"{__name__}.CutAtShutdown"},
        },
        "formatters": {"proxy": {"()": f"{__name__}.ProxyFormatter"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "stream": "ext://sys.stderr",
                "formatter": "proxy",
                "filters": ["redact", "cut"],
            }
        },
        "loggers": {
            "sse_cache": handler,
            "uvicorn": handler,
            "uvicorn.error": {"level": number},  # through "uvicorn"'s handler
            "uvicorn.access": handler,
        },
    }


# -- the proxy's access log -----------------------------------------------------------------

Message = MutableMapping[str, Any]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

#: Characters of the cache key in an access line: enough to tell entries apart and to find
#: one with ``sse-cache show`` / ``ls``, and the key is a hash (no tenant, no credential).
KEY_PREFIX_CHARS = 12

# Notices that say what became of a miss's answer; `detail` says why it was not stored.
_NOT_STORED = frozenset({"not_stored", "store_failed", "store_skipped"})


class _Line:
    """What one request's access line will say."""

    __slots__ = ("bytes", "cache", "complete", "key", "reason", "status", "stored")

    def __init__(self) -> None:
        self.cache = ""
        self.key = ""
        self.status = 0
        self.bytes = 0
        self.complete = False
        self.stored: bool | None = None
        self.reason = ""


_current: contextvars.ContextVar[_Line | None] = contextvars.ContextVar(
    "sse_cache_access_line", default=None
)


class AccessLog:
    """One INFO line on ``sse_cache.access`` per request on a cached route, when it ends::

        sse_cache: POST /v1/responses 429 cache=miss key=5f0c2a9be1d4 bytes=87 ms=812.4
            stored=no reason="upstream status 429"

    (one line; wrapped here).

    ``cache`` is the ``x-sse-cache`` status (``hit``, ``miss``, ``shared``, ``bypass``,
    ``refresh``); ``key`` the first characters of the cache key (a hash: never the tenant or a
    credential); ``bytes`` the response body bytes sent; ``ms`` the time from the request to
    the end of its response. A miss or refresh (and a bypass the cache recorded:
    ``Cache-Control: no-cache``) says whether its answer was ``stored`` and, if not, why; a
    follower whose client left before its stream's head says ``cache=shared`` and why;
    ``end=incomplete`` marks a response that did not end cleanly (the client left, the
    upstream broke, the server shut down). The same values are on the record as
    ``extra`` attributes (``cache_status``, ``key_prefix``, ``bytes_sent``, ``duration_ms``,
    ``stored``, ``reason``) for structured formatters.

    Use one instance both as a hook of the cache (``hooks=[access_log]``) and around it
    (:meth:`serve`): the hook hears the notices of the request being served (a context
    variable ties them to it, also when identical requests run at once).
    """

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger("sse_cache.access")

    def __call__(self, notice: Notice) -> None:
        line = _current.get()
        if line is None:
            return
        if notice.kind == "store" and (not line.key or notice.key == line.key):
            line.stored, line.reason = True, ""
        elif notice.kind in _NOT_STORED and (not line.key or notice.key == line.key):
            line.stored, line.reason = False, notice.detail
        elif notice.kind in ("bypass", "invalid") and notice.detail:
            line.reason = notice.detail
        elif notice.kind == "shared" and notice.detail:
            # A follower that left before its stream's head: no response, so no header says
            # what it was (its line: cache=shared, the key, and why it has no answer).
            line.cache, line.key, line.reason = "shared", notice.key, notice.detail

    @property
    def enabled(self) -> bool:
        """Whether lines are written (its logger takes INFO records)."""
        return self.logger.isEnabledFor(logging.INFO)

    async def serve(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        """Run ``app`` for this HTTP request and log its line when it ends (also when it
        fails or is cancelled)."""
        if not self.enabled:
            await app(scope, receive, send)
            return
        line = _Line()
        started = time.perf_counter()

        async def watching(message: Message) -> None:
            if message["type"] == "http.response.start":
                line.status = int(message["status"])
                for name, value in message.get("headers", ()):
                    lowered = name.lower()
                    if lowered == b"x-sse-cache":
                        line.cache = value.decode("latin-1")
                    elif lowered == b"x-sse-cache-key":
                        line.key = value.decode("latin-1")
            elif message["type"] == "http.response.body":
                await send(message)
                line.bytes += len(message.get("body", b""))
                line.complete = not message.get("more_body", False)
                return
            await send(message)

        token = _current.set(line)
        try:
            await app(scope, receive, watching)
        finally:
            _current.reset(token)
            self._write(scope, line, (time.perf_counter() - started) * 1000)

    def _write(self, scope: Scope, line: _Line, ms: float) -> None:
        path = logged_path(scope)
        if scope.get("query_string"):
            path += "?" + without_controls(scope["query_string"].decode("latin-1"))
        path = redact_query_key(path)
        words = [
            f"sse_cache: {scope.get('method', '')} {path} {line.status or '-'}",
            f"cache={line.cache or '-'}",
            f"key={line.key[:KEY_PREFIX_CHARS] or '-'}",
            f"bytes={line.bytes}",
            f"ms={ms:.1f}",
        ]
        stored, reason = line.stored, line.reason
        if line.cache in ("hit", "shared"):
            # Nothing of these is stored; a follower may hear its producer's notices, which
            # the producer's own line reports. (One with no response says why.)
            stored, reason = None, reason if not line.status else ""
        elif line.cache in ("miss", "refresh") or stored is not None:
            # (A bypass that was stored or refused says so too: Cache-Control: no-cache
            # stores what it gets; helper-154.)
            if stored is None:
                stored = False
                reason = reason or _unrecorded(scope, line)
            words.append(f"stored={'yes' if stored else 'no'}")
        if reason and not stored:
            words.append(f"reason={_quote(reason)}")
        if not line.complete:
            words.append("end=incomplete")
        self.logger.info(
            " ".join(words),
            extra={
                "cache_status": line.cache,
                "key_prefix": line.key[:KEY_PREFIX_CHARS],
                "bytes_sent": line.bytes,
                "duration_ms": round(ms, 1),
                "stored": stored,
                "reason": reason,
            },
        )


def _unrecorded(scope: Scope, line: _Line) -> str:
    # The cache sends no notice for an answer it did not even record: the usual causes can be
    # read off the request and the response.
    if line.status and not storable_status(line.status):
        return f"upstream status {line.status}"
    if not line.complete:
        return "the response did not complete"
    headers = {k.lower(): v for k, v in scope.get("headers", ())}
    if b"no-store" in headers.get(b"cache-control", b"").lower():
        return "the request said Cache-Control: no-store"
    if b"last-event-id" in headers:
        return "a resumed stream (Last-Event-ID) is never stored"
    return (
        "not a storable answer (not completed by the route's schema, or a content type or "
        "encoding the cache does not keep)"
    )


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", " ") + '"'
