"""vxlan_xdp.c (XDP and tc decap) through BPF_PROG_TEST_RUN: a fixture table
of input packet -> expected counter, return code and output bytes per program."""
from __future__ import annotations

import os

import pytest
from pyroute2 import IPRoute
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Ether
from scapy.layers.vxlan import VXLAN

import fl_packets as P
from flannel_bpf.loader.bpf.layout import (STAT_ACTION, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_DROP,
                                       XDP_PASS, Action, Stat)
from flannel_bpf.lab.netns import create_netns, remove_netns
from flannel_bpf.loader.bpf.maps import EndpointEntry, PeerEntry
from flannel_bpf.loader.netns import in_netns, write_sysctl

pytestmark = pytest.mark.usefixtures("require_root")

RETVAL = {
    "xdp_decap": {Action.PASS: XDP_PASS, Action.DROP: XDP_DROP},
    "tc_decap": {Action.PASS: TC_ACT_OK, Action.DROP: TC_ACT_SHOT, Action.REDIRECT: TC_ACT_REDIRECT},
}
SAME = "same"


def mutated(pkt, offset: int, value: bytes):
    raw = bytearray(bytes(pkt))
    raw[offset:offset + len(value)] = value
    return raw


GOOD = P.vxlan_from_peer()
INNER_TO_OTHER_POD = IP(src="10.244.2.7", dst="10.244.1.77", ttl=63) / UDP(sport=5201, dport=40000) / b"x"
INNER_TTL_1 = IP(src="10.244.2.7", dst=P.POD_IP, ttl=1) / ICMP() / b"x"
OUTER_IP = 14
VXLAN_OFFSET = 14 + 20 + 8
DIRECT = P.direct_from_peer3()

