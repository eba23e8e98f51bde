"""The LiteLLM proxy against ``sse-cache proxy``: the same upstream, the same client, one run.

One command: ``.venv/bin/python benchmarks/peers/compare.py``. It builds LiteLLM's venv
(``benchmarks/peers/.venv``, outside git, from ``requirements.txt`` beside this file; rebuilt
when that file changes), starts each server in an OS process of its own - ``sse-cache
mock-upstream`` streaming a 2,000-delta OpenAI Responses answer, a redis-server on 127.0.0.1,
and for each cache backend (``memory``: LiteLLM's ``local`` cache and ``memory://``; ``redis``:
both on that redis-server) a LiteLLM proxy (its config written by this script, with a stub
auth that knows two API keys, two tenants: ``litellm_auth.py``) and an ``sse-cache proxy`` -
and measures, with one httpx2 client for both, on ``POST /v1/responses``:

- **hit, time to first and last byte** of the 2,000-delta stream, medians [min-max] over
  ``--rounds`` (the two proxies alternate within each round, in alternating order). Every
  timed call is checked to be a hit and the run fails otherwise: ``x-sse-cache: hit`` for
  sse-cache, the ``x-litellm-cache-key`` header LiteLLM sends on cache hits only, and for
  both no new request at the upstream (it counts them: ``GET /_mock/stats``);
- **miss, time to first and last byte** (a new prompt each time, one upstream call each,
  checked), next to the same request straight to the upstream;
- before every timed call the servers are left to settle (together, less than 1 ms of CPU in
  50 ms): no call pays for work a server does after it answered (the JSON records how long
  they stayed busy after each call);
- **events replayed vs original**, **byte identity** and **event identity** of a hit against
  the upstream's own answer, and whether the answer text is the same;
- **20 simultaneous identical requests** (a new prompt; 20 connections opened first, then
  the requests released together): how many upstream calls each proxy made;
- **cross-tenant sharing**: tenant A's streamed answer is cached; does tenant B, asking the
  same with its own key, get it without an upstream call?
- **``stream=false`` after a streamed request**: served from the cache (no upstream call)?
  Is it the upstream's own non-stream answer (bytes, or at least the same output text)?

The upstream answers after ``--upstream-first-ms`` (300 ms, a model's time to first token)
and then sends its events at once; hits never reach it. Run: ``.venv/bin/python
benchmarks/peers/compare.py [--rounds 15] [--backends memory,redis] [--json PATH]``
(~10 minutes on 2 cores, plus ~2 minutes for the first venv). Prints a table per backend; ``--json
PATH`` writes every figure and sample. Nothing here is a test: a wrong answer where a check
says so (a timed call that was not a hit, a status that is not 200) fails the run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx2

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from _servers import HOST, free_port, server

from servers import RedisServer, find_binary
from sse_cache import Event, SSEParser, __version__

HERE = Path(__file__).resolve().parent
CLI = [sys.executable, "-m", "sse_cache"]
MODEL = "gpt-mock"
TENANT_A, TENANT_B = "sk-peers-tenant-a", "sk-peers-tenant-b"  # litellm_auth.py knows these
DELTAS = 2000
FAN_OUT = 20


# -- LiteLLM's venv and servers ---------------------------------------------------------------


def ensure_venv(venv: Path, requirements: Path) -> Path:
    """``venv``'s python, with ``requirements`` installed (again when the file changed)."""
    python = venv / "bin" / "python"
    stamp = venv / "peers-requirements.txt"
    wanted = requirements.read_text()
    if python.exists() and stamp.exists() and stamp.read_text() == wanted:
        return python
    print(f"building {venv} from {requirements.name} (a few minutes)...", flush=True)
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "-r", str(requirements)], check=True)
    stamp.write_text(wanted)
    return python


def installed_version(python: Path, package: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({package!r}))"
    return subprocess.run(
        [str(python), "-c", code], check=True, capture_output=True, text=True
    ).stdout.strip()


