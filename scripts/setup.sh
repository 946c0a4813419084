#!/usr/bin/env bash
# One-shot set-up on a fresh machine: system libraries (when root), a Python 3.12 virtualenv in .venv, the project with
# its dev + sim extras. Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

# jemalloc: glibc malloc makes CPU torch steps 7-25x slower. ffmpeg: video decoding for LeRobot datasets.
# libosmesa6 + libegl1: headless MuJoCo rendering.
need=()
[ -e /usr/lib/x86_64-linux-gnu/libjemalloc.so.2 ] || [ -e /usr/lib/aarch64-linux-gnu/libjemalloc.so.2 ] || need+=(libjemalloc2)
command -v ffmpeg >/dev/null || need+=(ffmpeg)
ldconfig -p 2>/dev/null | grep -q libOSMesa || need+=(libosmesa6)
ldconfig -p 2>/dev/null | grep -q 'libEGL.so.1' || need+=(libegl1)
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "[setup] apt-get install ${need[*]}"
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
  else
    echo "[setup] please install with your package manager: ${need[*]}" >&2
  fi
fi

PY=${PYTHON:-}
if [ -z "$PY" ]; then
  for cand in python3.12 "$(pyenv root 2>/dev/null)/versions/"3.12*/bin/python3.12; do
    if [ -x "$(command -v "$cand" 2>/dev/null || echo "$cand")" ] && "$cand" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      PY=$cand; break
    fi
  done
fi
[ -n "$PY" ] || { echo "[setup] Python 3.12 not found; set PYTHON=/path/to/python3.12" >&2; exit 1; }

[ -x .venv/bin/python ] || { echo "[setup] creating .venv with $PY"; "$PY" -m venv .venv; }
.venv/bin/python -m pip install -q --upgrade pip
echo "[setup] pip install -e '.[dev,sim]' (first time: a few minutes, torch is large)"
.venv/bin/python -m pip install -q -e '.[dev,sim]'
# openpi's robot client, for the `chunkpolicy serve` tests: its numpy<2 pin would downgrade numpy under zarr 3, so it
# goes in without its pins (what it imports — websockets, msgpack, dm-tree, pillow — comes with the extras above)
.venv/bin/python -m pip install -q --no-deps 'openpi-client==0.1.2'
echo "[setup] done: . .venv/bin/activate && source scripts/env.sh"