# (id, input, expected for xdp_decap, expected for tc_decap); expected = (stat, output)
CASES = [
    ("to-local-pod", GOOD, (Stat.DECAP_XDP, P.decapped_xdp(GOOD)),
     (Stat.DECAP_TO_POD, P.delivered_to_pod(GOOD[VXLAN].payload[IP]))),
    ("tcp-inside", P.vxlan_from_peer(IP(src="10.244.2.7", dst=P.POD_IP) / P.tcp(flags="SA")), "decap", "decap"),
    ("icmp-inside", P.vxlan_from_peer(IP(src="10.244.2.7", dst=P.POD_IP) / P.icmp_echo()), "decap", "decap"),
    ("inner-ip-options", P.vxlan_from_peer(IP(src="10.244.2.7", dst=P.POD_IP, options=b"\x01" * 4) / P.udp()),
     "decap", "decap"),
    ("to-pod-not-on-this-node", P.vxlan_from_peer(INNER_TO_OTHER_POD), "decap",
     (Stat.PASS_NOT_LOCAL_ENDPOINT, SAME)),
    ("inner-ttl-1", P.vxlan_from_peer(INNER_TTL_1), "decap", (Stat.PASS_TTL_EXCEEDED, SAME)),
    ("wrong-vni", P.vxlan_from_peer(vni=2), (Stat.PASS_WRONG_VNI, SAME), (Stat.PASS_WRONG_VNI, SAME)),
    ("unknown-sender", P.vxlan_from_peer(src=P.STRANGER_IP),
     (Stat.DROP_UNKNOWN_PEER, SAME), (Stat.DROP_UNKNOWN_PEER, SAME)),
    ("unknown-sender-other-vni", P.vxlan_from_peer(src=P.STRANGER_IP, vni=2),
     (Stat.DROP_UNKNOWN_PEER, SAME), (Stat.DROP_UNKNOWN_PEER, SAME)),
    ("other-udp-port", P.vxlan_from_peer(dport=4789), (Stat.PASS_NOT_VXLAN, SAME), (Stat.PASS_NOT_VXLAN, SAME)),
    ("not-our-address", P.vxlan_from_peer(dst="198.18.0.9"), (Stat.PASS_NOT_VXLAN, SAME),
     (Stat.PASS_NOT_VXLAN, SAME)),
    ("not-our-mac", P.vxlan_from_peer(eth_dst="02:aa:00:00:00:99"), (Stat.PASS_NOT_VXLAN, SAME),
     (Stat.PASS_NOT_VXLAN, SAME)),
    ("tcp-to-the-port", Ether(dst=P.UPLINK_MAC) / IP(src="198.18.0.2", dst=P.UNDERLAY_IP) / TCP(dport=8472),
     (Stat.PASS_NOT_VXLAN, SAME), (Stat.PASS_NOT_VXLAN, SAME)),
    ("plain-ping-to-host", Ether(dst=P.UPLINK_MAC) / IP(src="198.18.0.2", dst=P.UNDERLAY_IP) / ICMP(),
     (Stat.PASS_NOT_VXLAN, SAME), (Stat.PASS_NOT_VXLAN, SAME)),
    ("arp", Ether(dst="ff:ff:ff:ff:ff:ff") / ARP(pdst=P.UNDERLAY_IP), (Stat.PASS_NOT_IPV4, SAME),
     (Stat.PASS_NOT_IPV4, SAME)),
    ("ipv6", Ether(dst=P.UPLINK_MAC) / IPv6() / UDP(dport=8472), (Stat.PASS_NOT_IPV4, SAME),
     (Stat.PASS_NOT_IPV4, SAME)),
    ("vlan-tagged", P.vlan_tagged(GOOD), (Stat.PASS_VLAN_TAGGED, SAME), (Stat.PASS_VLAN_TAGGED, SAME)),
    ("vlan-tagged-not-vxlan", P.vlan_tagged(DIRECT), (Stat.PASS_VLAN_TAGGED, SAME), (Stat.PASS_VLAN_TAGGED, SAME)),
    ("outer-ip-options", P.with_ip_options(GOOD), (Stat.PASS_OUTER_IP_OPTIONS, SAME),
     (Stat.PASS_OUTER_IP_OPTIONS, SAME)),
    ("outer-first-fragment", P.vxlan_from_peer(outer_ip=dict(flags="MF")), (Stat.PASS_OUTER_FRAGMENT, SAME),
     (Stat.PASS_OUTER_FRAGMENT, SAME)),
    ("outer-later-fragment", P.vxlan_from_peer(outer_ip=dict(frag=185)), (Stat.PASS_OUTER_FRAGMENT, SAME),
     (Stat.PASS_OUTER_FRAGMENT, SAME)),
    ("outer-bad-checksum", P.vxlan_from_peer(outer_ip=dict(chksum=0x1234)), (Stat.PASS_OUTER_BAD_CSUM, SAME),
     (Stat.PASS_OUTER_BAD_CSUM, SAME)),
    ("vxlan-i-flag-missing", P.vxlan_from_peer(vxlan_flags=0), (Stat.PASS_VXLAN_BAD_FLAGS, SAME),
     (Stat.PASS_VXLAN_BAD_FLAGS, SAME)),
    ("vxlan-gbp-flag", P.vxlan_from_peer(vxlan_flags=0x88), (Stat.PASS_VXLAN_BAD_FLAGS, SAME),
     (Stat.PASS_VXLAN_BAD_FLAGS, SAME)),
    ("vxlan-reserved-byte", mutated(GOOD, VXLAN_OFFSET + 7, b"\x01"), (Stat.PASS_VXLAN_BAD_FLAGS, SAME),
     (Stat.PASS_VXLAN_BAD_FLAGS, SAME)),
    ("inner-arp", P.vxlan_from_peer(ARP(pdst=P.POD_IP), inner_eth_type=0x0806),
     (Stat.PASS_INNER_NOT_IPV4, SAME), (Stat.PASS_INNER_NOT_IPV4, SAME)),
    ("inner-ipv4-version-5", mutated(GOOD, VXLAN_OFFSET + 8 + 14, b"\x55"), (Stat.PASS_MALFORMED, SAME),
     (Stat.PASS_MALFORMED, SAME)),
    ("outer-tot-len-beyond-frame", Ether(bytes(GOOD)[:-10]), (Stat.PASS_MALFORMED, SAME),
     (Stat.PASS_MALFORMED, SAME)),
    ("no-inner-frame", Ether(dst=P.UPLINK_MAC) / IP(src="198.18.0.2", dst=P.UNDERLAY_IP)
     / UDP(dport=8472, chksum=0) / VXLAN(vni=1), (Stat.PASS_MALFORMED, SAME), (Stat.PASS_MALFORMED, SAME)),
    ("udp-len-beyond-ip", mutated(GOOD, OUTER_IP + 20 + 4, (2000).to_bytes(2, "big")),
     (Stat.PASS_MALFORMED, SAME), (Stat.PASS_MALFORMED, SAME)),
    ("udp-len-too-small", mutated(GOOD, OUTER_IP + 20 + 4, (20).to_bytes(2, "big")),
     (Stat.PASS_MALFORMED, SAME), (Stat.PASS_MALFORMED, SAME)),
    # DIRECT (host-gw) peers: plain IPv4 into the pod, tc only.
    ("direct-peer-to-local-pod", DIRECT, (Stat.PASS_NOT_VXLAN, SAME),
     (Stat.DIRECT_TO_POD, P.delivered_to_pod(DIRECT[IP]))),
    ("direct-ttl-1", P.direct_from_peer3(ttl=1), (Stat.PASS_NOT_VXLAN, SAME), (Stat.PASS_TTL_EXCEEDED, SAME)),
    ("direct-to-other-pod", P.direct_from_peer3(dst="10.244.1.77"), (Stat.PASS_NOT_VXLAN, SAME),
     (Stat.PASS_NOT_VXLAN, SAME)),
    ("plain-from-a-vxlan-peer-subnet", P.direct_from_peer3(src="10.244.2.7"), (Stat.PASS_NOT_VXLAN, SAME),
     (Stat.PASS_NOT_FROM_DIRECT_PEER, SAME)),
    ("plain-from-outside", P.direct_from_peer3(src="192.0.2.1"), (Stat.PASS_NOT_VXLAN, SAME),
     (Stat.PASS_NOT_FROM_DIRECT_PEER, SAME)),
    ("direct-not-our-mac", P.direct_from_peer3(eth_dst="02:aa:00:00:00:99"), (Stat.PASS_NOT_VXLAN, SAME),
     (Stat.PASS_NOT_TO_UPLINK_MAC, SAME)),
    ("direct-to-broadcast-mac", P.direct_from_peer3(eth_dst="ff:ff:ff:ff:ff:ff"), (Stat.PASS_NOT_VXLAN, SAME),
     (Stat.PASS_NOT_TO_UPLINK_MAC, SAME)),
    # A peer's VXLAN the kernel decapsulates (a real peer is never cut off).
    ("peer-to-broadcast-mac", P.vxlan_from_peer(eth_dst="ff:ff:ff:ff:ff:ff"), (Stat.PASS_NOT_VXLAN, SAME),
     (Stat.PASS_NOT_VXLAN, SAME)),
    # Anti-spoofing: UDP to our VXLAN port from an address with no lease never gets to the kernel's
    # vxlan socket, whichever way it is framed.
    *[(f"unknown-sender-{name}", pkt, (stat, SAME), (stat, SAME)) for name, pkt, stat in [
        ("broadcast-mac", P.vxlan_from_peer(src=P.STRANGER_IP, eth_dst="ff:ff:ff:ff:ff:ff"),
         Stat.DROP_UNKNOWN_PEER_OTHER_MAC),
        ("multicast-mac", P.vxlan_from_peer(src=P.STRANGER_IP, eth_dst="01:00:5e:00:00:01"),
         Stat.DROP_UNKNOWN_PEER_OTHER_MAC),
        ("foreign-mac", P.vxlan_from_peer(src=P.STRANGER_IP, eth_dst="02:aa:00:00:00:99"),
         Stat.DROP_UNKNOWN_PEER_OTHER_MAC),
        ("ip-options", P.with_ip_options(P.vxlan_from_peer(src=P.STRANGER_IP)), Stat.DROP_UNKNOWN_PEER_IP_OPTIONS),
        ("first-fragment", P.vxlan_from_peer(src=P.STRANGER_IP, outer_ip=dict(flags="MF")),
         Stat.DROP_UNKNOWN_PEER_FRAGMENT),
        ("options-and-fragment", P.with_ip_options(P.vxlan_from_peer(src=P.STRANGER_IP, outer_ip=dict(flags="MF"))),
         Stat.DROP_UNKNOWN_PEER_FRAGMENT),
        ("vlan-tagged", P.vlan_tagged(P.vxlan_from_peer(src=P.STRANGER_IP)), Stat.DROP_UNKNOWN_PEER_VLAN_TAGGED),
        ("vlan-0", P.vlan_tagged(P.vxlan_from_peer(src=P.STRANGER_IP), vlan=0), Stat.DROP_UNKNOWN_PEER_VLAN_TAGGED),
        ("to-loopback", P.vxlan_from_peer(src=P.STRANGER_IP, dst="127.0.0.1"), Stat.DROP_UNKNOWN_PEER_OTHER_ADDRESS),
        ("to-limited-broadcast", P.vxlan_from_peer(src=P.STRANGER_IP, dst="255.255.255.255"),
         Stat.DROP_UNKNOWN_PEER_OTHER_ADDRESS),
        ("to-multicast", P.vxlan_from_peer(src=P.STRANGER_IP, dst="239.1.2.3"), Stat.DROP_UNKNOWN_PEER_OTHER_ADDRESS),
        ("gbp-flag", P.vxlan_from_peer(src=P.STRANGER_IP, vxlan_flags=0x88), Stat.DROP_UNKNOWN_PEER),
        ("bad-outer-checksum", P.vxlan_from_peer(src=P.STRANGER_IP, outer_ip=dict(chksum=0x1234)),
         Stat.DROP_UNKNOWN_PEER),
        ("no-inner-frame", Ether(dst=P.UPLINK_MAC) / IP(src=P.STRANGER_IP, dst=P.UNDERLAY_IP)
         / UDP(dport=8472, chksum=0) / VXLAN(vni=1), Stat.DROP_UNKNOWN_PEER),
        # A later fragment carries no UDP header: it cannot be told apart, and without its (dropped)
        # first fragment the kernel never reassembles it.
        ("later-fragment", P.vxlan_from_peer(src=P.STRANGER_IP, outer_ip=dict(frag=185)),
         Stat.PASS_OUTER_FRAGMENT),
        # Not ours: other ports and protocols from the same address, however framed.
        ("other-port", P.vxlan_from_peer(src=P.STRANGER_IP, dport=4789), Stat.PASS_NOT_VXLAN),
        ("other-port-ip-options", P.with_ip_options(P.vxlan_from_peer(src=P.STRANGER_IP, dport=4789)),
         Stat.PASS_NOT_VXLAN),
        ("other-port-first-fragment", P.vxlan_from_peer(src=P.STRANGER_IP, dport=4789, outer_ip=dict(flags="MF")),
         Stat.PASS_NOT_VXLAN),
        ("other-port-broadcast-mac", P.vxlan_from_peer(src=P.STRANGER_IP, dport=4789, eth_dst="ff:ff:ff:ff:ff:ff"),
         Stat.PASS_NOT_VXLAN),
        ("tcp-to-the-port", Ether(dst=P.UPLINK_MAC) / IP(src=P.STRANGER_IP, dst=P.UNDERLAY_IP) / TCP(dport=8472),
         Stat.PASS_NOT_VXLAN),
    ]],
]


