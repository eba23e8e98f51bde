"""``CacheOptions``: the one list of options of the HTTP integrations.

:class:`~sse_cache.asgi.CacheMiddleware`, the httpx/httpx2 transports and the proxy take these
options as keywords (or one :class:`CacheOptions` as ``options=``) and hand them, validated
once here, to the :class:`~sse_cache.http.service.CacheService` they share. Adding an option means
adding a field here, and nowhere else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .._checks import (
    BYTES,
    POSITIVE_BYTES,
    boolean,
    callables,
    header_names,
    instance_of,
    integer,
    mapping,
    pacing_of,
    positive_number,
    text,
    ttl_of,
)
from .._notices import Hook
from ..breaker import DEFAULT_BREAKER_COOLDOWN, DEFAULT_BREAKER_FAILURES
from ..engine import DEFAULT_DECODED_CACHE_BYTES, DEFAULT_JOIN_TIMEOUT
from ..errors import ConfigError
from ..pacing import Pacing
from ..protocols import CacheKeyer, EventCodec, StreamAdapter
from ..recorder import DEFAULT_MAX_ENTRY_BYTES
from .policy import check_tenant

__all__ = ["DEFAULT_CROSS_PROCESS_LEASE", "MAX_CROSS_PROCESS_LEASE", "CacheOptions"]

#: Default lease of a cross-process producer: renewed every third of it while it produces,
#: so a killed producer's lease is gone (and its followers take over) within this long.
DEFAULT_CROSS_PROCESS_LEASE = 3.0
#: The longest lease ``cross_process_lease`` may ask for (one day): a longer one (or ``inf``)
#: cannot be given to the backend's lock, and a killed producer would block its key for as long.
MAX_CROSS_PROCESS_LEASE = 86400.0


@dataclasses.dataclass(frozen=True, kw_only=True)
class CacheOptions:
    """How the HTTP integrations cache (docs/asgi.md lists each option with its meaning).

    ``routes``, ``tenant``, ``max_body_bytes``: which requests are cached and for whom
    (:class:`~sse_cache.http.policy.CachePolicy`). ``origin``: the server the cached routes
    are answered by (``scheme://host[:port][/base]``), part of every key, so that caches of
    different servers on one backend never share an entry (the proxy sets its upstream; an
    HTTP client's transport keys each request by its own server unless one is set here). ``ttl``
    (at most :data:`~sse_cache.http.policy.MAX_TTL`, one year; None: no expiry),
    ``max_entry_bytes``, ``pacing``, ``hooks``, ``backend_timeout``, ``single_flight``,
    ``join_timeout``, ``keyer``, ``codec``, ``decoded_cache_bytes``: as for
    :class:`~sse_cache.engine.StreamCache` (the decoded-entry budget is shared by every
    route). ``cross_process`` / ``cross_process_lease``:
    single-flight across processes on a backend with leases and fan-out (Redis).
    ``breaker_failures`` / ``breaker_cooldown``: the backend's breaker
    (:mod:`sse_cache.breaker`). ``resume_window``: seconds a streamed miss whose client left
    is read on, so that the client can come back and resume it (None: abandoned at once).
    ``credential_headers``: more request headers that carry a caller's credential (a
    gateway's own), part of the default tenant scope beside
    :data:`~sse_cache.keys.CREDENTIAL_HEADERS` and the names ending like one.
    ``key_headers``: more request headers that change the answer on every route (a
    gateway's routing), keyed beside each adapter's own and
    :data:`~sse_cache.http.policy.GATEWAY_KEY_HEADERS`.
    """

    routes: Mapping[str, StreamAdapter | Callable[[], StreamAdapter]] | None = None
    tenant: str | Callable[[Mapping[str, str]], str | None] | None = None
    ttl: float | None = None
    max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES
    max_body_bytes: int = 4 * 1024 * 1024
    pacing: str | float | Pacing = "instant"
    hooks: Iterable[Hook] = ()
    backend_timeout: float = 2.0
    single_flight: bool = True
    join_timeout: float = DEFAULT_JOIN_TIMEOUT
    keyer: CacheKeyer | None = None
    codec: EventCodec | None = None
    cross_process: bool = False
    cross_process_lease: float = DEFAULT_CROSS_PROCESS_LEASE
    decoded_cache_bytes: int = DEFAULT_DECODED_CACHE_BYTES
    breaker_failures: int = DEFAULT_BREAKER_FAILURES
    breaker_cooldown: float = DEFAULT_BREAKER_COOLDOWN
    resume_window: float | None = None
    origin: str = ""
    credential_headers: Iterable[str] = ()
    key_headers: Iterable[str] = ()

    def __post_init__(self) -> None:
        # Every option is checked here, once, naming it: a wrong type, NaN or a value out of
        # range is a ConfigError now, never a bare TypeError at the first request or a limit
        # silently turned off. (The policy, the engine and the breaker check theirs again
        # with the same checkers when they are built directly.)
        if self.routes is not None:
            mapping("routes", self.routes, what="a mapping of path to adapter")
        check_tenant(self.tenant)
        pacing_of("pacing", self.pacing)
        boolean("single_flight", self.single_flight)
        instance_of("keyer", self.keyer, CacheKeyer, optional=True)
        instance_of("codec", self.codec, EventCodec, optional=True)
        boolean("cross_process", self.cross_process)
        # The numbers as the parts built from these options use them (1e6 bytes: an int).
        lease = MAX_CROSS_PROCESS_LEASE
        checked: dict[str, Any] = {
            "hooks": callables("hooks", self.hooks),
            "max_entry_bytes": integer(
                "max_entry_bytes", self.max_entry_bytes, what=POSITIVE_BYTES
            ),
            "max_body_bytes": integer("max_body_bytes", self.max_body_bytes, what=POSITIVE_BYTES),
            "backend_timeout": positive_number("backend_timeout", self.backend_timeout),
            "join_timeout": positive_number("join_timeout", self.join_timeout, finite=False),
            "cross_process_lease": positive_number(
                "cross_process_lease", self.cross_process_lease, maximum=lease
            ),
            "decoded_cache_bytes": integer(
                "decoded_cache_bytes", self.decoded_cache_bytes, minimum=0, what=BYTES
            ),
            "breaker_failures": integer("breaker_failures", self.breaker_failures, minimum=0),
            "breaker_cooldown": positive_number("breaker_cooldown", self.breaker_cooldown),
            "credential_headers": header_names("credential_headers", self.credential_headers),
            "key_headers": header_names("key_headers", self.key_headers),
        }
        if self.ttl is not None:
            checked["ttl"] = ttl_of("ttl", self.ttl)
        if self.resume_window is not None:
            checked["resume_window"] = positive_number(
                "resume_window", self.resume_window, what="a positive number of seconds or None"
            )
        for field, value in checked.items():
            object.__setattr__(self, field, value)
        text("origin", self.origin)

    @classmethod
    def of(
        cls,
        options: CacheOptions | None,
        keywords: Mapping[str, Any],
        own: Iterable[str] = (),
    ) -> CacheOptions:
        """``options``, or options built from ``keywords`` (an integration's keyword
        arguments); an unknown name is a :class:`~sse_cache.errors.ConfigError` naming it and
        listing the known ones, with the integration's ``own`` options (so that a misspelt
        ``max_backround=`` is shown its spelling)."""
        if options is not None:
            if not isinstance(options, cls):
                # A dict of options is a common slip: say how to pass them instead.
                hint = (
                    " (pass them as keywords, or as CacheOptions(**...))"
                    if isinstance(options, Mapping)
                    else ""
                )
                raise ConfigError(f"options must be a CacheOptions{hint}, got {options!r}")
            if keywords:
                raise ConfigError(
                    f"pass either options= or keyword options, not both: {sorted(keywords)}"
                )
            return options
        unknown = sorted(set(keywords) - _NAMES)
        if unknown:
            raise ConfigError(
                f"unknown option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                f"(known: {', '.join(sorted(_NAMES | set(own)))})"
            )
        return cls(**keywords)


_NAMES = frozenset(field.name for field in dataclasses.fields(CacheOptions))
