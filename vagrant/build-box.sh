#!/usr/bin/env bash
# Package the cached test image (build-image.sh) as a vagrant-libvirt box, so the Vagrant path
# can run offline on the same Debian 12 / stock 6.1 root filesystem as vm-test.sh.
#
#   vagrant/build-box.sh            # prints the path of the .box file
#   vagrant/build-box.sh --add      # also `vagrant box add --force --name tcptrace-local`
#
# The box is box.img (qcow2 of the image) + metadata.json + a box Vagrantfile that boots the
# image's own kernel and initrd directly (the image has no bootloader: it is a bare ext4 file
# system, the same one vm-test.sh boots). Cached next to the image, keyed the same way.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
say() { printf 'build-box: %s\n' "$*" >&2; }
name=${TCPTRACE_BOX_NAME:-tcptrace-local}

[ "$(id -u)" -eq 0 ] || { say "must run as root"; exit 77; }
img=$(bash "$here/build-image.sh")
box=$img/$name.box

if [ ! -s "$box" ]; then
  t0=$(date +%s)
  work=$(mktemp -d "$img/box.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  # Whole GiB, because metadata.json states the disk size in GiB.
  bytes=$(stat -c %s "$img/rootfs.ext4")
  gib=$(( (bytes + (1 << 30) - 1) >> 30 ))
  qemu-img convert -O qcow2 "$img/rootfs.ext4" "$work/box.img"
  qemu-img resize -q "$work/box.img" "${gib}G"
  cp "$img/vmlinuz" "$img/initrd.img" "$work/"
  printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %d}\n' "$gib" >"$work/metadata.json"
  cat >"$work/Vagrantfile" <<'VF'
# Box Vagrantfile of tcptrace-local (vagrant/build-box.sh): a bare ext4 disk booted with the
# kernel and initrd shipped in the box, since the image has no partition table or bootloader.
Vagrant.configure("2") do |config|
  config.vm.provider :libvirt do |lv|
    boxdir = File.dirname(__FILE__)
    lv.kernel = File.join(boxdir, "vmlinuz")
    lv.initrd = File.join(boxdir, "initrd.img")
    lv.cmd_line = "root=/dev/vda rootfstype=ext4 rw console=ttyS0 net.ifnames=0"
    lv.disk_bus = "virtio"
  end
end
VF
  # Uncompressed tar: the qcow2 inside is already compact, and gzip would add a minute each way.
  tar -cf "$work/$name.box" -C "$work" metadata.json Vagrantfile box.img vmlinuz initrd.img
  mv "$work/$name.box" "$box"
  say "built $box ($(du -h "$box" | cut -f1)) in $(( $(date +%s) - t0 )) s"
else
  say "reusing $box"
fi

if [ "${1:-}" = --add ]; then
  vagrant box add --force --name "$name" "$box" >&2
fi
echo "$box"
