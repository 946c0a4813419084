#!/usr/bin/env bash
# The main job on a fresh machine (after scripts/setup.sh): see README "Quickstart".
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
exec .venv/bin/chunkpolicy quickstart "$@"
