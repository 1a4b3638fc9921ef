#!/usr/bin/env bash
# Quick start: set up whatever is missing (idempotent), then run tcptrace with the given
# arguments (default: `watch`).  Example: sudo scripts/run.sh report --duration 30
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
"$here/scripts/setup.sh"
[ $# -gt 0 ] || set -- watch
exec "${TCPTRACE_VENV:-$here/.venv}/bin/tcptrace" "$@"
