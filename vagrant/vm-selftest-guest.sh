#!/usr/bin/env bash
# Runs inside the VM for `vm-test.sh --self-test` (one boot). Each probe's exit status goes to
# $TCPTRACE_VM_OUT/<name>.status, which vm-test.sh checks on the host; the script itself exits 3
# so the host can also check that the command's own status comes back unchanged.
out=${TCPTRACE_VM_OUT:?run me through vagrant/vm-test.sh --self-test}
rec() { local name=$1; shift; "$@"; echo $? >"$out/$name.status"; }

rec true true
rec false false
rec exit7 sh -c 'exit 7'
rec kprobe_events test -e /sys/kernel/tracing/kprobe_events
rec headers test -e "/lib/modules/$(uname -r)/build/Makefile"
rec kprobe python3 vagrant/kprobe-smoke.py
exit 3
