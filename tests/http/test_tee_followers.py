"""What the followers of a live stream end with, against what the cache then holds: a
follower that ends cleanly has exactly the bytes a later hit replays, wherever the
upstream's chunks came apart, whatever it sent after the completing event, and wherever the
producer's client left. Driven through :class:`CacheService` as an integration drives it
(tests/integration runs the integrations themselves through real HTTP)."""

from __future__ import annotations

import json

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sse_cache import CacheStatus
from sse_cache.events import SSEParser
from sse_cache.http import CacheService

pytestmark = pytest.mark.anyio

PATH = "/v1/chat/completions"
SSE = [("content-type", "text/event-stream")]
HEADERS = {"authorization": "Bearer sk-tee", "content-type": "application/json"}
REQUEST = json.dumps({"model": "m", "messages": [], "stream": True}).encode()


def _chat(content: str, finish: str | None = None) -> bytes:
    choice = {"index": 0, "delta": {"content": content}, "finish_reason": finish}
    return b"data: " + json.dumps({"id": "c1", "choices": [choice]}).encode() + b"\n\n"


ANSWER = _chat("Hel") + _chat("lo") + _chat("", "stop") + b"data: [DONE]\n\n"

# What an upstream may send after `[DONE]` before it ends its body: keep-alive comments, part
# of one, part of an event it never finishes, an error.
AFTER = st.sampled_from(
    [
        b"",
        b": keep-alive\n\n",
        b": keep-al",
        b'data: {"x',
        b": a\n\n: b\n\n",
        b'data: {"error": {"message": "overloaded"}}\n\n',
    ]
)


Play = tuple[list[bytes], int | None, int, bool]


