"""CacheService without HTTP: what every integration relies on when it decides, looks up,
tees a miss and answers from the cache. The integrations only translate to and from their
framework (tests/integration runs them through real HTTP)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from sse_cache import CacheStatus, Notice, serialize_sse
from sse_cache.http import CacheService, Decision
from sse_cache.http._tee import media_type, not_recorded_because
from sse_cache.testing import responses_body, responses_stream

pytestmark = pytest.mark.anyio

PATH = "/v1/responses"
SSE = [("content-type", "text/event-stream")]


def body(prompt: str = "hello") -> bytes:
    return json.dumps({"model": "gpt-x", "input": prompt, "stream": True}).encode()


def headers(tenant: str = "sk-one", **more: str) -> dict[str, str]:
    return {"authorization": f"Bearer {tenant}", "content-type": "application/json", **more}


def upstream_bytes(prompt: str = "hello") -> bytes:
    return serialize_sse(responses_stream(prompt, text_deltas=30))


@pytest.fixture
def notices() -> list[Notice]:
    return []


@pytest.fixture
async def service(tmp_path: Path, notices: list[Notice]) -> AsyncIterator[CacheService]:
    svc = CacheService(f"sqlite:///{tmp_path}/c.db", hooks=[notices.append])
    yield svc
    await svc.aclose()


async def read(chunks: AsyncIterator[bytes]) -> bytes:
    return b"".join([chunk async for chunk in chunks])


async def miss(
    service: CacheService,
    decision: Decision,
    data: bytes,
    *,
    status: int = 200,
    pieces: int = 7,
) -> list[tuple[str, str]]:
    """Tee ``data`` through an exchange as an edge does: head, chunks (delivered, then
    recorded), end. Returns the headers the edge would add to the response."""
    async with service.exchange(decision) as ex:
        assert ex.answer is None
        tee = await ex.tee(status, SSE)
        step = max(1, len(data) // pieces)
        for start in range(0, len(data), step):
            chunk = data[start : start + step]
            if tee is not None:
                tee.relay(chunk)
        if tee is not None:
            tee.end()
        return ex.headers()


async def test_a_completed_miss_is_answered_byte_for_byte_next_time(
    service: CacheService, notices: list[Notice]
) -> None:
    data = upstream_bytes()
    decision = service.decide("POST", PATH, headers(), body())
    assert decision.adapter is not None
    sent = dict(await miss(service, decision, data))
    assert sent["x-sse-cache"] == CacheStatus.MISS.value

    again = service.decide("POST", PATH, headers(), body())
    async with service.exchange(again) as ex:
        answer = ex.answer
        assert answer is not None and ex.status is CacheStatus.HIT
        assert await read(answer.chunks) == data
        got = dict(answer.headers)
    assert got["x-sse-cache"] == "hit"
    assert got["x-sse-cache-key"] == sent["x-sse-cache-key"]
    kinds = [n.kind for n in notices]
    assert kinds.count("miss") == 1 and kinds.count("store") == 1 and kinds.count("hit") == 1


@pytest.mark.parametrize(
    ("status", "cut", "extra"),
    [
        (500, False, {}),  # not a success
        (200, True, {}),  # the upstream stopped before the completing event
        (200, False, {"cache-control": "no-store"}),  # the client said not to store it
    ],
)
async def test_what_is_not_stored(
    service: CacheService, status: int, cut: bool, extra: dict[str, str]
) -> None:
    data = upstream_bytes()
    if cut:
        data = data[: len(data) // 2]
    decision = service.decide("POST", PATH, headers(**extra), body())
    await miss(service, decision, data, status=status)
    again = service.decide("POST", PATH, headers(), body())
    async with service.exchange(again) as ex:
        assert ex.answer is None and ex.status is CacheStatus.MISS


async def test_an_exchange_left_by_an_error_stores_nothing(service: CacheService) -> None:
    data = upstream_bytes()
    decision = service.decide("POST", PATH, headers(), body())
    with pytest.raises(RuntimeError, match="client went away"):
        async with service.exchange(decision) as ex:
            tee = await ex.tee(200, SSE)
            assert tee is not None
            tee.relay(data)  # every byte arrived, but the edge failed before the end
            raise RuntimeError("client went away")
    async with service.exchange(service.decide("POST", PATH, headers(), body())) as ex:
        assert ex.answer is None


async def test_tenants_do_not_share_answers(service: CacheService) -> None:
    await miss(service, service.decide("POST", PATH, headers("sk-one"), body()), upstream_bytes())
    other = service.decide("POST", PATH, headers("sk-two"), body())
    async with service.exchange(other) as ex:
        assert ex.answer is None and ex.status is CacheStatus.MISS


async def test_a_stored_response_resumes_after_a_sequence_number(service: CacheService) -> None:
    events = responses_stream("resume me", text_deltas=30)
    data = serialize_sse(events)
    await miss(service, service.decide("POST", PATH, headers(), body("resume me")), data)
    response_id = json.loads(events[0].data)["response"]["id"]
    after = 10
    answer = await service.resume(
        "GET", f"{PATH}/{response_id}", f"stream=true&starting_after={after}", headers()
    )
    assert answer is not None
    rest = [e for e in events if json.loads(e.data)["sequence_number"] > after]
    assert await read(answer.chunks) == serialize_sse(rest)
    # Another tenant's GET goes to the upstream, whoever knows the id.
    assert (
        await service.resume(
            "GET", f"{PATH}/{response_id}", "stream=true&starting_after=0", headers("sk-two")
        )
        is None
    )


@pytest.mark.parametrize(
    "query",
    [
        "stream=true&starting_after=3_0",  # int() reads 30
        "stream=true&starting_after=%2B3",  # "+3"
        "stream=true&starting_after=%203",  # " 3"
        "stream=true&starting_after=%D9%A3",  # an Arabic-Indic 3
        "stream=true&starting_after=",  # empty: was read as absent (the whole stream)
        "stream=true&starting_after=2&starting_after=5",  # which one?
        "stream=true&starting_after=abc",
    ],
)
async def test_a_resume_whose_point_is_not_one_plain_integer_goes_to_the_upstream(
    service: CacheService, query: str
) -> None:
    # Answered from the cache, such a request got the rest after a point the API may not
    # read the same way (or would refuse): the upstream answers it, as it would uncached.
    events = responses_stream("resume me", text_deltas=8)
    await miss(
        service, service.decide("POST", PATH, headers(), body("resume me")), serialize_sse(events)
    )
    response_id = json.loads(events[0].data)["response"]["id"]
    assert await service.resume("GET", f"{PATH}/{response_id}", query, headers()) is None
    plain = await service.resume(
        "GET", f"{PATH}/{response_id}", "stream=true&starting_after=3", headers()
    )
    assert plain is not None


async def test_an_invalid_control_header_is_a_config_error_and_a_notice(
    service: CacheService, notices: list[Notice]
) -> None:
    from sse_cache import ConfigError

    with pytest.raises(ConfigError, match="x-sse-cache-ttl"):
        service.decide("POST", PATH, headers(**{"x-sse-cache-ttl": "soon"}), body())
    assert [n.kind for n in notices] == ["invalid"]


@pytest.mark.parametrize(
    ("status", "headers", "wanted", "why"),
    [
        (200, {"content-type": "text/event-stream; charset=utf-8"}, True, ""),
        (200, {"content-type": "application/json"}, True, ""),
        (200, {"content-type": "text/event-stream"}, False, "not to be stored"),
        (429, {"content-type": "text/event-stream"}, True, "upstream status 429"),
        (206, {"content-type": "text/event-stream"}, True, "upstream status 206"),
        (201, {"content-type": "application/json"}, True, ""),
        (
            200,
            {"content-type": "text/event-stream", "content-encoding": "gzip"},
            True,
            "compressed response body",
        ),
        (200, {"content-type": "text/html"}, True, "content type text/html"),
        (200, {}, True, "content type missing"),
    ],
)
def test_which_upstream_answers_are_recorded(
    status: int, headers: dict[str, str], wanted: bool, why: str
) -> None:
    # The reason is what the access log and the not_stored notice say.
    assert not_recorded_because(status, headers, media_type(headers), wanted=wanted) == why


# -- what a miss's tee must refuse to store (found by a mutation audit) ------------------------

JSON = [("content-type", "application/json")]
CHAT = "/v1/chat/completions"


def unary(prompt: str = "hello") -> bytes:
    return json.dumps({"model": "gpt-x", "input": prompt}).encode()


async def unary_miss(service: CacheService, path: str, request: bytes, answer: bytes) -> None:
    """A non-streamed miss answered ``answer`` (200, JSON), delivered in two chunks."""
    async with service.exchange(service.decide("POST", path, headers(), request)) as ex:
        assert ex.answer is None and ex.status is CacheStatus.MISS
        tee = await ex.tee(200, JSON)
        assert tee is not None
        half = len(answer) // 2
        for chunk in (answer[:half], answer[half:]):
            tee.relay(chunk)
        tee.end()


async def status_of(service: CacheService, path: str, request: bytes) -> CacheStatus:
    async with service.exchange(service.decide("POST", path, headers(), request)) as ex:
        return ex.status


def chat_request(prompt: str) -> bytes:
    messages = [{"role": "user", "content": prompt}]
    return json.dumps({"model": "gpt-x", "messages": messages}).encode()


def chat_answer(finish_reason: str | None) -> bytes:
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": "hi"},
        "finish_reason": finish_reason,
    }
    return json.dumps(
        {"id": "chatcmpl-1", "object": "chat.completion", "model": "gpt-x", "choices": [choice]}
    ).encode()


@pytest.mark.parametrize(
    ("path", "request_", "answer", "stored"),
    [
        # A Responses object that failed, though the HTTP status is 200 (what the API sends
        # for a non-streamed request whose generation failed): never a cache entry.
        (
            PATH,
            unary("failed"),
            json.dumps({**responses_body("failed"), "status": "failed"}),
            False,
        ),
        (PATH, unary("completed"), json.dumps(responses_body("completed")), True),
        # A chat completion whose choice has no finish_reason was cut short.
        (CHAT, chat_request("cut"), chat_answer(None).decode(), False),
        (CHAT, chat_request("done"), chat_answer("stop").decode(), True),
    ],
    ids=["responses-failed", "responses-completed", "chat-no-finish-reason", "chat-finished"],
)
async def test_a_json_answer_is_stored_only_when_its_adapter_judges_it_complete(
    service: CacheService, path: str, request_: bytes, answer: str, stored: bool
) -> None:
    # (Mutation audit T9: ResponseTee.close stored any JSON body that ended.)
    await unary_miss(service, path, request_, answer.encode())
    expected = CacheStatus.HIT if stored else CacheStatus.MISS
    assert await status_of(service, path, request_) is expected


@pytest.mark.parametrize("over", [0, 1], ids=["exactly-the-limit", "one-byte-over"])
async def test_a_json_answer_is_stored_up_to_max_entry_bytes_exactly(
    tmp_path: Path, over: int
) -> None:
    # (Mutation audit T8: the JSON body limit.) The body is padded with JSON whitespace to
    # max_entry_bytes (+1): the limit itself is allowed, one byte more is not stored.
    base = json.dumps(responses_body("sized")).encode()
    limit = len(base) + 100
    answer = base + b" " * (limit - len(base) + over)
    assert len(answer) == limit + over
    svc = CacheService(f"sqlite:///{tmp_path}/c.db", max_entry_bytes=limit)
    try:
        await unary_miss(svc, PATH, unary("sized"), answer)
        expected = CacheStatus.MISS if over else CacheStatus.HIT
        assert await status_of(svc, PATH, unary("sized")) is expected
    finally:
        await svc.aclose()


class EntryWritesFail:
    """A memory backend whose writes of one key (:attr:`failing`) fail, as a backend that
    dies between two writes would; every other write (an alias) succeeds."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self.failing = ""

    async def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    async def set(self, key: str, value: bytes, ttl: float | None = None) -> None:
        if key == self.failing:
            raise ConnectionError("backend down")
        self.data[key] = value

    async def delete(self, key: str) -> None:
        self.data.pop(key, None)

    async def aclose(self) -> None:
        pass


