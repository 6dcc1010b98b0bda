#!/usr/bin/env bash
# Fault scenarios at full size (sizes in tests/faults/catalog.py; see RELIABILITY.md):
# prints one summary line per scenario and a markdown table; JSON in test-artifacts/faults/.
# Usage: bench/faults.sh [--small] [scenario ...]   (names: tests/faults/catalog.py)
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
[ -x /work/venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=/work/venv/bin/python
size=--full
if [ "${1:-}" = "--small" ]; then size=; shift; fi
exec "$PY" -m tests.faults.run $size "$@"
