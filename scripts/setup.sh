#!/usr/bin/env bash
# Idempotent host set-up for tcptrace: everything a fresh Debian 12 / Ubuntu 22.04+ host needs,
# done by the project so that CI and new machines never depend on hand-installed state.
# Each step says what it did on stderr; a step with nothing to do stays quiet unless VERBOSE=1.
set -euo pipefail

here=$(cd "$(dirname "$0")/.." && pwd)
venv=${TCPTRACE_VENV:-$here/.venv}
say() { printf 'setup: %s\n' "$*" >&2; }

if [ "$(id -u)" -ne 0 ]; then
  say "must run as root (installs distro packages, links headers, mounts tracefs)"; exit 77
fi

# 1. Distro packages. BCC's Python module comes only from the distro (python3-bpfcc on
#    Debian/Ubuntu); the PyPI package called "bcc" is an unrelated project.
need=()
for p in bpfcc-tools python3-bpfcc python3-prometheus-client prometheus nftables iproute2 python3-venv hping3; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || need+=("$p")
done
# Headers: the running kernel's own package when the archive has one, else the distro's meta
# package (linked in below).
kver=$(uname -r)
if [ ! -e "/lib/modules/$kver/build" ]; then
  if apt-cache show "linux-headers-$kver" >/dev/null 2>&1; then hdr="linux-headers-$kver"
  elif [ -r /etc/os-release ] && . /etc/os-release && [ "${ID:-}" = ubuntu ]; then hdr=linux-headers-generic
  else hdr=linux-headers-amd64; fi
  dpkg-query -W -f='${Status}' "$hdr" 2>/dev/null | grep -q 'install ok installed' || need+=("$hdr")
fi
if [ ${#need[@]} -gt 0 ]; then
  say "installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  # linux-headers-$kver may be missing from the index only after the update; retry with the meta package.
  if ! apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null; then
    need=("${need[@]/linux-headers-$kver/linux-headers-amd64}")
    apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
  fi
fi

# 2. Kernel headers. BCC compiles against /lib/modules/$(uname -r)/build. When no headers are
#    packaged for the running kernel, link the newest installed ones and say so: tcptrace reads
#    only tracepoint fields, whose layout BCC takes from tracefs, so a version mismatch is safe.
if [ ! -e "/lib/modules/$kver/build" ]; then
  arch=$(ls -d /usr/src/linux-headers-*-amd64 /usr/src/linux-headers-*-generic 2>/dev/null | sort -V | tail -1 || true)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -1 || true)
  if [ -z "$arch" ]; then say "no kernel headers found under /usr/src"; exit 69; fi
  mkdir -p "/lib/modules/$kver"
  ln -sfn "$arch" "/lib/modules/$kver/build"
  [ -n "$common" ] && ln -sfn "$common" "/lib/modules/$kver/source"
  say "no headers packaged for kernel $kver: linked $(basename "$arch") (tracepoint-only programs tolerate this)"
fi

# 3. tracefs: BCC attaches tracepoints and reads their formats through it.
if ! mountpoint -q /sys/kernel/tracing; then
  mount -t tracefs tracefs /sys/kernel/tracing && say "mounted tracefs on /sys/kernel/tracing"
fi
if [ ! -e /sys/kernel/debug/tracing/events ] && [ -d /sys/kernel/debug ] && ! mountpoint -q /sys/kernel/debug; then
  # Some BCC versions look for tracepoints under debugfs.
  mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null || true
fi

# 4. A virtual environment that sees the distro's BCC module, with tcptrace installed into it.
#    It must be built on the distro interpreter: python3-bpfcc installs only for that one.
if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import bcc' 2>/dev/null; then
  rm -rf "$venv"
  /usr/bin/python3 -m venv --system-site-packages "$venv"
  say "created $venv on /usr/bin/python3 with system site-packages"
fi
stamp="$venv/.tcptrace-installed"
if [ ! -e "$stamp" ] || [ "$here/pyproject.toml" -nt "$stamp" ]; then
  "$venv/bin/pip" install -q --disable-pip-version-check -e "$here[test]" >&2
  touch "$stamp"
  say "installed tcptrace into $venv"
fi
