"""Python mirror of ebpf/lib/flannel_maps.h: map key/value layouts, peer
modes and counter ids (its FL_VXLAN_OVERHEAD is netdefs.VXLAN_OVERHEAD).
tests/bpf/test_layout.py compiles a probe against the header and fails on
any difference, so keep the two in step.

Addresses in these structs are 4 bytes in network order (``Ip4``), MACs 6
bytes (``Mac``); every other integer is host order, as in the header.
"""
from __future__ import annotations

import ctypes
import enum
import ipaddress

ETH_ALEN = 6
DEFAULT_SRC_PORT_RANGE = (32768, 60999)  # the kernel's ip_local_port_range

Mac = ctypes.c_uint8 * ETH_ALEN
Ip4 = ctypes.c_uint8 * 4


class PeerMode(enum.IntEnum):
    VXLAN = 1
    DIRECT = 2


class Stat(enum.IntEnum):
    """enum fl_stat: one counter per outcome of a program run."""

    ENCAP_VXLAN = 0
    FWD_DIRECT = 1
    PASS_NO_ROUTE = 2
    PASS_NOT_FOR_GATEWAY = 3
    PASS_OVERSIZE = 4
    PASS_ENCAP_FAILED = 5
    PASS_NO_CONFIG = 6
    PASS_NOT_IPV4 = 7
    PASS_MALFORMED = 8
    PASS_TTL_EXCEEDED = 9
    DROP_WRITE_FAILED = 10
    DECAP_XDP = 11
    DECAP_TO_POD = 12
    DIRECT_TO_POD = 13
    PASS_NOT_VXLAN = 14
    PASS_OUTER_IP_OPTIONS = 15
    PASS_OUTER_FRAGMENT = 16
    PASS_OUTER_BAD_CSUM = 17
    PASS_VXLAN_BAD_FLAGS = 18
    PASS_WRONG_VNI = 19
    PASS_INNER_NOT_IPV4 = 20
    PASS_NOT_LOCAL_ENDPOINT = 21
    PASS_DECAP_FAILED = 22
    DROP_UNKNOWN_PEER = 23
    PASS_VLAN_TAGGED = 24
    PASS_NOT_TO_UPLINK_MAC = 25
    PASS_NOT_FROM_DIRECT_PEER = 26
    DROP_UNKNOWN_PEER_OTHER_MAC = 27
    DROP_UNKNOWN_PEER_IP_OPTIONS = 28
    DROP_UNKNOWN_PEER_FRAGMENT = 29
    DROP_UNKNOWN_PEER_VLAN_TAGGED = 30
    DROP_UNKNOWN_PEER_OTHER_ADDRESS = 31
    LOCAL_TO_POD = 32

    @property
    def counter_name(self) -> str:
        """The name users see (status, metrics): lower case, e.g. ``encap_vxlan``."""
        return self.name.lower()


STAT_MAX = len(Stat)


class Action(enum.Enum):
    """What a program does with a packet for a given outcome."""

    PASS = "pass"          # TC_ACT_OK / XDP_PASS, packet as it came (or decapped, for DECAP_XDP)
    DROP = "drop"          # TC_ACT_SHOT / XDP_DROP
    REDIRECT = "redirect"  # TC_ACT_REDIRECT


STAT_ACTION = {
    s: (Action.REDIRECT if s in (Stat.ENCAP_VXLAN, Stat.FWD_DIRECT, Stat.DECAP_TO_POD, Stat.DIRECT_TO_POD,
                                 Stat.LOCAL_TO_POD)
        else Action.DROP if s.name.startswith("DROP_") else Action.PASS)
    for s in Stat
}

# Return codes (uapi/linux/pkt_cls.h, uapi/linux/bpf.h)
TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT = 0, 2, 7
XDP_DROP, XDP_PASS = 1, 2


class FlLpmV4Key(ctypes.Structure):
    """struct fl_lpm_v4_key: key of fl_peers."""
    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", Ip4)]


class FlPeer(ctypes.Structure):
    """struct fl_peer: value of fl_peers."""
    _fields_ = [("underlay_ip", Ip4), ("vtep_mac", Mac), ("mode", ctypes.c_uint8), ("pad", ctypes.c_uint8)]


class PeerIpKey(ctypes.Structure):
    """__be32 key of fl_peer_ips and fl_endpoints."""
    _fields_ = [("addr", Ip4)]


