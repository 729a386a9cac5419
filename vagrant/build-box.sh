#!/usr/bin/env bash
# Builds the libvirt box of the VM lab from Debian packages only (no Vagrant Cloud):
#   debootstrap (minbase bookworm) -> chroot apt-get + Python wheels -> mkfs.ext4 -d -> qcow2 -> box tar.
# The VMs have no network to any registry, so everything the project needs is put in the image:
# the Debian packages of ../setup.sh, the guest kernel with its headers (bcc compiles against
# them), and a venv at /opt/flannel-bpf/venv with pyproject.toml's dependencies plus a
# wheelhouse, so provisioning installs the project offline.
# The guest boots its kernel and initrd directly (no boot loader): they are copied out beside the box.
#
# Outputs (in $FBPF_VAGRANT_CACHE, default /var/cache/flannel-bpf-vagrant):
#   box/flannel-bpf-bookworm.box  box/vmlinuz  box/initrd.img  box/inputs.sha256
# A box whose inputs (this script, setup.sh's package list, pyproject's dependencies, the key,
# kernel suite and mirror) did not change is not rebuilt; --force rebuilds anyway.
set -euo pipefail
here=$(dirname "$(readlink -f "$0")")
repo=$(dirname "$here")

CACHE=${FBPF_VAGRANT_CACHE:-/var/cache/flannel-bpf-vagrant}
# The host's own Debian mirror, the first URI of its apt sources (either format), unless one is given.
host_mirror() {
  { sed -n 's/^URIs:[[:space:]]*\([^[:space:]]*\).*/\1/p' /etc/apt/sources.list.d/*.sources
    awk '$1 == "deb" { print ($2 ~ /^\[/) ? $3 : $2 }' /etc/apt/sources.list; } 2>/dev/null | head -1 || true
}
MIRROR=${FBPF_DEBIAN_MIRROR:-$(host_mirror)}
SUITE=bookworm
# 6.12 from backports by default: closer to the kernels the data plane is written for than
# bookworm's 6.1 (e.g. BPF_F_ADJ_ROOM_DECAP_L3_IPV4 needs 6.3). FBPF_GUEST_KERNEL_SUITE=bookworm for 6.1.
KERNEL_SUITE=${FBPF_GUEST_KERNEL_SUITE:-bookworm-backports}
DISK_GB=8
BOX_NAME=flannel-bpf-bookworm
VENV=/opt/flannel-bpf/venv
WHEELHOUSE=/opt/flannel-bpf/wheelhouse

say() { printf 'build-box: %s\n' "$*"; }
die() { printf 'build-box: error: %s\n' "$*" >&2; exit 1; }
[ -n "$MIRROR" ] || die "no Debian mirror in this host's apt sources: set FBPF_DEBIAN_MIRROR"

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap, chroot)"
for tool in debootstrap qemu-img mkfs.ext4 tar sha256sum; do
  command -v "$tool" >/dev/null || die "$tool is missing (vagrant/run.sh installs the host packages)"
done
pubkey=$(ls /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub 2>/dev/null | head -n1)
[ -n "$pubkey" ] || die "no vagrant insecure public key: install Debian's vagrant package"

# The project's Debian packages, taken from setup.sh so host and guest never drift apart.
eval "$(sed -n '/^DEBS=(/,/)/p' "$repo/setup.sh")"
[ "${#DEBS[@]}" -gt 0 ] || die "could not read the DEBS list from setup.sh"
GUEST_DEBS=("${DEBS[@]}" systemd systemd-sysv udev dbus openssh-server sudo python3 python3-venv
            e2fsprogs kmod rsync bpftool etcd-client less)
# linux-headers-amd64 comes with the kernel, from KERNEL_SUITE.
GUEST_DEBS=($(printf '%s\n' "${GUEST_DEBS[@]}" | grep -vx 'linux-headers-amd64' | sort -u))
mapfile -t PY_REQS < <(python3 -c 'import tomllib,sys; print("\n".join(tomllib.load(open(sys.argv[1],"rb"))["project"]["dependencies"]))' "$repo/pyproject.toml")
PY_BUILD_REQS=("setuptools>=68" "wheel")   # to build the project itself, offline, at provisioning

# What the box is made of, written beside it (inputs.txt) so a rebuild can be explained.
describe_inputs() {
  echo "build-box.sh $(sha256sum <"$0" | cut -d' ' -f1)"
  echo "vagrant.pub $(sha256sum <"$pubkey" | cut -d' ' -f1)"
  echo "mirror $MIRROR, kernel from $KERNEL_SUITE"
  echo "debs ${GUEST_DEBS[*]}"
  echo "python ${PY_REQS[*]}"
}
inputs=$(describe_inputs | sha256sum | cut -d' ' -f1)
out=$CACHE/box
if [ "${1:-}" != "--force" ] && [ -f "$out/$BOX_NAME.box" ] && [ -f "$out/vmlinuz" ] && [ -f "$out/initrd.img" ] \
   && [ "$(cat "$out/inputs.sha256" 2>/dev/null)" = "$inputs" ]; then
  say "box up to date: $out/$BOX_NAME.box (inputs ${inputs:0:12})"
  exit 0
fi

if [ -f "$out/inputs.txt" ]; then
  say "inputs changed since the last box: $(diff "$out/inputs.txt" <(describe_inputs) | grep '^>' | cut -c3- | cut -c1-200 | tr '\n' ';')"
fi
start=$SECONDS
work=$CACHE/build
root=$work/rootfs
mounted=()
cleanup() {
  local m
  for ((i=${#mounted[@]}-1; i>=0; i--)); do
    m=${mounted[i]}
    umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
  done
  mounted=()
}
trap cleanup EXIT
rm -rf "$work"
mkdir -p "$work" "$out"

say "debootstrap $SUITE (minbase) from $MIRROR"
debootstrap --variant=minbase "$SUITE" "$root" "$MIRROR" >"$work/debootstrap.log" 2>&1 \
  || { tail -n 30 "$work/debootstrap.log" >&2; die "debootstrap failed (log: $work/debootstrap.log)"; }

for m in proc sys dev dev/pts; do
  case $m in
    proc) mount -t proc proc "$root/proc" ;;
    sys) mount -t sysfs sys "$root/sys" ;;
    *) mount --bind "/$m" "$root/$m" ;;
  esac
  mounted+=("$root/$m")
done
in_root() { chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin DEBIAN_FRONTEND=noninteractive LANG=C.UTF-8 "$@"; }

# Nothing installed in the chroot may start a service on the build host (etcd would).
printf '#!/bin/sh\nexit 101\n' >"$root/usr/sbin/policy-rc.d"
chmod 755 "$root/usr/sbin/policy-rc.d"
cat >"$root/etc/apt/sources.list" <<EOF
deb $MIRROR $SUITE main
deb $MIRROR $SUITE-updates main
deb $MIRROR $SUITE-backports main
EOF
cp /etc/resolv.conf "$root/etc/resolv.conf"
printf '/dev/vda / ext4 errors=remount-ro 0 1\n' >"$root/etc/fstab"
# Before the kernel: initramfs-tools cannot probe the root device from a chroot, so name its
# type, and the initramfs checks the root filesystem at boot.
mkdir -p "$root/etc/initramfs-tools/conf.d"
echo FSTYPE=ext4 >"$root/etc/initramfs-tools/conf.d/fstype.conf"
say "installing ${#GUEST_DEBS[@]} packages and the $KERNEL_SUITE kernel with headers"
{
  in_root apt-get update -q
  in_root apt-get install -y -q --no-install-recommends "${GUEST_DEBS[@]}"
  in_root apt-get install -y -q --no-install-recommends -t "$KERNEL_SUITE" linux-image-amd64 linux-headers-amd64
} >"$work/apt.log" 2>&1 || { tail -n 30 "$work/apt.log" >&2; die "apt-get in the chroot failed (log: $work/apt.log)"; }

# Python dependencies: wheels built on this host (same Debian, same Python), installed offline.
say "Python wheels: ${PY_REQS[*]} ${PY_BUILD_REQS[*]}"
mkdir -p "$root$WHEELHOUSE"
python3 -m venv "$work/pip-venv"
"$work/pip-venv/bin/pip" wheel -q --wheel-dir "$root$WHEELHOUSE" "${PY_REQS[@]}" "${PY_BUILD_REQS[@]}" >"$work/pip.log" 2>&1 \
  || { tail -n 30 "$work/pip.log" >&2; die "pip wheel failed (log: $work/pip.log)"; }
{
  in_root python3 -m venv --system-site-packages "$VENV"
  in_root "$VENV/bin/pip" install -q --no-index --find-links "$WHEELHOUSE" "${PY_REQS[@]}" "${PY_BUILD_REQS[@]}"
  in_root "$VENV/bin/python" -c 'import bcc, etcd3, pyroute2, rich, prometheus_client'
} >>"$work/pip.log" 2>&1 || { tail -n 30 "$work/pip.log" >&2; die "the guest venv failed (log: $work/pip.log)"; }

say "configuring the guest"
kver=$(ls "$root/lib/modules" | sort -V | tail -n1)
[ -e "$root/usr/src/linux-headers-$kver/Makefile" ] || die "no headers for guest kernel $kver"
echo fbpf >"$root/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 fbpf\n' >"$root/etc/hosts"
# Every VM must get its own machine-id: networkd's DHCP client id comes from it.
: >"$root/etc/machine-id"
rm -f "$root/var/lib/dbus/machine-id"
# eth0 is the management network (vagrant's ssh only): DHCP for the address, and never a route
# from it, so no VM has a way out. eth1, the lab underlay, is configured by provision.sh.
mkdir -p "$root/etc/systemd/network" "$root/etc/systemd/networkd.conf.d"
cat >"$root/etc/systemd/network/10-eth0.network" <<'EOF'
[Match]
Name=eth0

[Network]
DHCP=ipv4
LinkLocalAddressing=no
IPv6AcceptRA=no

[DHCPv4]
UseGateway=no
UseRoutes=no
UseDNS=no
UseNTP=no
EOF
# networkd must leave the routes and rules of flannel-bpf (flannel.<VNI>, cni0) alone.
printf '[Network]\nManageForeignRoutes=no\nManageForeignRoutingPolicyRules=no\n' \
  >"$root/etc/systemd/networkd.conf.d/10-flannel-bpf.conf"
printf 'net.ipv6.conf.all.disable_ipv6 = 1\nnet.ipv6.conf.default.disable_ipv6 = 1\n' >"$root/etc/sysctl.d/10-no-ipv6.conf"
in_root systemctl enable -q systemd-networkd ssh
in_root systemctl disable -q etcd 2>/dev/null || true
in_root systemctl mask -q e2scrub_reap.service apt-daily.timer apt-daily-upgrade.timer fstrim.timer 2>/dev/null || true

in_root useradd -m -s /bin/bash vagrant
in_root passwd -l root >/dev/null
install -d -m 700 "$root/home/vagrant/.ssh"
install -m 600 "$pubkey" "$root/home/vagrant/.ssh/authorized_keys"
in_root chown -R vagrant:vagrant /home/vagrant/.ssh
printf 'vagrant ALL=(ALL) NOPASSWD: ALL\nDefaults:vagrant !requiretty\n' >"$root/etc/sudoers.d/vagrant"
chmod 440 "$root/etc/sudoers.d/vagrant"
printf 'UseDNS no\nGSSAPIAuthentication no\nPasswordAuthentication no\n' >"$root/etc/ssh/sshd_config.d/vagrant.conf"

cp "$root/boot/vmlinuz-$kver" "$work/vmlinuz"
cp "$root/boot/initrd.img-$kver" "$work/initrd.img"
in_root apt-get clean
rm -f "$root/usr/sbin/policy-rc.d" "$root/etc/resolv.conf"
rm -rf "$root/var/lib/apt/lists/"* "$root/tmp/"* "$root/root/.cache"
cleanup

say "making the ${DISK_GB} GB ext4 image (mkfs.ext4 -d) and qcow2"
truncate -s "${DISK_GB}G" "$work/disk.raw"
mkfs.ext4 -q -F -L fbpf-root -d "$root" "$work/disk.raw"
qemu-img convert -O qcow2 "$work/disk.raw" "$work/box.img"
rm -rf "$root" "$work/disk.raw"
printf '{"provider":"libvirt","format":"qcow2","virtual_size":%d}\n' "$DISK_GB" >"$work/metadata.json"
cat >"$work/Vagrantfile" <<'EOF'
# flannel-bpf lab box: boots its kernel directly; vagrant/Vagrantfile sets kernel, initrd and cmdline.
Vagrant.configure("2") do |config|
  config.ssh.insert_key = false
end
EOF
tar -C "$work" -cf "$work/$BOX_NAME.box" metadata.json Vagrantfile box.img
mv "$work/$BOX_NAME.box" "$work/vmlinuz" "$work/initrd.img" "$out/"
echo "$kver" >"$out/kernel-release"
describe_inputs >"$out/inputs.txt"
echo "$inputs" >"$out/inputs.sha256"
rm -rf "$work"
say "built $out/$BOX_NAME.box (guest kernel $kver, $(du -h "$out/$BOX_NAME.box" | cut -f1)) in $((SECONDS - start)) s"
