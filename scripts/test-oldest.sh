#!/usr/bin/env bash
# The oldest versions pyproject.toml allows: installs requirements/oldest.lock into .venv-oldest
# and runs the backend, core, engine and HTTP-layer tests there (what talks to redis-py,
# pymemcache, msgspec, anyio and prometheus_client directly). CI runs it after the whole suite
# on the dev lock.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv-oldest LOCK=requirements/oldest.lock bash scripts/venv.sh dev
exec .venv-oldest/bin/python -m pytest -p no:cacheprovider tests/backends tests/core tests/engine tests/http "$@"
