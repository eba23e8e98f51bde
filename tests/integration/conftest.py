"""Shared helpers for the HTTP integration tests: real uvicorn servers on 127.0.0.1."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import pytest

from sse_cache._uvicorn import serve as serve_app

Serve = Callable[[Any], AbstractAsyncContextManager[str]]


@pytest.fixture
def serve() -> Serve:
    """``async with serve(app) as base_url``: the app on a free loopback port (asyncio)."""
    return serve_app


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """The LiteLLM recipe test needs ``litellm[proxy]`` (~800 MB, not a dev dependency): it
    is deselected, not skipped, where LiteLLM is not installed."""
    if importlib.util.find_spec("litellm") is not None:
        return
    dropped = [item for item in items if item.get_closest_marker("litellm")]
    if dropped:
        items[:] = [item for item in items if not item.get_closest_marker("litellm")]
        config.hook.pytest_deselected(items=dropped)


@pytest.fixture
def never_served(monkeypatch: pytest.MonkeyPatch) -> None:
    """For tests of options the command must refuse: were a check to regress, the command
    would serve (with ``--workers 100000``: fork a process per worker) instead of failing."""

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the command started a server: an option check let it through")

    import uvicorn

    import sse_cache.cli.proxy

    monkeypatch.setattr(uvicorn, "run", refuse)
    monkeypatch.setattr(sse_cache.cli.proxy, "serve_workers", refuse)