def litellm_config(upstream: str, cache: dict[str, Any]) -> str:
    """LiteLLM's config: one model on the mock upstream, the cache, the stub auth (JSON is
    YAML)."""
    config = {
        "model_list": [
            {
                "model_name": MODEL,
                "litellm_params": {
                    "model": f"openai/{MODEL}",
                    "api_base": f"{upstream}/v1",
                    "api_key": "sk-peers-upstream",
                },
            }
        ],
        "litellm_settings": {"cache": True, "cache_params": cache},
        "general_settings": {
            # LiteLLM refuses to start without a master key; the stub auth decides the rest.
            "master_key": f"sk-peers-master-{secrets.token_hex(16)}",
            "custom_auth": "litellm_auth.user_api_key_auth",
        },
    }
    return json.dumps(config, indent=2)


@contextmanager
def litellm_server(venv_python: Path, config: str, workdir: Path) -> Iterator[tuple[str, int]]:
    """A LiteLLM proxy (its own CLI, one worker) on a free port, until the block ends: its
    URL and pid. LiteLLM takes 10-30 s to start on a small machine; its output goes to
    ``workdir``."""
    workdir.mkdir(parents=True)
    (workdir / "config.yaml").write_text(config)
    shutil.copy(HERE / "litellm_auth.py", workdir / "litellm_auth.py")
    port = free_port()
    log = workdir / "litellm.log"
    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}  # no price list download
    argv = [str(venv_python.parent / "litellm"), "--config", "config.yaml"]
    argv += ["--host", HOST, "--port", str(port)]
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv, cwd=workdir, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"LiteLLM exited with {proc.returncode}:\n{tail}")
            try:
                with httpx2.Client() as probe:
                    probe.get(f"http://{HOST}:{port}/health/liveliness", timeout=1)
                break
            except httpx2.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"LiteLLM did not start in 180 s (log: {log})") from None
                time.sleep(0.25)
        yield f"http://{HOST}:{port}", proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the client -------------------------------------------------------------------------------


def cpu_ns(pids: list[int]) -> int:
    """CPU time (ns) the live threads of ``pids`` have used (``/proc/PID/task/*/schedstat``)."""
    total = 0
    for pid in pids:
        for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
            with suppress(OSError, ValueError, IndexError):  # a thread that just ended
                total += int(stat.read_text().split()[0])
    return total


SETTLE_WINDOW = 0.05


async def settle(pids: list[int], limit: float = 10.0) -> float:
    """Wait until the servers ``pids`` are idle - less than 1 ms of CPU over
    ``SETTLE_WINDOW`` - so that a timed call does not share the cores with the work a server
    does after it answered (LiteLLM logs and stores in the background). Returns how long
    they were still busy, in steps of ``SETTLE_WINDOW``."""
    busy = 0.0
    while busy < limit:
        before = cpu_ns(pids)
        await anyio.sleep(SETTLE_WINDOW)
        if cpu_ns(pids) - before < 1_000_000:
            break
        busy += SETTLE_WINDOW
    return busy


class NotAHit(RuntimeError):
    """A call that had to be a cache hit was not one."""


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes
    first: float  # seconds to the first body byte
    last: float  # seconds to the last body byte


@dataclass
class Peer:
    name: str
    url: str
    health: str  # a cheap GET that opens a connection

    def was_hit(self, reply: Reply) -> bool:
        if self.name == "sse-cache":
            return reply.headers.get("x-sse-cache") == "hit"
        # LiteLLM sends its cache key only when the answer came from its cache.
        return "x-litellm-cache-key" in reply.headers

    def status(self, reply: Reply) -> str:
        if self.name == "sse-cache":
            return reply.headers.get("x-sse-cache", "?")
        return "hit" if self.was_hit(reply) else "miss"


def request_body(prompt: str, stream: bool = True) -> dict[str, Any]:
    return {"model": MODEL, "input": prompt, "stream": stream}


async def post(client: httpx2.AsyncClient, url: str, body: dict[str, Any], key: str) -> Reply:
    headers = {"authorization": f"Bearer {key}"}
    start = time.perf_counter()
    first = 0.0
    parts: list[bytes] = []
    async with client.stream("POST", f"{url}/v1/responses", json=body, headers=headers) as r:
        async for chunk in r.aiter_raw():
            if not parts:
                first = time.perf_counter() - start
            parts.append(chunk)
        last = time.perf_counter() - start
    reply = Reply(r.status_code, dict(r.headers), b"".join(parts), first, last)
    if reply.status != 200:
        raise RuntimeError(f"{url}: status {reply.status}: {reply.body[:300]!r}")
    return reply


