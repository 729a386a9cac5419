"""Our encapsulation against the kernel vxlan device set up as flanneld does.

A three-namespace lab: a pod, host 1 (pod veth, flannel.1, uplink) and host 2
(uplink, flannel.1). The same inner frame is (a) sent by the pod and
encapsulated by host 1's kernel, captured on host 2's uplink, and (b) run
through tc_encap_from_pods by test-run. The two must agree field by field,
except the outer IPv4 ID (the kernel's comes from its per-destination ID
generator, ours from a per-CPU packet count: both vary per packet as DF is
clear), the IPv4
header checksum that covers it (both are checked for validity instead), the
outer destination MAC (bpf_redirect_neigh fills it in on transmit), and the
outer UDP checksum: the kernel computes it, we send 0 (see below).
"""
from __future__ import annotations

import os
import select
import socket
import struct
import subprocess
import time

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether
from scapy.layers.vxlan import VXLAN

import fl_packets as P
from flannel_bpf.loader.bpf.layout import Stat
from flannel_bpf.loader.bpf.maps import EndpointEntry, PeerEntry
from flannel_bpf.lab.netns import create_netns, remove_netns
from flannel_bpf.loader.netns import in_netns, write_sysctl

pytestmark = pytest.mark.usefixtures("require_root")

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
CAPTURE_TIMEOUT = 3.0


