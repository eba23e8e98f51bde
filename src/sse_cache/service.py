"""Moved to :mod:`sse_cache.http.service`; this path keeps working, with a DeprecationWarning,
until the release after 0.1."""

import warnings

from .http.service import *  # noqa: F403
from .http.service import __all__ as __all__

warnings.warn(
    "sse_cache.service moved to sse_cache.http.service; import it from there "
    "(the old path goes away in the release after 0.1)",
    DeprecationWarning,
    stacklevel=2,
)