async def test_a_stream_whose_write_failed_gets_no_response_id_alias() -> None:
    # (Mutation audit L3: the recording said "stored" whatever the write gave.) The alias by
    # which GET /v1/responses/{id} resumes a stored stream must not name a key that holds
    # nothing: nothing was written under the key, and nothing names it either.
    from sse_cache.http._resume import alias_key

    backend = EntryWritesFail()
    service = CacheService(backend)
    events = responses_stream("write fails", text_deltas=5)
    data = serialize_sse(events)
    decision = service.decide("POST", PATH, headers(), body("write fails"))
    async with service.exchange(decision) as ex:
        backend.failing = ex.key  # the entry's write fails
        tee = await ex.tee(200, SSE)
        assert tee is not None
        tee.relay(data)
        tee.end()
    response_id = json.loads(events[0].data)["response"]["id"]
    assert decision.adapter is not None
    alias = alias_key(decision.adapter.name, decision.tenant, response_id, decision.origin)
    assert ex.key not in backend.data
    assert alias not in backend.data, "an alias names an entry that was never stored"
    # The write works again: the next identical request stores it, and is indexed then.
    backend.failing = ""
    await miss(service, service.decide("POST", PATH, headers(), body("write fails")), data)
    assert ex.key in backend.data and backend.data[alias] == ex.key.encode()


