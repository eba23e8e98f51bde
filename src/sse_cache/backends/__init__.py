"""Storage backends and :func:`from_url`.

Every backend, built-in or third-party, is found through the entry-point group
``sse_cache.backends``: the entry point's name is a URL scheme and its value a factory
``from_url(url, **options) -> Backend``. Only the module of the scheme asked for is imported,
so ``import sse_cache`` never imports redis or pymemcache. The backend classes are exported
lazily from here for the same reason.
"""

from __future__ import annotations

import importlib
import logging
import reprlib
import sys
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import TYPE_CHECKING, Any, Final

from .._logging import redact_userinfo
from ..errors import ConfigError, SSECacheError
from ..protocols import Backend

if TYPE_CHECKING:
    from .memcached import MemcachedBackend as MemcachedBackend
    from .memory import MemoryBackend as MemoryBackend
    from .redis import RedisBackend as RedisBackend
    from .sqlite import SQLiteBackend as SQLiteBackend

__all__ = [
    "ENTRY_POINT_GROUP",
    "MemcachedBackend",
    "MemoryBackend",
    "RedisBackend",
    "SQLiteBackend",
    "asyncio_only",
    "from_url",
    "known_schemes",
    "open_backend",
]

#: The entry-point group where backends register a factory, keyed by URL scheme.
ENTRY_POINT_GROUP: Final = "sse_cache.backends"

_DIST: Final = "sse-cache"

# The built-ins, as declared in pyproject.toml. Used only when the package metadata is not
# available (running from a source tree that was never installed); a test checks that this
# table and the installed entry points agree.
_BUILTIN: Final = {
    "memory": "sse_cache.backends.memory:from_url",
    "sqlite": "sse_cache.backends.sqlite:from_url",
    "redis": "sse_cache.backends.redis:from_url",
    "rediss": "sse_cache.backends.redis:from_url",
    "unix": "sse_cache.backends.redis:from_url",
    "redis+cluster": "sse_cache.backends.redis:from_url",
    "rediss+cluster": "sse_cache.backends.redis:from_url",
    "memcached": "sse_cache.backends.memcached:from_url",
}

# Which extra installs a missing third-party module that a built-in backend needs.
_EXTRAS: Final = {"redis": "redis", "pymemcache": "memcached"}

_CLASSES: Final = {
    "MemoryBackend": ".memory",
    "SQLiteBackend": ".sqlite",
    "RedisBackend": ".redis",
    "MemcachedBackend": ".memcached",
}


def __getattr__(name: str) -> Any:
    # Lazy class exports (PEP 562): `from sse_cache.backends import RedisBackend` imports
    # redis only then.
    module = _CLASSES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    try:
        mod = importlib.import_module(module, __name__)
    except ImportError as exc:
        extra = _EXTRAS.get((exc.name or "").partition(".")[0])
        if extra is None:
            raise
        raise ImportError(
            f"{name} needs the {exc.name} package: pip install 'sse-cache[{extra}]'",
            name=exc.name,
        ) from exc
    return getattr(mod, name)


def __dir__() -> list[str]:
    return sorted(__all__)


_log = logging.getLogger("sse_cache")