def ip(netns: str, *args: str) -> None:
    cmd = ["ip", "-n", netns, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {done.stderr.strip()}")


def bridge_fdb(netns: str, *args: str) -> None:
    subprocess.run(["bridge", "-n", netns, "fdb", *args], check=True, capture_output=True, timeout=10)


def add_flannel_vxlan(netns: str, local_ip: str, vtep_mac: str, subnet_zero: str, gbp: bool = False) -> None:
    """flannel.1 as flanneld's vxlan backend makes it."""
    ip(netns, "link", "add", "flannel.1", "type", "vxlan", "id", "1", "local", local_ip, "dev", "uplink",
       "nolearning", "dstport", "8472", *(["gbp"] if gbp else []))
    ip(netns, "link", "set", "flannel.1", "address", vtep_mac, "mtu", "1450", "up")
    ip(netns, "addr", "add", f"{subnet_zero}/32", "dev", "flannel.1")


def add_vxlan_peer(netns: str, subnet: str, subnet_zero: str, vtep_mac: str, public_ip: str) -> None:
    ip(netns, "neigh", "replace", subnet_zero, "lladdr", vtep_mac, "dev", "flannel.1", "nud", "permanent")
    bridge_fdb(netns, "replace", vtep_mac, "dev", "flannel.1", "dst", public_ip, "self", "permanent")
    ip(netns, "route", "replace", subnet, "via", subnet_zero, "dev", "flannel.1", "onlink")


@pytest.fixture(scope="module")
def wire_lab():
    yield from make_wire_lab(gbp=False)


# What host 1's iptables marks forwarded pod traffic with in the GBP lab: policy 7, D and A set.
GBP_MARK = 0x480007


@pytest.fixture(scope="module")
def gbp_wire_lab():
    """The same with Backend.GBP: both devices with gbp, and forwarded packets marked."""
    for lab in make_wire_lab(gbp=True):
        subprocess.run(["ip", "netns", "exec", lab["host1"], "iptables", "-t", "mangle", "-A", "FORWARD",
                        "-j", "MARK", "--set-mark", hex(GBP_MARK)], check=True, capture_output=True, timeout=10)
        yield lab


def make_wire_lab(gbp: bool):
    """pod --veth-- host1 [flannel.1] --veth uplink-- host2 [flannel.1], 198.18.0.0/24 underlay."""
    tag = f"fbw{'g' if gbp else ''}{os.getpid()}"
    pod, host1, host2 = f"{tag}-pod", f"{tag}-h1", f"{tag}-h2"
    made = []
    try:
        for ns in (pod, host1, host2):
            create_netns(ns)
            made.append(ns)
            ip(ns, "link", "set", "lo", "up")
        ip(host1, "link", "add", "uplink", "address", P.UPLINK_MAC, "type", "veth",
           "peer", "name", "uplink", "address", P.PEER2_UPLINK_MAC, "netns", host2)
        ip(host1, "link", "add", "vethpod", "address", P.BRIDGE_MAC, "type", "veth",
           "peer", "name", "eth0", "address", P.POD_MAC, "netns", pod)
        for ns, addr in ((host1, "198.18.0.1/24"), (host2, "198.18.0.2/24")):
            ip(ns, "addr", "add", addr, "dev", "uplink")
            ip(ns, "link", "set", "uplink", "up")
        ip(host1, "addr", "add", "10.244.1.1/24", "dev", "vethpod")
        ip(host1, "link", "set", "vethpod", "up")
        ip(pod, "addr", "add", f"{P.POD_IP}/24", "dev", "eth0")
        ip(pod, "link", "set", "eth0", "mtu", "1450", "up")
        write_sysctl("net.ipv4.ip_forward", 1, netns=host1)
        # Static underlay neighbours: no ARP exchange in the captures.
        ip(host1, "neigh", "replace", "198.18.0.2", "lladdr", P.PEER2_UPLINK_MAC, "dev", "uplink", "nud", "permanent")
        add_flannel_vxlan(host1, "198.18.0.1", P.VTEP_MAC, "10.244.1.0", gbp)
        add_vxlan_peer(host1, "10.244.2.0/24", "10.244.2.0", P.PEER2.vtep_mac, "198.18.0.2")
        add_flannel_vxlan(host2, "198.18.0.2", P.PEER2.vtep_mac, "10.244.2.0", gbp)
        add_vxlan_peer(host2, "10.244.1.0/24", "10.244.1.0", P.VTEP_MAC, "198.18.0.1")
        yield dict(pod=pod, host1=host1, host2=host2)
    finally:
        for ns in made:
            remove_netns(ns)


def packet_socket(netns: str, ifname: str) -> socket.socket:
    with in_netns(netns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        sock.bind((ifname, 0))
    return sock


def receive(sock: socket.socket, match) -> bytes:
    """The first received frame for which match(frame) holds, within CAPTURE_TIMEOUT."""
    deadline = time.monotonic() + CAPTURE_TIMEOUT
    while (left := deadline - time.monotonic()) > 0:
        if not select.select([sock], [], [], left)[0]:
            break
        frame, addr = sock.recvfrom(65535)
        if addr[2] != PACKET_OUTGOING and match(frame):
            return frame
    raise AssertionError("expected frame not captured")


def vxlan_carrying(marker: bytes):
    def match(frame: bytes) -> bool:
        pkt = Ether(frame)
        return UDP in pkt and pkt[UDP].dport == 8472 and marker in frame
    return match


def kernel_encapsulates(lab, inner: Ether) -> bytes:
    """What host 1's kernel puts on the wire when the pod sends `inner`."""
    capture = packet_socket(lab["host2"], "uplink")
    sender = packet_socket(lab["pod"], "eth0")
    try:
        sender.send(bytes(inner))
        return receive(capture, vxlan_carrying(bytes(inner[IP].payload)[-12:]))
    finally:
        sender.close()
        capture.close()


def unique(l4, n: int):
    """Distinct payload per case so captures cannot mix cases up."""
    return l4 / f"case-{n:04d}-{os.getpid()}".encode()


INNER = [
    ("udp", lambda n: P.from_pod(unique(P.udp(), n))),
    ("tcp-syn-ect0", lambda n: P.from_pod(unique(P.tcp(sport=41000 + n), n), tos=2)),
    ("icmp-ce-dscp", lambda n: P.from_pod(unique(P.icmp_echo(), n), tos=0xB8 | 3)),
    ("tcp-1400", lambda n: P.from_pod(unique(P.tcp(flags="PA", payload=b"q" * 1350), n))),
    ("inner-df", lambda n: P.from_pod(unique(P.udp(sport=777), n), flags="DF")),
]


def udp_checksum_or_offload_seed(pkt: Ether) -> set:
    """The full UDP checksum, or what CHECKSUM_PARTIAL leaves for the NIC to
    finish (the pseudo-header sum): a veth never finishes it."""
    again = IP(bytes(pkt[IP]))
    del again[UDP].chksum
    full = IP(bytes(again))[UDP].chksum
    words = struct.unpack("!4H", socket.inet_aton(pkt[IP].src) + socket.inet_aton(pkt[IP].dst))
    seed = sum(words) + 17 + pkt[UDP].len
    while seed >> 16:
        seed = (seed & 0xFFFF) + (seed >> 16)
    return {full, seed}


def ipv4_header_ok(pkt: Ether) -> bool:
    hdr = IP(bytes(pkt[IP])[:20])
    again = hdr.copy()
    del again.chksum
    return IP(bytes(again)).chksum == hdr.chksum


@pytest.mark.parametrize("n, make", [(n, make) for n, (_, make) in enumerate(INNER)], ids=[i[0] for i in INNER])
def test_encap_matches_the_kernel_vxlan_device(wire_lab, node, n, make):
    inner = make(n)
    kernel = Ether(kernel_encapsulates(wire_lab, inner))
    ours_run = node.run("tc_encap_from_pods", inner)
    assert ours_run.stats == [Stat.ENCAP_VXLAN]
    ours = Ether(ours_run.result.data)

    assert ipv4_header_ok(kernel) and ipv4_header_ok(ours)
    # Outer Ethernet: same source; the destination comes from the neighbour table at transmit.
    assert (ours.src, ours.type) == (kernel.src, kernel.type) == (P.UPLINK_MAC, 0x0800)
    for field in ("version", "ihl", "tos", "len", "flags", "frag", "ttl", "proto", "src", "dst"):
        assert getattr(ours[IP], field) == getattr(kernel[IP], field), f"outer IPv4 {field}"
    # Same flow hash, same mapping into 32768-60999: the kernel's port exactly.
    for field in ("sport", "dport", "len"):
        assert getattr(ours[UDP], field) == getattr(kernel[UDP], field), f"UDP {field}"
    # The one deliberate difference: the kernel device (udpcsum is its default, and
    # flanneld does not change it) checksums the outer UDP, we send 0, as RFC 7348
    # recommends and every receiver must accept (see the next test).
    assert ours[UDP].chksum == 0
    assert kernel[UDP].chksum in udp_checksum_or_offload_seed(kernel)
    # VXLAN header, inner Ethernet and the forwarded inner packet (TTL - 1): byte for byte.
    assert bytes(ours[VXLAN]) == bytes(kernel[VXLAN])


def test_group_based_policy_header_matches_the_kernel_device_with_gbp(gbp_wire_lab, node):
    """Backend.GBP: the kernel device writes skb->mark into the VXLAN header (G, D, A flags and
    the policy ID); for the same inner packet and mark, ours must write the same 8 bytes."""
    inner = P.from_pod(unique(P.udp(sport=4242), 8000))
    kernel = Ether(kernel_encapsulates(gbp_wire_lab, inner))
    node.maps.set_local_config(P.node_config(gbp=True))
    ours = Ether(node.run("tc_encap_from_pods", inner, mark=GBP_MARK).result.data)
    assert bytes(kernel[UDP].payload)[:4] == bytes.fromhex("88480007")  # the lab marks as meant
    assert bytes(ours[VXLAN]) == bytes(kernel[VXLAN])


def test_the_kernel_vxlan_device_accepts_our_encapsulation(wire_lab, node):
    inner = P.from_pod(unique(P.udp(sport=999), 9000))
    frame = bytearray(node.run("tc_encap_from_pods", inner).result.data)
    frame[0:6] = bytes.fromhex(P.PEER2_UPLINK_MAC.replace(":", ""))  # what redirect_neigh writes
    capture = packet_socket(wire_lab["host2"], "flannel.1")
    sender = packet_socket(wire_lab["host1"], "uplink")
    try:
        sender.send(bytes(frame))
        got = Ether(receive(capture, lambda f: bytes(inner[IP].payload)[-12:] in f))
    finally:
        sender.close()
        capture.close()
    assert bytes(got) == bytes(Ether(bytes(frame))[VXLAN].payload)


def test_kernel_encapsulation_decaps_in_our_programs(wire_lab, node):
    """What a stock flannel node sends, taken apart by our XDP and tc decap on host 2."""
    inner = P.from_pod(unique(P.tcp(flags="PA", payload=b"k" * 300), 9001))
    wire = kernel_encapsulates(wire_lab, inner)
    node.maps.set_local_config(P.node_config(underlay_ip="198.18.0.2", subnet="10.244.2.0/24",
                                             vtep_mac=P.PEER2.vtep_mac, uplink_mac=P.PEER2_UPLINK_MAC))
    node.maps.sync_peers([PeerEntry.make("10.244.1.0/24", "198.18.0.1", P.VTEP_MAC)])
    kernel_inner = Ether(wire)[VXLAN].payload

    xdp = node.run("xdp_decap", wire)
    assert xdp.stats == [Stat.DECAP_XDP]
    assert Ether(xdp.result.data) == Ether(dst=P.PEER2_UPLINK_MAC, src=kernel_inner.src) / kernel_inner[IP]
    node.maps.set_endpoints([EndpointEntry.make("10.244.2.7", 5, "02:cc:00:00:02:07")])
    tc = node.run("tc_decap", wire)
    assert tc.stats == [Stat.DECAP_TO_POD]
    assert Ether(tc.result.data)[IP].ttl == kernel_inner[IP].ttl - 1