class Upstream:
    def __init__(self, url: str) -> None:
        self.url = url

    async def calls(self, client: httpx2.AsyncClient) -> int:
        """``POST /v1/responses`` requests the mock has answered (LiteLLM's own background
        calls, such as ``GET /v1/models``, are not counted)."""
        stats = (await client.get(f"{self.url}/_mock/stats")).json()
        return int(stats["requests"].get("POST /v1/responses", 0))


async def cached(
    client: httpx2.AsyncClient, upstream: Upstream, peer: Peer, body: dict[str, Any], key: str
) -> Reply:
    """Ask until ``peer`` answers from its cache; the first hit. LiteLLM stores a streamed
    answer in the background after the stream ended, so the first repeat may still miss."""
    for _ in range(60):
        before = await upstream.calls(client)
        reply = await post(client, peer.url, body, key)
        if peer.was_hit(reply) and await upstream.calls(client) == before:
            return reply
        await anyio.sleep(0.25)
    raise NotAHit(f"{peer.name}: still not a hit after 60 requests")


# -- what is compared -------------------------------------------------------------------------


def events_of(body: bytes) -> list[Event]:
    parser = SSEParser()
    return parser.feed(body) + parser.close()


def answer_text(events: list[Event]) -> str:
    """The output text, from the ``response.output_text.delta`` events."""
    text = []
    for event in events:
        if event.data.startswith("{"):
            data = json.loads(event.data)
            if data.get("type") == "response.output_text.delta":
                text.append(data["delta"])
    return "".join(text)


def json_output_text(body: bytes) -> str:
    """The output text of a non-stream Responses answer."""
    parts = []
    for item in json.loads(body).get("output", []):
        for content in item.get("content") or []:
            if content.get("type") == "output_text":
                parts.append(content["text"])
    return "".join(parts)


def first_difference(ours: list[Event], original: list[Event]) -> str:
    for i, (a, b) in enumerate(zip(ours, original, strict=False)):
        if (a.event, a.data) != (b.event, b.data):
            return (
                f"event {i}: event: {a.event!r} vs {b.event!r}; "
                f"data {a.data[:80]!r} vs {b.data[:80]!r}"
            )
    return f"{len(ours)} events vs {len(original)}"


@dataclass
class Figures:
    """One peer on one backend."""

    hit_first_ms: list[float] = field(default_factory=list)
    hit_last_ms: list[float] = field(default_factory=list)
    busy_after_hit_ms: list[float] = field(default_factory=list)  # the servers, after the hit
    miss_first_ms: list[float] = field(default_factory=list)
    miss_last_ms: list[float] = field(default_factory=list)
    busy_after_miss_ms: list[float] = field(default_factory=list)
    events_replayed: int = 0
    events_original: int = 0
    text_deltas_replayed: int = 0
    text_deltas_original: int = 0
    bytes_identical: bool = False
    events_identical: bool = False
    first_difference: str = ""
    answer_identical: bool = False
    fan_out_upstream_calls: int = 0
    fan_out_statuses: dict[str, int] = field(default_factory=dict)
    fan_out_answers_identical: bool = False
    cross_tenant_shared: bool = False
    cross_tenant_status: str = ""
    non_stream_from_cache: bool = False
    non_stream_status: str = ""
    non_stream_bytes_identical: bool = False
    non_stream_text_identical: bool = False


def deltas(events: list[Event]) -> int:
    return sum('"type":"response.output_text.delta"' in e.data for e in events)


