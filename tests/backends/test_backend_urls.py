"""``sse_cache.backends.from_url``: schemes, options and their validation, lazy imports, the
entry-point registry and third-party plugins."""

from __future__ import annotations

import importlib
import logging
import math
import re
import subprocess
import sys
import textwrap
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import pytest

import sse_cache.backends as backends
from sse_cache.backends import from_url, known_schemes, open_backend
from sse_cache.errors import ConfigError


def classname(url: str, **options: Any) -> str:
    return type(from_url(url, **options)).__name__


# -- schemes ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("memory://", "MemoryBackend"),
        ("MEMORY://?max_bytes=10MiB", "MemoryBackend"),
        ("sqlite:////tmp/x.db", "SQLiteBackend"),
        ("sqlite:///./x.db", "SQLiteBackend"),
        ("sqlite:///:memory:", "SQLiteBackend"),
        ("redis://localhost:6379/0", "RedisBackend"),
        ("redis://:pw@localhost/3?prefix=app:&timeout=0.2", "RedisBackend"),
        ("rediss://user:pw@cache.example:6380/1?ssl_cert_reqs=none", "RedisBackend"),
        ("unix:///run/redis.sock?db=2", "RedisBackend"),
        ("redis+cluster://10.0.0.1:7000,10.0.0.2:7001", "RedisBackend"),
        ("rediss+cluster://h1:7000", "RedisBackend"),
        ("memcached://127.0.0.1:11211", "MemcachedBackend"),
        ("memcached://h1:1,h2:2,[::1]:3?chunk_size=512KiB", "MemcachedBackend"),
    ],
)
def test_schemes(url: str, expected: str) -> None:
    # Creating a backend does no I/O: none of these hosts needs to exist.
    assert classname(url) == expected


@pytest.mark.parametrize(
    ("url", "connection", "expected"),
    [
        (
            "unix:///run/redis.sock?db=2",
            "UnixDomainSocketConnection",
            {"path": "/run/redis.sock", "db": 2},
        ),
        (
            "unix://:pw@/tmp/a%20b.sock",
            "UnixDomainSocketConnection",
            {"path": "/tmp/a b.sock", "password": "pw"},
        ),
        ("redis://localhost:6380/3", "Connection", {"host": "localhost", "port": 6380, "db": 3}),
        (
            "redis://u%40x:p%3Aw@h",
            "Connection",
            {"host": "h", "port": 6379, "username": "u@x", "password": "p:w"},
        ),
        ("redis://[::1]:7000?db=4", "Connection", {"host": "::1", "port": 7000, "db": 4}),
        (
            "rediss://h:6390/1?ssl_cert_reqs=none",
            "SSLConnection",
            {"host": "h", "port": 6390, "db": 1},
        ),
    ],
)
def test_redis_urls_reach_the_connection(
    url: str, connection: str, expected: dict[str, Any]
) -> None:
    # What redis-py will connect to, read from its pool: this does not depend on how a given
    # redis-py release parses URLs (8.x rejects URLs that 5.x accepted).
    pool = from_url(url).client.connection_pool  # type: ignore[attr-defined]
    assert pool.connection_class.__name__ == connection
    assert {k: pool.connection_kwargs.get(k) for k in expected} == expected


def test_unix_url_without_a_path() -> None:
    with pytest.raises(ConfigError, match="no socket path"):
        from_url("unix://")


