"""What a data-plane backend needs to know about one remote flannel node."""
from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network

from flannel_bpf.loader.netdefs import DEFAULT_VNI, check_public_ip, check_vni, check_vtep_mac


@dataclass(frozen=True)
class Peer:
    """A remote node: its pod subnet, its underlay (public) IP and, for VXLAN, its VTEP MAC
    and VNI. Strings are accepted and converted; bad values raise ValueError naming the field."""
    subnet: IPv4Network
    public_ip: IPv4Address
    vtep_mac: str | None = None
    vni: int = DEFAULT_VNI

    def __post_init__(self):
        # Values that already are addresses are kept: a sync converts thousands of leases.
        try:
            subnet = self.subnet if isinstance(self.subnet, IPv4Network) else IPv4Network(self.subnet)
        except ValueError as e:
            raise ValueError(f"bad peer subnet {self.subnet!r}: {e}") from None
        public_ip = check_public_ip(self.public_ip, "peer public_ip")
        vtep_mac = None if self.vtep_mac is None else check_vtep_mac(self.vtep_mac, "peer vtep_mac")
        check_vni(self.vni, "peer vni")
        object.__setattr__(self, "subnet", subnet)
        object.__setattr__(self, "public_ip", public_ip)
        object.__setattr__(self, "vtep_mac", vtep_mac)

    @property
    def vtep_ip(self) -> IPv4Address:
        """The peer's `.0` address: its flannel.<VNI> device address, our route's gateway."""
        return self.subnet.network_address
