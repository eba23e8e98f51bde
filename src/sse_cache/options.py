"""Moved to :mod:`sse_cache.http.options`; this path keeps working, with a DeprecationWarning,
until the release after 0.1."""

import warnings

from .http.options import *  # noqa: F403
from .http.options import __all__ as __all__

warnings.warn(
    "sse_cache.options moved to sse_cache.http.options; import it from there "
    "(the old path goes away in the release after 0.1)",
    DeprecationWarning,
    stacklevel=2,
)
