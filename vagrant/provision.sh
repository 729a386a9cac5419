#!/usr/bin/env bash
# Provisions one VM of the lab (run as root by Vagrant's shell provisioner; idempotent).
#   underlay eth1 = FBPF_NODE_IP/24 (no gateway: the lab has no way out)
#   node 1: etcd on its underlay address, and flannel's network config (Backend.Type bpf)
#   every node: the project installed offline into /opt/flannel-bpf/venv, the agent as the
#   systemd unit flannel-bpf.service (attach --iface eth1), pods on cni0.
# Environment: FBPF_NODE (1..N), FBPF_NODE_IP, FBPF_ETCD_IP, FBPF_PODS (default 2).
set -euo pipefail
: "${FBPF_NODE:?}" "${FBPF_NODE_IP:?}" "${FBPF_ETCD_IP:?}"
PODS=${FBPF_PODS:-2}
SRC=${FBPF_SRC:-/vagrant}
VENV=/opt/flannel-bpf/venv
WHEELHOUSE=/opt/flannel-bpf/wheelhouse
ETCD_URL=http://$FBPF_ETCD_IP:2379
HEALTHZ_PORT=8471
# VXLAN between the VMs (no DirectRouting, although they share one L2): the lab is there to
# show the XDP decapsulation on a virtio NIC. The decap hook is in the config, not on the agent's
# command line, so the VM bench switches paths by writing the config alone.
NET_CONFIG='{"Network": "10.244.0.0/16", "SubnetLen": 24, "Backend": {"Type": "bpf", "VNI": 1, "Port": 8472, "DirectRouting": false, "Decap": "xdp"}}'

say() { printf 'provision node%s: %s\n' "$FBPF_NODE" "$*"; }
die() { printf 'provision node%s: error: %s\n' "$FBPF_NODE" "$*" >&2; exit 1; }
# wait_until SECONDS CMD...: retry CMD every second; fails after SECONDS.
wait_until() {
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 1
  done
}

hostnamectl set-hostname "node$FBPF_NODE" 2>/dev/null || hostname "node$FBPF_NODE"
sed -i "s/^127\.0\.1\.1 .*/127.0.1.1 node$FBPF_NODE/" /etc/hosts

say "underlay eth1 $FBPF_NODE_IP/24"
cat >/etc/systemd/network/20-eth1.network <<EOF
[Match]
Name=eth1

[Network]
Address=$FBPF_NODE_IP/24
LinkLocalAddressing=no
IPv6AcceptRA=no
EOF
networkctl reload
networkctl reconfigure eth1
wait_until 60 sh -c "ip -4 -o addr show dev eth1 | grep -qF ' $FBPF_NODE_IP/'" || die "eth1 did not get $FBPF_NODE_IP"
if ip route show default | grep -q .; then die "the VM has a default route: $(ip route show default)"; fi

say "installing flannel-bpf from $SRC into $VENV (offline)"
"$VENV/bin/pip" install -q --disable-pip-version-check --no-index --find-links "$WHEELHOUSE" \
  --no-deps --no-build-isolation "$SRC"
ln -sfn "$VENV/bin/flannel-bpf" /usr/local/bin/flannel-bpf

if [ "$FBPF_NODE" = 1 ]; then
  say "etcd on $ETCD_URL"
  cat >/etc/default/etcd <<EOF
ETCD_NAME=node1
ETCD_DATA_DIR=/var/lib/etcd/flannel-bpf
ETCD_LISTEN_CLIENT_URLS=$ETCD_URL,http://127.0.0.1:2379
ETCD_ADVERTISE_CLIENT_URLS=$ETCD_URL
ETCD_LISTEN_PEER_URLS=http://$FBPF_ETCD_IP:2380
ETCD_INITIAL_ADVERTISE_PEER_URLS=http://$FBPF_ETCD_IP:2380
ETCD_INITIAL_CLUSTER=node1=http://$FBPF_ETCD_IP:2380
ETCD_INITIAL_CLUSTER_STATE=new
ETCD_INITIAL_CLUSTER_TOKEN=flannel-bpf-vagrant
EOF
  systemctl enable -q etcd
  systemctl restart etcd
fi
wait_until 300 env ETCDCTL_API=3 etcdctl --endpoints "$ETCD_URL" --command-timeout=5s endpoint health \
  || die "etcd at $ETCD_URL is not healthy after 300 s"
if [ "$FBPF_NODE" = 1 ]; then
  ETCDCTL_API=3 etcdctl --endpoints "$ETCD_URL" put /coreos.com/network/config "$NET_CONFIG" >/dev/null
  say "network config: $NET_CONFIG"
fi

say "agent: flannel-bpf.service"
cat >/etc/systemd/system/flannel-bpf.service <<EOF
[Unit]
Description=flannel-bpf node agent
After=network-online.target
Wants=network-online.target

[Service]
ExecStart=$VENV/bin/flannel-bpf attach --iface eth1 --etcd-endpoints $ETCD_URL --compile-timeout 1200 \\
    --healthz-ip 127.0.0.1 --healthz-port $HEALTHZ_PORT
Restart=always
RestartSec=2
# SIGTERM leaves the data plane forwarding (pinned); the restarted agent adopts it.
KillSignal=SIGTERM

[Install]
WantedBy=multi-user.target
EOF
systemctl daemon-reload
systemctl enable -q flannel-bpf
systemctl restart flannel-bpf
ready() { "$VENV/bin/python" -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$HEALTHZ_PORT/readyz', timeout=5)"; }
# bcc compiles the programs in the VM first: slow under software emulation.
wait_until 1200 ready || { journalctl -u flannel-bpf --no-pager -n 40 >&2; die "the agent is not ready after 1200 s"; }
say "agent ready: $(tr '\n' ' ' </run/flannel/subnet.env)"

say "pods: $("$VENV/bin/python" -m flannel_bpf.lab.node pods --count "$PODS")"
