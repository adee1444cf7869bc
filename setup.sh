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
  busybox-static cpio kmod udev squashfs-tools              # guests, lab VM
  build-essential                                           # guests, headers
  linux-perf trace-cmd                                      # comparison tools
  linux-headers-amd64 vagrant vagrant-libvirt               # lab VM, Vagrantfile
  zstd                                                      # lab VM: 6.12's bzImage
  sudo                                                      # README's commands
)
# QEMU >= 8.2 for the rig and the lab: virtio-mem dynamic-memslots, and a
# TCG that runs the nested lab's L1 (under 7.2, Debian 12's own, a traced
# L1 livelocked in 2 of 3 runs; under 10.0, 4 of 4 finished).  Debian 12
# gets it from bookworm-backports, on the mirror its own sources name, with
# only the QEMU packages pinned there; newer distros ship it themselves.
QEMU_PKGS=(qemu-system-x86 qemu-system-common qemu-system-data qemu-utils seabios)
qemu_recent() {
  local v
  v=$(qemu-system-x86_64 --version 2>/dev/null | sed -n 's/.*version \([0-9]*\.[0-9]*\).*/\1/p')
  [ -n "$v" ] && [ "$(printf '%s\n8.2\n' "$v" | sort -V | head -1)" = 8.2 ]
}
debian_mirror() {  # the URI the system's own sources use for bookworm
  awk '/^URIs:/ {u=$2} /^Suites:/ {for (i = 2; i <= NF; i++) if ($i == "bookworm") {print u; exit}}' \
    /etc/apt/sources.list.d/*.sources 2>/dev/null
  awk '$1 == "deb" && $3 == "bookworm" {print $2; exit}' /etc/apt/sources.list 2>/dev/null
  return 0  # either file may be missing
}
. /etc/os-release
if [ "${VERSION_CODENAME:-}" = bookworm ] && ! qemu_recent; then
  mirror=$(debian_mirror | head -1)
  [ -n "$mirror" ] || { echo "setup: no bookworm entry in the apt sources" >&2; exit 1; }
  printf 'Types: deb\nURIs: %s\nSuites: bookworm-backports\nComponents: main\nSigned-By: %s\n' \
    "$mirror" /usr/share/keyrings/debian-archive-keyring.gpg \
    > /etc/apt/sources.list.d/slotscope-backports.sources
  printf '# slotscope: QEMU >= 8.2 from bookworm-backports; nothing else\nPackage: %s\nPin: release n=bookworm-backports\nPin-Priority: 990\n' \
    "${QEMU_PKGS[*]}" > /etc/apt/preferences.d/slotscope-qemu
  log "apt: QEMU from bookworm-backports (${QEMU_PKGS[*]})"
  apt-get update -q
  apt-get install -y -q --no-install-recommends "${QEMU_PKGS[@]}"
fi

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
qemu_recent || log "warning: $(qemu-system-x86_64 --version | head -1): the lab wants QEMU >= 8.2"
# The nested lab VM's kernels, 6.1 (linux-headers-amd64's release) and 6.12
# (Debian's newest for bookworm): images, modules and headers unpacked (never
# installed: no initramfs or bootloader hooks) into a cache, /lib/modules and
# /usr/src; skipped when already there (vmrig/kernel.py).
.venv/bin/python -m vmrig.kernel fetch | sed 's/^/setup: lab kernel: /'
log "done: run the tests with  sudo .venv/bin/pytest"
