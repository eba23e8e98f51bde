#!/usr/bin/env bash
# The whole test suite: installs sse-cache[dev] into .venv and runs pytest. Tests start their
# own redis-server and memcached on 127.0.0.1 (apt packages redis-server, memcached); without
# them those tests skip, except with CI=true, where a missing server fails the run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh dev
exec .venv/bin/python -m pytest "$@"
