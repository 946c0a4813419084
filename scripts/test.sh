#!/usr/bin/env bash
# Run the test suite with the runtime environment (jemalloc, headless GL, offline hub).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
exec .venv/bin/python -m pytest tests "$@"
