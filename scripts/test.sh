#!/usr/bin/env bash
# The whole test suite, as CI runs it: set-up, then all three tiers on this kernel (pure,
# CLI-over-replay, kernel as root), then the kernel tier again inside a VM on Debian's stock
# kernel, where the kprobe path exists (vagrant/vm-test.sh). TCPTRACE_SKIP_VM=1 skips the VM.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
scripts/setup.sh
# A kernel tier that cannot run is a failure here, not a skip.
export TCPTRACE_REQUIRE_KERNEL=1
"${TCPTRACE_VENV:-$here/.venv}/bin/python" -m pytest -q -p no:cacheprovider tests "$@"
if [ "${TCPTRACE_SKIP_VM:-0}" != 1 ]; then
  vagrant/vm-test.sh
fi
