"""tc_route.c through BPF_PROG_TEST_RUN: a fixture table of input packet ->
expected counter, return code and output bytes."""
from __future__ import annotations

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether

import fl_packets as P
from flannel_bpf.loader.bpf.layout import STAT_ACTION, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, Action, Stat

pytestmark = pytest.mark.usefixtures("require_root")

TC_RETVAL = {Action.PASS: TC_ACT_OK, Action.DROP: TC_ACT_SHOT, Action.REDIRECT: TC_ACT_REDIRECT}
SAME = "same"  # output must equal input
PODS, HOST = "tc_encap_from_pods", "tc_encap_from_host"
ROUTED, NETKIT = "tc_from_routed_pod", "nk_from_pod"  # a routed veth pod's host side, a netkit pod's egress
NO_MAC = "00:00:00:00:00:00"  # an L3 netkit device's, both ends
OTHER_POD_IP = "10.244.1.6"


def udp_of_l3_len(l3_len: int, dst="10.244.2.7"):
    """A pod's UDP packet whose IPv4 total length is exactly l3_len."""
    return P.from_pod(P.udp(payload=b"x" * (l3_len - 28)), dst=dst)


def malformed(mutate):
    raw = bytearray(bytes(P.from_pod()))
    mutate(raw)
    return Ether(bytes(raw))


def set_tot_len(n):
    return lambda raw: raw.__setitem__(slice(16, 18), n.to_bytes(2, "big"))


def set_byte(offset, value):
    return lambda raw: raw.__setitem__(offset, value)


def delivered_locally(pkt: Ether) -> bytes:
    """To the local pod: from the gateway to its MAC, TTL - 1."""
    out = Ether(dst=P.POD_MAC, src=P.BRIDGE_MAC) / pkt[IP].copy()
    out[IP].ttl -= 1
    del out[IP].chksum
    return bytes(Ether(bytes(out)))


def from_netkit_pod(l4=None, **kw) -> Ether:
    pkt = P.from_pod(l4, eth_dst=NO_MAC, **kw)
    pkt.src = NO_MAC
    return pkt


def direct_forwarded(pkt: Ether) -> bytes:
    out = pkt.copy()
    out[IP].ttl -= 1
    del out[IP].chksum
    return bytes(Ether(bytes(out)))


