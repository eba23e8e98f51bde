"""``sse_cache._uvicorn.serve``, the in-process server of the demo and the tests."""

from __future__ import annotations

import asyncio
import gc
import socket

import httpx2
import pytest

from sse_cache._uvicorn import serve
from sse_cache.testing import GatedUpstream

pytestmark = [pytest.mark.anyio, pytest.mark.parametrize("anyio_backend", ["asyncio"])]


def _server_side_sockets(port: int) -> list[socket.socket]:
    out = []
    for obj in gc.get_objects():
        if isinstance(obj, asyncio.Transport) and not obj.is_closing():
            sock = obj.get_extra_info("socket")
            if sock is not None and sock.getsockname()[1] == port:
                out.append(sock)
    return out


async def test_accepted_connections_send_small_writes_at_once() -> None:
    # A streamed response is many small writes: with Nagle's algorithm on, a write that
    # follows an unacknowledged one waits for the peer's delayed ACK (~40 ms on Linux), and a
    # response's first event arrived that late behind its headers. asyncio turns Nagle off
    # only on sockets whose protocol says TCP, which the listening socket must therefore say.
    app = GatedUpstream(b"data: x\n\n")
    async with serve(app) as url, httpx2.AsyncClient() as client:
        port = int(url.rsplit(":", 1)[1])
        async with client.stream("GET", url + "/") as response:
            served = _server_side_sockets(port)
            assert served, "no accepted connection found"
            for sock in served:
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            assert await response.aread() == b"data: x\n\n"
