"""Test helpers: upstreams to put a cache in front of, and the streams they send.

- :class:`MockUpstream`: a deterministic mock of the OpenAI (Responses, Chat Completions),
  Anthropic Messages and Google Gemini streaming APIs, as an ASGI app (what
  ``sse-cache mock-upstream`` serves), with pacing and error modes chosen per request.
- :class:`GatedUpstream`: a small SSE upstream serving the stream a test gives it, counting
  its calls, holding the stream at a gate the test opens, or cutting it.
- :func:`metric_value`: one sample of a metrics scrape, as Prometheus reads it.
- :class:`NoticeLog`: a hook that keeps the cache's notices, and lets a test wait for one.
- :func:`responses_stream`, :func:`responses_body`: a realistic OpenAI Responses stream and
  the response it ends with; :func:`paced` yields events at an upstream's pace;
  :func:`mock_text` makes deterministic text.

The same arguments always give the same bytes. Nothing here is needed to use the cache.
"""

from __future__ import annotations

from ._asgi import UpstreamCut as UpstreamCut
from ._gated import GatedUpstream as GatedUpstream
from ._metrics import metric_value as metric_value
from ._mock import DEFAULT_DELTAS as DEFAULT_DELTAS
from ._mock import DEFAULT_SUMMARIES as DEFAULT_SUMMARIES
from ._mock import MockUpstream as MockUpstream
from ._notices import NoticeLog as NoticeLog
from ._pacing import paced as paced
from ._request import ERROR_MODES as ERROR_MODES
from ._responses import responses_body as responses_body
from ._responses import responses_stream as responses_stream
from ._responses import responses_text_pieces as responses_text_pieces
from ._text import mock_text as mock_text

__all__ = [
    "DEFAULT_DELTAS",
    "DEFAULT_SUMMARIES",
    "ERROR_MODES",
    "GatedUpstream",
    "MockUpstream",
    "NoticeLog",
    "UpstreamCut",
    "metric_value",
    "mock_text",
    "paced",
    "responses_body",
    "responses_stream",
    "responses_text_pieces",
]
