"""The lab in Kubernetes mode: the Kubernetes API stand-in as the API server, three hosts whose
agents run --kube-subnet-mgr (two bpf, one stock-style kernel vxlan node), node objects with
podCIDRs. Pods reach each other over the BPF path, the vxlan node interoperates both ways, every
node carries flanneld's annotations, and a cluster moves node by node."""
from __future__ import annotations

import json
from ipaddress import IPv4Network

import pytest
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Node
from lightkube.models.core_v1 import NodeSpec
from pyroute2 import IPRoute

from flannel_bpf.lab import kube
from flannel_bpf.lab import orchestrator as orch
from flannel_bpf.lab.run import ping
from flannel_bpf.loader.netns import in_netns

from e2e_lab import counters, lab_name, map_subnets, wait_programmed, wait_until

BACKENDS = ("bpf", "bpf", "vxlan")


@pytest.fixture(scope="module")
def kube_lab():
    spec = orch.LabSpec(name=lab_name("k"), hosts=3, pods=1, backends=BACKENDS, kube=True)
    try:
        yield orch.up(spec)
    finally:
        orch.down(spec.name)


def vtep_mac(host) -> str:
    with in_netns(host.netns), IPRoute() as ipr:
        return ipr.get_links(ifname="flannel.1")[0].get_attr("IFLA_ADDRESS")


def test_every_node_carries_flanneld_s_annotations(kube_lab):
    lab = kube_lab
    assert lab.state.etcd is None and lab.state.network_config["Backend"]["Type"] == "vxlan"
    for host in lab.hosts:
        assert kube.node_annotations(lab, host) == {
            "flannel.alpha.coreos.com/backend-data": json.dumps({"VNI": 1, "VtepMAC": vtep_mac(host)},
                                                                separators=(",", ":")),
            "flannel.alpha.coreos.com/backend-type": "vxlan",
            "flannel.alpha.coreos.com/kube-subnet-manager": "true",
            "flannel.alpha.coreos.com/public-ip": host.address.split("/")[0],
        }
        node = kube._call(lab, lambda c: c.get(Node, kube.node_name(host)))
        assert str(kube.pod_cidr(host)) == host.agent.subnet == node.spec.podCIDR
        condition = next(c for c in node.status.conditions if c.type == "NetworkUnavailable")
        assert (condition.status, condition.reason) == ("False", "FlannelIsUp")


def test_pods_reach_each_other_over_the_bpf_path_and_the_vxlan_node_both_ways(kube_lab):
    lab = kube_lab
    matrix = orch.ping_matrix(lab, count=2)
    assert matrix.ok, [f"{orch.pod_label(s)}->{orch.pod_label(d)}" for s, d, _ in matrix.failures]
    h1, h3 = lab.host(1), lab.host(3)
    for src, dst, encap_host, decap_host in ((h1, h3, h1, None), (h3, h1, None, h1)):
        before = counters(h1)
        assert ping(src.pods[0].netns, dst.pods[0].ip, count=3, wait=1.0).ok
        grew = {name: n - before.get(name, 0) for name, n in counters(h1).items()}
        if encap_host:   # bpf -> stock vxlan node: encapsulated by the program
            assert grew.get("encap_vxlan", 0) >= 3
        if decap_host:   # stock vxlan node -> bpf: decapsulated by the program
            assert grew.get("decap_to_pod", 0) + grew.get("decap_xdp", 0) >= 3


def test_nodes_without_flannel_are_never_programmed_and_a_joining_node_is(kube_lab):
    lab = kube_lab
    name = f"{lab.name}-kubelet-only"
    # A node the kubelet registered, with a podCIDR, where flannel does not run (yet).
    kube._call(lab, lambda c: c.create(Node(metadata=ObjectMeta(name=name),
                                            spec=NodeSpec(podCIDR="10.244.200.0/24"))))
    joined = orch.join_host(lab, "bpf", pods=1)
    subnet = IPv4Network(joined.agent.subnet)
    for host in lab.hosts[:2]:
        wait_programmed(host, subnet)
        assert IPv4Network("10.244.200.0/24") not in map_subnets(host)
    assert ping(joined.pods[0].netns, lab.host(3).pods[0].ip, count=2, wait=1.0).ok


def test_vxlan_node_moves_to_bpf(kube_lab):
    """Node by node: the stock vxlan node restarts as a flannel-bpf node; its peers follow its
    (maybe new) VtepMAC and every pod still reaches it."""
    lab = kube_lab
    h3 = lab.host(3)
    orch.stop_agent(lab, 3)
    orch.start_agent(lab, 3, "bpf")
    orch.wait_ready(lab, [3])
    mac = vtep_mac(lab.host(3))
    wait_until(lambda: json.loads(kube.node_annotations(lab, h3)["flannel.alpha.coreos.com/backend-data"])
               ["VtepMAC"] == mac, 10, what="the moved node publishes its VtepMAC")
    matrix = orch.ping_matrix(lab, count=2)
    assert matrix.ok, [f"{orch.pod_label(s)}->{orch.pod_label(d)}" for s, d, _ in matrix.failures]
