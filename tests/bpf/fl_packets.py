"""The node the packet tests pretend to be, and scapy builders for its traffic.

Node 1 (us): underlay 198.18.0.1, subnet 10.244.1.0/24. Peers: node 2
(10.244.2.0/24, VXLAN via 198.18.0.2) and node 3 (10.244.3.0/24, DIRECT via
198.18.0.3). One local pod 10.244.1.5.
"""
from __future__ import annotations

import ipaddress

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Dot1Q, Ether
from scapy.layers.vxlan import VXLAN

from flannel_bpf.loader.bpf.layout import PeerMode
from flannel_bpf.loader.bpf.maps import EndpointEntry, NodeConfig, PeerEntry

LO_IFINDEX = 1  # test-run skbs live on lo; redirect targets are never used

UNDERLAY_IP = "198.18.0.1"
UPLINK_MAC = "02:aa:00:00:00:01"
VTEP_MAC = "02:fb:00:00:01:01"
BRIDGE_MAC = "02:bb:00:00:00:01"  # cni0, the pods' gateway
VNI = 1
VXLAN_PORT = 8472

PEER2 = PeerEntry.make("10.244.2.0/24", "198.18.0.2", "02:fb:00:00:01:02", PeerMode.VXLAN)
PEER3 = PeerEntry.make("10.244.3.0/24", "198.18.0.3", "02:fb:00:00:01:03", PeerMode.DIRECT)
PEER2_UPLINK_MAC = "02:aa:00:00:00:02"
PEER3_UPLINK_MAC = "02:aa:00:00:00:03"
STRANGER_IP = "198.18.0.66"  # holds no lease

POD_IP = "10.244.1.5"
POD_MAC = "02:cc:00:00:00:05"
POD_HOST_IFINDEX = 1
LOCAL_POD = EndpointEntry.make(POD_IP, POD_HOST_IFINDEX, POD_MAC)


def node_config(**overrides) -> NodeConfig:
    fields = dict(underlay_ip=UNDERLAY_IP, subnet="10.244.1.0/24", vtep_mac=VTEP_MAC,
                  uplink_mac=UPLINK_MAC, uplink_ifindex=LO_IFINDEX, vni=VNI, vxlan_port=VXLAN_PORT,
                  mtu=1500, bridge_mac=BRIDGE_MAC, bridge_ifindex=LO_IFINDEX)
    fields.update(overrides)
    return NodeConfig.make(**fields)


# --- what arrives at cni0 from a pod ---------------------------------------
def from_pod(l4=None, dst="10.244.2.7", src=POD_IP, ttl=64, tos=0, eth_dst=BRIDGE_MAC, **ip):
    l4 = UDP(sport=40000, dport=5201) / b"payload" if l4 is None else l4
    return Ether(dst=eth_dst, src=POD_MAC) / IP(src=src, dst=dst, ttl=ttl, tos=tos, **ip) / l4


def from_host(l4=None, dst="10.244.2.7", src="10.244.1.0", **ip):
    """What the kernel hands to flannel.<VNI>'s egress: already routed, MACs from its neighbour."""
    return from_pod(l4, dst=dst, src=src, eth_dst=PEER2.vtep_mac, **ip)


def encapsulated(inner: Ether, peer: PeerEntry = PEER2, ip_id: int = 0, sport: int = 0,
                 forwarded: bool = True) -> Ether:
    """What tc_route writes for `inner`: flannel's vxlan framing; the outer
    destination MAC is left zero for bpf_redirect_neigh to fill."""
    inner_ip = inner[IP].copy()
    if forwarded:
        inner_ip.ttl -= 1
        del inner_ip.chksum
    ecn = inner[IP].tos & 3
    return (Ether(src=UPLINK_MAC, dst="00:00:00:00:00:00")
            / IP(src=UNDERLAY_IP, dst=str(peer.underlay_ip), ttl=64, id=ip_id, flags=0,
                 tos=2 if ecn == 3 else ecn)
            / UDP(sport=sport, dport=VXLAN_PORT, chksum=0)
            / VXLAN(flags=0x08, vni=VNI)
            / Ether(src=VTEP_MAC, dst=peer.vtep_mac) / inner_ip)


# --- what arrives on the uplink ---------------------------------------------
def vxlan_from_peer(inner_l3=None, src=str(PEER2.underlay_ip), dst=UNDERLAY_IP, vni=VNI,
                    dport=VXLAN_PORT, eth_dst=UPLINK_MAC, inner_eth_type=0x0800, vxlan_flags=0x08,
                    outer_ip: dict | None = None) -> Ether:
    inner_l3 = (IP(src="10.244.2.7", dst=POD_IP, ttl=63) / UDP(sport=5201, dport=40000) / b"reply"
                if inner_l3 is None else inner_l3)
    return (Ether(dst=eth_dst, src=PEER2_UPLINK_MAC)
            / IP(src=src, dst=dst, ttl=64, **(outer_ip or {}))
            / UDP(sport=41234, dport=dport, chksum=0)
            / VXLAN(flags=vxlan_flags, vni=vni)
            / Ether(src=PEER2.vtep_mac, dst=VTEP_MAC, type=inner_eth_type) / inner_l3)


def decapped_xdp(pkt: Ether) -> bytes:
    """XDP decap result: the inner frame, addressed to the uplink."""
    inner = pkt[VXLAN].payload.copy()
    inner.dst = UPLINK_MAC
    return bytes(inner)


def delivered_to_pod(inner_ip: IP, forwarded: bool = True) -> bytes:
    """tc decap result: gateway -> pod MAC, TTL - 1."""
    ip = inner_ip.copy()
    if forwarded:
        ip.ttl -= 1
        del ip.chksum
    return bytes(Ether(dst=POD_MAC, src=BRIDGE_MAC) / ip)


def direct_from_peer3(dst=POD_IP, src="10.244.3.9", ttl=63, eth_dst=UPLINK_MAC) -> Ether:
    return Ether(dst=eth_dst, src=PEER3_UPLINK_MAC) / IP(src=src, dst=dst, ttl=ttl) / ICMP() / b"ping"


def with_ip_options(pkt: Ether) -> Ether:
    """A copy whose outer IPv4 header carries a 4-byte option (NOP x4)."""
    out = pkt.copy()
    out[IP].options = b"\x01\x01\x01\x01"
    del out[IP].ihl, out[IP].len, out[IP].chksum
    return Ether(bytes(out))


def vlan_tagged(pkt: Ether, vlan: int = 42) -> Ether:
    return Ether(dst=pkt.dst, src=pkt.src) / Dot1Q(vlan=vlan) / pkt.payload.copy()


def tcp(sport=40000, dport=5201, flags="S", payload=b""):
    return TCP(sport=sport, dport=dport, flags=flags, seq=1000, window=64240) / payload


def udp(sport=40000, dport=5201, payload=b"payload"):
    return UDP(sport=sport, dport=dport) / payload


def icmp_echo(payload=b"ping"):
    return ICMP(type=8, id=7, seq=1) / payload


def subnet_of(addr: str) -> ipaddress.IPv4Network:
    return ipaddress.ip_network(addr + "/24", strict=False)