async def hits(
    client: httpx2.AsyncClient,
    upstream: Upstream,
    peers: list[Peer],
    figures: dict[str, Figures],
    prompt: str,
    rounds: int,
    pids: list[int],
) -> None:
    """Hit timings, and the replayed events against the upstream's own."""
    body = request_body(prompt)
    original = await post(client, upstream.url, body, TENANT_A)
    want = events_of(original.body)
    for peer in peers:
        hit = await cached(client, upstream, peer, body, TENANT_A)
        got = events_of(hit.body)
        f = figures[peer.name]
        f.events_replayed, f.events_original = len(got), len(want)
        f.text_deltas_replayed, f.text_deltas_original = deltas(got), deltas(want)
        f.bytes_identical = hit.body == original.body
        f.events_identical = [(e.event, e.data) for e in got] == [(e.event, e.data) for e in want]
        f.first_difference = "" if f.events_identical else first_difference(got, want)
        f.answer_identical = answer_text(got) == answer_text(want)
    await settle(pids)
    for i in range(rounds):
        for peer in peers if i % 2 == 0 else peers[::-1]:
            before = await upstream.calls(client)
            reply = await post(client, peer.url, body, TENANT_A)
            figures[peer.name].busy_after_hit_ms.append(await settle(pids) * 1e3)
            calls = await upstream.calls(client) - before
            if not peer.was_hit(reply) or calls:
                raise NotAHit(
                    f"{peer.name}, round {i + 1}: not a hit ({peer.status(reply)}, "
                    f"{calls} upstream call(s))"
                )
            figures[peer.name].hit_first_ms.append(reply.first * 1e3)
            figures[peer.name].hit_last_ms.append(reply.last * 1e3)


async def misses(
    client: httpx2.AsyncClient,
    upstream: Upstream,
    peers: list[Peer],
    figures: dict[str, Figures],
    direct: Figures,
    prompt: str,
    rounds: int,
    pids: list[int],
) -> None:
    """Misses (a new prompt each time) through each proxy and straight to the upstream; each
    checked to have made exactly one upstream call."""
    await settle(pids)
    for i in range(rounds):
        for name, url in [("direct", upstream.url), *((p.name, p.url) for p in peers)]:
            before = await upstream.calls(client)
            reply = await post(client, url, request_body(f"{prompt} {name} {i}"), TENANT_A)
            f = figures.get(name, direct)
            f.busy_after_miss_ms.append(await settle(pids) * 1e3)
            calls = await upstream.calls(client) - before
            if calls != 1:
                raise RuntimeError(f"{name}: a miss made {calls} upstream calls")
            f.miss_first_ms.append(reply.first * 1e3)
            f.miss_last_ms.append(reply.last * 1e3)


async def fan_out(upstream: Upstream, peer: Peer, f: Figures, prompt: str) -> None:
    """``FAN_OUT`` identical requests, on connections opened beforehand, released together."""
    body = request_body(prompt)
    clients = [httpx2.AsyncClient(timeout=120) for _ in range(FAN_OUT)]
    replies: list[Reply] = []
    try:
        for c in clients:  # each opens its connection now, not when released
            (await c.get(f"{peer.url}{peer.health}")).raise_for_status()
        before = await upstream.calls(clients[0])
        go = anyio.Event()

        async def one(c: httpx2.AsyncClient) -> None:
            await go.wait()
            replies.append(await post(c, peer.url, body, TENANT_A))

        async with anyio.create_task_group() as tg:
            for c in clients:
                tg.start_soon(one, c)
            go.set()
        f.fan_out_upstream_calls = await upstream.calls(clients[0]) - before
        original = await post(clients[0], upstream.url, body, TENANT_A)
    finally:
        for c in clients:
            await c.aclose()
    f.fan_out_statuses = dict(Counter(peer.status(r) for r in replies))
    text = answer_text(events_of(original.body))
    f.fan_out_answers_identical = all(answer_text(events_of(r.body)) == text for r in replies)


async def cross_tenant(
    client: httpx2.AsyncClient, upstream: Upstream, peer: Peer, f: Figures, prompt: str
) -> None:
    """Tenant A's answer cached; tenant B asks the same with its own key."""
    body = request_body(prompt)
    await cached(client, upstream, peer, body, TENANT_A)
    before = await upstream.calls(client)
    reply = await post(client, peer.url, body, TENANT_B)
    f.cross_tenant_shared = await upstream.calls(client) == before
    f.cross_tenant_status = peer.status(reply)


async def non_stream_after_stream(
    client: httpx2.AsyncClient, upstream: Upstream, peer: Peer, f: Figures, prompt: str
) -> None:
    """A streamed answer cached; the same request with ``stream: false``."""
    await cached(client, upstream, peer, request_body(prompt), TENANT_A)
    before = await upstream.calls(client)
    reply = await post(client, peer.url, request_body(prompt, stream=False), TENANT_A)
    f.non_stream_from_cache = await upstream.calls(client) == before
    f.non_stream_status = peer.status(reply)
    original = await post(client, upstream.url, request_body(prompt, stream=False), TENANT_A)
    f.non_stream_bytes_identical = reply.body == original.body
    f.non_stream_text_identical = json_output_text(reply.body) == json_output_text(original.body)


