"""``python -m sse_cache`` runs the ``sse-cache`` command."""

import sys

from .cli import main

sys.exit(main())
