"""sse_cache: record, store and replay streamed (Server-Sent Events) LLM responses."""

from __future__ import annotations

from .codec import MsgpackCodec as MsgpackCodec
from .entry import Entry as Entry
from .errors import (
    BackendError as BackendError,
    BackendTimeout as BackendTimeout,
    BackendUnavailable as BackendUnavailable,
    ConfigError as ConfigError,
    CorruptEntry as CorruptEntry,
    SSECacheError as SSECacheError,
    SSEError as SSEError,
)
from .events import Event as Event, SSEParser as SSEParser, serialize_sse as serialize_sse
from .keys import CacheRequest as CacheRequest, DefaultKeyer as DefaultKeyer
from .protocols import Outcome as Outcome

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "BackendTimeout",
    "BackendUnavailable",
    "CacheRequest",
    "ConfigError",
    "CorruptEntry",
    "DefaultKeyer",
    "Entry",
    "Event",
    "MsgpackCodec",
    "Outcome",
    "SSECacheError",
    "SSEError",
    "SSEParser",
    "serialize_sse",
]
