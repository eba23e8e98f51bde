"""Serve an ASGI app with uvicorn inside the current event loop (the demo and the tests)."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import anyio

__all__ = ["serve"]


@asynccontextmanager
async def serve(
    app: Any,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    lifespan: Literal["auto", "on", "off"] = "off",
    startup_timeout: float = 10.0,
) -> AsyncIterator[str]:
    """Serve ``app`` on ``host:port`` (0: a free port) until the block ends; yields the base
    URL. ``lifespan``: uvicorn's setting (``"on"`` runs the app's startup and shutdown).
    Needs uvicorn (``sse-cache[proxy]``) and asyncio."""
    import uvicorn

    # proto=IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY on accepted sockets only when the
    # protocol says TCP. Without it Nagle's algorithm meets the client's delayed ACK, and a
    # response's first body bytes could wait ~40 ms behind its headers.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    bound = sock.getsockname()[1]
    # ws="none": nothing served here speaks WebSocket, and uvicorn would otherwise import
    # the websockets package when it is installed (whose older releases warn on import).
    config = uvicorn.Config(
        app, log_level="warning", lifespan=lifespan, access_log=False, ws="none"
    )
    stopping = anyio.Event()

    class InLoopServer(uvicorn.Server):
        # Looks at its state once a second (and at once when told to stop), not every 0.1 s:
        # a test waiting with anyio.wait_all_tasks_blocked, which also looks every 0.1 s,
        # fell into step with uvicorn's wakes on a loaded machine (at each look, uvicorn's
        # task was just due), and the wait never ended.
        async def main_loop(self) -> None:
            # (on_tick(0) renews the Date header at each look: once a second, as uvicorn's.)
            while not await self.on_tick(0):
                with anyio.move_on_after(1.0):
                    await stopping.wait()

    server = InLoopServer(config)
    try:
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, [sock])
            with anyio.fail_after(startup_timeout):
                while not server.started:  # noqa: ASYNC110 - uvicorn offers no event to wait on
                    await anyio.sleep(0.01)
            try:
                yield f"http://{host}:{bound}"
            finally:
                server.should_exit = True
                stopping.set()
    finally:
        sock.close()
