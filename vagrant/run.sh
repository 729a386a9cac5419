#!/usr/bin/env bash
# The multi-VM lab, end to end (run as root on a Debian 12 host):
#   vagrant/run.sh up     host packages, libvirt daemons, the box (built once, cached), vagrant up
#   vagrant/run.sh test   on every VM: pod-to-pod pings to every other VM, and proof that the
#                         replies were decapsulated by XDP in native mode; writes a JSON report
#   vagrant/run.sh down   destroys the VMs, their volumes and the lab's libvirt networks, even
#                         after a failed or interrupted run, and the storage pool and libvirt
#                         daemons this script made or started (the built box stays cached)
#   vagrant/run.sh bench  the pod-to-pod benchmark between node1 and node2 (after up) for every path
#                         (bpf XDP, bpf tc, kernel vxlan, host-gw, underlay), switched in place:
#                         the netns bench's table, JSON and chart. Under software emulation one
#                         short round, a functional check whose figures are not performance.
#                         The VMs stay up, switched back to the backend they had: run.sh down afterwards.
#   vagrant/run.sh all    up, test, down (down also when up or test fail); exit code of the test
#   vagrant/run.sh purge  down, then also the cached box, its libvirt volume and the build cache
# Every step is bounded in time. Settings: see the Vagrantfile; also FBPF_VAGRANT_RESULTS (the
# JSON report, default $FBPF_VAGRANT_CACHE/last-check.json), FBPF_BENCH_OUT (the bench's JSON and
# chart, default bench-results/ in the repository), FBPF_BENCH_ROUNDS, FBPF_BENCH_SECONDS,
# FBPF_PYTHON (the host's Python with the project installed, default the repository's .venv).
set -euo pipefail
here=$(dirname "$(readlink -f "$0")")

export FBPF_VAGRANT_CACHE=${FBPF_VAGRANT_CACHE:-/var/cache/flannel-bpf-vagrant}
export FBPF_NODES=${FBPF_NODES:-2}
export FBPF_PODS=${FBPF_PODS:-2}
export VAGRANT_CWD=$here
export VAGRANT_HOME=${VAGRANT_HOME:-$FBPF_VAGRANT_CACHE/vagrant.d}
export VAGRANT_DEFAULT_PROVIDER=libvirt
export VAGRANT_CHECKPOINT_DISABLE=1 VAGRANT_NO_PLUGINS_CHECK=1
export LIBVIRT_DEFAULT_URI=qemu:///system
RESULTS=${FBPF_VAGRANT_RESULTS:-$FBPF_VAGRANT_CACHE/last-check.json}
BOX=flannel-bpf/bookworm
BOX_FILE=$FBPF_VAGRANT_CACHE/box/flannel-bpf-bookworm.box
NETWORKS=(fbpf-underlay fbpf-mgmt)
POOL=default                                   # vagrant-libvirt's storage pool
# What this script brought to life and `down` ends: daemons started by hand, a pool it made.
OWN_DAEMONS=$FBPF_VAGRANT_CACHE/own-daemons
OWN_POOL=$FBPF_VAGRANT_CACHE/own-pool
HOST_DEBS=(vagrant vagrant-libvirt libvirt-daemon-system libvirt-clients dnsmasq-base qemu-system-x86
           qemu-utils debootstrap e2fsprogs rsync openssh-client python3-venv)

say() { printf 'vagrant lab: %s\n' "$*"; }
die() { printf 'vagrant lab: error: %s\n' "$*" >&2; exit 1; }
bounded() { local seconds=$1; shift; timeout --kill-after=30 "$seconds" "$@"; }
virsh_() { bounded 60 virsh -q "$@"; }

host_packages() {
  local missing=() p
  for p in "${HOST_DEBS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return
  say "installing host packages: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  bounded 300 apt-get update -q >/dev/null
  bounded 900 apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null
}

# PID 1 is not always systemd (containers): then start the daemons by hand.
# The daemons must not inherit fd 9, the lock of this script: `9>&-` on each.
libvirt_daemons() {
  if [ -d /run/systemd/system ]; then
    systemctl start virtlogd libvirtd
  else
    if ! pgrep -x virtlogd >/dev/null; then
      virtlogd -d 9>&-
      echo virtlogd >>"$OWN_DAEMONS"
    fi
    if ! pgrep -x libvirtd >/dev/null; then
      echo libvirtd >>"$OWN_DAEMONS"
      if [ "${FBPF_LIBVIRT_DRIVER:-qemu}" = qemu ] && [ -e /dev/kvm ]; then
        # When /dev/kvm is there but KVM does not work (a PVM hypervisor), libvirt finds its
        # cached QEMU capabilities stale on almost every call and probes QEMU again (10-20 s
        # each). Software emulation needs no KVM: libvirtd gets its own mount namespace with a
        # read-only empty file over /dev/kvm, which it then sees as unusable, as QEMU does, and
        # a qemu.conf without per-domain mount namespaces (which cannot carry that file along).
        local conf=/run/flannel-bpf-vagrant
        mkdir -p "$conf"
        : >"$conf/no-kvm"
        { cat /etc/libvirt/qemu.conf; echo 'namespaces = []'; } >"$conf/qemu.conf"
        unshare --mount --propagation private sh -c "mount --bind $conf/no-kvm /dev/kvm &&
          mount -o remount,bind,ro /dev/kvm && mount --bind $conf/qemu.conf /etc/libvirt/qemu.conf &&
          exec libvirtd -d" 9>&-
      else
        libvirtd -d 9>&-
      fi
    fi
  fi
  local deadline=$((SECONDS + 30))
  until virsh -q version >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || die "libvirtd does not answer on $LIBVIRT_DEFAULT_URI"
    sleep 1
  done
}

