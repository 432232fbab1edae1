#!/usr/bin/env bash
# The one-shot GPU check (see benchmarks/gpu_check.py): run from anywhere, writes into OUT_DIR.
set -euo pipefail
if [ $# -lt 1 ]; then echo "usage: $0 OUT_DIR [--smoke]" >&2; exit 2; fi
cd "$(dirname "$0")/.."
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" exec python3 benchmarks/gpu_check.py "$@"
