"""The public surface: contract names from DESIGN.md exist where users import them, every
public module declares ``__all__`` truthfully, and importing the core stays light."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

PUBLIC_MODULES = [
    "sse_cache",
    "sse_cache.adapters",
    "sse_cache.asgi",
    "sse_cache.backends",
    "sse_cache.breaker",
    "sse_cache.codec",
    "sse_cache.engine",
    "sse_cache.entry",
    "sse_cache.errors",
    "sse_cache.events",
    "sse_cache.flight",
    "sse_cache.http",
    "sse_cache.http.options",
    "sse_cache.http.policy",
    "sse_cache.http.service",
    "sse_cache.httpx",
    "sse_cache.httpx2",
    "sse_cache.keys",
    "sse_cache.metrics",
    "sse_cache.pacing",
    "sse_cache.protocols",
    "sse_cache.proxy",
    "sse_cache.recorder",
    "sse_cache.testing",
]

# DESIGN.md marks these names as contract.
CONTRACT = {
    "sse_cache": ["Event", "SSEParser", "serialize_sse", "StreamCache", "Entry"],
    "sse_cache.errors": [
        "SSECacheError",
        "SSEError",
        "CorruptEntry",
        "BackendError",
        "ConfigError",
    ],
    # (LeasingBackend: what a plugin backend implements for cross-process single-flight.)
    "sse_cache.protocols": [
        "CacheKeyer",
        "EventCodec",
        "Backend",
        "StreamAdapter",
        "LeasingBackend",
        "FanoutBackend",
    ],
    "sse_cache.keys": ["DefaultKeyer"],
    "sse_cache.codec": ["MsgpackCodec"],
    "sse_cache.adapters": ["OpenAIResponses", "OpenAIChat", "AnthropicMessages", "GenericSSE"],
    "sse_cache.backends": [
        "from_url",
        "MemoryBackend",
        "SQLiteBackend",
        "RedisBackend",
        "MemcachedBackend",
    ],
    "sse_cache.asgi": ["CacheMiddleware"],
    "sse_cache.httpx": ["AsyncCacheTransport", "CacheTransport"],
    "sse_cache.httpx2": ["AsyncCacheTransport", "CacheTransport"],
}


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_all_is_declared_and_true(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    assert len(set(exported)) == len(exported), f"{name}.__all__ has duplicates"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names missing attributes: {missing}"


@pytest.mark.parametrize(("name", "names"), CONTRACT.items())
def test_contract_names_are_exported(name: str, names: list[str]) -> None:
    module = importlib.import_module(name)
    assert set(names) <= set(module.__all__)


def test_every_exception_the_package_exports_is_in_its_errors_module() -> None:
    # docs/exceptions.md lists them all under sse_cache.errors: SharedStreamAborted, in
    # sse_cache.flight alone, raised ImportError there, and BackendFull and ValueTooLarge
    # were not in its __all__ (helper-101).
    import sse_cache
    from sse_cache import errors

    raised = {
        name
        for name in sse_cache.__all__
        if isinstance(getattr(sse_cache, name), type)
        and issubclass(getattr(sse_cache, name), BaseException)
    }
    assert raised <= set(errors.__all__), raised - set(errors.__all__)


def test_errors_share_one_root_and_subclass_useful_builtins() -> None:
    from sse_cache import errors

    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.SSECacheError)
    assert issubclass(errors.ConfigError, ValueError)
    assert issubclass(errors.BackendUnavailable, ConnectionError)
    assert issubclass(errors.BackendTimeout, TimeoutError)


def test_importing_the_core_loads_no_optional_dependency() -> None:
    code = (
        "import sys, sse_cache, sse_cache.adapters, sse_cache.backends, sse_cache.asgi;"
        "heavy = {'redis', 'pymemcache', 'httpx', 'httpx2', 'uvicorn', 'openai', 'anthropic'};"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("name", ["options", "policy", "service"])
def test_moved_modules_still_import_with_a_warning(name: str) -> None:
    # Moved under sse_cache.http; the old path works for one more release.
    sys.modules.pop(f"sse_cache.{name}", None)
    with pytest.warns(DeprecationWarning, match=f"sse_cache.http.{name}"):
        old = importlib.import_module(f"sse_cache.{name}")
    new = importlib.import_module(f"sse_cache.http.{name}")
    assert old.__all__ == new.__all__
    assert all(getattr(old, n) is getattr(new, n) for n in new.__all__)


def test_the_old_mock_upstream_path_still_imports_with_a_warning() -> None:
    # sse_cache.mock_upstream moved into sse_cache.testing; the old path works for one release.
    sys.modules.pop("sse_cache.mock_upstream", None)
    with pytest.warns(DeprecationWarning, match=r"import .* from sse_cache\.testing"):
        old = importlib.import_module("sse_cache.mock_upstream")
    testing = importlib.import_module("sse_cache.testing")
    assert set(old.__all__) == {
        "DEFAULT_DELTAS",
        "DEFAULT_SUMMARIES",
        "ERROR_MODES",
        "MockUpstream",
        "UpstreamCut",
    }
    assert all(getattr(old, n) is getattr(testing, n) for n in old.__all__)
    sys.modules.pop("sse_cache.mock_upstream")  # later imports warn again