# (id, program, input packet, expected stat, expected output: SAME, "encap", "encap-host" or bytes, skb ctx)
CASES = [
    ("udp", PODS, P.from_pod(P.udp()), Stat.ENCAP_VXLAN, "encap", {}),
    ("tcp-syn", PODS, P.from_pod(P.tcp()), Stat.ENCAP_VXLAN, "encap", {}),
    ("tcp-data", PODS, P.from_pod(P.tcp(flags="PA", payload=b"d" * 1000)), Stat.ENCAP_VXLAN, "encap", {}),
    ("icmp", PODS, P.from_pod(P.icmp_echo()), Stat.ENCAP_VXLAN, "encap", {}),
    ("ecn-ce-and-dscp", PODS, P.from_pod(P.udp(), tos=0xB8 | 3), Stat.ENCAP_VXLAN, "encap", {}),
    ("ecn-ect1", PODS, P.from_pod(P.tcp(), tos=1), Stat.ENCAP_VXLAN, "encap", {}),
    ("inner-ip-options", PODS, P.with_ip_options(P.from_pod(P.udp())), Stat.ENCAP_VXLAN, "encap", {}),
    ("inner-fragment", PODS, P.from_pod(P.udp(), flags="MF"), Stat.ENCAP_VXLAN, "encap", {}),
    ("ttl-2-still-forwarded", PODS, P.from_pod(P.udp(), ttl=2), Stat.ENCAP_VXLAN, "encap", {}),
    ("exactly-mtu-minus-50", PODS, udp_of_l3_len(1450), Stat.ENCAP_VXLAN, "encap", {}),
    ("direct-peer", PODS, P.from_pod(P.icmp_echo(), dst="10.244.3.9"), Stat.FWD_DIRECT,
     direct_forwarded(P.from_pod(P.icmp_echo(), dst="10.244.3.9")), {}),
    ("direct-exactly-mtu", PODS, udp_of_l3_len(1500, "10.244.3.9"), Stat.FWD_DIRECT,
     direct_forwarded(udp_of_l3_len(1500, "10.244.3.9")), {}),
    ("gso-tcp-direct", PODS, P.from_pod(P.tcp(flags="A", payload=b"g" * 3000), dst="10.244.3.9"), Stat.FWD_DIRECT,
     direct_forwarded(P.from_pod(P.tcp(flags="A", payload=b"g" * 3000), dst="10.244.3.9")),
     dict(gso_size=1460, gso_segs=3)),
    # Misses and refusals: the kernel gets the packet exactly as it came.
    ("no-lease", PODS, P.from_pod(P.udp(), dst="10.244.9.9"), Stat.PASS_NO_ROUTE, SAME, {}),
    ("to-the-host", PODS, P.from_pod(P.udp(), dst=P.UNDERLAY_IP), Stat.PASS_NO_ROUTE, SAME, {}),
    ("own-subnet", PODS, P.from_pod(P.udp(), dst="10.244.1.7"), Stat.PASS_NO_ROUTE, SAME, {}),
    ("arp", PODS, Ether(dst="ff:ff:ff:ff:ff:ff", src=P.POD_MAC) / ARP(pdst="10.244.1.1", psrc=P.POD_IP),
     Stat.PASS_NOT_IPV4, SAME, {}),
    ("ipv6", PODS, Ether(dst=P.BRIDGE_MAC, src=P.POD_MAC) / IPv6(dst="fd00::1") / UDP(), Stat.PASS_NOT_IPV4, SAME, {}),
    ("vlan-tagged", PODS, P.vlan_tagged(P.from_pod(P.udp())), Stat.PASS_VLAN_TAGGED, SAME, {}),
    ("l2-broadcast", PODS, P.from_pod(P.udp(), eth_dst="ff:ff:ff:ff:ff:ff"), Stat.PASS_NOT_FOR_GATEWAY, SAME, {}),
    ("l2-multicast", PODS, P.from_pod(P.udp(), dst="10.244.2.255", eth_dst="01:00:5e:00:00:fb"),
     Stat.PASS_NOT_FOR_GATEWAY, SAME, {}),
    ("to-another-local-mac", PODS, P.from_pod(P.udp(), eth_dst="02:cc:00:00:00:07"),
     Stat.PASS_NOT_FOR_GATEWAY, SAME, {}),
    ("host-path-any-unicast-mac", HOST, P.from_pod(P.udp(), eth_dst="02:cc:00:00:00:07"),
     Stat.ENCAP_VXLAN, "encap-host", {}),
    ("ttl-1", PODS, P.from_pod(P.udp(), ttl=1), Stat.PASS_TTL_EXCEEDED, SAME, {}),
    ("ttl-0", PODS, P.from_pod(P.udp(), ttl=0), Stat.PASS_TTL_EXCEEDED, SAME, {}),
    ("mtu-minus-49", PODS, udp_of_l3_len(1451), Stat.PASS_OVERSIZE, SAME, {}),
    ("direct-mtu-plus-1", PODS, udp_of_l3_len(1501, "10.244.3.9"), Stat.PASS_OVERSIZE, SAME, {}),
    ("gso-segment-too-big", PODS, P.from_pod(P.tcp(flags="A", payload=b"g" * 3000)), Stat.PASS_OVERSIZE, SAME,
     dict(gso_size=1411, gso_segs=3)),  # 20 + 20 + 1411 = 1451 > 1450
    # test-run skbs carry no gso_type, so the kernel refuses to resize a GSO
    # packet: exercises the "adjust_room failed -> kernel path" branch.
    ("encap-refused", PODS, P.from_pod(P.tcp(flags="A", payload=b"g" * 3000)), Stat.PASS_ENCAP_FAILED, SAME,
     dict(gso_size=1410, gso_segs=3)),
    ("tot-len-beyond-frame", PODS, malformed(set_tot_len(500)), Stat.PASS_MALFORMED, SAME, {}),
    ("tot-len-below-header", PODS, malformed(set_tot_len(19)), Stat.PASS_MALFORMED, SAME, {}),
    ("ihl-4", PODS, malformed(set_byte(14, 0x44)), Stat.PASS_MALFORMED, SAME, {}),
    ("version-6-in-ipv4-frame", PODS, malformed(set_byte(14, 0x65)), Stat.PASS_MALFORMED, SAME, {}),
    # (A tc test-run refuses IPv4 frames shorter than 34 bytes; the XDP table covers those.)
    # flannel.<VNI> egress: routed by the kernel already, so no TTL change.
    ("host-udp", HOST, P.from_host(P.udp()), Stat.ENCAP_VXLAN, "encap-host", {}),
    ("host-ttl-1", HOST, P.from_host(P.icmp_echo(), ttl=1), Stat.ENCAP_VXLAN, "encap-host", {}),
    ("host-no-lease", HOST, P.from_host(P.udp(), dst="10.244.77.1"), Stat.PASS_NO_ROUTE, SAME, {}),
    ("host-direct", HOST, P.from_host(P.udp(), dst="10.244.3.1"), Stat.FWD_DIRECT, SAME, {}),
    # Routed pods (flannel-bpf-cni): whatever MAC the frame carries, it is for the router.
    ("routed-udp", ROUTED, P.from_pod(P.udp(), eth_dst="02:dd:00:00:00:01"), Stat.ENCAP_VXLAN, "encap", {}),
    ("routed-direct", ROUTED, P.from_pod(P.icmp_echo(), dst="10.244.3.9", eth_dst="02:dd:00:00:00:01"),
     Stat.FWD_DIRECT, direct_forwarded(P.from_pod(P.icmp_echo(), dst="10.244.3.9", eth_dst="02:dd:00:00:00:01")), {}),
    ("routed-to-a-local-pod", ROUTED, P.from_pod(P.udp(), src=OTHER_POD_IP, dst=P.POD_IP),
     Stat.LOCAL_TO_POD, delivered_locally(P.from_pod(P.udp(), src=OTHER_POD_IP, dst=P.POD_IP)), {}),
    ("routed-local-ttl-1", ROUTED, P.from_pod(P.udp(), src=OTHER_POD_IP, dst=P.POD_IP, ttl=1),
     Stat.PASS_TTL_EXCEEDED, SAME, {}),
    ("routed-not-a-pod", ROUTED, P.from_pod(P.udp(), dst="10.244.1.7"), Stat.PASS_NO_ROUTE, SAME, {}),
    ("routed-arp", ROUTED, Ether(dst="ff:ff:ff:ff:ff:ff", src=P.POD_MAC) / ARP(pdst="10.244.1.1", psrc=P.POD_IP),
     Stat.PASS_NOT_IPV4, SAME, {}),
    ("netkit-udp", NETKIT, from_netkit_pod(P.udp()), Stat.ENCAP_VXLAN, "encap", {}),
    ("netkit-tcp-data", NETKIT, from_netkit_pod(P.tcp(flags="PA", payload=b"d" * 1000)), Stat.ENCAP_VXLAN,
     "encap", {}),
    ("netkit-direct", NETKIT, from_netkit_pod(P.icmp_echo(), dst="10.244.3.9"), Stat.FWD_DIRECT,
     direct_forwarded(from_netkit_pod(P.icmp_echo(), dst="10.244.3.9")), {}),
    ("netkit-to-a-local-pod", NETKIT, from_netkit_pod(P.udp(), src=OTHER_POD_IP, dst=P.POD_IP),
     Stat.LOCAL_TO_POD, delivered_locally(from_netkit_pod(P.udp(), src=OTHER_POD_IP, dst=P.POD_IP)), {}),
    ("netkit-to-the-host", NETKIT, from_netkit_pod(P.udp(), dst=P.UNDERLAY_IP), Stat.PASS_NO_ROUTE, SAME, {}),
    ("netkit-oversize", NETKIT, from_netkit_pod(P.udp(payload=b"x" * 1423)), Stat.PASS_OVERSIZE, SAME, {}),
    # A bridge pod's frame to the gateway for a routed pod of the node: the kernel routes it.
    ("bridge-pod-to-a-routed-pod", PODS, P.from_pod(P.udp(), src=OTHER_POD_IP, dst=P.POD_IP),
     Stat.PASS_NO_ROUTE, SAME, {}),
]


