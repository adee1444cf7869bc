#!/usr/bin/env bash
# One-command setup on a Debian/Ubuntu KVM host; idempotent; run as root.
#   sudo ./setup.sh
# Installs the distro packages (bcc, QEMU, ...), a kernel header tree for bcc,
# mounts tracefs, and creates .venv (system site packages, so `import bcc`
# works) with slotscope installed editable plus its test extras.
set -euo pipefail
cd "$(dirname "$0")"
log() { printf 'setup: %s\n' "$*"; }
[ "$(id -u)" = 0 ] || { echo "setup: run as root (sudo ./setup.sh)" >&2; exit 1; }

export DEBIAN_FRONTEND=noninteractive
APT_PKGS=(
  python3-bpfcc bpfcc-tools python3-venv python3-dev        # bcc from the distro
  qemu-system-x86 qemu-utils ipxe-qemu                      # rig (NIC ROMs)
  busybox-static cpio kmod udev                             # guests, lab VM
  build-essential                                           # guests, headers
  linux-perf trace-cmd                                      # comparison tools
  linux-headers-amd64 vagrant vagrant-libvirt               # lab VM, Vagrantfile
  sudo                                                      # README's commands
)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "apt: installing ${missing[*]}"
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

# Kernel headers for bcc.  Prefer the running kernel's own package; else a
# stand-in tree (Debian's 6.1 headers) linked as build/source.  A stand-in is
# only used to compile: the tracer reads every struct offset it needs from
# /sys/kernel/btf/vmlinux at load time, never from these headers.
KREL=$(uname -r)
MOD=/lib/modules/$KREL
if [ ! -e "$MOD/build/include" ]; then
  if apt-get install -y -q --no-install-recommends "linux-headers-$KREL" 2>/dev/null; then
    log "headers: linux-headers-$KREL"
  else
    apt-get install -y -q --no-install-recommends linux-headers-amd64
    arch_dir=$(ls -d /usr/src/linux-headers-*-amd64 | grep -v -e cloud -e rt | sort -V | tail -1)
    common_dir=${arch_dir%-amd64}-common
    mkdir -p "$MOD"
    ln -sfn "$arch_dir" "$MOD/build"
    ln -sfn "$common_dir" "$MOD/source"
    log "headers: no linux-headers-$KREL; stand-in $arch_dir (struct offsets come from BTF)"
  fi
fi

# tracefs: bcc's tracepoints need it and minimal hosts do not mount it.
if [ ! -e /sys/kernel/tracing/events ]; then
  mount -t tracefs tracefs /sys/kernel/tracing 2>/dev/null || true
fi
if [ ! -e /sys/kernel/debug/tracing ] && [ -d /sys/kernel/debug ]; then
  mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null || true
fi

# .venv on the distro Python so the distro's bcc is importable.
if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv --system-site-packages .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test,lab]'
.venv/bin/python -c 'import bcc, slotscope' || { echo "setup: bcc not importable from .venv" >&2; exit 1; }
# The nested lab VM's kernel: Debian's linux-image matching the installed
# linux-headers-amd64, unpacked (not installed) into a cache, its modules in
# /lib/modules/<release>; skipped when already there (vmrig/kernel.py).
.venv/bin/python -m vmrig.kernel fetch | sed 's/^/setup: lab kernel: /'
log "done: run the tests with  sudo .venv/bin/pytest"
