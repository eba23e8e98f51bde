"""Deprecated: the mock upstream lives in :mod:`sse_cache.testing` now.

``from sse_cache.mock_upstream import MockUpstream`` keeps working for one release, with a
:class:`DeprecationWarning`; import from ``sse_cache.testing`` instead.
"""

from __future__ import annotations

import warnings

from .testing import DEFAULT_DELTAS as DEFAULT_DELTAS
from .testing import DEFAULT_SUMMARIES as DEFAULT_SUMMARIES
from .testing import ERROR_MODES as ERROR_MODES
from .testing import MockUpstream as MockUpstream
from .testing import UpstreamCut as UpstreamCut

__all__ = ["DEFAULT_DELTAS", "DEFAULT_SUMMARIES", "ERROR_MODES", "MockUpstream", "UpstreamCut"]

warnings.warn(
    "sse_cache.mock_upstream is deprecated and will be removed in the next release: "
    "import MockUpstream, UpstreamCut and the rest from sse_cache.testing",
    DeprecationWarning,
    stacklevel=2,
)
