"""Typed access to the data plane's pinned maps: what the controller writes
(local config, peers, endpoints) and what status/metrics read (counters).

Opens the maps from their pin directory, so any process can use it without
compiling the programs. One process (the agent) writes; readers may run
alongside it.
"""
from __future__ import annotations

import ipaddress
import os
from collections import Counter as Multiset
from dataclasses import dataclass
from typing import Iterable

from flannel_bpf.loader.bpf import bpfsys, layout
from flannel_bpf.loader.bpf.layout import PeerMode
from flannel_bpf.loader.netdefs import DEFAULT_VNI, DEFAULT_VXLAN_PORT, VXLAN_OVERHEAD, check_vni, is_multicast_mac, mac_bytes


@dataclass(frozen=True)
class PeerEntry:
    """A remote flannel subnet and how to reach it."""

    subnet: ipaddress.IPv4Network
    underlay_ip: ipaddress.IPv4Address  # the peer's PublicIP
    vtep_mac: str                       # the peer's VtepMAC (unused in DIRECT mode)
    mode: PeerMode = PeerMode.VXLAN

    @classmethod
    def make(cls, subnet, underlay_ip, vtep_mac: str | bytes = "00:00:00:00:00:00",
             mode: PeerMode | str = PeerMode.VXLAN) -> "PeerEntry":
        """Validating constructor: raises ValueError naming the bad field."""
        if isinstance(mode, str):
            try:
                mode = PeerMode[mode.upper()]
            except KeyError:
                raise ValueError(f"peer mode {mode!r}: expected vxlan or direct") from None
        return cls(layout.ip4_network(subnet), layout.ip4(underlay_ip),
                   layout.bytes_to_mac(mac_bytes(vtep_mac)), PeerMode(mode))


@dataclass(frozen=True)
class EndpointEntry:
    """A pod of this node: its IPv4, host-side veth ifindex and eth0 MAC."""

    ip: ipaddress.IPv4Address
    ifindex: int
    mac: str

    @classmethod
    def make(cls, ip, ifindex: int, mac: str | bytes) -> "EndpointEntry":
        _check_ifindex("endpoint ifindex", ifindex, required=True)
        return cls(layout.ip4(ip), ifindex, layout.bytes_to_mac(mac_bytes(mac)))


@dataclass(frozen=True)
class NodeConfig:
    """This node, as the programs need it (struct fl_local_config)."""

    underlay_ip: ipaddress.IPv4Address
    subnet: ipaddress.IPv4Network
    vtep_mac: str
    uplink_mac: str
    uplink_ifindex: int
    vni: int = DEFAULT_VNI
    vxlan_port: int = DEFAULT_VXLAN_PORT
    mtu: int = 1500                       # the uplink's MTU
    bridge_mac: str = "00:00:00:00:00:00"  # cni0's MAC: source of packets handed to pods
    bridge_ifindex: int = 0
    vxlan_ifindex: int = 0
    src_port_min: int = layout.DEFAULT_SRC_PORT_RANGE[0]
    src_port_max: int = layout.DEFAULT_SRC_PORT_RANGE[1]
    gbp: bool = False                     # Backend.GBP: policy IDs from skb->mark, as the kernel device

    @classmethod
    def make(cls, *, underlay_ip, subnet, vtep_mac, uplink_mac, uplink_ifindex: int, **kw) -> "NodeConfig":
        """Validating constructor: raises ValueError naming the bad field."""
        cfg = cls(underlay_ip=layout.ip4(underlay_ip), subnet=layout.ip4_network(subnet),
                  vtep_mac=layout.bytes_to_mac(mac_bytes(vtep_mac)),
                  uplink_mac=layout.bytes_to_mac(mac_bytes(uplink_mac)),
                  uplink_ifindex=uplink_ifindex, **kw)
        cfg.validate()
        return cfg

    def validate(self) -> None:
        check_vni(self.vni)
        if not 1 <= self.vxlan_port <= 65535:
            raise ValueError(f"VXLAN port {self.vxlan_port!r}: must be 1..65535")
        if not 576 + VXLAN_OVERHEAD <= self.mtu <= 65535:
            raise ValueError(f"MTU {self.mtu!r}: must be {576 + VXLAN_OVERHEAD}..65535")
        if not isinstance(self.gbp, bool):
            raise ValueError(f"gbp {self.gbp!r}: must be true or false")
        if not 1 <= self.src_port_min < self.src_port_max <= 65535:
            raise ValueError(f"source port range {self.src_port_min}-{self.src_port_max}: need 1 <= min < max <= 65535")
        _check_ifindex("uplink ifindex", self.uplink_ifindex, required=True)
        _check_ifindex("bridge ifindex", self.bridge_ifindex)
        _check_ifindex("vxlan ifindex", self.vxlan_ifindex)
        for name in ("vtep_mac", "uplink_mac", "bridge_mac"):
            if is_multicast_mac(mac_bytes(getattr(self, name))):
                raise ValueError(f"{name} {getattr(self, name)}: must be a unicast MAC")

    def to_c(self) -> layout.FlLocalConfig:
        self.validate()
        return layout.FlLocalConfig(
            configured=1,
            underlay_ip=layout.c_array(layout.Ip4, self.underlay_ip.packed),
            subnet_addr=layout.c_array(layout.Ip4, self.subnet.network_address.packed),
            subnet_prefixlen=self.subnet.prefixlen,
            vni=self.vni, vxlan_port=self.vxlan_port,
            src_port_min=self.src_port_min, src_port_max=self.src_port_max, mtu=self.mtu,
            uplink_ifindex=self.uplink_ifindex, bridge_ifindex=self.bridge_ifindex,
            vxlan_ifindex=self.vxlan_ifindex,
            vtep_mac=layout.c_array(layout.Mac, mac_bytes(self.vtep_mac)),
            uplink_mac=layout.c_array(layout.Mac, mac_bytes(self.uplink_mac)),
            bridge_mac=layout.c_array(layout.Mac, mac_bytes(self.bridge_mac)),
            gbp=int(self.gbp),
        )

    @classmethod
    def from_c(cls, c: layout.FlLocalConfig) -> "NodeConfig":
        return cls(
            underlay_ip=layout.bytes_to_ip4(c.underlay_ip),
            subnet=ipaddress.IPv4Network((bytes(c.subnet_addr), c.subnet_prefixlen)),
            vtep_mac=layout.bytes_to_mac(c.vtep_mac), uplink_mac=layout.bytes_to_mac(c.uplink_mac),
            uplink_ifindex=c.uplink_ifindex, vni=c.vni, vxlan_port=c.vxlan_port, mtu=c.mtu,
            bridge_mac=layout.bytes_to_mac(c.bridge_mac), bridge_ifindex=c.bridge_ifindex,
            vxlan_ifindex=c.vxlan_ifindex, src_port_min=c.src_port_min, src_port_max=c.src_port_max,
            gbp=bool(c.gbp),
        )


