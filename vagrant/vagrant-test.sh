#!/usr/bin/env bash
# The whole Vagrant path in one script, offline: the local box (build-box.sh) under
# vagrant-libvirt, provisioned by scripts/setup.sh, the test command run over `vagrant ssh`,
# then the VM destroyed. Exits with the test command's status.
#
#   vagrant/vagrant-test.sh                    # TCPTRACE_SKIP_VM=1 make test: every tier
#   vagrant/vagrant-test.sh 'uname -r; id'     # any shell command, run as root from /vagrant
#
# libvirt's networks (vagrant-libvirt's management network 192.168.121.0/24 and libvirt's
# default one) live in a network namespace this script creates, so their addresses, bridges,
# DHCP server and NAT rules exist only there and no VM traffic can leave it. libvirtd and
# virtlogd are started inside that namespace (Debian's package does not start them where there
# is no systemd) and stopped again at the end if this script started them.
#
# Environment: TCPTRACE_VM_ACCEL=kvm (default: emulation, as in vm-test.sh), TCPTRACE_KEEP_VM=1
# keeps the VM and daemons up for debugging.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
say() { printf 'vagrant-test: %s\n' "$*" >&2; }
ns=tcptrace-vagrant
box=tcptrace-local
default_cmd='TCPTRACE_SKIP_VM=1 make test'
cmd=${1:-$default_cmd}

[ "$(id -u)" -eq 0 ] || { say "must run as root (libvirtd, network namespace)"; exit 77; }

need=()
for p in vagrant vagrant-libvirt libvirt-daemon-system libvirt-clients dnsmasq-base qemu-system-x86 \
         qemu-utils rsync openssh-client iproute2; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${need[@]}" >/tmp/tcptrace-vagrant-apt.log 2>&1 \
    || { tail -20 /tmp/tcptrace-vagrant-apt.log >&2; exit 1; }
fi

# Domains run as root: with the package's default (user libvirt-qemu) every domain definition
# spends ~50 s relabelling and chowning files, and the box's kernel/initrd live under /root.
conf=/etc/libvirt/qemu.conf
if ! grep -q '^user = "root"' "$conf" || ! grep -q '^group = "root"' "$conf"; then
  sed -i -e '/^#\?user = /d' -e '/^#\?group = /d' "$conf"
  printf 'user = "root"\ngroup = "root"\n' >>"$conf"
  say "set user/group = root in $conf"
fi

t_all=$(date +%s)
boxfile=$(bash "$here/build-box.sh")
# Vagrant draws progress bars with carriage returns even into a pipe: keep logs readable.
quiet_progress() {
  stdbuf -o0 tr '\r' '\n' | sed -u 's/\x1b\[[0-9;]*[A-Za-z]//g' | grep --line-buffered -v -e '^ *Progress: ' -e '^ *$' || true
}
# Re-add the box when it was built from another image than the installed one; libvirt's copy of
# the old disk (uploaded by the first `vagrant up`) must then go too, or vagrant-libvirt reuses it.
stamp=$HOME/.vagrant.d/boxes/$box/tcptrace-source
readded=0
if [ "$(cat "$stamp" 2>/dev/null)" != "$boxfile" ]; then
  vagrant box add --force --name "$box" "$boxfile" 2>&1 | quiet_progress >&2
  echo "$boxfile" >"$stamp"
  readded=1
fi

ip netns list | grep -qw "^$ns" || { ip netns add "$ns"; say "created network namespace $ns"; }
ip -n "$ns" link set lo up
nsx() { ip netns exec "$ns" "$@"; }

# Daemons: reuse ones already running in our namespace; refuse ones running anywhere else,
# because their networks would be on the host's real interfaces.
started=()
start_daemon() {  # name, pidfile, args...
  local name=$1 pidfile=$2; shift 2
  if [ -s "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    if [ "$(readlink "/proc/$(cat "$pidfile")/ns/net")" = "$(nsx readlink /proc/self/ns/net)" ]; then
      return 0
    fi
    say "$name (pid $(cat "$pidfile")) runs outside namespace $ns: stop it first"; exit 1
  fi
  nsx "$name" "$@"
  for _ in $(seq 50); do [ -S "$sock" ] && [ -s "$pidfile" ] && break; sleep 0.2; done
  started+=("$pidfile")
  say "started $name in $ns (pid $(cat "$pidfile"))"
}
sock=/run/libvirt/virtlogd-sock
start_daemon virtlogd /run/virtlogd.pid -d
sock=/run/libvirt/libvirt-sock
start_daemon libvirtd /run/libvirtd.pid -d
# vagrant-libvirt puts volumes in the "default" pool; a fresh libvirt has none.
if ! nsx virsh -q pool-info default >/dev/null 2>&1; then
  mkdir -p /var/lib/libvirt/images
  nsx virsh -q pool-define-as default dir --target /var/lib/libvirt/images >/dev/null
  nsx virsh -q pool-start default >/dev/null
fi

if [ $readded = 1 ]; then
  for v in $(nsx virsh -q vol-list default 2>/dev/null | awk -v b="${box}_vagrant_box_image" 'index($1, b) == 1 {print $1}'); do
    nsx virsh -q vol-delete --pool default "$v" >/dev/null && say "deleted stale libvirt volume $v"
  done
fi

vg() { nsx env VAGRANT_CWD="$here" TCPTRACE_BOX="$box" vagrant "$@"; }
teardown() {
  [ "${TCPTRACE_KEEP_VM:-0}" = 1 ] && { say "TCPTRACE_KEEP_VM=1: leaving the VM and daemons up"; return; }
  vg destroy -f >/dev/null 2>&1 || true
  local pids=() pf p
  for pf in "${started[@]}"; do pids+=("$(cat "$pf" 2>/dev/null)"); done
  for p in "${pids[@]}"; do [ -n "$p" ] && kill "$p" 2>/dev/null; done
  # The namespace goes too once nothing runs in it any more (daemons we reused keep it).
  if [ ${#started[@]} -eq 2 ]; then
    for p in "${pids[@]}"; do
      for _ in $(seq 100); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
    done
    if [ -z "$(ip netns pids "$ns" 2>/dev/null)" ]; then ip netns delete "$ns" && say "removed network namespace $ns"; fi
  fi
  return 0
}
trap teardown EXIT

t0=$(date +%s)
vg up --provider=libvirt 2>&1 | quiet_progress
t1=$(date +%s)
say "vagrant up (with provisioning): $(( t1 - t0 )) s"
set +e
vg ssh -c "cd /vagrant && sudo bash -c $(printf %q "$cmd")"
rc=$?
set -e
t2=$(date +%s)
say "test command exited $rc after $(( t2 - t1 )) s; whole run $(( t2 - t_all )) s"
if [ $rc -ne 0 ]; then
  # Before the VM goes: what the guest kernel saw (a process killed for memory says 137 and
  # nothing more in the test log) and its memory now.
  say "the guest's kernel log, last lines, and its memory:"
  vg ssh -c 'sudo dmesg | tail -n 25; free -m' 2>&1 >&2 || true
fi
exit $rc