async def test_an_answer_being_stored_is_no_hit_for_a_request_wanting_none_so_old(
    service: CacheService,
) -> None:
    # The producer's stream ended and its entry is judged, not yet stored (its exchange is
    # still open): an identical request is answered from it. One that asks for no answer
    # older than max-age must get what it would get from the backend's copy: none older.
    data = upstream_bytes()
    async with service.exchange(service.decide("POST", PATH, headers(), body())) as producer:
        tee = await producer.tee(200, SSE)
        assert tee is not None
        tee.relay(data)
        tee.end()  # judged: complete
        plain = service.decide("POST", PATH, headers(), body())
        async with service.exchange(plain) as ex:
            assert ex.status is CacheStatus.HIT and ex.answer is not None
            assert await read(ex.answer.chunks) == data
        strict = service.decide("POST", PATH, headers(**{"x-sse-cache-max-age": "0"}), body())
        async with service.exchange(strict) as ex:
            assert ex.answer is None and ex.status is CacheStatus.MISS


async def test_a_service_opened_again_starts_with_a_closed_breaker() -> None:
    # Calls to the closed backend (requests served without a lifespan between two servings)
    # open the breaker; the backend opened again is a new one, which an open breaker would
    # skip for its cooldown: every stored answer upstream (helper-99).
    import time

    service = CacheService("memory://")
    await service.aclose()
    for _ in range(10):
        service.breaker.failure(time.monotonic(), "BackendUnavailable('MemoryBackend is closed')")
    assert service.breaker.state.value == "open"
    service.reopen()
    assert service.breaker.state.value == "closed"
    assert service.breaker.allow(time.monotonic())  # the new backend is asked
    await service.aclose()


def test_the_access_line_says_why_a_206_was_not_stored() -> None:
    # The part a Range asked for: its line said "not a storable answer (not completed by the
    # route's schema...)", a guess (helper-172).
    from sse_cache._logging import _Line, _unrecorded

    line = _Line()
    line.status, line.complete = 206, True
    assert _unrecorded({"type": "http", "headers": []}, line) == "upstream status 206"
    line.status = 200
    assert _unrecorded({"type": "http", "headers": []}, line).startswith("not a storable")