def _check_ifindex(what: str, value, required: bool = False) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not (1 if required else 0) <= value < 1 << 31:
        raise ValueError(f"{what} {value!r}: must be a {'positive' if required else 'non-negative'} interface index")


def _lpm_key(subnet: ipaddress.IPv4Network) -> layout.FlLpmV4Key:
    return layout.FlLpmV4Key(prefixlen=subnet.prefixlen,
                           addr=layout.c_array(layout.Ip4, subnet.network_address.packed))


def _addr_key(addr: ipaddress.IPv4Address) -> layout.PeerIpKey:
    return layout.PeerIpKey(addr=layout.c_array(layout.Ip4, addr.packed))


class DataPlaneMaps:
    """The five maps pinned in `pin_dir` (created by loader.program.load_programs)."""

    def __init__(self, pin_dir: str):
        self.pin_dir = pin_dir
        missing = [n for n in layout.MAPS if not os.path.exists(os.path.join(pin_dir, n))]
        if missing:
            raise FileNotFoundError(f"no pinned map {', '.join(missing)} in {pin_dir}: are the programs loaded?")
        self._maps: dict[str, bpfsys.BpfMap] = {}
        try:
            for name, (_, _, key_type, value_type) in layout.MAPS.items():
                self._maps[name] = bpfsys.BpfMap.open_pinned(os.path.join(pin_dir, name), key_type, value_type)
        except BaseException:
            self.close()
            raise
        # Writer-side mirror of fl_peers, so fl_peer_ips (derived: the set of
        # peer underlay addresses) is kept in O(changes), not O(peers).
        self._peers: dict[ipaddress.IPv4Network, PeerEntry] | None = None
        self._ip_refs: Multiset = Multiset()

    def close(self) -> None:
        for m in self._maps.values():
            m.close()
        self._maps.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def map(self, name: str) -> bpfsys.BpfMap:
        """Raw access to one map (tests, debugging)."""
        return self._maps[name]

    # --- local config -------------------------------------------------------
    def set_local_config(self, config: NodeConfig) -> None:
        self._maps["fl_config"].update(layout.ArrayKey(0), config.to_c())

    def get_local_config(self) -> NodeConfig | None:
        c = self._maps["fl_config"].lookup(layout.ArrayKey(0))
        return NodeConfig.from_c(c) if c is not None and c.configured else None

    def clear_local_config(self) -> None:
        """Programs go back to passing everything to the kernel."""
        self._maps["fl_config"].update(layout.ArrayKey(0), layout.FlLocalConfig())

    # --- peers --------------------------------------------------------------
    def _load_peers(self) -> dict:
        if self._peers is None:
            self._peers = {p.subnet: p for p in self.list_peers()}
            self._ip_refs = Multiset(p.underlay_ip for p in self._peers.values())
            current = {layout.bytes_to_ip4(k.addr) for k in self._maps["fl_peer_ips"].keys()}
            self._sync_peer_ips(current)
        return self._peers

    def _sync_peer_ips(self, candidates: Iterable[ipaddress.IPv4Address]) -> None:
        """Brings fl_peer_ips in line with the peers for the given addresses."""
        candidates = set(candidates)
        add = sorted(ip for ip in candidates if self._ip_refs[ip] > 0)
        drop = [ip for ip in candidates if self._ip_refs[ip] <= 0]
        ips = self._maps["fl_peer_ips"]
        ips.update_batch([_addr_key(ip) for ip in add], [layout.FlPeerIp(present=1) for _ in add])
        ips.delete_batch([_addr_key(ip) for ip in drop])
        for ip in drop:
            self._ip_refs.pop(ip, None)

    def upsert_peers(self, entries: Iterable[PeerEntry]) -> int:
        """Adds or replaces peers (one batch). Returns how many were written."""
        entries = list({e.subnet: e for e in entries}.values())  # last one wins
        if not entries:
            return 0
        peers = self._load_peers()
        self._maps["fl_peers"].update_batch(
            [_lpm_key(e.subnet) for e in entries],
            [layout.FlPeer(underlay_ip=layout.c_array(layout.Ip4, e.underlay_ip.packed),
                         vtep_mac=layout.c_array(layout.Mac, mac_bytes(e.vtep_mac)),
                         mode=int(e.mode)) for e in entries])
        touched = set()
        for e in entries:
            old = peers.get(e.subnet)
            if old is not None:
                self._ip_refs[old.underlay_ip] -= 1
                touched.add(old.underlay_ip)
            peers[e.subnet] = e
            self._ip_refs[e.underlay_ip] += 1
            touched.add(e.underlay_ip)
        self._sync_peer_ips(touched)
        return len(entries)

    def remove_peers(self, subnets: Iterable) -> int:
        """Removes peers by subnet; unknown ones are ignored. Returns how many went."""
        nets = {layout.ip4_network(s) for s in subnets}
        peers = self._load_peers()
        removed = self._maps["fl_peers"].delete_batch([_lpm_key(n) for n in nets])
        touched = set()
        for net in nets:
            old = peers.pop(net, None)
            if old is not None:
                self._ip_refs[old.underlay_ip] -= 1
                touched.add(old.underlay_ip)
        self._sync_peer_ips(touched)
        return removed

    def sync_peers(self, desired: Iterable[PeerEntry]) -> tuple[int, int]:
        """Makes fl_peers exactly `desired` (reconcile after a re-list).
        Returns (written, removed)."""
        desired = {e.subnet: e for e in desired}
        current = self._load_peers()
        stale = [s for s in current if s not in desired]
        changed = [e for s, e in desired.items() if current.get(s) != e]
        return self.upsert_peers(changed), self.remove_peers(stale)

    def list_peers(self) -> list[PeerEntry]:
        out = []
        for key, value in self._maps["fl_peers"].items():
            try:
                mode = PeerMode(value.mode)
            except ValueError:
                continue  # not written by this code: the programs ignore it too
            out.append(PeerEntry(ipaddress.IPv4Network((bytes(key.addr), key.prefixlen)),
                                 layout.bytes_to_ip4(value.underlay_ip),
                                 layout.bytes_to_mac(value.vtep_mac), mode))
        return sorted(out, key=lambda p: (p.subnet.network_address, p.subnet.prefixlen))

    def known_peer_ips(self) -> set[ipaddress.IPv4Address]:
        """fl_peer_ips as it is in the kernel (derived from the peers)."""
        return {layout.bytes_to_ip4(k.addr) for k in self._maps["fl_peer_ips"].keys()}

    # --- endpoints ----------------------------------------------------------
    def set_endpoints(self, entries: Iterable[EndpointEntry]) -> int:
        entries = list({e.ip: e for e in entries}.values())
        self._maps["fl_endpoints"].update_batch(
            [_addr_key(e.ip) for e in entries],
            [layout.FlEndpoint(ifindex=e.ifindex, mac=layout.c_array(layout.Mac, mac_bytes(e.mac)))
             for e in entries])
        return len(entries)

    def remove_endpoints(self, ips: Iterable) -> int:
        return self._maps["fl_endpoints"].delete_batch([_addr_key(layout.ip4(ip)) for ip in ips])

    def list_endpoints(self) -> list[EndpointEntry]:
        return sorted((EndpointEntry(layout.bytes_to_ip4(k.addr), v.ifindex, layout.bytes_to_mac(v.mac))
                       for k, v in self._maps["fl_endpoints"].items()), key=lambda e: e.ip)

    # --- counters -----------------------------------------------------------
    def read_counters(self) -> dict[str, tuple[int, int]]:
        """{counter name: (packets, bytes)} summed over CPUs, for every counter."""
        counters = self._maps["fl_counters"]
        out = {}
        for stat in layout.Stat:
            per_cpu = counters.lookup(layout.ArrayKey(int(stat))) or []
            out[stat.counter_name] = (sum(c.packets for c in per_cpu), sum(c.bytes for c in per_cpu))
        return out

    def reset_counters(self) -> None:
        counters = self._maps["fl_counters"]
        for stat in layout.Stat:
            counters.update(layout.ArrayKey(int(stat)), layout.FlCounter())
