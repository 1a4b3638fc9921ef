#!/usr/bin/env bash
# Run a command (default: the kernel test suite) as root inside a Debian 12 VM on its stock 6.1
# kernel, where kprobes exist, and exit with that command's exit status.
#
#   vagrant/vm-test.sh                       # python3 -m pytest -v -p no:cacheprovider tests/kernel
#                                            #   tests/unit/test_golden.py (see below)
#   vagrant/vm-test.sh python3 -m tcptrace doctor --json
#   vagrant/vm-test.sh bash -c 'cmd1; cmd2'  # anything; runs from the checkout root
#   vagrant/vm-test.sh --self-test           # one boot: proves exit statuses come back, and that
#                                            # BCC compiles and attaches a kprobe in the guest
#
# The image comes from build-image.sh (built once, then cached). The guest boots it under a
# copy-on-write snapshot, so the cached image is never modified; the checkout is shared in over 9p
# at the same path as on the host (read-only unless TCPTRACE_VM_SHARE=rw); there is no network
# device. The guest command sees PYTHONPATH=<checkout>, TCPTRACE_IN_VM=1, and TCPTRACE_VM_OUT, a
# directory on a writable share where it may leave files (copied to $TCPTRACE_VM_OUT_DIR on the
# host when that is set).
#
# Environment:
#   TCPTRACE_VM_ACCEL    auto (default), tcg or kvm. auto does not trust /dev/kvm (on a microVM
#                        host it may be a paravirtual one that hangs or crawls with stock kernels):
#                        it boots the self-test under KVM, bounded by TCPTRACE_VM_PROBE_S (default
#                        30; the TCG self-test takes 19-51 s, so a KVM that cannot beat that is no
#                        gain), and uses KVM only if that passed, else TCG, saying why.
#   TCPTRACE_VM_CPU      qemu -cpu model (default: max under TCG, host under KVM)
#   TCPTRACE_VM_TIMEOUT  seconds before a hung guest is killed (default 3600, a hang guard;
#                        scripts/test.sh passes what is left of the CI run's time limit)
#   TCPTRACE_VM_TIMES    a file to append key=value timings to (accel, accel_why, probe_s,
#                        boot_s, run_s, total_s), for scripts/test.sh's stage times
#   TCPTRACE_VM_MEM, TCPTRACE_VM_CPUS   default 2048 (MiB) and 2
#   TCPTRACE_VM_SHARE    ro (default) or rw: how the checkout is shared
#   TCPTRACE_VM_CACHE    image cache (default /var/cache/tcptrace-vm)
#   TCPTRACE_VM_ENV      names of further host variables to pass into the guest (space-separated);
#                        TCPTRACE_REQUIRE_KERNEL is always passed when set, so scripts/test.sh's
#                        "a kernel tier that cannot run is a failure" holds in the VM too
#
# Exit status: the guest command's; 124 when the timeout killed the guest; 125 when the guest
# never reported a status (boot failure, kernel panic) or the runner itself failed.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
checkout=$(cd "$here/.." && pwd)
say() { printf 'vm-test: %s\n' "$*" >&2; }
die() { say "$*"; exit 125; }

accel=${TCPTRACE_VM_ACCEL:-auto}
timeout_s=${TCPTRACE_VM_TIMEOUT:-3600}
mem=${TCPTRACE_VM_MEM:-2048}
cpus=${TCPTRACE_VM_CPUS:-2}
share=${TCPTRACE_VM_SHARE:-ro}

self_test=0
case "${1:-}" in
  --self-test) self_test=1; shift ;;
  -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  --) shift ;;
esac
if [ $self_test = 1 ]; then
  set -- bash vagrant/vm-selftest-guest.sh
