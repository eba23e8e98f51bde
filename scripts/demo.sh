#!/usr/bin/env bash
# The demo: installs the package (no extras) into .venv and runs `sse-cache demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/venv.sh ""
exec .venv/bin/sse-cache demo "$@"