@st.composite
def plays(draw: st.DrawFn) -> Play:
    """The upstream's chunks (its answer may begin with a comment: then the recording keeps
    its bytes), after which one the producer's client leaves (None: it reads to the end),
    before which one the follower joins, and whether the upstream ends its body after the
    last chunk."""
    data = draw(st.sampled_from([b"", b": hi\n\n"])) + ANSWER + draw(AFTER)
    cuts = sorted(set(draw(st.lists(st.integers(1, len(data) - 1), max_size=8))))
    chunks = [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    leave = draw(st.none() | st.integers(0, len(chunks) - 1))
    join = draw(st.integers(0, len(chunks)))
    return chunks, leave, join, draw(st.booleans())


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(play=plays())
async def test_a_follower_that_ends_cleanly_has_what_a_hit_replays(
    anyio_backend: str, play: Play
) -> None:
    chunks, leave, join, ends = play
    service = CacheService("memory://")
    ended = False  # the upstream ended its body, read to it
    followed: list[bytes | Exception] = []

    async def follow() -> None:
        async with service.exchange(service.decide("POST", PATH, HEADERS, REQUEST)) as ex:
            assert ex.status is CacheStatus.SHARED and ex.answer is not None
            got = b""
            try:
                async for chunk in ex.answer.chunks:
                    got += chunk
            except Exception as exc:  # its stream failed: never a clean end
                followed.append(exc)
                return
            followed.append(got)

    try:
        with anyio.fail_after(30):  # a deadlock guard
            async with anyio.create_task_group() as tg:
                decision = service.decide("POST", PATH, HEADERS, REQUEST)
                async with service.exchange(decision) as producer:
                    assert producer.status is CacheStatus.MISS
                    tee = await producer.tee(200, SSE)
                    assert tee is not None
                    reading = True  # the producer's client
                    for i, chunk in enumerate(chunks):
                        if i == join:
                            tg.start_soon(follow)
                            await anyio.wait_all_tasks_blocked()  # it follows the stream
                        tee.relay(chunk)
                        await tee.flush()
                        if not reading and tee.end_if_answered():
                            break  # stopped at the answer: the upstream is closed
                        if i == leave:
                            reading = False
                            if not tee.client_left():
                                break  # no one reads on: stored if it holds the answer
                    else:
                        if join == len(chunks):
                            tg.start_soon(follow)
                            await anyio.wait_all_tasks_blocked()
                        if ends:
                            tee.end()
                            ended = True
                        else:
                            tee.stop("every reader left before the stream ended")
        async with service.exchange(service.decide("POST", PATH, HEADERS, REQUEST)) as again:
            hit = None
            if again.status is CacheStatus.HIT:
                assert again.answer is not None
                hit = b"".join([c async for c in again.answer.chunks])
    finally:
        await service.aclose()
    sent = b"".join(chunks)
    answer = sent[: sent.index(b"data: [DONE]\n\n") + len(b"data: [DONE]\n\n")]
    for got in followed:
        if ended:
            # Read to the upstream's end: every byte, cleanly.
            assert got == sent, got
        if isinstance(got, Exception):
            continue  # (failed: the client knows it has no whole answer)
        # Ended cleanly: the whole answer, as the upstream sent it, and where it was stored
        # exactly what the hits replay.
        assert got.startswith(answer) and sent.startswith(got), got
        if hit is not None:
            assert got == hit, (got, hit)
    if hit is not None:
        assert hit.startswith(answer) and sent.startswith(hit)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_an_answer_too_large_to_store_reaches_followers_reading_on_to_its_end(
    anyio_backend: str,
) -> None:
    # The chunk that completes the answer also takes the bytes the recording keeps (the
    # stream is not in the canonical form: a comment) past max_entry_bytes: nothing will be
    # stored. The producer's client has left; the follower reads on, and the upstream ends
    # its body: the follower gets all of it, cleanly (helper-112: the answer was taken as
    # complete all the same, the stream stopped there and the follower aborted: "the
    # shared stream stopped: the answer is complete").
    chunks = [
        b": hello\n\n" + _chat("Hel"),
        b": " + b"p" * 25_000 + b"\n\n" + _chat("lo") + _chat("", "stop") + b"data: [DONE]\n\n",
        b": bye\n\n",
    ]
    service = CacheService("memory://", max_entry_bytes=20_000)
    followed: list[bytes] = []

    async def follow() -> None:
        async with service.exchange(service.decide("POST", PATH, HEADERS, REQUEST)) as ex:
            assert ex.status is CacheStatus.SHARED and ex.answer is not None
            followed.append(b"".join([chunk async for chunk in ex.answer.chunks]))

    try:
        with anyio.fail_after(30):  # a deadlock guard
            async with anyio.create_task_group() as tg:
                decision = service.decide("POST", PATH, HEADERS, REQUEST)
                async with service.exchange(decision) as producer:
                    tee = await producer.tee(200, SSE)
                    assert tee is not None
                    tg.start_soon(follow)
                    await anyio.wait_all_tasks_blocked()  # it follows the stream
                    tee.relay(chunks[0])
                    await anyio.wait_all_tasks_blocked()  # (the follower keeps up)
                    assert tee.client_left()  # the follower reads on
                    for chunk in chunks[1:]:
                        tee.relay(chunk)
                        await tee.flush()
                        assert not tee.end_if_answered()  # no answer to store
                        await anyio.wait_all_tasks_blocked()  # (the follower keeps up)
                    tee.end()
        async with service.exchange(service.decide("POST", PATH, HEADERS, REQUEST)) as again:
            assert again.status is CacheStatus.MISS  # too large: not stored
    finally:
        await service.aclose()
    assert followed == [b"".join(chunks)]


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_long_line_in_many_pieces_is_not_copied_at_each_piece(
    anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A recording judged as it comes looks at where the answer ends from the parser's state
    # before each chunk: a copy, with the line pending in it. Copied at each of a long
    # line's pieces (a large response.completed in small pieces), the stream cost time
    # quadratic in the line's length (helper-112: 545 ms for 4 MiB in 1 KiB pieces). A piece
    # without a line end completes no event: no copy.
    copies = 0
    copy = SSEParser.copy

    def counted(parser: SSEParser) -> SSEParser:
        nonlocal copies
        copies += 1
        return copy(parser)

    monkeypatch.setattr(SSEParser, "copy", counted)
    line = b'data: {"x": "' + b"y" * 1_000_000 + b'"}\n\n'
    service = CacheService("memory://")
    try:
        decision = service.decide("POST", PATH, HEADERS, REQUEST)
        async with service.exchange(decision) as producer:
            tee = await producer.tee(200, SSE)
            assert tee is not None
            for start in range(0, len(line), 1024):
                tee.relay(line[start : start + 1024])
            tee.relay(b"data: [DONE]\n\n")
            tee.fail("the test is over")
    finally:
        await service.aclose()
    assert copies == 2  # the piece with the line's end, and [DONE]


def _sse(name: str, data: dict[str, object]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()


MESSAGE = (
    _sse("message_start", {"type": "message_start", "message": {"id": "msg_1", "content": []}})
    + _sse(
        "content_block_start",
        {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    )
    + _sse(
        "content_block_delta",
        {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}},
    )
    + _sse("content_block_stop", {"type": "content_block_stop", "index": 0})
    + _sse("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn"}})
    + _sse("message_stop", {"type": "message_stop"})
)
OVERLOADED = _sse(
    "error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
)
MESSAGES = json.dumps({"model": "claude", "max_tokens": 9, "messages": [], "stream": True}).encode()


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize(
    ("pieces", "stopped_by", "stored"),
    [
        # The producer's client got the error event after message_stop (its SDK raised, and
        # closed the response): the stream failed, for the followers and the cache alike
        # (helper-136: stored, and replayed as a clean answer).
        ([MESSAGE + OVERLOADED], "client_left", False),
        ([MESSAGE, OVERLOADED], "client_left", False),
        ([MESSAGE, OVERLOADED], "stop", False),
        ([MESSAGE, OVERLOADED[:30], OVERLOADED[30:]], "stop", False),
        # Part of an error event is no event (the upstream may never finish it): the answer
        # is whole.
        ([MESSAGE, OVERLOADED[:30]], "stop", True),
        ([MESSAGE + OVERLOADED[:30]], "client_left", True),
        # Not a failure: a comment after the answer.
        ([MESSAGE, b": keep-alive\n\n"], "stop", True),
    ],
)
async def test_a_failure_after_the_answer_that_its_client_got_fails_the_stream(
    anyio_backend: str, pieces: list[bytes], stopped_by: str, stored: bool
) -> None:
    service = CacheService("memory://")
    followed: list[tuple[bytes, Exception | None]] = []

    async def follow() -> None:
        async with service.exchange(
            service.decide("POST", "/v1/messages", HEADERS, MESSAGES)
        ) as ex:
            assert ex.status is CacheStatus.SHARED and ex.answer is not None
            got = b""
            try:
                async for chunk in ex.answer.chunks:
                    got += chunk
            except Exception as exc:
                followed.append((got, exc))
                return
            followed.append((got, None))

    try:
        with anyio.fail_after(30):  # a deadlock guard
            async with anyio.create_task_group() as tg:
                decision = service.decide("POST", "/v1/messages", HEADERS, MESSAGES)
                async with service.exchange(decision) as producer:
                    tee = await producer.tee(200, SSE)
                    assert tee is not None
                    tg.start_soon(follow)
                    await anyio.wait_all_tasks_blocked()  # it follows the stream
                    for piece in pieces:
                        tee.relay(piece)
                        await tee.flush()
                    if stopped_by == "stop":
                        tee.stop("every reader left before the stream ended")
                    elif tee.client_left():
                        # Not answered (the failure came in the answer's own chunk): read
                        # on for the follower, to the upstream's end.
                        tee.end()
        again = service.exchange(service.decide("POST", "/v1/messages", HEADERS, MESSAGES))
        async with again as ex:
            status = ex.status
    finally:
        await service.aclose()
    [(got, failed)] = followed
    if stored:
        assert got == MESSAGE and failed is None and status is CacheStatus.HIT
    else:
        # The follower got what the producer's client got, the error event included (its
        # SDK raises the provider's error; helper-162: it failed with none), and never a
        # clean end without it.
        assert got == MESSAGE + OVERLOADED, got
        assert failed is not None or stopped_by == "client_left"
        assert status is CacheStatus.MISS


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
@pytest.mark.parametrize(
    "encodings",
    [["gzip", "identity"], ["identity", "gzip"], ["gzip"]],
    ids=["gzip-then-identity", "identity-then-gzip", "gzip"],
)
async def test_a_body_encoded_under_any_of_its_content_encoding_lines_is_neither_shared_nor_stored(
    anyio_backend: str, encodings: list[str]
) -> None:
    # Content-Encoding sent twice, "gzip" then "identity": read as its last line, the body
    # was taken for plain text, and the followers got its gzip bytes with neither line: a
    # clean 200 of bytes their SDKs could not read (helper-165). Lines of one header read as
    # one list (RFC 9110 §5.3): encoded, it goes to the one that asked, and no further.
    service = CacheService("memory://")
    followed: list[tuple[CacheStatus, list[tuple[str, str]] | None]] = []

    async def follow() -> None:
        async with service.exchange(service.decide("POST", PATH, HEADERS, REQUEST)) as ex:
            followed.append((ex.status, None if ex.answer is None else ex.answer.headers))

    head = [("content-type", "text/event-stream")]
    head += [("content-encoding", coding) for coding in encodings]
    try:
        with anyio.fail_after(30):  # a deadlock guard
            async with anyio.create_task_group() as tg:
                decision = service.decide("POST", PATH, HEADERS, REQUEST)
                async with service.exchange(decision) as producer:
                    tg.start_soon(follow)
                    await anyio.wait_all_tasks_blocked()  # it follows the stream
                    tee = await producer.tee(200, head)
                    if tee is not None:
                        tee.relay(b"\x1f\x8b not SSE")
                        tee.end()
        async with service.exchange(service.decide("POST", PATH, HEADERS, REQUEST)) as again:
            stored = again.status
    finally:
        await service.aclose()
    # The follower was let go to ask the upstream for itself (sent nothing of this one).
    assert followed == [(CacheStatus.MISS, None)]
    assert stored is CacheStatus.MISS


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_followers_of_a_stream_are_not_sent_the_upstreams_length(anyio_backend: str) -> None:
    # The upstream's Content-Length counted a comment it would send after message_stop; the
    # producer's client left at message_stop, and the followers ended there with the answer,
    # under a length 14 bytes longer: their HTTP clients failed on it (helper-165).
    service = CacheService("memory://")
    followed: list[tuple[list[tuple[str, str]], bytes]] = []

    async def follow() -> None:
        async with service.exchange(
            service.decide("POST", "/v1/messages", HEADERS, MESSAGES)
        ) as ex:
            assert ex.status is CacheStatus.SHARED and ex.answer is not None
            got = b"".join([chunk async for chunk in ex.answer.chunks])
            followed.append((ex.answer.headers, got))

    length = str(len(MESSAGE + b": keep-alive\n\n"))
    try:
        with anyio.fail_after(30):  # a deadlock guard
            async with anyio.create_task_group() as tg:
                decision = service.decide("POST", "/v1/messages", HEADERS, MESSAGES)
                async with service.exchange(decision) as producer:
                    tg.start_soon(follow)
                    await anyio.wait_all_tasks_blocked()  # it follows the stream
                    tee = await producer.tee(200, [*SSE, ("content-length", length)])
                    assert tee is not None
                    tee.relay(MESSAGE)
                    await tee.flush()
                    assert not tee.client_left()  # (at message_stop: stored, followers end)
    finally:
        await service.aclose()
    [(head, got)] = followed
    assert got == MESSAGE
    assert "content-length" not in {name.lower() for name, _ in head}