async def measure(
    upstream: Upstream, peers: list[Peer], kind: str, rounds: int, pids: list[int]
) -> dict[str, Any]:
    """Every figure for ``peers`` on one backend; ``pids``: every server's process."""
    figures = {peer.name: Figures() for peer in peers}
    direct = Figures()
    run = secrets.token_hex(4)  # prompts never asked before, whatever the backend holds
    async with httpx2.AsyncClient(timeout=120) as client:
        await hits(client, upstream, peers, figures, f"peers {kind} {run} hit", rounds, pids)
        await misses(client, upstream, peers, figures, direct, f"peers {kind} {run}", rounds, pids)
        for peer in peers:
            f = figures[peer.name]
            await fan_out(upstream, peer, f, f"peers {kind} {run} fan-out {peer.name}")
            tenants = f"peers {kind} {run} tenants {peer.name}"
            await cross_tenant(client, upstream, peer, f, tenants)
            non_stream = f"peers {kind} {run} non-stream {peer.name}"
            await non_stream_after_stream(client, upstream, peer, f, non_stream)
    return {
        **{name: asdict(f) for name, f in figures.items()},
        "upstream direct": {"first_ms": direct.miss_first_ms, "last_ms": direct.miss_last_ms},
    }


# -- the run ----------------------------------------------------------------------------------


def spread(values: list[float]) -> str:
    return f"{statistics.median(values):.1f} [{min(values):.1f}-{max(values):.1f}] ms"


def yes(value: bool) -> str:
    return "yes" if value else "no"


def table(kind: str, litellm: str, results: dict[str, dict[str, Any]]) -> None:
    ours, peer, direct = results["sse-cache"], results["litellm"], results["upstream direct"]
    med = statistics.median

    def both(label: str, show: Callable[[dict[str, Any]], str]) -> tuple[str, str, str]:
        return label, show(ours), show(peer)

    def ratio(key: str) -> str:
        return f"{med(peer[key]) / med(ours[key]):.1f}x"

    def statuses(r: dict[str, Any]) -> str:
        return ", ".join(f"{n} {s}" for s, n in sorted(r["fan_out_statuses"].items()))

    rows = [
        both("hit, first byte", lambda r: spread(r["hit_first_ms"])),
        both("hit, last byte", lambda r: spread(r["hit_last_ms"])),
        ("  LiteLLM / sse-cache, first byte", "", ratio("hit_first_ms")),
        ("  LiteLLM / sse-cache, last byte", "", ratio("hit_last_ms")),
        both("miss, first byte", lambda r: spread(r["miss_first_ms"])),
        both("miss, last byte", lambda r: spread(r["miss_last_ms"])),
        (
            "  the upstream alone: first / last",
            f"{med(direct['first_ms']):.1f} / {med(direct['last_ms']):.1f} ms",
            "",
        ),
        both(
            "events replayed / original",
            lambda r: f"{r['events_replayed']:,} / {r['events_original']:,}",
        ),
        both(
            "text deltas replayed / original",
            lambda r: f"{r['text_deltas_replayed']:,} / {r['text_deltas_original']:,}",
        ),
        both("hit bytes identical", lambda r: yes(r["bytes_identical"])),
        both("hit events identical", lambda r: yes(r["events_identical"])),
        both("same answer text", lambda r: yes(r["answer_identical"])),
        both(f"{FAN_OUT} simultaneous: upstream calls", lambda r: str(r["fan_out_upstream_calls"])),
        both("  their answers", statuses),
        both("  all the same answer text", lambda r: yes(r["fan_out_answers_identical"])),
        both(
            "tenant B gets tenant A's entry",
            lambda r: f"{yes(r['cross_tenant_shared'])} ({r['cross_tenant_status']})",
        ),
        both(
            "stream=false after stream: cached",
            lambda r: f"{yes(r['non_stream_from_cache'])} ({r['non_stream_status']})",
        ),
        both(
            "  = upstream's JSON: bytes / text",
            lambda r: (
                f"{yes(r['non_stream_bytes_identical'])} / {yes(r['non_stream_text_identical'])}"
            ),
        ),
    ]
    print(f"backend: {kind}")
    print(f"{'':<38} {'sse-cache ' + __version__:<30} LiteLLM {litellm}")
    for label, a, b in rows:
        print(f"{label:<38} {a:<30} {b}")
    for name, r in (("sse-cache", ours), ("LiteLLM", peer)):
        if r["first_difference"]:
            print(f"  {name}'s hit vs the upstream's events, first difference: ")
            print(f"    {r['first_difference']}")