def test_sqlite_paths_as_sqlalchemy_reads_them(tmp_path: Path) -> None:
    def path(url: str) -> str:
        return from_url(url).path  # type: ignore[attr-defined,no-any-return]

    # Three slashes: the path after them, relative to the working directory.
    assert path("sqlite:///cache.db") == "cache.db"
    assert path("sqlite:///./rel.db") == "./rel.db"
    assert path("sqlite:///sub/dir/x.db") == "sub/dir/x.db"
    assert path("sqlite:///a%20b.db") == "a b.db"
    assert path("sqlite:///x.db?max_bytes=1MiB") == "x.db"
    # Four slashes (or more): absolute.
    assert path("sqlite:////abs/x.db") == "/abs/x.db"
    assert path("sqlite://///abs/x.db") == "/abs/x.db"
    assert path(f"sqlite:///{tmp_path}/x.db") == f"{tmp_path}/x.db"  # "sqlite:///" + "/tmp/..."
    assert path("sqlite:///:memory:") == ":memory:"
    assert path("sqlite:///~/x.db") == str(Path.home() / "x.db")
    assert path("sqlite://./rel.db") == "./rel.db"  # two slashes and a dot: a common slip


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sqlite://host/x.db", "has no host.*four slashes"),
        ("sqlite:///", "names no file"),
        ("sqlite:////", "names no file"),
        ("sqlite://", "names no file"),
    ],
)
def test_sqlite_urls_that_name_no_file(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        from_url(url)


def test_sqlite_create_option_is_a_boolean() -> None:
    # What create=false does is tested in test_backend_sqlite.py, against real files.
    with pytest.raises(ConfigError, match="option 'create': expected true or false"):
        from_url("sqlite:///x.db?create=maybe")


def test_memcached_servers() -> None:
    backend: Any = from_url("memcached://h1,h2:2,[::1]:3")
    assert backend.servers == [("h1", 11211), ("h2", 2), ("::1", 3)]


def test_keyword_options_override_the_query() -> None:
    backend: Any = from_url("redis://localhost/0?prefix=url:", prefix="kw:")
    assert backend.prefix == "kw:"


def test_unknown_scheme_lists_known_ones() -> None:
    with pytest.raises(ConfigError) as info:
        from_url("nosuch://x")
    message = str(info.value)
    assert "'nosuch'" in message
    for scheme in ("memory://", "sqlite://", "redis://", "rediss://", "redis+cluster://"):
        assert scheme in message
    assert "memcached://" in message


@pytest.mark.parametrize("url", ["", "memory", "localhost:6379", 42])
def test_not_a_url(url: Any) -> None:
    with pytest.raises(ConfigError, match="scheme://"):
        from_url(url)


# -- option validation --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "parameter"),
    [
        ("memory://?max_bytes=lots", "max_bytes"),
        ("memory://?max_entries=0", "max_entries"),
        ("memory://?maxbytes=1", "maxbytes"),
        ("sqlite:///x.db?timeout=-1", "timeout"),
        ("sqlite:///x.db?timeout=nan", "timeout"),
        ("sqlite:///x.db?read_timeout=abc", "read_timeout"),
        ("sqlite:///x.db?purge_interval=-3", "purge_interval"),
        ("sqlite:///x.db?synchronous=sometimes", "synchronous"),
        ("sqlite:///x.db?max_bytes=12XB", "max_bytes"),
        ("sqlite:///x.db?journal=wal", "journal"),
        ("redis://localhost?timeout=0", "timeout"),
        ("redis://localhost?timeout=soon", "timeout"),
        ("redis://localhost?max_connections=0", "max_connections"),
        ("redis://localhost?db=-1", "db"),
        ("redis://localhost?socket_timeout=1", "socket_timeout"),
        ("rediss://localhost?ssl_cert_reqs=maybe", "ssl_cert_reqs"),
        ("rediss://localhost?ssl_check_hostname=perhaps", "ssl_check_hostname"),
        ("redis://localhost?prefix=a&prefix=b", "prefix"),
        ("memcached://h?chunk_size=100", "chunk_size"),
        ("memcached://h?chunk_size=big", "chunk_size"),
        ("memcached://h?max_pool_size=0", "max_pool_size"),
        ("memcached://h?dead_timeout=x", "dead_timeout"),
        ("memcached://h?ttl=3", "ttl"),
    ],
)
def test_bad_option_names_the_parameter(url: str, parameter: str) -> None:
    with pytest.raises(ConfigError, match=f"'{parameter}'"):
        from_url(url)