def expected_output(kind, pkt: Ether, out: bytes) -> bytes:
    if kind == SAME:
        return bytes(pkt)
    if kind in ("encap", "encap-host"):
        got = Ether(out)
        return bytes(P.encapsulated(pkt, ip_id=got[IP].id, sport=got[UDP].sport, forwarded=kind == "encap"))
    return kind


@pytest.mark.parametrize("case_id, prog, pkt, stat, expect, ctx", CASES, ids=[c[0] for c in CASES])
def test_encap_table(node, case_id, prog, pkt, stat, expect, ctx):
    outcome = node.run(prog, pkt, **ctx)
    assert outcome.counted == {stat: (1, len(pkt))}, case_id
    assert outcome.result.retval == TC_RETVAL[STAT_ACTION[stat]]
    want = expected_output(expect, pkt, outcome.result.data)
    assert outcome.result.data.hex() == want.hex()
    if expect in ("encap", "encap-host"):
        assert 32768 <= Ether(outcome.result.data)[UDP].sport < 60999


def test_nothing_happens_before_the_node_is_configured(node):
    node.maps.clear_local_config()
    for prog in (PODS, HOST):
        pkt = P.from_pod(P.udp())
        outcome = node.run(prog, pkt)
        assert outcome.counted == {Stat.PASS_NO_CONFIG: (1, len(pkt))}
        assert (outcome.result.retval, outcome.result.data) == (TC_ACT_OK, bytes(pkt))