def show_logs(tmp: Path) -> None:
    """The servers' output, when the run failed (their directory is removed next)."""
    for log in sorted(tmp.rglob("*.log")):
        text = log.read_text(errors="replace").strip()
        if text:
            print(f"\n--- {log.relative_to(tmp)} (last 4,000 characters)\n{text[-4000:]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument(
        "--backends",
        type=lambda s: s.split(","),
        default=["memory", "redis"],
        help="comma-separated: memory, redis (default both)",
    )
    parser.add_argument("--upstream-first-ms", type=float, default=300)
    parser.add_argument("--venv", type=Path, default=HERE / ".venv")
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    args = parser.parse_args()
    for kind in args.backends:
        if kind not in ("memory", "redis"):
            raise SystemExit(f"unknown backend {kind!r}: memory or redis")
    if args.rounds < 1:
        raise SystemExit("--rounds must be at least 1")

    venv_python = ensure_venv(args.venv, HERE / "requirements.txt")
    litellm = installed_version(venv_python, "litellm")
    machine = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg(),
        "litellm": litellm,
        "sse_cache": __version__,
    }
    print(
        f"LiteLLM {litellm} vs sse-cache {__version__}; {machine['platform']}, "
        f"{machine['cpus']} CPUs, load {machine['load_average_at_start'][0]:.1f}; "
        f"{args.rounds} rounds; a {DELTAS:,}-delta Responses stream",
        flush=True,
    )
    results: dict[str, Any] = {"machine": machine, "rounds": args.rounds, "backends": {}}
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="sse-cache-peers-")))
        stack.push(lambda *exc: show_logs(tmp) if exc[0] is not None else None)
        mock = [*CLI, "mock-upstream", "--port", "{port}", "--deltas", str(DELTAS)]
        mock += ["--first-ms", str(args.upstream_first_ms), "--delay-ms", "0"]
        upstream_server = stack.enter_context(server(*mock, log=tmp / "upstream.log"))
        upstream, upstream_pid = Upstream(upstream_server.url), upstream_server.pid
        redis: RedisServer | None = None
        redis_pid: list[int] = []
        if "redis" in args.backends:
            redis = RedisServer(find_binary("redis-server", "redis-server"))
            redis.start()
            stack.callback(redis.cleanup)
            assert redis.proc is not None
            redis_pid.append(redis.proc.pid)
        for kind in args.backends:
            if kind == "memory":
                ours_backend, cache = "memory://", {"type": "local"}
            else:
                assert redis is not None
                ours_backend = redis.url
                cache = {"type": "redis", "host": HOST, "port": redis.port}
            with ExitStack() as servers:
                proxy = [*CLI, "proxy", "--upstream", upstream.url, "--backend", ours_backend]
                proxy += ["--port", "{port}", "--log-level", "warning"]
                ours = servers.enter_context(server(*proxy, log=tmp / f"proxy-{kind}.log"))
                theirs, litellm_pid = servers.enter_context(
                    litellm_server(
                        venv_python, litellm_config(upstream.url, cache), tmp / f"litellm-{kind}"
                    )
                )
                peers = [
                    Peer("sse-cache", ours.url, "/_sse_cache/health"),
                    Peer("litellm", theirs, "/health/liveliness"),
                ]
                print(f"\n{kind}: " + ", ".join(f"{p.name} at {p.url}" for p in peers), flush=True)
                pids = [upstream_pid, ours.pid, litellm_pid, *redis_pid]
                figures = anyio.run(measure, upstream, peers, kind, args.rounds, pids)
            results["backends"][kind] = figures
            table(kind, litellm, figures)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"\nwritten: {args.json}")


if __name__ == "__main__":
    main()
