"""Pods made by flannel-bpf-cni in the lab, next to bridge pods and a stock vxlan host: every pod
reaches every other; the routed pods' traffic is encapsulated and decapsulated by the programs
(counters) and delivered through fl_endpoints; CNI DEL and `lab down` leave nothing."""
from __future__ import annotations

import json

import pytest

from flannel_bpf.lab import orchestrator as orch
from flannel_bpf.lab.cni_pods import call_cni, cni_config
from flannel_bpf.lab.run import ping, run_in_netns
from flannel_bpf.loader.bpf.maps import DataPlaneMaps

from e2e_lab import assert_lab_gone, cli, counters, lab_name, root_snapshot

BACKENDS = ("bpf", "bpf", "vxlan")


@pytest.fixture(scope="module")
def before():
    return root_snapshot()


@pytest.fixture(scope="module")
def lab(before):
    spec = orch.LabSpec(name=lab_name("cni"), hosts=3, pods=2, backends=BACKENDS, decap="tc",
                        pod_devices=("veth", "routed-veth"))
    try:
        yield orch.up(spec)
    finally:
        orch.down(spec.name)


def routed(lab):
    return [p for h in lab.hosts for p in h.pods if p.device == "routed-veth"]


def test_every_pod_reaches_every_other(lab):
    assert {p.device for h in lab.hosts for p in h.pods} == {"veth", "routed-veth"}
    shown = json.loads(cli("lab", "status", "--name", lab.name, "--json").stdout)
    assert {p["device"] for h in shown["hosts"] for p in h["pods"]} == {"veth", "routed-veth"}
    matrix = orch.ping_matrix(lab, count=2)
    assert len(matrix.results) == 6 * 5
    assert [(s.netns, d.netns) for s, d, _ in matrix.failures] == []


def forwarded(host) -> int:
    """IPv4 packets the host's kernel has forwarded (Ip: ForwDatagrams of its namespace)."""
    lines = [line.split() for line in run_in_netns(host.netns, ["cat", "/proc/net/snmp"]).stdout.splitlines()
             if line.startswith("Ip:")]
    return int(lines[1][lines[0].index("ForwDatagrams")])


def test_routed_pods_take_the_bpf_path(lab):
    """h2's routed pod pings h1's: h2's program encapsulates at the pod's device, h1 decapsulates
    straight into the pod; neither kernel forwards a packet of it."""
    src = next(p for p in routed(lab) if p.host == 2)
    dst = next(p for p in routed(lab) if p.host == 1)
    with DataPlaneMaps(lab.host(1).agent.pin_dir) as maps:
        entry = {str(e.ip): e for e in maps.list_endpoints()}[dst.ip]
    links = json.loads(run_in_netns(lab.host(1).netns, ["ip", "-j", "link", "show", dst.host_veth]).stdout)
    assert entry.ifindex == links[0]["ifindex"]
    assert "tc_from_routed_pod" in run_in_netns(lab.host(2).netns, ["tc", "filter", "show", "dev",
                                                                     src.host_veth, "ingress"]).stdout
    before = [(counters(h), forwarded(h)) for h in (lab.host(1), lab.host(2))]
    assert ping(src.netns, dst.ip, count=20, interval=0.01, wait=2.0).ok
    (c1, f1), (c2, f2) = [(counters(h), forwarded(h)) for h in (lab.host(1), lab.host(2))]
    assert c1["decap_to_pod"] - before[0][0]["decap_to_pod"] >= 20
    assert c2["encap_vxlan"] - before[1][0]["encap_vxlan"] >= 20
    assert (f1 - before[0][1], f2 - before[1][1]) == (0, 0)


def test_a_routed_pod_reaches_a_bridge_pod_of_its_node_directly(lab):
    host = lab.host(1)
    src = next(p for p in routed(lab) if p.host == 1)
    dst = next(p for p in host.pods if p.device == "veth")
    ping(dst.netns, dst.gateway, count=1, wait=1.0)  # the bridge pod in fl_endpoints (as after its first packet)
    before, fwd = counters(host), forwarded(host)
    assert ping(src.netns, dst.ip, count=10, interval=0.01, wait=2.0).ok
    assert counters(host)["local_to_pod"] - before["local_to_pod"] >= 10
    # only the replies (bridge pod -> routed pod) are the kernel's to route
    assert forwarded(host) - fwd <= 10


def test_cni_del_leaves_nothing(lab):
    """The last test on this lab: DEL of one routed pod, twice."""
    pod = next(p for p in routed(lab) if p.host == 1)
    host = lab.host(1)
    config = cni_config("routed-veth", host.agent.subnet_file, orch.host_dir(lab, host) / "ipam",
                        host.agent.pin_dir, pod.ip)
    for _ in range(2):
        assert call_cni(host.netns, "DEL", config, container_id=pod.netns, pod_netns=pod.netns) is None
    assert run_in_netns(host.netns, ["ip", "link", "show", pod.host_veth], check=False).returncode != 0
    assert pod.ip not in run_in_netns(host.netns, ["ip", "-4", "route"]).stdout
    with DataPlaneMaps(host.agent.pin_dir) as maps:
        assert pod.ip not in {str(e.ip) for e in maps.list_endpoints()}
    allocations = orch.host_dir(lab, host) / "ipam" / "fbpf-lab"
    assert not (allocations / pod.ip).exists()


def test_lab_down_leaves_nothing(lab, before):
    orch.down(lab.name)
    assert_lab_gone(lab.name, before)