elif [ $# -eq 0 ]; then
  # The golden outputs too: the guest has Debian 12's click and tabulate, the oldest versions
  # pyproject.toml accepts, and the report's tables must be the same bytes with them. -v: each
  # test's name and result reach the log as it ends, so a run killed at CI's time limit still
  # says which tests failed and which one it was in.
  set -- python3 -m pytest -v -p no:cacheprovider tests/kernel tests/unit/test_golden.py
fi

[ "$(id -u)" -eq 0 ] || { say "must run as root (builds the image with debootstrap)"; exit 77; }
case "$timeout_s" in ''|*[!0-9]*) die "TCPTRACE_VM_TIMEOUT must be whole seconds, not '$timeout_s'" ;; esac
now() { echo "${EPOCHREALTIME/,/.}"; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN {printf "%.1f", b - a}'; }
times_file=${TCPTRACE_VM_TIMES:-}
note_time() { [ -z "$times_file" ] || printf '%s=%s\n' "$1" "$2" >>"$times_file"; }

accel_why=
if [ "$accel" = auto ]; then
  probe_s=${TCPTRACE_VM_PROBE_S:-30}
  if [ ! -c /dev/kvm ] || ! { : <>/dev/kvm; } 2>/dev/null; then
    accel=tcg accel_why="no usable /dev/kvm"
  else
    # The self-test boot under KVM: it proves the guest boots, runs its job, compiles and
    # attaches a kprobe with BCC and reports back, all within the bound.
    plog=$(mktemp "${TMPDIR:-/tmp}/tcptrace-vm-probe.XXXXXX")
    t_probe=$(now)
    prc=0
    TCPTRACE_VM_ACCEL=kvm TCPTRACE_VM_TIMEOUT=$probe_s TCPTRACE_VM_TIMES= TCPTRACE_VM_OUT_DIR= \
      bash "$0" --self-test >"$plog" 2>&1 || prc=$?
    note_time probe_s "$(since "$t_probe")"
    if [ $prc = 0 ]; then
      accel=kvm accel_why="KVM self-test passed in $(since "$t_probe") s"
    else
      case $prc in
        124) accel_why="KVM self-test did not finish within ${probe_s} s" ;;
        *) accel_why="KVM self-test failed ($prc): $(grep -m1 -e '^qemu-system' -e 'self-test: FAIL' "$plog" | cut -c1-160)" ;;
      esac
      accel=tcg
    fi
    rm -f "$plog"
  fi
  say "accel auto: using $accel ($accel_why)"
fi
note_time accel "$accel"
note_time accel_why "${accel_why:-TCPTRACE_VM_ACCEL=$accel}"
case "$accel" in
  tcg) accel_args=(-accel tcg,thread=multi,tb-size=512 -cpu "${TCPTRACE_VM_CPU:-max}") ;;
  kvm) accel_args=(-accel kvm -cpu "${TCPTRACE_VM_CPU:-host}") ;;
  *) die "TCPTRACE_VM_ACCEL must be auto, tcg or kvm, not '$accel'" ;;
esac
case "$share" in
  # Read-only, the guest may cache the checkout (cache=loose): Python's imports and pytest's
  # collection stat files by the thousand, and each uncached 9p round trip is slow under TCG.
  ro) share_opt=,readonly=on; mount_ro=,ro,cache=loose ;;
  rw) share_opt=; mount_ro= ;;
  *) die "TCPTRACE_VM_SHARE must be ro or rw, not '$share'" ;;
esac

img=$(bash "$here/build-image.sh") || die "image build failed"
kver=$(cat "$img/kernel-release")

ctl=$(mktemp -d "${TMPDIR:-/tmp}/tcptrace-vm.XXXXXX")
qpid=
cleanup() {
  [ -n "$qpid" ] && kill "$qpid" 2>/dev/null || true
  rm -rf "$ctl"
}
trap cleanup EXIT
trap 'say interrupted; exit 130' INT TERM
mkdir -p "$ctl/out"

# The command, quoted for bash (printf %q), so arguments with spaces or quotes arrive intact,
# preceded by the host variables the guest should see.
: >"$ctl/run.bash"
for v in TCPTRACE_REQUIRE_KERNEL ${TCPTRACE_VM_ENV:-}; do
  if [ -n "${!v+set}" ]; then printf 'export %s=%q\n' "$v" "${!v}" >>"$ctl/run.bash"; fi
done
printf '%q ' "$@" >>"$ctl/run.bash"
echo >>"$ctl/run.bash"
# The job the guest's init runs (POSIX sh, as the init calls it). It writes the command's status
# to the control share; anything that stops it from doing so shows up as "no status" on the host.
cat >"$ctl/job.sh" <<JOB
#!/bin/sh
up() { cut -d' ' -f1 /proc/uptime; }
echo "vm-test: guest up after \$(up) s, kernel \$(uname -r)"
mkdir -p '$checkout'
mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144$mount_ro src '$checkout' || {
  echo "vm-test: cannot mount the checkout"; echo 125 >/ctl/status; exit; }
cd '$checkout'
export HOME=/root LANG=C.UTF-8 TERM=dumb PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
export PYTHONPATH='$checkout' TCPTRACE_IN_VM=1 TCPTRACE_VM_OUT=/ctl/out
echo "vm-test: running: \$(tail -1 /ctl/run.bash)"
up >/ctl/started
/bin/bash /ctl/run.bash
rc=\$?
echo "vm-test: guest command exited \$rc at \$(up) s"
up >/ctl/ended
echo \$rc >/ctl/status.tmp && mv /ctl/status.tmp /ctl/status
sync
JOB
chmod +x "$ctl/job.sh"