def resolve(expect, pkt, prog):
    if expect == "decap":  # the fast path of each program
        inner_ip = Ether(bytes(pkt))[VXLAN].payload[IP]
        return ((Stat.DECAP_XDP, P.decapped_xdp(Ether(bytes(pkt)))) if prog == "xdp_decap"
                else (Stat.DECAP_TO_POD, P.delivered_to_pod(inner_ip)))
    stat, out = expect
    return stat, bytes(pkt) if out is SAME else out


@pytest.mark.parametrize("prog", ["xdp_decap", "tc_decap"])
@pytest.mark.parametrize("case_id, pkt, xdp_expect, tc_expect", CASES, ids=[c[0] for c in CASES])
def test_decap_table(node, prog, case_id, pkt, xdp_expect, tc_expect):
    stat, want = resolve(xdp_expect if prog == "xdp_decap" else tc_expect, pkt, prog)
    outcome = node.run(prog, pkt)
    assert outcome.counted == {stat: (1, len(bytes(pkt)))}, case_id
    assert outcome.result.retval == RETVAL[prog][STAT_ACTION[stat]]
    assert outcome.result.data.hex() == bytes(want).hex()


@pytest.mark.parametrize("length", [14, 20, 33, 34, 60, 83])
def test_xdp_truncated_frames_pass(node, length):
    """Short frames (a test-run needs 14 bytes; tc needs 34 for IPv4, so XDP only)."""
    pkt = bytes(GOOD)[:length]
    outcome = node.run("xdp_decap", pkt)
    assert outcome.counted == {Stat.PASS_MALFORMED: (1, length)}
    assert (outcome.result.retval, outcome.result.data) == (XDP_PASS, pkt)