def test_source_port_is_per_flow_and_in_the_kernel_range(node):
    def sport(l4):
        return Ether(node.run(PODS, P.from_pod(l4)).result.data)[UDP].sport

    assert sport(P.udp(sport=1111)) == sport(P.udp(sport=1111))
    ports = {sport(P.udp(sport=1000 + i)) for i in range(64)}
    assert len(ports) > 48, "flows should spread over source ports"
    assert all(32768 <= p < 60999 for p in ports)


def test_outer_ip_id_changes_from_packet_to_packet_of_a_flow(node):
    """DF is clear, so a router may fragment: repeated IDs between two hosts would let
    fragments of different packets be glued together."""
    ids = [Ether(node.run(PODS, P.from_pod(P.udp())).result.data)[IP].id for _ in range(200)]
    assert len(set(ids)) == len(ids)


@pytest.mark.parametrize("gbp, mark, flags", [
    (False, 0x480007, 0x08000000),  # without GBP the mark never reaches the wire
    (True, 0, 0x08000000),          # the kernel adds the extension only for a nonzero mark
    (True, 0x7, 0x88000007),        # G flag, policy ID from mark bits 0-15
    (True, 0x480007, 0x88480007),   # and D (mark bit 22), A (mark bit 19)
    (True, 0xFFFF0000, 0x88480000), # other mark bits stay off the wire
])
def test_group_based_policy_flags_come_from_the_mark_as_the_kernel_writes_them(node, gbp, mark, flags):
    node.maps.set_local_config(P.node_config(gbp=gbp))
    out = Ether(node.run(PODS, P.from_pod(P.udp()), mark=mark).result.data)
    vxlan_header = bytes(out[UDP].payload)[:8]
    assert int.from_bytes(vxlan_header[:4], "big") == flags
    assert vxlan_header[4:] == (P.VNI << 8).to_bytes(4, "big")


def test_source_port_range_and_vxlan_settings_come_from_the_config(node):
    node.maps.set_local_config(P.node_config(src_port_min=50000, src_port_max=50010, vni=0xABCD,
                                             vxlan_port=4789, mtu=3000))
    pkt = udp_of_l3_len(2950)  # test-run takes at most a page
    out = Ether(node.run(PODS, pkt).result.data)
    assert 50000 <= out[UDP].sport < 50010
    assert (out[UDP].dport, out["VXLAN"].vni) == (4789, 0xABCD)
    assert node.run(PODS, udp_of_l3_len(2951)).stats == [Stat.PASS_OVERSIZE]


def test_a_peer_entry_pointing_at_ourselves_is_never_used(node):
    node.maps.upsert_peers([P.PeerEntry.make("10.244.8.0/24", P.UNDERLAY_IP, P.VTEP_MAC)])
    pkt = P.from_pod(P.udp(), dst="10.244.8.8")
    outcome = node.run(PODS, pkt)
    assert outcome.stats == [Stat.PASS_NO_ROUTE] and outcome.result.data == bytes(pkt)


def test_longest_prefix_wins_and_removed_peers_stop_matching(node):
    more_specific = P.PeerEntry.make("10.244.2.128/25", "198.18.0.9", "02:fb:00:00:01:09")
    node.maps.upsert_peers([more_specific])
    out = Ether(node.run(PODS, P.from_pod(P.udp(), dst="10.244.2.200")).result.data)
    assert out[IP].dst == "198.18.0.9" and out["VXLAN"].payload.dst == "02:fb:00:00:01:09"
    out = Ether(node.run(PODS, P.from_pod(P.udp(), dst="10.244.2.100")).result.data)
    assert out[IP].dst == "198.18.0.2"
    node.maps.remove_peers(["10.244.2.0/24", "10.244.2.128/25"])
    assert node.run(PODS, P.from_pod(P.udp(), dst="10.244.2.200")).stats == [Stat.PASS_NO_ROUTE]