# The daemons this script started (by the pid in their pid file), libvirtd first.
stop_own_daemons() {
  local d pid
  [ -f "$OWN_DAEMONS" ] || return 0
  for d in libvirtd virtlogd; do
    grep -qx "$d" "$OWN_DAEMONS" || continue
    pid=$(cat "/run/$d.pid" 2>/dev/null || true)
    if [ -n "$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "$d" ]; then
      kill "$pid"
      timeout 30 tail --pid="$pid" -f /dev/null || kill -9 "$pid" 2>/dev/null || true
      say "stopped $d (pid $pid)"
    fi
  done
  rm -f "$OWN_DAEMONS"
}

box_volumes() { virsh_ vol-list "$POOL" 2>/dev/null | awk '{print $1}' | grep -F 'flannel-bpf-VAGRANTSLASH-bookworm' || true; }

box() {
  bounded 2400 "$here/build-box.sh"
  local stamp=$VAGRANT_HOME/flannel-bpf-box.sha256 built
  built=$(cat "$FBPF_VAGRANT_CACHE/box/inputs.sha256")
  if [ "$(cat "$stamp" 2>/dev/null)" != "$built" ] || ! bounded 60 vagrant box list | grep -q "^$BOX "; then
    say "adding the box to vagrant"
    bounded 600 vagrant box add --force --name "$BOX" "$BOX_FILE" >/dev/null
    # vagrant-libvirt uploads a box to the storage pool once: drop the copy of an older build.
    local v
    for v in $(box_volumes); do virsh_ vol-delete --pool "$POOL" "$v" >/dev/null; done
    echo "$built" >"$stamp"
  fi
}

print_consoles() {
  local f
  for f in "$FBPF_VAGRANT_CACHE"/console/*.log; do
    [ -f "$f" ] && { echo "--- last lines of $f" >&2; tail -n 15 "$f" >&2; }
  done
}

up() {
  local start=$SECONDS
  host_packages
  libvirt_daemons
  box
  mkdir -p "$FBPF_VAGRANT_CACHE/console"
  rm -f "$FBPF_VAGRANT_CACHE"/console/*.log
  virsh_ pool-info "$POOL" >/dev/null 2>&1 || touch "$OWN_POOL"  # vagrant-libvirt will make it
  say "vagrant up: $FBPF_NODES VMs, libvirt driver ${FBPF_LIBVIRT_DRIVER:-qemu}"
  if ! bounded "${FBPF_UP_TIMEOUT:-1800}" vagrant up --provider libvirt 2>&1 | sed -u -E 's/(\x1b\[K)?Progress: [0-9]+%//g'; then
    print_consoles
    die "vagrant up failed"
  fi
  say "up in $((SECONDS - start)) s"
}

run_checks() {
  local start=$SECONDS i out failed=0 reports=()
  mkdir -p "$(dirname "$RESULTS")"
  for ((i = 1; i <= FBPF_NODES; i++)); do
    out=$FBPF_VAGRANT_CACHE/check-node$i.json
    if ! bounded 600 vagrant ssh "node$i" -c "sudo /opt/flannel-bpf/venv/bin/python -m flannel_bpf.lab.node check \
          --iface eth1 --count $FBPF_PODS --expect-peers $((FBPF_NODES - 1))" >"$out"; then
      failed=1
    fi
    reports+=("$out")
  done
  python3 - "$RESULTS" "${reports[@]}" <<'EOF'
import json, sys
nodes = []
for path in sys.argv[2:]:
    text = open(path).read().strip()
    try:
        nodes.append(json.loads(text.splitlines()[-1]))
    except (IndexError, ValueError):
        nodes.append({"ok": False, "problems": [f"no report in {path}: {text[-300:]!r}"]})
report = {"ok": bool(nodes) and all(n.get("ok") for n in nodes), "nodes": nodes}
json.dump(report, open(sys.argv[1], "w"), indent=2)
for n in nodes:
    pings = n.get("pings", [])
    good = sum(p["received"] == p["sent"] > 0 for p in pings)
    print(f"  {n.get('node', '?')}: subnet {n.get('subnet', '?')}, {good}/{len(pings)} remote pods answer, "
          f"XDP {'/'.join(n.get('xdp_modes', [])) or 'none'}, decap_xdp +{n.get('counters_delta', {}).get('decap_xdp', 0)}, "
          f"encap_vxlan +{n.get('counters_delta', {}).get('encap_vxlan', 0)}"
          + "".join(f"\n    problem: {p}" for p in n.get("problems", [])))
EOF
  local ok
  ok=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["ok"])' "$RESULTS")
  say "checks $( [ "$ok" = True ] && [ $failed = 0 ] && echo passed || echo FAILED ) in $((SECONDS - start)) s; report: $RESULTS"
  [ "$ok" = True ] && [ $failed = 0 ]
}

bench() {
  local py=${FBPF_PYTHON:-$here/../.venv/bin/python} config=$FBPF_VAGRANT_CACHE/ssh-config
  [ -x "$py" ] || die "no $py: run ./setup.sh first (the bench's report runs on the host, in the project's venv)"
  bounded 300 vagrant ssh-config node1 node2 >"$config" 2>/dev/null || die "the lab is not up: vagrant/run.sh up first"
  say "bench: node1's pod to node2's pod, every path"
  bounded "${FBPF_BENCH_TIMEOUT:-7200}" "$py" -m flannel_bpf lab bench --vms "$config" \
    --rounds "${FBPF_BENCH_ROUNDS:-3}" --seconds "${FBPF_BENCH_SECONDS:-5}" \
    --out "${FBPF_BENCH_OUT:-$here/../bench-results}" 9>&-
}

down() {
  local start=$SECONDS d v n
  # libvirtd may have died (or the host rebooted) while domains exist: it must run to remove them.
  if command -v libvirtd >/dev/null; then (libvirt_daemons) || say "libvirtd is not answering"; fi
  if command -v vagrant >/dev/null && [ -d "$here/.vagrant" ]; then
    bounded 300 vagrant destroy -f >/dev/null 2>&1 || say "vagrant destroy failed; removing what is left by hand"
  fi
  if command -v virsh >/dev/null && virsh -q version >/dev/null 2>&1; then
    for d in $(virsh_ list --all --name | grep '^fbpf-' || true); do
      virsh_ destroy "$d" >/dev/null 2>&1 || true
      virsh_ undefine "$d" >/dev/null 2>&1 || true
      say "removed domain $d"
    done
    for v in $(virsh_ vol-list "$POOL" 2>/dev/null | awk '{print $1}' | grep '^fbpf-' || true); do
      virsh_ vol-delete --pool "$POOL" "$v" >/dev/null && say "removed volume $v"
    done
    for n in "${NETWORKS[@]}"; do
      if virsh_ net-info "$n" >/dev/null 2>&1; then
        virsh_ net-destroy "$n" >/dev/null 2>&1 || true
        virsh_ net-undefine "$n" >/dev/null 2>&1 || true
        say "removed network $n"
      fi
    done
  fi
  if [ -f "$OWN_POOL" ] && virsh -q version >/dev/null 2>&1; then
    # The box's copy goes too (uploaded again by the next up, ~1 min): the pool was ours.
    for v in $(box_volumes); do virsh_ vol-delete --pool "$POOL" "$v" >/dev/null; done
    if [ -z "$(virsh_ vol-list "$POOL" 2>/dev/null)" ]; then
      virsh_ pool-destroy "$POOL" >/dev/null 2>&1 || true
      virsh_ pool-undefine "$POOL" >/dev/null 2>&1 || true
      rm -f "$OWN_POOL"
      say "removed storage pool $POOL"
    fi
  fi
  rm -rf "$here/.vagrant"
  stop_own_daemons
  say "down in $((SECONDS - start)) s"
}

purge() {
  if command -v libvirtd >/dev/null; then (libvirt_daemons) || say "libvirtd is not answering"; fi
  if command -v virsh >/dev/null && virsh -q version >/dev/null 2>&1; then
    for v in $(box_volumes); do virsh_ vol-delete --pool "$POOL" "$v" >/dev/null; done
  fi
  down
  rm -rf "$FBPF_VAGRANT_CACHE"
  say "purged $FBPF_VAGRANT_CACHE"
}

[ "$(id -u)" = 0 ] || die "must run as root (libvirt, debootstrap)"
mkdir -p "$FBPF_VAGRANT_CACHE"
# One run at a time: two would fight over the same domains and networks.
exec 9>"$FBPF_VAGRANT_CACHE/run.lock"
flock -w 30 9 || die "another vagrant/run.sh is running"

case "${1:-}" in
  up) up ;;
  test) run_checks ;;
  bench) bench ;;
  down) down ;;
  purge) purge ;;
  all)
    start=$SECONDS
    trap 'down' EXIT
    up
    run_checks
    say "all done in $((SECONDS - start)) s (down follows)"
    ;;
  *) echo "usage: vagrant/run.sh up|test|bench|down|all|purge" >&2; exit 2 ;;
esac
