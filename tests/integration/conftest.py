"""Shared helpers for the HTTP integration tests: real uvicorn servers on 127.0.0.1."""

from __future__ import annotations

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
