"""The values every layer shares, each defined once: the VNI range, MAC addresses, defaults, and
the checks of a peer's published fields that need nothing but the value (no kernel, no etcd, no
network config). Checks raise ValueError with a one-line message naming the field."""
from __future__ import annotations

import re
from ipaddress import IPv4Address, IPv4Network

# The VNI range is flannel's lease VNI: its vxlan backend publishes and reads BackendData.VNI as a
# Go uint16 (vxlanLeaseAttrs), so a stock node cannot decode a lease with a larger VNI and a
# mixed cluster could not use it. The VXLAN header and the kernel device would take 24 bits; the
# lease is the narrower limit, and the one every layer (config, lease, peer, device, maps) checks.
MIN_VNI, MAX_VNI = 0, 0xFFFF
DEFAULT_VNI = 1
DEFAULT_VXLAN_PORT = 8472  # the Linux kernel's default, what flannel's Port 0 means
VXLAN_OVERHEAD = 50        # outer IPv4 20 + UDP 8 + VXLAN 8 + inner Ethernet 14 (FL_VXLAN_OVERHEAD)
DEFAULT_BRIDGE = "cni0"    # the pod bridge the CNI bridge plugin makes
DEFAULT_SUBNET_FILE = "/run/flannel/subnet.env"
DEFAULT_ETCD_PREFIX = "/coreos.com/network"

# Six hex bytes separated by ':' or '-' (one separator throughout), as Go's net.ParseMAC takes
# them in 48-bit form.
_MAC = re.compile(r"^[0-9a-f]{2}([:-])[0-9a-f]{2}(?:\1[0-9a-f]{2}){4}$", re.IGNORECASE)


def parse_mac(value, what: str = "MAC address") -> str:
    """`value` as a lower-case, colon-separated MAC ("0a:58:0a:f4:01:01")."""
    text = value.strip() if isinstance(value, str) else value
    if not isinstance(text, str) or not _MAC.match(text):
        raise ValueError(f"bad {what} {value!r}: expected six hex bytes like 0a:58:0a:f4:01:01")
    return text.lower().replace("-", ":")


def mac_bytes(value, what: str = "MAC address") -> bytes:
    """A MAC given as text or 6 raw bytes -> 6 bytes."""
    if isinstance(value, (bytes, bytearray)):
        if len(value) != 6:
            raise ValueError(f"bad {what}: must be 6 bytes, got {len(value)}")
        return bytes(value)
    return bytes.fromhex(parse_mac(value, what).replace(":", ""))


def is_multicast_mac(mac: bytes) -> bool:
    return bool(mac[0] & 1)  # the I/G bit; broadcast included


def check_vtep_mac(value, what: str = "VtepMAC") -> str:
    """A VTEP MAC: a MAC (normalised as parse_mac does) that is unicast."""
    mac = parse_mac(value, what)
    if is_multicast_mac(mac_bytes(mac)):
        raise ValueError(f"bad {what} {value!r}: a multicast address cannot be a VTEP")
    return mac


def check_vni(value, what: str = "VNI") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not MIN_VNI <= value <= MAX_VNI:
        raise ValueError(f"bad {what} {value!r}: must be an integer {MIN_VNI}..{MAX_VNI}")
    return value


_THIS_NETWORK = IPv4Network("0.0.0.0/8")  # "this host on this network": never a destination


def check_public_ip(value, what: str = "PublicIP") -> IPv4Address:
    """An underlay address a packet can be sent to: unicast, not in 0.0.0.0/8, not loopback,
    not multicast, not in 240.0.0.0/4 (which holds the limited broadcast 255.255.255.255)."""
    try:
        if not isinstance(value, (str, IPv4Address)):
            raise ValueError
        address = value if isinstance(value, IPv4Address) else IPv4Address(value)
    except ValueError:
        raise ValueError(f"bad {what} {value!r}: not an IPv4 address") from None
    if address in _THIS_NETWORK or address.is_loopback or address.is_multicast or address.is_reserved:
        raise ValueError(f"bad {what} {value!r}: not a unicast address another node can reach")
    return address
