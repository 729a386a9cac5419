"""A mixed cluster: bpf and stock-equivalent vxlan hosts, two underlay subnets joined by a router,
DirectRouting on, a 3-member etcd. bpf peers on the same L2 segment are DIRECT, the others VXLAN;
every pod must reach every other pod both ways, whatever the pair of backends."""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from flannel_bpf.lab import orchestrator as orch
from flannel_bpf.lab.run import ping, run_in_netns, tcp_transfer
from flannel_bpf.lab.topology import Pod

from e2e_lab import counters, lab_name, peer_modes

BACKENDS = ("bpf", "vxlan", "bpf", "vxlan", "bpf")
BEHIND_ROUTER = (4, 5)


@pytest.fixture(scope="module")
def mixed():
    spec = orch.LabSpec(name=lab_name("m"), hosts=5, pods=1, backends=BACKENDS, etcd_members=3,
                        second_subnet=BEHIND_ROUTER, direct_routing=True)
    try:
        yield orch.up(spec)
    finally:
        orch.down(spec.name)


def _crosses_router(lab, src: Pod, dst: Pod) -> bool:
    return lab.host(src.host).underlay_subnet != lab.host(dst.host).underlay_subnet


def _involves_bpf(lab, src: Pod, dst: Pod) -> bool:
    return "bpf" in (lab.host(src.host).agent.backend, lab.host(dst.host).agent.backend)


def _pairs(lab, routed_bpf: bool) -> list[tuple[Pod, Pod]]:
    pods = orch.all_pods(lab)
    return [(s, d) for s in pods for d in pods if s is not d
            and (_crosses_router(lab, s, d) and _involves_bpf(lab, s, d)) == routed_bpf]


def _unreachable(pairs: list[tuple[Pod, Pod]]) -> list[str]:
    """Pairs that fail a 2-probe ping or a 1 MiB TCP transfer."""
    def check(pair):
        src, dst = pair
        if not ping(src.netns, dst.ip, count=2, wait=1.0).ok:
            return f"{orch.pod_label(src)}->{orch.pod_label(dst)} ping"
        if not tcp_transfer(src.netns, dst.netns, dst.ip, nbytes=1 << 20, timeout=5.0):
            return f"{orch.pod_label(src)}->{orch.pod_label(dst)} tcp"
        return None
    with ThreadPoolExecutor(max_workers=6) as pool:
        return [failure for failure in pool.map(check, pairs) if failure]


def test_mixed_lab_runs_vxlan_config_with_bpf_hosts_on_a_three_member_etcd(mixed):
    lab = mixed
    assert lab.state.network_config == {"Network": "10.244.0.0/16",
                                        "Backend": {"Type": "vxlan", "VNI": 1, "DirectRouting": True}}
    assert len(lab.state.etcd.endpoints) == 3
    assert all(orch.process_running(m.pid, m.data_dir) for m in lab.state.etcd.members)
    leases = orch.etcd_client(lab).get_prefix(lab.state.etcd.prefix + "/subnets/")
    assert len(leases) == 5 and {json.loads(v)["BackendType"] for v in leases.values()} == {"vxlan"}
    for host, backend in zip(lab.hosts, BACKENDS):
        command = Path(host.agent.log_path).read_text().splitlines()[0]
        assert ("--backend bpf" in command) == (backend == "bpf")
        assert command.count("http://198.18.0.25") == 3  # all three etcd members


def test_bpf_peers_on_the_same_segment_are_direct_and_routed_ones_vxlan(mixed):
    lab = mixed
    subnet = {h.index: IPv4Network(h.agent.subnet) for h in lab.hosts}
    h1_modes = peer_modes(lab.host(1))
    assert {i: h1_modes[subnet[i]] for i in (2, 3, 4, 5)} == {2: "DIRECT", 3: "DIRECT", 4: "VXLAN", 5: "VXLAN"}
    h5_modes = peer_modes(lab.host(5))
    assert {i: h5_modes[subnet[i]] for i in (1, 2, 3, 4)} == {1: "VXLAN", 2: "VXLAN", 3: "VXLAN", 4: "DIRECT"}
    # The stock vxlan host does the same with kernel routes.
    routes = run_in_netns(lab.host(2).netns, ["ip", "-4", "-o", "route"]).stdout
    assert f"{subnet[1]} via 198.18.0.11 dev eth0 proto 251" in routes
    assert f"{subnet[4]} via {subnet[4].network_address} dev flannel.1 proto 251 onlink" in routes


def test_pairs_on_one_segment_and_kernel_pairs_across_the_router_reach_each_other(mixed):
    lab = mixed
    before = counters(lab.host(1))
    pairs = _pairs(lab, routed_bpf=False)
    assert len(pairs) == 10  # 6 on segment 1, 2 on segment 2, vxlan h2<->h4 across
    assert _unreachable(pairs) == []
    grew = {k: v - before[k] for k, v in counters(lab.host(1)).items()}
    assert grew["fwd_direct"] > 0 and grew["direct_to_pod"] > 0, grew


def test_bpf_pairs_across_the_router_reach_each_other(mixed):
    """VXLAN to a peer behind the router: the outer packet must go to the router, not be
    ARPed for on our segment (the next hop comes from a FIB lookup on the outer header)."""
    lab = mixed
    before = counters(lab.host(1))
    pairs = _pairs(lab, routed_bpf=True)
    assert len(pairs) == 10
    assert _unreachable(pairs) == []
    grew = {k: v - before[k] for k, v in counters(lab.host(1)).items()}
    assert grew["encap_vxlan"] > 0 and grew["decap_to_pod"] > 0, grew