def _scheme_entry_points() -> dict[str, list[EntryPoint]]:
    found: dict[str, list[EntryPoint]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        found.setdefault(ep.name.lower(), []).append(ep)
    return found


def asyncio_only(backend: object) -> bool:
    """Whether ``backend`` (a URL or a backend) is the built-in Redis backend, which runs on
    asyncio only (redis-py's asyncio client): under trio its every operation fails."""
    if isinstance(backend, str):
        scheme = backend.partition(":")[0].lower()
        return _BUILTIN.get(scheme, "").startswith("sse_cache.backends.redis:")
    # (Imported only if it was: a backend object of that class, or of a subclass, means it
    # was; redis may not be installed.)
    redis_module = sys.modules.get("sse_cache.backends.redis")
    return redis_module is not None and isinstance(backend, redis_module.RedisBackend)


def known_schemes() -> list[str]:
    """Every URL scheme :func:`from_url` accepts: built-ins and installed plugins."""
    return sorted(set(_BUILTIN) | set(_scheme_entry_points()))


def _dist_name(ep: EntryPoint) -> str:
    dist = ep.dist
    return dist.name if dist is not None else "?"


def _pick(scheme: str, candidates: list[EntryPoint]) -> EntryPoint:
    # Two distributions may claim one scheme (or one may be installed twice). Our own
    # registration wins for built-in schemes so a plugin cannot take over `redis`; otherwise
    # the choice is deterministic (by distribution name). Either way the losers are named in
    # a warning: a user who installed a plugin for a scheme must not find another one serving
    # it without a word.
    chosen = sorted(candidates, key=_dist_name)[0]
    if len(candidates) > 1 and scheme in _BUILTIN:
        own = [ep for ep in candidates if _dist_name(ep).replace("_", "-").lower() == _DIST]
        if own:
            chosen = own[0]
    others = sorted({_dist_name(ep) for ep in candidates} - {_dist_name(chosen)})
    if others:
        _log.warning(
            "sse_cache: the %s:// backend scheme is claimed by %s and %s; using %s",
            scheme,
            _dist_name(chosen),
            ", ".join(others),
            _described(scheme, chosen),
        )
    return chosen


def _described(scheme: str, ep: EntryPoint | None) -> str:
    """How errors name the factory of ``scheme``: a plugin by its entry point and its
    distribution (the package to look at), a built-in by its scheme."""
    target = ep.value if ep is not None else _BUILTIN[scheme]
    return f"backend plugin {scheme!r} ({target}" + (
        f", from {_dist_name(ep)})" if ep is not None else ")"
    )


def _load(scheme: str, ep: EntryPoint | None) -> Callable[..., Any]:
    target = ep.value if ep is not None else _BUILTIN[scheme]
    where = _described(scheme, ep)
    try:
        if ep is not None:
            factory = ep.load()
        else:
            module, _, attr = target.partition(":")
            factory = getattr(importlib.import_module(module), attr)
    except ImportError as exc:
        missing = (exc.name or "").partition(".")[0]
        if target.startswith("sse_cache.") and missing in _EXTRAS:
            raise ConfigError(
                f"the {scheme}:// backend needs the {missing} package: "
                f"pip install 'sse-cache[{_EXTRAS[missing]}]'"
            ) from exc
        raise ConfigError(f"{where} cannot be imported: {exc}") from exc
    except Exception as exc:
        raise ConfigError(f"{where} failed to load: {exc!r}") from exc
    if not callable(factory):
        raise ConfigError(f"{where} is not callable")
    return factory  # type: ignore[no-any-return]


def open_backend(backend: Backend | str) -> tuple[Backend, bool]:
    """``backend`` itself, or the backend its URL names (:func:`from_url`), with whether the
    caller opened it (and so must close it).

    Raises :class:`ConfigError` for anything else (``None``: an unset
    ``os.environ.get("CACHE_URL")``, say), so that the engine, the middleware and the
    transports refuse it when they are built instead of missing on every request."""
    if isinstance(backend, str):
        return from_url(backend), True
    if not isinstance(backend, Backend):
        raise ConfigError(
            f"backend must be a URL string or a Backend, got {reprlib.repr(backend)} "
            f"({type(backend).__name__})"
        )
    return backend, False


def from_url(url: str, **options: Any) -> Backend:
    """Create a backend from a URL; keyword ``options`` override the URL's query parameters.

    Built-in schemes: ``memory://``, ``sqlite:///relative/file.db`` (as SQLAlchemy reads it:
    relative to the working directory; ``sqlite:////abs/file.db`` absolute,
    ``sqlite:///:memory:``), ``redis://[user:password@]host:port/db``, ``rediss://`` (TLS),
    ``unix:///path/redis.sock``, ``redis+cluster://host:port[,host:port...]`` (and
    ``rediss+cluster://``), ``memcached://host:port[,host:port...]``; see docs/backends.md for
    each scheme's options. Other schemes are looked up among installed plugins.

    Raises :class:`ConfigError` for an unknown scheme (the message lists the known ones), an
    invalid option (naming it), a missing optional package (with the ``pip install`` hint) or
    a plugin that fails to load. Creating a backend does no I/O: connections open on first use.
    """
    if not isinstance(url, str) or "://" not in url:
        shown = redact_userinfo(url) if isinstance(url, str) else url
        raise ConfigError(f"backend URL must look like scheme://..., got {shown!r}")
    scheme = url.split("://", 1)[0].lower()
    candidates = _scheme_entry_points().get(scheme)
    if candidates is None and scheme not in _BUILTIN:
        known = ", ".join(f"{s}://" for s in known_schemes())
        raise ConfigError(f"unknown backend URL scheme {scheme!r}; known schemes: {known}")
    ep = _pick(scheme, candidates) if candidates else None
    factory = _load(scheme, ep)
    where = _described(scheme, ep) if ep is not None else f"backend factory for {scheme}://"
    try:
        backend = factory(url, **options)
    except SSECacheError:
        raise  # the factory's own error (a ConfigError naming its option, say), as it is
    except Exception as exc:
        # (Its message may show the URL it was given: never with the password.)
        said = repr(exc).replace(url, redact_userinfo(url))
        raise ConfigError(f"{where} failed: {said}") from exc
    if not isinstance(backend, Backend):
        raise ConfigError(
            f"{where} returned {type(backend).__name__}, "
            "which does not implement the Backend protocol"
        )
    return backend
