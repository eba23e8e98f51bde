"""Moved to :mod:`sse_cache.http.policy`; this path keeps working, with a DeprecationWarning,
until the release after 0.1."""

import warnings

from .http.policy import *  # noqa: F403
from .http.policy import __all__ as __all__

warnings.warn(
    "sse_cache.policy moved to sse_cache.http.policy; import it from there "
    "(the old path goes away in the release after 0.1)",
    DeprecationWarning,
    stacklevel=2,
)
