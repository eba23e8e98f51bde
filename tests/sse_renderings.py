"""For the tests of byte-exact replay: hypothesis strategies of SSE events and of the many
ways an upstream may write them on the wire (fields in any order, ``data:`` with or without
its space, comments, extra blank lines, a BOM, LF, CRLF, CR or mixed line ends), an upstream
serving given bytes in given pieces, and a client for an ASGI app."""

from __future__ import annotations

import itertools
from typing import Any

import httpx2
from hypothesis import strategies as st

from sse_cache import Event, SSEParser
from sse_cache.adapters import GenericSSE
from sse_cache.asgi import CacheMiddleware
from sse_cache.testing import GatedUpstream

_text = st.text(st.characters(codec="utf-8", exclude_characters="\r\n"), max_size=20)
_field = st.text(st.characters(codec="utf-8", exclude_characters="\r\n\x00"), max_size=10)

#: Events whose values the wire can carry (no CR or LF in a value, no NUL in an id).
events = st.lists(
    st.builds(
        Event,
        data=st.lists(_text, min_size=1, max_size=3).map("\n".join),
        event=st.none() | _field,
        id=st.none() | st.from_regex(r"[a-z0-9]{1,6}", fullmatch=True),
        retry=st.none() | st.integers(0, 10**6),
    ),
    min_size=1,
    max_size=12,
)

_LINE_ENDS = {"lf": [b"\n"], "crlf": [b"\r\n"], "cr": [b"\r"], "mixed": [b"\n", b"\r\n", b"\r"]}


@st.composite
def renderings(draw: st.DrawFn) -> tuple[list[bytes], bytes, list[Event]]:
    """``(pieces, trailer, events)``: each event's bytes as an upstream might send them (what
    precedes it, comments say, included), the bytes after the last event, and the events.
    The bytes parse to exactly these events (an empty line after a CR never ends with an LF:
    the two would make one CRLF)."""
    evs = draw(events)
    ends = _LINE_ENDS[draw(st.sampled_from(sorted(_LINE_ENDS)))]
    canonical_only = draw(st.booleans())  # a stream in serialize_sse's form, but for the ends

    previous = [b""]  # the last line end written

    def line(text: str) -> bytes:
        # An empty line after a CR must not end with an LF: the two would be one CRLF.
        choices = [e for e in ends if text or previous[0] != b"\r" or e != b"\n"]
        previous[0] = draw(st.sampled_from(choices))
        return text.encode() + previous[0]

    def extras() -> bytes:
        if canonical_only:
            return b""
        out = b""
        for _ in range(draw(st.integers(0, 2))):
            kind = draw(st.sampled_from(["comment", "blank", "unknown"]))
            if kind == "comment":
                out += line(":" + draw(_text))
            elif kind == "blank":
                out += line("")
            else:  # an unknown field, ignored by the parser, alone in its block
                out += line("x-unknown: " + draw(_field)) + line("")
        return out

    pieces: list[bytes] = []
    for index, event in enumerate(evs):
        fields = []
        if event.event is not None:
            fields.append(("event", event.event))
        if event.id is not None:
            fields.append(("id", event.id))
        if event.retry is not None:
            fields.append(("retry", str(event.retry)))
        data = [("data", value) for value in event.data.split("\n")]
        if not canonical_only:
            # Fields anywhere among the data lines (which keep their order).
            for field in draw(st.permutations(fields)):
                data.insert(draw(st.integers(0, len(data))), field)
            fields = []
        piece = (
            b"\xef\xbb\xbf" if index == 0 and not canonical_only and draw(st.booleans()) else b""
        )
        piece += extras()
        for name, value in [*fields, *data]:
            # No space after the colon only where the value does not start with one.
            bare = not canonical_only and not value.startswith(" ") and draw(st.booleans())
            piece += line(f"{name}:{value}" if bare else f"{name}: {value}")
        piece += line("")
        pieces.append(piece)
    return pieces, extras(), evs


def parse(raw: bytes) -> list[Event]:
    """The events of a whole stream."""
    parser = SSEParser()
    events = parser.feed(raw)
    parser.close()
    return events


def upstream_cut_at(raw: bytes, cuts: list[int]) -> GatedUpstream:
    """Answers every request with ``raw`` as an SSE stream, in pieces cut at ``cuts``."""
    bounds = [0, *sorted({c for c in cuts if 0 < c < len(raw)}), len(raw)]
    return GatedUpstream([raw[start:end] for start, end in itertools.pairwise(bounds)])


def client(app: Any) -> httpx2.AsyncClient:
    """A client of ``app`` through httpx2's ASGI transport."""
    return httpx2.AsyncClient(transport=httpx2.ASGITransport(app), base_url="http://t")


async def replays(
    raw: bytes, cuts: list[int], last_id: str | None, headers: dict[str, str]
) -> tuple[bytes, bytes, bytes, bytes | None]:
    """The miss, the instant hit, a paced hit and (with ``last_id``) a Last-Event-ID hit of
    ``raw`` served in pieces cut at ``cuts`` to a generic SSE route through the middleware,
    asked with ``headers`` (a credential); checks that the upstream was called once."""
    upstream = upstream_cut_at(raw, cuts)
    app = CacheMiddleware(upstream, "memory://", routes={"/events": GenericSSE})
    async with client(app) as http:
        miss = await http.post("/events", json={"q": 1}, headers=headers)
        hit = await http.post("/events", json={"q": 1}, headers=headers)
        paced_headers = {**headers, "x-sse-cache-replay": "0ms"}
        paced = await http.post("/events", json={"q": 1}, headers=paced_headers)
        suffix = None
        if last_id is not None:
            resumed = await http.post(
                "/events", json={"q": 1}, headers={**headers, "last-event-id": last_id}
            )
            assert resumed.headers["x-sse-cache"] == "hit"
            suffix = resumed.content
    assert miss.headers["x-sse-cache"] == "miss"
    assert [hit.headers["x-sse-cache"], paced.headers["x-sse-cache"]] == ["hit", "hit"]
    assert upstream.calls == 1
    return miss.content, hit.content, paced.content, suffix
