#!/usr/bin/env bash
# Build (once) a Debian 12 root filesystem whose stock 6.1 kernel has kprobes, kretprobes and BTF,
# so the kernel test suite can exercise the tcp_v4_connect/tcp_v6_connect kprobe path that the
# 6.18 microVM host kernel lacks (CONFIG_KPROBES unset there).
#
# Output, in $TCPTRACE_VM_CACHE/<key>/ (default /var/cache/tcptrace-vm):
#   rootfs.ext4   raw ext4 image of the root filesystem (never written by vm-test.sh: it boots
#                 it behind a copy-on-write snapshot)
#   vmlinuz, initrd.img   the image's own kernel and initramfs, for qemu -kernel/-initrd
#   kernel-release        `uname -r` of that kernel
# <key> is a hash of this script (which holds the package list and the guest init), so editing
# either builds a new image and a second run with nothing changed reuses the first one.
# Prints the image directory on stdout; progress goes to stderr.
#
# Everything comes from Debian's archive through debootstrap, using the mirror apt is configured
# with here (override: TCPTRACE_VM_MIRROR). No other download happens.
set -euo pipefail

say() { printf 'build-image: %s\n' "$*" >&2; }
here=$(cd "$(dirname "$0")" && pwd)
cache=${TCPTRACE_VM_CACHE:-/var/cache/tcptrace-vm}
suite=bookworm

# Packages in the guest. The first block is what the kernel suite needs; the second what the
# minimal init (vm-test.sh) needs; the third makes the same image usable as a Vagrant box
# (build-box.sh): systemd as init when booted normally, DHCP on the management NIC, ssh for
# `vagrant ssh`, sudo and rsync for Vagrant's provisioning and synced folder.
packages=(
  linux-image-amd64 linux-headers-amd64 bpfcc-tools python3-bpfcc
  python3-click python3-tabulate python3-pytest python3-jsonschema python3-prometheus-client
  prometheus
  nftables iproute2 procps util-linux hping3

  initramfs-tools kmod
  make python3-venv python3-pip python3-setuptools python3-wheel

  systemd-sysv udev dbus openssh-server sudo rsync ca-certificates
)

if [ "$(id -u)" -ne 0 ]; then say "must run as root (debootstrap, chroot)"; exit 77; fi

key=$(cat "$0" "$here/vagrant-insecure.pub" | sha256sum | cut -c1-16)
out=$cache/$key
if [ -s "$out/rootfs.ext4" ] && [ -s "$out/vmlinuz" ] && [ -s "$out/initrd.img" ] && [ -e "$out/.complete" ]; then
  say "reusing $out"
  echo "$out"
  exit 0
fi

# Host prerequisites, installed from Debian when missing.
need=()
for p in debootstrap e2fsprogs qemu-system-x86 qemu-utils; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  say "installing host packages: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${need[@]}" >/tmp/tcptrace-vm-host-apt.log 2>&1 \
    || { tail -20 /tmp/tcptrace-vm-host-apt.log >&2; say "installing host packages failed"; exit 1; }
fi

# The mirror: the first deb.debian.org-style URI apt uses for the main archive (not -security).
mirror=${TCPTRACE_VM_MIRROR:-}
if [ -z "$mirror" ]; then
  mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null \
    | awk '/^URIs:/ {u=$2} /^Suites:/ && u !~ /security/ && $0 ~ /(^| )'"$suite"'( |$)/ {print u; exit}')
fi
if [ -z "$mirror" ]; then
  mirror=$(grep -hE '^deb +(\[[^]]*\] +)?[a-z]+://' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
    | grep -v security | grep -E " $suite( |$)" | awk '{for(i=2;i<=NF;i++) if ($i ~ /:\/\//) {print $i; exit}}' | head -1)