class FlPeerIp(ctypes.Structure):
    """struct fl_peer_ip: value of fl_peer_ips."""
    _fields_ = [("present", ctypes.c_uint8)]


class FlEndpoint(ctypes.Structure):
    """struct fl_endpoint: value of fl_endpoints."""
    _fields_ = [("ifindex", ctypes.c_uint32), ("mac", Mac), ("pad", ctypes.c_uint8 * 2)]


class FlLocalConfig(ctypes.Structure):
    """struct fl_local_config: the one value of fl_config."""
    _fields_ = [
        ("configured", ctypes.c_uint32),
        ("underlay_ip", Ip4),
        ("subnet_addr", Ip4),
        ("subnet_prefixlen", ctypes.c_uint32),
        ("vni", ctypes.c_uint32),
        ("vxlan_port", ctypes.c_uint16),
        ("src_port_min", ctypes.c_uint16),
        ("src_port_max", ctypes.c_uint16),
        ("mtu", ctypes.c_uint16),
        ("uplink_ifindex", ctypes.c_uint32),
        ("bridge_ifindex", ctypes.c_uint32),
        ("vxlan_ifindex", ctypes.c_uint32),
        ("vtep_mac", Mac),
        ("uplink_mac", Mac),
        ("bridge_mac", Mac),
        ("gbp", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
    ]


class ArrayKey(ctypes.Structure):
    """__u32 index of fl_config and fl_counters."""
    _fields_ = [("index", ctypes.c_uint32)]


class FlCounter(ctypes.Structure):
    """struct fl_counter: per-CPU value of fl_counters."""
    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


# name -> (C key type, C value type, ctypes key, ctypes value): every map the programs share.
MAPS = {
    "fl_peers": ("struct fl_lpm_v4_key", "struct fl_peer", FlLpmV4Key, FlPeer),
    "fl_peer_ips": ("__be32", "struct fl_peer_ip", PeerIpKey, FlPeerIp),
    "fl_config": ("__u32", "struct fl_local_config", ArrayKey, FlLocalConfig),
    "fl_endpoints": ("__be32", "struct fl_endpoint", PeerIpKey, FlEndpoint),
    "fl_counters": ("__u32", "struct fl_counter", ArrayKey, FlCounter),
}

# C struct name -> ctypes mirror, for the layout probe.
STRUCTS = {
    "struct fl_lpm_v4_key": FlLpmV4Key,
    "struct fl_peer": FlPeer,
    "struct fl_peer_ip": FlPeerIp,
    "struct fl_endpoint": FlEndpoint,
    "struct fl_local_config": FlLocalConfig,
    "struct fl_counter": FlCounter,
}

def bytes_to_mac(raw) -> str:
    return ":".join(f"{b:02x}" for b in bytes(raw))


def ip4(value) -> ipaddress.IPv4Address:
    """An IPv4 address from text, bytes or an address object, with a clear error."""
    if isinstance(value, ipaddress.IPv4Address):  # already one (and re-parsing 10,000 costs)
        return value
    try:
        if isinstance(value, (bytes, bytearray)) and len(value) != 4:
            raise ValueError
        addr = ipaddress.ip_address(bytes(value) if isinstance(value, bytearray) else value)
    except ValueError:
        raise ValueError(f"not an IPv4 address: {value!r}") from None
    if addr.version != 4:
        raise ValueError(f"not an IPv4 address: {value!r}")
    return addr


def ip4_to_bytes(value) -> bytes:
    """IPv4 address -> 4 bytes in network order."""
    return ip4(value).packed


def bytes_to_ip4(raw) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(bytes(raw))


def ip4_network(value) -> ipaddress.IPv4Network:
    """An IPv4 prefix with host bits zero, e.g. ``"10.244.3.0/24"``."""
    if isinstance(value, ipaddress.IPv4Network):  # host bits are always zero in one
        return value
    try:
        net = ipaddress.ip_network(value, strict=True)
    except (ValueError, TypeError) as e:
        raise ValueError(f"not an IPv4 subnet: {value!r} ({e})") from None
    if net.version != 4:
        raise ValueError(f"not an IPv4 subnet: {value!r}")
    return net


def c_array(ctype, raw: bytes):
    """ctypes array (Mac, Ip4) from bytes."""
    return ctype.from_buffer_copy(raw)
