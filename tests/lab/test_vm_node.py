"""`python -m flannel_bpf.lab.node`, the pods and check of a VM of the vagrant lab, run here in a
network namespace that stands in for the VM (the module works on its caller's namespace)."""
import json
import secrets
import subprocess
import sys
from ipaddress import IPv4Network

import pytest

from flannel_bpf.lab.node import NodeError, pod_addresses
from flannel_bpf.lab.run import ping, run_in_netns
from flannel_bpf.lab.netns import create_netns, remove_netns
from flannel_bpf.loader.netns import list_netns, netns_path, read_sysctl

pytestmark = pytest.mark.usefixtures("require_root")


@pytest.fixture
def vm(tmp_path):
    """(host namespace, pod namespace prefix, subnet.env path); all removed afterwards."""
    tag = secrets.token_hex(3)
    host, prefix = f"fbpf-vm{tag}", f"fbpf-vm{tag}-p"
    create_netns(host)
    subnet_file = tmp_path / "subnet.env"
    subnet_file.write_text("FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET=10.244.7.1/24\n"
                           "FLANNEL_MTU=1450\nFLANNEL_IPMASQ=false\n")
    try:
        yield host, prefix, subnet_file
    finally:
        for ns in list_netns():
            if ns.startswith(prefix):
                remove_netns(ns)
        remove_netns(host)


def node_command(host, *args):
    return subprocess.run(["nsenter", f"--net={netns_path(host)}", sys.executable, "-m",
                           "flannel_bpf.lab.node", *map(str, args)],
                          capture_output=True, text=True, timeout=60)


def test_pods_get_the_subnet_env_addresses_and_reach_each_other(vm):
    host, prefix, subnet_file = vm
    first = node_command(host, "pods", "--count", 2, "--subnet-file", subnet_file, "--prefix", prefix)
    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout) == [{"netns": f"{prefix}1", "address": "10.244.7.2/24"},
                                        {"netns": f"{prefix}2", "address": "10.244.7.3/24"}]
    # cni0 holds FLANNEL_SUBNET; the host forwards; each pod has FLANNEL_MTU and a default route.
    assert "inet 10.244.7.1/24" in run_in_netns(host, ["ip", "-4", "addr", "show", "cni0"]).stdout
    assert read_sysctl("net.ipv4.ip_forward", host) == "1"
    for index in (1, 2):
        pod = f"{prefix}{index}"
        assert "mtu 1450" in run_in_netns(pod, ["ip", "-o", "link", "show", "eth0"]).stdout
        assert run_in_netns(pod, ["ip", "route", "show", "default"]).stdout.startswith("default via 10.244.7.1 dev eth0")
    # The pods' gateway pings left neighbour entries on cni0, from which the agent learns pods.
    neighbours = run_in_netns(host, ["ip", "-4", "neigh", "show", "dev", "cni0"]).stdout
    assert "10.244.7.2 " in neighbours and "10.244.7.3 " in neighbours
    assert ping(f"{prefix}1", "10.244.7.3", count=2).ok

    again = node_command(host, "pods", "--count", 2, "--subnet-file", subnet_file, "--prefix", prefix)
    assert again.returncode == 0 and again.stdout == first.stdout, again.stderr
    assert sorted(ns for ns in list_netns() if ns.startswith(prefix)) == [f"{prefix}1", f"{prefix}2"]


def test_without_a_lease_pods_and_check_say_what_is_missing(vm, tmp_path):
    host, prefix, _ = vm
    missing = tmp_path / "none.env"
    for args in (("pods",), ("check", "--iface", "eth1")):
        proc = node_command(host, *args, "--subnet-file", missing, "--prefix", prefix)
        assert proc.returncode == 1
        assert f"{missing} has no FLANNEL_SUBNET (is flannel-bpf attach running?)" in proc.stderr
    assert not [ns for ns in list_netns() if ns.startswith(prefix)]


def test_check_without_a_data_plane_fails_naming_it(vm):
    host, prefix, subnet_file = vm
    proc = node_command(host, "check", "--iface", f"nope{secrets.token_hex(2)}",
                        "--subnet-file", subnet_file, "--prefix", prefix)
    assert proc.returncode == 1
    assert "flannel-bpf status failed" in proc.stderr and "attach" in proc.stderr


