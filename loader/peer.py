"""What a data-plane backend needs to know about one remote flannel node."""
from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
MAX_VNI = (1 << 24) - 1


def normalize_mac(value: str, what: str = "MAC address") -> str:
    mac = str(value).strip().lower().replace("-", ":")
    if not _MAC.match(mac):
        raise ValueError(f"bad {what} {value!r}: expected six hex bytes like 0a:58:0a:f4:01:01")
    if int(mac[:2], 16) & 1:
        raise ValueError(f"bad {what} {value!r}: a multicast address cannot be a VTEP")
    return mac


@dataclass(frozen=True)
class Peer:
    """A remote node: its pod subnet, its underlay (public) IP and, for VXLAN, its VTEP MAC
    and VNI. Strings are accepted and converted; bad values raise ValueError naming the field."""
    subnet: IPv4Network
    public_ip: IPv4Address
    vtep_mac: str | None = None
    vni: int = 1

    def __post_init__(self):
        # Values that already are addresses are kept: a sync converts thousands of leases.
        try:
            subnet = self.subnet if isinstance(self.subnet, IPv4Network) else IPv4Network(self.subnet)
        except ValueError as e:
            raise ValueError(f"bad peer subnet {self.subnet!r}: {e}") from None
        try:
            public_ip = (self.public_ip if isinstance(self.public_ip, IPv4Address)
                         else IPv4Address(self.public_ip))
        except ValueError as e:
            raise ValueError(f"bad peer public_ip {self.public_ip!r}: {e}") from None
        vtep_mac = None if self.vtep_mac is None else normalize_mac(self.vtep_mac, "peer vtep_mac")
        if isinstance(self.vni, bool) or not isinstance(self.vni, int) or not 0 <= self.vni <= MAX_VNI:
            raise ValueError(f"bad peer vni {self.vni!r}: must be an integer 0..{MAX_VNI}")
        object.__setattr__(self, "subnet", subnet)
        object.__setattr__(self, "public_ip", public_ip)
        object.__setattr__(self, "vtep_mac", vtep_mac)

    @property
    def vtep_ip(self) -> IPv4Address:
        """The peer's `.0` address: its flannel.<VNI> device address, our route's gateway."""
        return self.subnet.network_address
