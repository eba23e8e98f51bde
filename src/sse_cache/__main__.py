"""``python -m sse_cache``: the ``sse-cache`` command."""

import sys

from .cli import main

sys.exit(main())