qemu=(qemu-system-x86_64 -nodefaults -no-user-config -display none -no-reboot
  "${accel_args[@]}" -m "$mem" -smp "$cpus"
  -kernel "$img/vmlinuz" -initrd "$img/initrd.img"
  -append "root=/dev/vda rootfstype=ext4 ro console=ttyS0 loglevel=4 panic=-1 init=/usr/local/sbin/tcptrace-vm-init ${TCPTRACE_VM_APPEND:-}"
  -drive "file=$img/rootfs.ext4,format=raw,if=virtio,snapshot=on"
  -virtfs "local,path=$ctl,mount_tag=ctl,security_model=none,id=ctl"
  -virtfs "local,path=$checkout,mount_tag=src,security_model=none,multidevs=remap,id=src$share_opt"
  -device virtio-rng-pci
  -nic none
  -chardev stdio,id=con,signal=off -serial chardev:con)

say "booting $kver ($accel, ${mem} MiB, $cpus CPUs, timeout ${timeout_s} s): $*"
t0=$(now)
timeout -k 10 "$timeout_s" "${qemu[@]}" </dev/null &
qpid=$!
# Boot: qemu start to the guest command starting, seen from here (the job writes /ctl/started
# just before the command), to half a second.
boot_s= run_s=
while kill -0 "$qpid" 2>/dev/null; do
  if [ -e "$ctl/started" ]; then boot_s=$(since "$t0"); break; fi
  sleep 0.5
done
set +e
wait "$qpid"
qrc=$?
set -e
qpid=
# The command's own time by the guest's clock (uptime at its start and end), when it has both.
if [ -s "$ctl/started" ] && [ -s "$ctl/ended" ]; then
  run_s=$(awk -v a="$(cat "$ctl/started")" -v b="$(cat "$ctl/ended")" 'BEGIN {printf "%.1f", b - a}')
fi
elapsed=$(since "$t0")
[ -z "$boot_s" ] || note_time boot_s "$boot_s"
[ -z "$run_s" ] || note_time run_s "$run_s"
note_time total_s "$elapsed"

if [ -n "${TCPTRACE_VM_OUT_DIR:-}" ]; then
  mkdir -p "$TCPTRACE_VM_OUT_DIR" && cp -a "$ctl/out/." "$TCPTRACE_VM_OUT_DIR/"
fi

if [ "$qrc" -eq 124 ] || [ "$qrc" -eq 137 ]; then
  say "the guest did not finish within ${timeout_s} s (TCPTRACE_VM_TIMEOUT): killed"
  exit 124
fi
if [ ! -s "$ctl/status" ]; then
  say "the guest never reported an exit status (qemu exited $qrc after ${elapsed} s): boot failure,"
  say "kernel panic or init failure; the console output above says which"
  exit 125
fi
rc=$(cat "$ctl/status")
say "guest command exited $rc; boot ${boot_s:-?} s, command ${run_s:-?} s, whole run ${elapsed} s ($accel)"

if [ $self_test = 1 ]; then
  # The guest script exits 3 on purpose and records each probe's status in $TCPTRACE_VM_OUT.
  fail=0
  check() {  # name, expectation (zero|nonzero), value
    local ok=0
    case "$2" in zero) [ "$3" = 0 ] && ok=1 ;; nonzero) [ -n "$3" ] && [ "$3" != 0 ] && ok=1 ;; esac
    if [ $ok = 1 ]; then say "self-test: ok   $1 = $3"; else say "self-test: FAIL $1 = '${3:-missing}', expected $2"; fail=1; fi
  }
  st() { cat "$ctl/out/$1.status" 2>/dev/null || true; }
  check true zero "$(st true)"
  check false nonzero "$(st false)"
  check 'exit 7' nonzero "$(st exit7)"
  [ "$(st exit7)" = 7 ] || { say "self-test: FAIL exit 7 came back as '$(st exit7)'"; fail=1; }
  check kprobe_events zero "$(st kprobe_events)"
  check headers zero "$(st headers)"
  check 'bcc kprobe on tcp_v4_connect' zero "$(st kprobe)"
  [ "$rc" = 3 ] || { say "self-test: FAIL the script's own status came back as $rc, expected 3"; fail=1; }
  [ $fail = 0 ] && say "self-test: passed" || say "self-test: FAILED"
  exit $fail
fi
exit "$rc"
