#!/usr/bin/env bash
# Installs everything flannel-bpf needs on a Debian 12 machine, from the registries only.
# Run as root. Idempotent: a second run checks, finds everything in place and changes nothing.
set -euo pipefail
cd "$(dirname "$(readlink -f "$0")")"

say() { printf 'setup: %s\n' "$*"; }
[ "$(id -u)" = 0 ] || { echo "setup: must run as root (BPF, netns, apt)" >&2; exit 1; }

DEBS=(python3-bpfcc python3-venv etcd-server iproute2 iperf3 ethtool tcpdump iptables containernetworking-plugins
      linux-headers-amd64 libbpf1 procps iputils-ping sockperf curl
      docker.io supervisor busybox-static systemd)  # the install-by-hand tests: real dockerd, supervisord, systemd-analyze
missing=()
for p in "${DEBS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  say "installing Debian packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
  # The etcd package may start a system etcd on 2379; flannel-bpf runs its own instances only.
  if printf '%s\n' "${missing[@]}" | grep -qx etcd-server; then
    { service etcd stop || pkill -f '^/usr/bin/etcd$'; } >/dev/null 2>&1 && say "stopped the etcd service the package started" || true
  fi
  # Likewise Docker and supervisor: the tests run their own dockerd and supervisord in namespaces.
  if printf '%s\n' "${missing[@]}" | grep -qxE 'docker.io|supervisor'; then
    for svc in docker containerd supervisor; do service "$svc" stop >/dev/null 2>&1 || true; done
  fi
else
  say "Debian packages present"
fi

# bcc compiles against the running kernel's headers, found through /lib/modules/$(uname -r).
# This kernel ships none, so point those links at Debian's newest linux-headers tree.
kdir=/lib/modules/$(uname -r)
if [ ! -e "$kdir/build/Makefile" ] || [ ! -e "$kdir/source/include/linux/kconfig.h" ]; then
  hdr=$(ls -d /usr/src/linux-headers-*-amd64 2>/dev/null | sort -V | tail -n1)
  common=$(ls -d /usr/src/linux-headers-*-common 2>/dev/null | sort -V | tail -n1)
  [ -n "$hdr" ] && [ -n "$common" ] || { echo "setup: no linux-headers tree under /usr/src" >&2; exit 1; }
  mkdir -p "$kdir"
  ln -sfn "$hdr" "$kdir/build"
  ln -sfn "$common" "$kdir/source"
  say "the running kernel $(uname -r) has no headers: linked $kdir/build -> $hdr and $kdir/source -> $common"
fi

# bpffs for pinned maps and programs.
if ! mountpoint -q /sys/fs/bpf; then
  mount -t bpf bpf /sys/fs/bpf
  say "mounted bpffs on /sys/fs/bpf"
fi

# The venv sees Debian's bcc (python3-bpfcc) through the system site-packages.
if [ ! -x .venv/bin/python ]; then
  /usr/bin/python3 -m venv --system-site-packages .venv
  say "created .venv from /usr/bin/python3"
fi
stamp=.venv/.flannel-bpf-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  say "installing flannel-bpf and its Python dependencies into .venv"
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test,bench]'
  touch "$stamp"
else
  say "Python packages present"
fi
.venv/bin/python -c 'import bcc, etcd3, lightkube, pyroute2, rich' || { echo "setup: imports failed" >&2; exit 1; }
say "ready"
