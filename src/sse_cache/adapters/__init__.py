"""Schema adapters: one per event schema, pure functions of requests and events.

``by_name(name)`` builds an adapter from its schema name (the name stored in every entry);
``for_path(path)`` picks the adapter for a well-known API route. ``KeyedAdapter`` (the
request side every built-in adapter shares: key fields, the streaming flag) and
``split_text`` (text into delta-sized pieces) are for adapters of other schemas
(docs/adapters.md).
"""

from __future__ import annotations

import re
from typing import Any, Final

from ..errors import ConfigError
from ..protocols import StreamAdapter
from ._common import KeyedAdapter as KeyedAdapter
from ._common import split_text as split_text
from .anthropic import AnthropicMessages as AnthropicMessages
from .gemini import GeminiGenerateContent as GeminiGenerateContent
from .generic import GenericSSE as GenericSSE
from .openai_chat import OpenAIChat as OpenAIChat
from .openai_responses import OpenAIResponses as OpenAIResponses

__all__ = [
    "ADAPTERS",
    "AnthropicMessages",
    "GeminiGenerateContent",
    "GenericSSE",
    "KeyedAdapter",
    "OpenAIChat",
    "OpenAIResponses",
    "by_name",
    "for_path",
    "split_text",
]

#: Adapter classes by schema name.
ADAPTERS: Final[dict[str, type[Any]]] = {
    GenericSSE.name: GenericSSE,
    OpenAIResponses.name: OpenAIResponses,
    OpenAIChat.name: OpenAIChat,
    AnthropicMessages.name: AnthropicMessages,
    GeminiGenerateContent.name: GeminiGenerateContent,
}

# Route suffixes of the well-known APIs (gateways mount them under various prefixes).
_PATHS: Final = (
    ("/responses", OpenAIResponses.name),
    ("/chat/completions", OpenAIChat.name),
    ("/messages", AnthropicMessages.name),
)
# Gemini names the model in the path: .../models/{model}:generateContent (or stream...).
_GEMINI: Final = re.compile(r"/models/[^/:]+:(?:streamGenerateContent|generateContent)$")


def by_name(name: str, **options: Any) -> StreamAdapter:
    """A new adapter for schema ``name`` (``generic``, ``openai-responses``, ``openai-chat``,
    ``anthropic-messages``, ``gemini``), built with keyword ``options``. Raises :class:`ConfigError`
    for an unknown name or option."""
    try:
        cls = ADAPTERS[name]
    except KeyError:
        known = ", ".join(sorted(ADAPTERS))
        raise ConfigError(f"unknown adapter {name!r}; known: {known}") from None
    try:
        adapter: StreamAdapter = cls(**options)
    except TypeError as exc:
        raise ConfigError(f"invalid options for adapter {name!r}: {exc}") from None
    return adapter


def for_path(path: str, **options: Any) -> StreamAdapter | None:
    """The adapter for an API path (``/v1/responses``, ``/v1/chat/completions``,
    ``/v1/messages``, also under a prefix such as ``/openai/v1/...``; Gemini's
    ``.../models/{model}:generateContent`` and ``:streamGenerateContent``); None for others.
    The query string, if any, is ignored."""
    path = path.split("?", 1)[0].rstrip("/")
    for suffix, name in _PATHS:
        if path.endswith(suffix):
            return by_name(name, **options)
    if _GEMINI.search(path):
        return by_name(GeminiGenerateContent.name, **options)
    return None
