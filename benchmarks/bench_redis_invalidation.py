"""How long after another process's write the Redis near cache stops answering the old value.

A writer process ``SET``s a key that this process's backend keeps in its near cache, and
reports the moment (``time.monotonic``, one clock for every process on the machine) its
``SET`` returned; this process polls ``cached()`` between event-loop turns and notes when
the old value is gone (Redis's invalidation, on the tracking connection, was handled). The
delay is that difference: what the near cache adds to "a write elsewhere is seen". It can
be negative: Redis queues the invalidation before the writer's reply. The script starts its
own redis-server on a loopback port.

    .venv/bin/python benchmarks/bench_redis_invalidation.py [--writes 300]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from servers import RedisServer, find_binary
from sse_cache.backends.redis import RedisBackend, from_url

WRITER = """
import sys, time, redis
client = redis.Redis(port=int(sys.argv[1]))
for line in sys.stdin:
    client.set("sse-cache:e:k", line.strip().encode())
    print(time.monotonic(), flush=True)
"""


async def measure(port: int, writes: int) -> list[float]:
    backend = from_url(f"redis://127.0.0.1:{port}/0")
    assert isinstance(backend, RedisBackend)
    writer = await asyncio.create_subprocess_exec(
        sys.executable, "-c", WRITER, str(port),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    assert writer.stdin is not None and writer.stdout is not None
    delays: list[float] = []
    await backend.set("k", b"start", None)
    try:
        for n in range(writes):
            # Wait until the current value is kept (tracking up, the GET done).
            for _ in range(10_000):
                await backend.get("k")
                if backend.cached("k") is not None:
                    break
                await asyncio.sleep(0.001)
            else:
                raise SystemExit("the near cache never kept the key")
            old = backend.cached("k")
            writer.stdin.write(f"v{n}\n".encode())
            await writer.stdin.drain()
            for _ in range(10_000_000):  # event-loop turns, until the invalidation is handled
                if backend.cached("k") != old:
                    break
                await asyncio.sleep(0)
            gone = time.monotonic()
            returned = float(await writer.stdout.readline())
            delays.append(gone - returned)
    finally:
        writer.stdin.close()
        await writer.wait()
        await backend.aclose()
    return delays


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writes", type=int, default=300)
    args = parser.parse_args()
    server = RedisServer(find_binary("redis-server", "redis-server"))
    server.start()
    try:
        delays = asyncio.run(measure(server.port, args.writes))
    finally:
        server.cleanup()
    delays_us = sorted(d * 1e6 for d in delays)
    q = statistics.quantiles(delays_us, n=100)
    print(
        f"invalidation seen after the writer's SET returned, {len(delays_us)} writes: "
        f"median {statistics.median(delays_us):.0f} us, p90 {q[89]:.0f}, p99 {q[98]:.0f}, "
        f"range [{delays_us[0]:.0f} .. {delays_us[-1]:.0f}] us"
    )


if __name__ == "__main__":
    main()