@pytest.mark.parametrize(
    ("url", "match"),
    [
        ("redis://localhost/abc", "database must be a number"),
        ("redis://localhost/1?db=2", "both in path"),
        ("redis://h1:1,h2:2", "redis\\+cluster://"),
        ("redis://localhost:port", "bad port"),
        ("redis://localhost?ssl_ca_certs=/x.pem", "rediss://"),
        ("redis+cluster://h1:7000/3", "database 0"),
        ("redis+cluster://h1:7000?db=1", "no 'db'"),
        ("memcached://h1:x", "bad port"),
        ("memcached://h1,,h2", "empty host"),
        ("memcached://h?prefix=has space", "prefix"),
        ("memcached://h/1", "memcached has no databases, got the path '/1'"),
        ("memcached://h:0", "port 0"),
        ("memcached://h?chunk_size=2GiB", "largest item"),
        # It went to 6379: maybe another Redis (helper-81).
        ("redis://h:0", "port 0"),
        ("rediss://h:0/1", "port 0"),
        # Dropped without a word: the server was used without them (helper-81).
        ("memcached://admin:secret@h:11211", "memcached has no authentication"),
    ],
)
def test_bad_urls(url: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        from_url(url)


def test_size_units() -> None:
    assert from_url("memory://?max_bytes=2KiB")._max_bytes == 2048  # type: ignore[attr-defined]
    assert from_url("memory://?max_bytes=3M")._max_bytes == 3 * 1024**2  # type: ignore[attr-defined]
    assert from_url("memory://?max_bytes=none")._max_bytes is None  # type: ignore[attr-defined]
    assert from_url("memory://", max_bytes=77)._max_bytes == 77  # type: ignore[attr-defined]


# -- registry, lazy imports, plugins ------------------------------------------------------


def test_builtins_are_registered_as_entry_points() -> None:
    installed = {
        ep.name: ep.value
        for ep in entry_points(group="sse_cache.backends")
        if ep.dist is not None and ep.dist.name.replace("_", "-") == "sse-cache"
    }
    assert installed == backends._BUILTIN


def test_known_schemes() -> None:
    assert set(known_schemes()) >= {"memory", "sqlite", "redis", "memcached", "redis+cluster"}


def test_lazy_class_exports() -> None:
    from sse_cache.backends.memory import MemoryBackend
    from sse_cache.backends.redis import RedisBackend

    assert backends.MemoryBackend is MemoryBackend
    assert backends.RedisBackend is RedisBackend
    assert "SQLiteBackend" in dir(backends)
    with pytest.raises(AttributeError):
        backends.NoSuchBackend  # noqa: B018


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_import_does_not_load_redis_or_pymemcache() -> None:
    result = run_python(
        """
        import sys
        import sse_cache, sse_cache.backends
        from sse_cache.backends import from_url, MemoryBackend
        from_url("memory://"); from_url("sqlite:///:memory:")
        loaded = [m for m in ("redis", "pymemcache") if m in sys.modules]
        assert not loaded, loaded
        from_url("redis://localhost")
        assert "redis" in sys.modules and "pymemcache" not in sys.modules
        print("ok")
        """
    )
    assert result.stdout.strip() == "ok", result.stderr


def test_missing_optional_package_gives_the_install_hint() -> None:
    result = run_python(
        """
        import sys
        sys.modules["redis"] = None  # as if redis-py were not installed
        sys.modules["pymemcache"] = None
        from sse_cache.backends import from_url
        from sse_cache.errors import ConfigError
        for url in ("redis://localhost", "memcached://localhost"):
            try:
                from_url(url)
            except ConfigError as exc:
                print(exc)
        try:
            from sse_cache.backends import RedisBackend
        except ImportError as exc:
            print(exc)
        """
    )
    lines = result.stdout.splitlines()
    assert len(lines) == 3, result.stderr
    assert "pip install 'sse-cache[redis]'" in lines[0]
    assert "pip install 'sse-cache[memcached]'" in lines[1]
    assert "pip install 'sse-cache[redis]'" in lines[2]


def make_plugin(root: Path, name: str, entry_points_txt: str, module: str) -> None:
    """A minimal installed distribution: a module plus a ``.dist-info`` with its entry
    points, found by importlib.metadata once ``root`` is on sys.path. Nothing is installed
    into the environment and nothing is downloaded."""
    (root / f"{name}.py").write_text(textwrap.dedent(module))
    info = root / f"{name}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(textwrap.dedent(entry_points_txt))


PLUGIN = """
    from sse_cache.backends.memory import MemoryBackend

    class DictBackend(MemoryBackend):
        '''A third-party backend: here a MemoryBackend that remembers its URL.'''

        def __init__(self, url, **options):
            super().__init__()
            self.url = url
            self.options = options

    def from_url(url, **options):
        return DictBackend(url, **options)
"""


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_third_party_plugin_is_found(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, anyio_backend: str
) -> None:
    make_plugin(
        tmp_path,
        "sse_cache_myscheme",
        "[sse_cache.backends]\nmyscheme = sse_cache_myscheme:from_url\n",
        PLUGIN,
    )
    with pytest.raises(ConfigError, match="unknown backend URL scheme 'myscheme'"):
        from_url("myscheme://somewhere")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "myscheme" in known_schemes()
    backend: Any = from_url("myscheme://somewhere/x?y=1", flavour="vanilla")
    assert type(backend).__name__ == "DictBackend"
    assert backend.url == "myscheme://somewhere/x?y=1"
    assert backend.options == {"flavour": "vanilla"}
    await backend.set("k", b"v", None)
    assert await backend.get("k") == b"v"
    await backend.aclose()
    with pytest.raises(ConfigError) as info:
        from_url("nosuch://")
    assert "myscheme://" in str(info.value)


def test_broken_plugins_are_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_plugin(
        tmp_path,
        "sse_cache_broken",
        """
        [sse_cache.backends]
        crashing = sse_cache_broken:from_url
        missing = sse_cache_broken_nonexistent:from_url
        noattr = sse_cache_odd2:nothing_here
        """,
        """
        raise RuntimeError("plugin import explodes")
        """,
    )
    make_plugin(
        tmp_path,
        "sse_cache_odd2",
        "",
        "VALUE = 1\n",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    cases = {
        "crashing": "plugin import explodes",
        "missing": "sse_cache_broken_nonexistent",
        "noattr": "nothing_here",
    }
    for scheme, detail in cases.items():
        with pytest.raises(ConfigError) as info:
            from_url(f"{scheme}://x")
        message = str(info.value)
        assert f"backend plugin {scheme!r}" in message and detail in message
        assert "sse_cache_" in message  # the distribution or module is named


def test_plugin_contract_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    make_plugin(
        tmp_path,
        "sse_cache_odd",
        """
        [sse_cache.backends]
        notcallable = sse_cache_odd:NOT_CALLABLE
        wrongtype = sse_cache_odd:returns_wrong_type
        factoryfails = sse_cache_odd:factory_fails
        """,
        """
        NOT_CALLABLE = 3
        def returns_wrong_type(url):
            return object()
        def factory_fails(url):
            raise RuntimeError(f"cannot reach the moon at {url}")
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ConfigError, match="'notcallable'.*not callable"):
        from_url("notcallable://x")
    # A factory that fails or returns something else is named with its entry point and
    # distribution: the package to look at.
    named = r"backend plugin '{}' \(sse_cache_odd:\w+, from sse_cache_odd\) "
    with pytest.raises(ConfigError, match=named.format("wrongtype") + "returned object, which"):
        from_url("wrongtype://x")
    with pytest.raises(ConfigError, match=named.format("factoryfails") + "failed: .*the moon"):
        from_url("factoryfails://x")
    # The URL its error shows is shown without its password, as everywhere else.
    with pytest.raises(ConfigError, match=r"moon at factoryfails://\*\*\*@h") as info:
        from_url("factoryfails://u:hunter2@h")
    assert "hunter2" not in str(info.value)


def test_a_plugin_cannot_take_over_a_builtin_scheme(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    make_plugin(
        tmp_path,
        "aaa_hijack",
        "[sse_cache.backends]\nmemory = aaa_hijack:from_url\n",
        "def from_url(url):\n    raise RuntimeError('hijacked')\n",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="sse_cache"):
        assert classname("memory://") == "MemoryBackend"
    # The plugin's author is told why their factory is never called.
    assert [r.getMessage() for r in caplog.records] == [
        "sse_cache: the memory:// backend scheme is claimed by sse-cache and aaa_hijack; "
        "using backend plugin 'memory' (sse_cache.backends.memory:from_url, from sse-cache)"
    ]


def test_two_plugins_claiming_one_scheme_are_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # Two distributions register the same scheme: one is picked (by distribution name, so
    # every process picks the same), and the other is named, not ignored without a word.
    for name in ("zzz_second", "aaa_first"):
        make_plugin(
            tmp_path,
            name,
            f"[sse_cache.backends]\nshared = {name}:from_url\n",
            textwrap.dedent(PLUGIN),
        )
    monkeypatch.syspath_prepend(str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="sse_cache"):
        backend: Any = from_url("shared://x")
    assert type(backend).__module__ == "aaa_first"
    assert [r.getMessage() for r in caplog.records] == [
        "sse_cache: the shared:// backend scheme is claimed by aaa_first and zzz_second; "
        "using backend plugin 'shared' (aaa_first:from_url, from aaa_first)"
    ]


# -- what is not a backend ----------------------------------------------------------------


async def _app(scope: object, receive: object, send: object) -> None:
    raise AssertionError("not called")


NOT_BACKENDS = [None, 42, b"redis://localhost", object(), {"url": "memory://"}]


@pytest.mark.parametrize("value", NOT_BACKENDS)
def test_what_is_neither_a_url_nor_a_backend_is_refused(value: Any) -> None:
    # backend=os.environ.get("CACHE_URL") unset: every request was an uncached miss with
    # only a logged AttributeError; now the engine, the middleware and the transports (all
    # through open_backend) refuse it when they are built.
    from sse_cache.adapters import GenericSSE
    from sse_cache.asgi import CacheMiddleware
    from sse_cache.engine import StreamCache
    from sse_cache.http.service import CacheService

    message = "backend must be a URL string or a Backend, got "
    with pytest.raises(ConfigError, match=message + re.escape(repr(value)[:10])):
        open_backend(value)
    # (The engine may check its argument itself, in words of its own.)
    with pytest.raises(ConfigError, match="backend must be"):
        StreamCache(value, GenericSSE())
    with pytest.raises(ConfigError, match=message):
        CacheService(value)
    with pytest.raises(ConfigError, match=message):
        CacheMiddleware(_app, value)


@pytest.mark.parametrize("library", ["sse_cache.httpx", "sse_cache.httpx2"])
def test_the_transports_refuse_what_is_not_a_backend(library: str) -> None:
    module = importlib.import_module(library)
    for transport in (module.AsyncCacheTransport, module.CacheTransport):
        with pytest.raises(ConfigError, match="backend must be a URL string or a Backend"):
            transport(None)


def test_a_backend_object_is_used_as_it_is() -> None:
    backend = from_url("memory://")
    assert open_backend(backend) == (backend, False)
    opened, owned = open_backend("memory://")
    assert type(opened).__name__ == "MemoryBackend" and owned


# -- passwords never reach an error message -----------------------------------------------

PASSWORD = "S3CRETPW"


@pytest.mark.parametrize(
    ("url", "match"),
    [
        # redis:// (standalone_client and from_url)
        (f"redis://app:{PASSWORD}@redis.internal:63790x", "bad port in 'redis.internal:63790x'"),
        (f"redis://:{PASSWORD}@redis.internal:port/0", "bad port in 'redis.internal:port'"),
        (f"redis://app:{PASSWORD}@h:99999", "bad port in 'h:99999'"),
        (f"redis://app:{PASSWORD}@h/abc", "database must be a number"),
        (f"redis://app:{PASSWORD}@h/1?db=2", "both in path"),
        (f"redis://app:{PASSWORD}@h1:1,h2:2", "redis\\+cluster://"),
        (f"redis://app:{PASSWORD}@h?ssl_ca_certs=/x.pem", "rediss://"),
        (f"redis://app:{PASSWORD}@h?timeout=0", "'timeout'"),
        (f"redis://app:{PASSWORD}@h?max_connections=lots", "'max_connections'"),
        (f"redis://app:{PASSWORD}@h?prefix=a&prefix=b", "given twice"),
        (f"redis://app:{PASSWORD}@h?unknown=1", "unknown option"),
        (f"rediss://app:{PASSWORD}@h:1x?ssl_cert_reqs=none", "bad port in 'h:1x'"),
        (f"rediss://app:{PASSWORD}@h?ssl_cert_reqs=maybe", "'ssl_cert_reqs'"),
        (f"unix://app:{PASSWORD}@", "names no socket path: 'unix://\\*\\*\\*@'"),
        (f"unix://:{PASSWORD}@/?db=x", "'db'"),
        (f"redis+cluster://app:{PASSWORD}@h1:7000/3", "database 0"),
        (f"redis+cluster://app:{PASSWORD}@h1:7000?db=1", "no 'db'"),
        (f"redis+cluster://app:{PASSWORD}@h1:70x", "bad port in 'h1:70x'"),
        (f"redis+cluster://app:{PASSWORD}@h1,,h2", "empty host"),
        (f"redis+cluster://app:{PASSWORD}@:7000", "missing host"),
        (f"redis+cluster://app:{PASSWORD}@h1:0", "port 0"),
        (f"redis+cluster://app:{PASSWORD}@h1?near_cache=1MiB", "'near_cache'"),
        # A password with an unencoded '/': its tail must not be read as a host either.
        (f"redis://app:{PASSWORD}/x@h:1x", "bad port in 'h:1x'"),
        # sqlite:// (_path_from_url and from_url)
        (f"sqlite://u:{PASSWORD}@h/x.db", "a SQLite URL has no host"),
        (f"sqlite://:{PASSWORD}@/x.db", "has no host"),
        (f"sqlite://u:{PASSWORD}@h/x.db?timeout=1", "sqlite://\\*\\*\\*@h/x.db"),
        # the registry
        (f"redis:/app:{PASSWORD}@h", "scheme://"),
        (f"app:{PASSWORD}@h:6379", "scheme://"),
    ],
)
def test_url_errors_never_show_the_password(url: str, match: str) -> None:
    # `sse-cache ls/stats` print these messages: a password in them reached the terminal
    # (and logs, CI output).
    with pytest.raises(ConfigError, match=match) as info:
        from_url(url)
    assert PASSWORD not in str(info.value)
    assert PASSWORD not in repr(info.value.__cause__ or "")
    assert PASSWORD[:4] not in str(info.value)


# -- numbers: integers are never rounded, timeouts are bounded ------------------------------


@pytest.mark.parametrize(
    ("url", "options", "parameter"),
    [
        ("redis://localhost", {"db": 1.9}, "db"),
        ("redis://localhost", {"max_connections": 2.7}, "max_connections"),
        ("redis://localhost", {"max_connections": math.inf}, "max_connections"),
        ("redis://localhost", {"max_connections": math.nan}, "max_connections"),
        ("redis://localhost", {"health_check_interval": 0.5}, "health_check_interval"),
        ("redis://localhost?max_connections=inf", {}, "max_connections"),
        ("redis://localhost?max_connections=2.7", {}, "max_connections"),
        ("redis://localhost?db=1e3", {}, "db"),
        ("memory://", {"max_entries": 2.5}, "max_entries"),
        ("memory://", {"max_entries": -math.inf}, "max_entries"),
        ("memcached://h", {"max_pool_size": 2.7}, "max_pool_size"),
        ("memcached://h", {"max_pool_size": math.inf}, "max_pool_size"),
    ],
)
def test_integer_options_are_never_rounded(
    url: str, options: dict[str, Any], parameter: str
) -> None:
    # db=1.9 became 1, max_connections=2.7 became 2, and inf surfaced as "backend factory
    # for redis:// failed: OverflowError(...)" without naming the option.
    with pytest.raises(ConfigError, match=f"option '{parameter}': expected an integer") as info:
        from_url(url, **options)
    assert "OverflowError" not in str(info.value)


def test_integral_numbers_are_integers() -> None:
    backend: Any = from_url("redis://localhost", db=3.0, max_connections="7")
    kwargs = backend.client.connection_pool.connection_kwargs
    assert kwargs["db"] == 3 and type(kwargs["db"]) is int
    assert backend.client.connection_pool.max_connections == 7


@pytest.mark.parametrize(
    ("base", "parameter"),
    [
        ("redis://localhost", "timeout"),
        ("redis://localhost", "connect_timeout"),
        ("sqlite:///x.db", "timeout"),
        ("sqlite:///x.db", "read_timeout"),
        ("sqlite:///x.db", "queue_timeout"),
        ("memcached://h", "timeout"),
        ("memcached://h", "connect_timeout"),
        ("memcached://h", "dead_timeout"),
        ("memcached://h", "queue_timeout"),
    ],
)
@pytest.mark.parametrize("value", ["1e300", "86401", "1e20"])
def test_timeouts_are_at_most_a_day(base: str, parameter: str, value: str) -> None:
    # ?timeout=1e300 passed from_url, then every operation failed with OverflowError
    # ("timestamp out of range for platform time_t").
    with pytest.raises(ConfigError, match=f"option '{parameter}': expected a number <= 86400"):
        from_url(f"{base}?{parameter}={value}")
    from_url(f"{base}?{parameter}=86400")  # one day is still fine


@pytest.mark.parametrize("value", ["1025", "10000000", "1e7"])
def test_memcached_pool_size_is_bounded(value: str) -> None:
    # ?max_pool_size=10000000 made aclose() allocate one token per slot (90 s, 643 MiB).
    with pytest.raises(ConfigError, match="'max_pool_size': expected an integer"):
        from_url(f"memcached://h?max_pool_size={value}")
    from_url("memcached://h?max_pool_size=1024")
    from sse_cache.backends.memcached import MemcachedBackend

    for size in (0, 1025, 10**7, 2.5, True):
        with pytest.raises(ConfigError, match="max_pool_size must be an integer from 1 to 1024"):
            MemcachedBackend([("h", 11211)], max_pool_size=size)  # type: ignore[arg-type]