def test_nothing_happens_before_the_node_is_configured(node):
    node.maps.clear_local_config()
    for prog, ok in (("xdp_decap", XDP_PASS), ("tc_decap", TC_ACT_OK)):
        outcome = node.run(prog, GOOD)
        assert outcome.counted == {Stat.PASS_NO_CONFIG: (1, len(GOOD))}
        assert (outcome.result.retval, outcome.result.data) == (ok, bytes(GOOD))


def test_a_peer_is_trusted_only_while_it_holds_a_lease(node):
    assert node.run("xdp_decap", GOOD).stats == [Stat.DECAP_XDP]
    node.maps.remove_peers([P.PEER2.subnet])
    assert node.run("xdp_decap", GOOD).stats == [Stat.DROP_UNKNOWN_PEER]
    # The same address back with another subnet: trusted again.
    node.maps.upsert_peers([PeerEntry.make("10.244.20.0/24", P.PEER2.underlay_ip, P.PEER2.vtep_mac)])
    assert node.run("xdp_decap", GOOD).stats == [Stat.DECAP_XDP]


def test_endpoints_decide_tc_delivery(node):
    inner = IP(src="10.244.2.7", dst="10.244.1.9", ttl=9) / UDP() / b"z"
    pkt = P.vxlan_from_peer(inner)
    assert node.run("tc_decap", pkt).stats == [Stat.PASS_NOT_LOCAL_ENDPOINT]
    node.maps.set_endpoints([EndpointEntry.make("10.244.1.9", 7, "02:cc:00:00:00:09")])
    out = node.run("tc_decap", pkt)
    assert out.stats == [Stat.DECAP_TO_POD]
    assert Ether(out.result.data).dst == "02:cc:00:00:00:09"
    node.maps.remove_endpoints(["10.244.1.9"])
    assert node.run("tc_decap", pkt).stats == [Stat.PASS_NOT_LOCAL_ENDPOINT]