fi
mirror=${mirror:-http://deb.debian.org/debian}

# Build in a private mount namespace: the chroot's proc, sys, dev and devpts mounts can then
# neither propagate to the host nor outlive this script, even if it is killed before its trap
# runs (the namespace, and every mount in it, dies with the last process).
if [ -z "${TCPTRACE_VM_BUILD_NS:-}" ]; then
  export TCPTRACE_VM_BUILD_NS=1 TCPTRACE_VM_MIRROR="$mirror"
  exec unshare --mount --propagation private bash "$0" "$@"
fi
say "building $out from $mirror ($suite)"

mkdir -p "$cache"
work=$(mktemp -d "$cache/build.XXXXXX")
root=$work/root
cleanup() {
  for m in dev/pts dev proc sys; do mountpoint -q "$root/$m" 2>/dev/null && umount -l "$root/$m"; done
  rm -rf --one-file-system "$work"
}
trap cleanup EXIT

t0=$(date +%s)
debootstrap --variant=minbase "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 \
  || { tail -20 "$work/debootstrap.log" >&2; say "debootstrap failed"; exit 1; }
say "debootstrap: $(( $(date +%s) - t0 )) s"

mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
# A private /dev, never the host's: with a bind mount, a package script that replaces a node,
# or a teardown that runs before the unmount, reaches the host's /dev (this machine once lost
# /dev/null that way).
mount -t tmpfs -o mode=0755,size=1m tmpfs "$root/dev"
for n in "null 1 3" "zero 1 5" "full 1 7" "random 1 8" "urandom 1 9" "tty 5 0"; do
  set -- $n; mknod -m 666 "$root/dev/$1" c "$2" "$3"
done
mkdir -p "$root/dev/pts" "$root/dev/shm"
ln -s /proc/self/fd "$root/dev/fd"
mount -t devpts -o newinstance,ptmxmode=0666 devpts "$root/dev/pts"
ln -s pts/ptmx "$root/dev/ptmx"
cp /etc/resolv.conf "$root/etc/resolv.conf" 2>/dev/null || true
echo "deb $mirror $suite main" >"$root/etc/apt/sources.list"
# No service may start inside the chroot (sshd, dbus): the host is not the guest.
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"; chmod +x "$root/usr/sbin/policy-rc.d"

t1=$(date +%s)
chroot "$root" /usr/bin/env DEBIAN_FRONTEND=noninteractive LC_ALL=C sh -ec "
  apt-get update -q
  apt-get install -y -q --no-install-recommends ${packages[*]}
  apt-get clean
" >"$work/apt.log" 2>&1 || { tail -30 "$work/apt.log" >&2; say "package install failed"; exit 1; }
say "packages: $(( $(date +%s) - t1 )) s"
rm -f "$root/usr/sbin/policy-rc.d"
rm -rf "$root/var/lib/apt/lists/"*

kver=$(ls "$root/lib/modules" | sort -V | tail -1)
chroot "$root" test -e "/lib/modules/$kver/build/Makefile" || { say "linux-headers did not provide /lib/modules/$kver/build"; exit 1; }

# ---- guest configuration -------------------------------------------------------------------
echo tcptrace-vm >"$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 tcptrace-vm\n::1 localhost ip6-localhost ip6-loopback\n' >"$root/etc/hosts"
printf '/dev/vda / ext4 rw,errors=remount-ro 0 1\n' >"$root/etc/fstab"
: >"$root/etc/resolv.conf"
chroot "$root" passwd -d root >/dev/null   # console login for debugging a box; no network to reach it

# 9p for the shared checkout. They are loaded from the root filesystem by the init (the root is
# on virtio-blk, which the default MODULES=most initramfs already carries), and listed here too so
# systemd loads them early when the image boots as a Vagrant box.
printf '9pnet_virtio\n9p\n' >"$root/etc/modules-load.d/9p.conf"

# The minimal init for vm-test.sh (kernel argument init=/usr/local/sbin/tcptrace-vm-init).
# It prepares what the suite needs, mounts the control share and runs the job vm-test.sh put
# there, then powers off. The job writes its own exit status to the share; the init only makes
# sure the machine always powers off, whatever the job does.
cat >"$root/usr/local/sbin/tcptrace-vm-init" <<'INIT'
#!/bin/sh
# PID 1 in the tcptrace test VM (see vagrant/build-image.sh). No systemd: boot to job in seconds.
PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export PATH
# The initramfs has already moved /proc, /sys, /dev and /run over; mount only what is missing.
mnt() { mountpoint -q "$3" || mount -t "$1" -o "$2" "$1" "$3"; }
mnt proc defaults /proc
mnt sysfs defaults /sys
mnt devtmpfs mode=0755 /dev
mkdir -p /dev/pts /dev/shm
mnt devpts gid=5,mode=620 /dev/pts
mnt tmpfs mode=1777 /dev/shm
mount -o remount,rw /
mnt tmpfs mode=1777 /tmp
mnt tmpfs mode=0755 /run
mnt tracefs defaults /sys/kernel/tracing
mnt debugfs defaults /sys/kernel/debug
mnt bpf mode=0700 /sys/fs/bpf
mnt cgroup2 defaults /sys/fs/cgroup
ip link set lo up
hostname tcptrace-vm
modprobe 9pnet_virtio && modprobe 9p
mkdir -p /ctl
if mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 ctl /ctl && [ -x /ctl/job.sh ]; then
  /bin/sh /ctl/job.sh </dev/null
else
  echo "tcptrace-vm-init: no control share (ctl) or no /ctl/job.sh: nothing to run" >&2
fi
sync
echo o >/proc/sysrq-trigger
sleep 10
poweroff -f
INIT
chmod 755 "$root/usr/local/sbin/tcptrace-vm-init"

# Vagrant box side: DHCP on whatever NIC libvirt gives, sshd on, a vagrant user with the
# well-known insecure key (Vagrant replaces it with a fresh one on first `vagrant up`).
mkdir -p "$root/etc/systemd/network"
printf '[Match]\nName=en* eth*\n\n[Network]\nDHCP=yes\n' >"$root/etc/systemd/network/50-dhcp.network"
chroot "$root" systemctl enable systemd-networkd ssh >/dev/null 2>&1
chroot "$root" useradd -m -s /bin/bash vagrant
echo 'vagrant:vagrant' | chroot "$root" chpasswd
echo 'vagrant ALL=(ALL) NOPASSWD: ALL' >"$root/etc/sudoers.d/vagrant"; chmod 440 "$root/etc/sudoers.d/vagrant"
install -d -m 700 -o 1000 -g 1000 "$root/home/vagrant/.ssh"
install -m 600 -o 1000 -g 1000 "$here/vagrant-insecure.pub" "$root/home/vagrant/.ssh/authorized_keys"
# sshd generates host keys on first boot in the VM, not here, so no two boxes share them.
rm -f "$root"/etc/ssh/ssh_host_*
mkdir -p "$root/etc/systemd/system/ssh.service.d"
# Debian's unit runs `sshd -t` first, which fails without host keys: generate them before it.
printf '[Service]\nExecStartPre=\nExecStartPre=/usr/bin/ssh-keygen -A\nExecStartPre=/usr/sbin/sshd -t\n' \
  >"$root/etc/systemd/system/ssh.service.d/hostkeys.conf"
echo 'UseDNS no' >"$root/etc/ssh/sshd_config.d/vagrant.conf"

for m in dev/pts dev proc sys; do umount -l "$root/$m"; done

# ---- image ---------------------------------------------------------------------------------
cp "$root/boot/vmlinuz-$kver" "$work/vmlinuz"
cp "$root/boot/initrd.img-$kver" "$work/initrd.img"
echo "$kver" >"$work/kernel-release"
printf '%s\n' "${packages[@]}" >"$work/packages"
used_mb=$(du -sm "$root" | cut -f1)
size_mb=$(( used_mb + 1536 ))   # headroom for the suite's writes (behind the snapshot) and a box's provisioning
t2=$(date +%s)
mkfs.ext4 -q -F -L tcptrace-root -d "$root" "$work/rootfs.ext4" "${size_mb}M" >&2
say "image: ${size_mb} MiB ext4 in $(( $(date +%s) - t2 )) s (kernel $kver)"
rm -rf --one-file-system "$root"

mkdir -p "$out"
mv "$work/rootfs.ext4" "$work/vmlinuz" "$work/initrd.img" "$work/kernel-release" "$work/packages" "$out/"
touch "$out/.complete"
say "built $out in $(( $(date +%s) - t0 )) s"

# Each image is 2-3 GB: keep only the newest few (TCPTRACE_VM_KEEP, default 2), so switching
# between two branches does not rebuild but the cache does not grow without bound.
keep=${TCPTRACE_VM_KEEP:-2}
ls -1dt "$cache"/*/.complete 2>/dev/null | tail -n +"$((keep + 1))" | while read -r stale; do
  d=$(dirname "$stale"); rm -rf "$d"; say "removed old image $d"
done
echo "$out"
