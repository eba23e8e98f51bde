"""sse_cache: record, store and replay streamed (Server-Sent Events) LLM responses."""

from __future__ import annotations

from ._notices import CacheStatus as CacheStatus
from ._notices import Notice as Notice
from .breaker import Breaker as Breaker
from .codec import MsgpackCodec as MsgpackCodec
from .engine import (
    CachedStream as CachedStream,
)
from .engine import (
    SharedStreamAborted as SharedStreamAborted,
)
from .engine import (
    StreamCache as StreamCache,
)
from .entry import Entry as Entry
from .errors import (
    BackendBusy as BackendBusy,
)
from .errors import (
    BackendCorrupt as BackendCorrupt,
)
from .errors import (
    BackendError as BackendError,
)
from .errors import (
    BackendFull as BackendFull,
)
from .errors import (
    BackendReadOnly as BackendReadOnly,
)
from .errors import (
    BackendTimeout as BackendTimeout,
)
from .errors import (
    BackendUnavailable as BackendUnavailable,
)
from .errors import (
    ConfigError as ConfigError,
)
from .errors import (
    CorruptEntry as CorruptEntry,
)
from .errors import (
    SSECacheError as SSECacheError,
)
from .errors import (
    SSEError as SSEError,
)
from .errors import (
    UnreadableEntry as UnreadableEntry,
)
from .errors import (
    ValueTooLarge as ValueTooLarge,
)
from .events import Event as Event
from .events import SSEParser as SSEParser
from .events import serialize_sse as serialize_sse
from .http.options import CacheOptions as CacheOptions
from .keys import CacheRequest as CacheRequest
from .keys import DefaultKeyer as DefaultKeyer
from .pacing import Pacing as Pacing
from .protocols import (
    Backend as Backend,
)
from .protocols import (
    CacheKeyer as CacheKeyer,
)
from .protocols import (
    EventCodec as EventCodec,
)
from .protocols import (
    Outcome as Outcome,
)
from .protocols import (
    StreamAdapter as StreamAdapter,
)
from .recorder import Recorder as Recorder

__version__ = "0.1.0"

__all__ = [
    "Backend",
    "BackendBusy",
    "BackendFull",
    "BackendCorrupt",
    "BackendReadOnly",
    "BackendError",
    "BackendTimeout",
    "BackendUnavailable",
    "Breaker",
    "CacheKeyer",
    "CacheOptions",
    "CacheRequest",
    "CacheStatus",
    "CachedStream",
    "ConfigError",
    "CorruptEntry",
    "DefaultKeyer",
    "Entry",
    "Event",
    "EventCodec",
    "MsgpackCodec",
    "Notice",
    "Outcome",
    "Pacing",
    "Recorder",
    "SSECacheError",
    "SSEError",
    "SSEParser",
    "SharedStreamAborted",
    "StreamAdapter",
    "StreamCache",
    "UnreadableEntry",
    "ValueTooLarge",
    "serialize_sse",
]