def test_our_encap_decaps_on_the_peer_to_the_original_packet(node):
    """Round trip: node 1 encapsulates, node 2's programs take it apart again."""
    sent = P.from_pod(P.tcp(flags="PA", payload=b"r" * 200), dst="10.244.2.7")
    wire = bytearray(node.run("tc_encap_from_pods", sent).result.data)
    wire[0:6] = bytes.fromhex(P.PEER2_UPLINK_MAC.replace(":", ""))  # what redirect_neigh fills in

    node.maps.set_local_config(P.node_config(underlay_ip=P.PEER2.underlay_ip, subnet=P.PEER2.subnet,
                                             vtep_mac=P.PEER2.vtep_mac, uplink_mac=P.PEER2_UPLINK_MAC))
    node.maps.sync_peers([PeerEntry.make("10.244.1.0/24", P.UNDERLAY_IP, P.VTEP_MAC)])
    node.maps.set_endpoints([EndpointEntry.make("10.244.2.7", 3, "02:cc:00:00:02:07")])

    def after_hops(hops):
        ip = sent[IP].copy()
        ip.ttl -= hops
        del ip.chksum
        return bytes(ip)

    xdp = node.run("xdp_decap", bytes(wire))  # the stack then routes it (TTL - 1 there)
    assert xdp.stats == [Stat.DECAP_XDP]
    assert bytes(Ether(xdp.result.data)[IP]) == after_hops(1)
    tc = node.run("tc_decap", bytes(wire))  # router on both nodes: TTL - 2
    assert tc.stats == [Stat.DECAP_TO_POD]
    delivered = Ether(tc.result.data)
    assert (delivered.src, delivered.dst) == (P.BRIDGE_MAC, "02:cc:00:00:02:07")
    assert bytes(delivered[IP]) == after_hops(2)


def test_a_strangers_vxlan_only_passing_through_is_not_ours(node):
    """The FIB decides what "addressed to this node" means beyond our underlay address: VXLAN from
    a non-peer to a destination this node routes elsewhere is passed, to one it would deliver
    locally (or nowhere) dropped. Run in a namespace of its own, whose lo is the uplink here."""
    netns = f"fbpf-t{os.getpid()}-fib"
    transit = P.vxlan_from_peer(src=P.STRANGER_IP, dst="198.19.5.7")
    create_netns(netns)
    try:
        with in_netns(netns), IPRoute() as ipr:
            ipr.link("set", index=P.LO_IFINDEX, state="up")
            write_sysctl("net.ipv4.conf.all.forwarding", 1)
            write_sysctl("net.ipv4.conf.lo.forwarding", 1)
            for prog in ("xdp_decap", "tc_decap"):
                assert node.run(prog, transit).stats == [Stat.DROP_UNKNOWN_PEER_OTHER_ADDRESS]  # no route
            ipr.route("add", dst="198.19.5.0/24", oif=P.LO_IFINDEX)
            for prog in ("xdp_decap", "tc_decap"):
                outcome = node.run(prog, transit)
                assert outcome.stats == [Stat.PASS_NOT_VXLAN], prog
                assert outcome.result.data == bytes(transit)
    finally:
        remove_netns(netns)
