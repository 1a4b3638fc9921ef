#!/usr/bin/env bash
# The whole test suite, as CI runs it: set-up, then all three tiers on this kernel (pure,
# CLI-over-replay, kernel as root), then the kernel tier again inside a VM on Debian's stock
# kernel, where the kprobe path exists (vagrant/vm-test.sh). TCPTRACE_SKIP_VM=1 skips the VM.
#
# It prints the host (CPU model, cores, CPU vulnerability mitigations) first and each stage's
# time last, pass or fail, so a slow host is visible in the log. The VM's timeout is what is
# left of the whole run's time limit, not a fixed figure:
#   TCPTRACE_CI_LIMIT_S   the whole run's limit (default 5400: CI's 90 minutes)
#   TCPTRACE_CI_T0        when the run started (epoch seconds; .ci/run sets it, default: now)
#   TCPTRACE_CI_MARGIN_S  kept back for what follows the VM and for the clone before us
#                         (default 300)
#   TCPTRACE_VM_TIMEOUT   still applies when it is shorter than what is left
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

limit=${TCPTRACE_CI_LIMIT_S:-5400}
t_ci=${TCPTRACE_CI_T0:-$(date +%s)}
margin=${TCPTRACE_CI_MARGIN_S:-300}
say() { printf 'ci: %s\n' "$*" >&2; }

# ---- the host -------------------------------------------------------------------------------
cpu=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo 2>/dev/null || true)
say "host: ${cpu:-unknown CPU}, $(nproc) cores, $(awk '/^MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), kernel $(uname -r)$([ -e /dev/kvm ] && echo ', /dev/kvm present')"
# Mitigations decide what kernel entry costs (SRSO Safe-RET and retpolines made one host of this
# kind 5x slower at the same storm): name every one that is not "Not affected".
vulns=/sys/devices/system/cpu/vulnerabilities
if [ -d "$vulns" ]; then
  for f in "$vulns"/*; do
    v=$(cat "$f" 2>/dev/null || true)
    [ -n "$v" ] && [ "$v" != "Not affected" ] && say "cpu vulnerability: $(basename "$f"): $v"
  done
fi
say "time limit ${limit} s for the whole run; $(( $(date +%s) - t_ci )) s already gone"

# ---- stages ---------------------------------------------------------------------------------
names=() secs=() results=()
now() { echo "${EPOCHREALTIME/,/.}"; }
elapsed() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.1f", b - a}'; }
record() { names+=("$1"); secs+=("$2"); results+=("$3"); }
# stage NAME CMD...: run CMD, record its time and outcome, keep its exit status.
stage() {
  local name=$1 t0 rc=0; shift
  say "--- $name"
  t0=$(now)
  "$@" || rc=$?
  record "$name" "$(elapsed "$t0" "$(now)")" "$([ $rc = 0 ] && echo ok || echo "FAILED ($rc)")"
  return $rc
}
report() {
  local rc=$? i
  say "stage times:"
  for i in "${!names[@]}"; do
    printf 'ci:   %-22s %8s s  %s\n' "${names[$i]}" "${secs[$i]}" "${results[$i]}" >&2
  done
  printf 'ci:   %-22s %8s s  of the %s s limit; exit %s\n' total "$(( $(date +%s) - t_ci ))" "$limit" "$rc" >&2
}
trap report EXIT

stage set-up scripts/setup.sh
# A kernel tier that cannot run is a failure here, not a skip.
export TCPTRACE_REQUIRE_KERNEL=1
stage "host tiers" "${TCPTRACE_VENV:-$here/.venv}/bin/python" -m pytest -q -rs -p no:cacheprovider tests "$@"

if [ "${TCPTRACE_SKIP_VM:-0}" = 1 ]; then
  say "TCPTRACE_SKIP_VM=1: no VM stage"
  exit 0
fi
stage "image build" bash vagrant/build-image.sh >/dev/null
budget=$(( limit - ($(date +%s) - t_ci) - margin ))
if [ "$budget" -lt 120 ]; then
  say "only ${budget} s left for the VM stage (limit ${limit} s, margin ${margin} s): not starting it"
  exit 124
fi
say "VM stage budget: ${budget} s (limit ${limit} s - $(( $(date +%s) - t_ci )) s gone - margin ${margin} s)"
# A shorter TCPTRACE_VM_TIMEOUT of the caller's own still applies.
if [ -n "${TCPTRACE_VM_TIMEOUT:-}" ] && [ "$TCPTRACE_VM_TIMEOUT" -lt "$budget" ]; then
  budget=$TCPTRACE_VM_TIMEOUT
  say "TCPTRACE_VM_TIMEOUT=${budget}: the VM gets that"
fi
times=$(mktemp "${TMPDIR:-/tmp}/tcptrace-vm-times.XXXXXX")
vm_rc=0
TCPTRACE_VM_TIMEOUT=$budget TCPTRACE_VM_TIMES=$times vagrant/vm-test.sh || vm_rc=$?
# vm-test.sh's own measurements: accel probe, boot (qemu start to guest command), guest command.
get() { sed -n "s/^$1=//p" "$times" | tail -1; }
[ -n "$(get probe_s)" ] && record "VM accel probe" "$(get probe_s)" "$(get accel) ($(get accel_why))"
[ -n "$(get boot_s)" ] && record "VM boot" "$(get boot_s)" "$(get accel)"
[ -n "$(get run_s)" ] && record "VM tests" "$(get run_s)" "$([ $vm_rc = 0 ] && echo ok || echo "FAILED ($vm_rc)")"
[ -z "$(get run_s)" ] && record "VM" "$(get total_s)" "FAILED ($vm_rc)"
rm -f "$times"
exit $vm_rc
