"""The programs on real interfaces with real traffic (a two-host netns lab):
pod to pod over our encap and tc decap, host to pod through flannel.1's
egress, the kernel's own TTL handling, and XDP decap. The control plane is
played by hand here; its own tests live elsewhere."""
from __future__ import annotations

import pytest
from pyroute2 import IPRoute

from flannel_bpf.lab.run import ping, run_in_netns, tcp_transfer
from flannel_bpf.lab.topology import temporary_lab
from flannel_bpf.loader.bpf.attach import attach_tc, attach_xdp, detach_tc
from flannel_bpf.loader.netlink.kernel_vxlan import KernelVxlanBackend
from flannel_bpf.loader.netns import in_netns
from flannel_bpf.loader.bpf.maps import EndpointEntry, NodeConfig, PeerEntry
from flannel_bpf.loader.peer import Peer
from flannel_bpf.loader.bpf.program import load_programs

pytestmark = pytest.mark.usefixtures("require_root")

SUBNETS = {1: "10.244.1.0/24", 2: "10.244.2.0/24"}
POD_IPS = {1: "10.244.1.2", 2: "10.244.2.2"}


def link(netns: str, name: str):
    with in_netns(netns), IPRoute() as ipr:
        return ipr.link("get", ifname=name)[0]


@pytest.fixture(scope="module")
def cluster(pin_root):
    """Two hosts, one pod each, flannel.1 as flanneld sets it up, and our programs on top."""
    with temporary_lab(prefix="fbd", hosts=2) as lab:
        devices, loaded = {}, {}
        try:
            for i in (1, 2):
                lab.add_pod(i, 1, f"{POD_IPS[i]}/24", f"10.244.{i}.1", 1450)
                host = lab.host(i)
                with in_netns(host.netns):
                    devices[i] = KernelVxlanBackend(uplink=host.uplink, public_ip=host.ip,
                                                    subnet=SUBNETS[i]).setup()
            for i, other in ((1, 2), (2, 1)):
                host, peer_host = lab.host(i), lab.host(other)
                with in_netns(host.netns):
                    KernelVxlanBackend(uplink=host.uplink, public_ip=host.ip, subnet=SUBNETS[i]).apply_peers(
                        [Peer(SUBNETS[other], peer_host.ip, devices[other].mac)])
                loaded[i] = load_programs(f"{pin_root}/lab-h{i}")
                uplink, bridge = link(host.netns, host.uplink), link(host.netns, "cni0")
                pod = host.pod(1)
                pod_mac = link(pod.netns, pod.ifname).get_attr("IFLA_ADDRESS")
                maps = loaded[i].maps
                maps.set_local_config(NodeConfig.make(
                    underlay_ip=host.ip, subnet=SUBNETS[i], vtep_mac=devices[i].mac,
                    uplink_mac=uplink.get_attr("IFLA_ADDRESS"), uplink_ifindex=uplink["index"],
                    bridge_mac=bridge.get_attr("IFLA_ADDRESS"), bridge_ifindex=bridge["index"],
                    vxlan_ifindex=devices[i].ifindex, mtu=uplink.get_attr("IFLA_MTU")))
                maps.upsert_peers([PeerEntry.make(SUBNETS[other], peer_host.ip, devices[other].mac)])
                maps.set_endpoints([EndpointEntry.make(pod.ip, link(host.netns, pod.host_veth)["index"],
                                                       pod_mac)])
                fds = loaded[i].prog_fds
                with in_netns(host.netns):
                    attach_tc("cni0", "ingress", fds["tc_encap_from_pods"], "fbpf_encap")
                    attach_tc("flannel.1", "egress", fds["tc_encap_from_host"], "fbpf_encap")
                    attach_tc(host.uplink, "ingress", fds["tc_decap"], "fbpf_decap")
            yield lab, loaded
        finally:
            for programs in loaded.values():
                programs.close()


def counters(loaded, i):
    return {k: v for k, v in loaded[i].maps.read_counters().items() if v[0]}


def reset(loaded):
    for programs in loaded.values():
        programs.maps.reset_counters()


def test_pod_to_pod_over_bpf_encap_and_tc_decap(cluster):
    lab, loaded = cluster
    reset(loaded)
    pod1, pod2 = lab.host(1).pod(1), lab.host(2).pod(1)
    result = ping(pod1.netns, pod2.ip, count=3)
    assert result.ok, result
    assert tcp_transfer(pod1.netns, pod2.netns, pod2.ip, nbytes=8 << 20)
    assert tcp_transfer(pod2.netns, pod1.netns, pod1.ip, nbytes=8 << 20)
    for i in (1, 2):
        seen = counters(loaded, i)
        assert seen.get("encap_vxlan", (0, 0))[0] > 0, seen
        assert seen.get("decap_to_pod", (0, 0))[0] > 0, seen
        assert "drop_unknown_peer" not in seen and "drop_write_failed" not in seen, seen
    # TSO survives the encapsulation: far fewer program runs than MTU-sized packets.
    packets, nbytes = counters(loaded, 1)["encap_vxlan"]
    assert nbytes / packets > 1450, (packets, nbytes)


def test_host_to_pod_goes_through_flannel_egress(cluster):
    lab, loaded = cluster
    reset(loaded)
    result = ping(lab.host(1).netns, POD_IPS[2], count=2)
    assert result.ok, result
    assert counters(loaded, 1)["encap_vxlan"][0] >= 2  # from tc_encap_from_host


def test_ttl_expiry_is_answered_by_the_kernel(cluster):
    lab, loaded = cluster
    reset(loaded)
    out = run_in_netns(lab.host(1).pod(1).netns, ["ping", "-c", "1", "-W", "1", "-t", "1", POD_IPS[2]],
                       check=False)
    assert "Time to live exceeded" in out.stdout, out.stdout + out.stderr
    assert counters(loaded, 1)["pass_ttl_exceeded"][0] == 1


def test_xdp_decap_delivers_too(cluster):
    lab, loaded = cluster
    host2 = lab.host(2)
    with in_netns(host2.netns):
        detach_tc(host2.uplink, "ingress", "fbpf_decap")
        attach_xdp(host2.uplink, loaded[2].prog_fds["xdp_decap"])
    reset(loaded)
    result = ping(lab.host(1).pod(1).netns, POD_IPS[2], count=3)
    assert result.ok, result
    assert counters(loaded, 2)["decap_xdp"][0] >= 3