def test_pod_addresses():
    assert [str(a) for a in pod_addresses(IPv4Network("10.244.3.0/24"), 3)] == \
        ["10.244.3.2/24", "10.244.3.3/24", "10.244.3.4/24"]
    assert len(pod_addresses(IPv4Network("10.244.3.0/24"), 200)) == 200
    for bad in (0, 201):
        with pytest.raises(NodeError, match="pod count must be 1..200"):
            pod_addresses(IPv4Network("10.244.3.0/24"), bad)
    with pytest.raises(NodeError, match="1..5 for 10.244.3.0/29"):
        pod_addresses(IPv4Network("10.244.3.0/29"), 6)


@pytest.mark.parametrize("mode", ["native", "generic"])
def test_nic_reports_the_xdp_mode_driver_and_address_the_kernel_shows(vm, mode):
    from bcc import BPF
    from pyroute2 import IPRoute

    from flannel_bpf.loader.bpf.attach import attach_xdp
    from flannel_bpf.loader.netns import in_netns

    host, _, _ = vm
    with in_netns(host), IPRoute() as ipr:
        ipr.link("add", ifname="eth1", kind="veth", peer="eth1-peer")
        for name in ("eth1", "eth1-peer"):
            ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")
        ipr.addr("add", index=ipr.link_lookup(ifname="eth1")[0], address="198.18.2.11", prefixlen=24)
    before = json.loads(node_command(host, "nic", "--iface", "eth1").stdout)
    assert before["driver"] == "veth" and before["address"] == "198.18.2.11"
    assert before["xdp_mode"] is None and before["xdp_prog"] is None
    assert before["xdp_tx_queues"] == "n/a"  # the queue arithmetic is virtio_net's

    bpf = BPF(text=b"int xdp_pass_all(struct xdp_md *ctx) { return XDP_PASS; }")
    try:
        with in_netns(host):
            attach_xdp("eth1", bpf.load_func(b"xdp_pass_all", BPF.XDP).fd, mode)
        after = node_command(host, "nic", "--iface", "eth1")
    finally:
        bpf.cleanup()
    report = json.loads(after.stdout)
    assert report["xdp_mode"] == mode
    assert report["xdp_prog"].startswith("xdp_pass_all id ")


def test_xdp_and_queue_parsing():
    from flannel_bpf.lab.node import parse_channels, parse_xdp

    native = ("3: eth1: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 xdp qdisc mq state UP mode DEFAULT\n"
              "    link/ether 52:54:00:aa:bb:cc brd ff:ff:ff:ff:ff:ff promiscuity 0\n"
              "    prog/xdp id 42 name xdp_decap tag 0123456789abcdef jited\n")
    assert parse_xdp(native) == ("native", "xdp_decap id 42")
    assert parse_xdp(native.replace(" xdp ", " xdpgeneric ")) == ("generic", "xdp_decap id 42")
    assert parse_xdp("3: eth1: <UP> mtu 1500 qdisc mq state UP\n") == (None, None)
    channels = ("Channel parameters for eth1:\nPre-set maximums:\nRX:\t\tn/a\nTX:\t\tn/a\nOther:\t\tn/a\n"
                "Combined:\t2\nCurrent hardware settings:\nRX:\t\tn/a\nTX:\t\tn/a\nOther:\t\tn/a\nCombined:\t1\n")
    assert parse_channels(channels) == (2, 1)
    assert parse_channels(channels.replace("Combined:\t1", "Combined:\t2")) == (2, 2)
    assert parse_channels("netlink error: Operation not supported") == (None, None)


def test_xdp_tx_queues_of_virtio_net():
    from flannel_bpf.lab.node import xdp_tx_queues

    warning = ("[   12.3] virtio_net virtio2 eth1: XDP request 2 queues but max is 1. XDP_TX and XDP_REDIRECT "
               "will operate in a slower locked tx mode.\n")
    # Attached: the queues in use count XDP's own (1 + 1 of 2); only the kernel's warning says locked.
    assert xdp_tx_queues("eth1", "virtio_net", "native", 2, 2, 1, "") == "on their own queues"
    assert xdp_tx_queues("eth1", "virtio_net", "native", 1, 1, 1, warning) == "on shared queues (locked mode)"
    assert xdp_tx_queues("eth2", "virtio_net", "native", 2, 2, 1, warning) == "on their own queues"
    # Not attached: predicted from the queues in use, the vCPUs and the maximum.
    assert xdp_tx_queues("eth1", "virtio_net", None, 2, 1, 1, "") == "on their own queues"
    assert xdp_tx_queues("eth1", "virtio_net", None, 2, 2, 2, "") == "on shared queues (locked mode)"
    assert xdp_tx_queues("eth1", "veth", "native", None, None, 2, "") == "n/a"
