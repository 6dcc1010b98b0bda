#!/usr/bin/env bash
# Fault scenarios at full size (kill 2000, disconnect 2000, race 10000, overload 2000):
# prints one summary line per scenario and a markdown table; JSON in test-artifacts/faults/.
# Usage: bench/faults.sh [--small] [kill|disconnect|race|overload ...]
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
[ -x /work/venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=/work/venv/bin/python
size=--full
if [ "${1:-}" = "--small" ]; then size=; shift; fi
exec "$PY" -m tests.faults.run $size "$@"
