#!/usr/bin/env bash
# The demo: installs sse-cache[demo] (uvicorn, httpx2, the openai SDK) into .venv and runs
# `sse-cache demo`: a mock upstream and the caching proxy on loopback, no network needed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh demo
exec .venv/bin/sse-cache demo "$@"
