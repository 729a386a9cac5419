"""Stock-equivalent kernel VXLAN backend: what flanneld's vxlan backend programs.

- device flannel.<VNI>: vxlan id VNI, local = public IP, dev = uplink, nolearning, dstport 8472,
  MTU = uplink MTU - 50, a random locally administered unicast MAC (the VtepMAC), address
  <own subnet .0>/32, up;
- per peer: neighbour <peer .0> lladdr <VtepMAC> permanent, FDB <VtepMAC> dst <PublicIP>
  (self, permanent), route <subnet> via <peer .0> dev flannel.<VNI> onlink;
- with DirectRouting and the peer on-link: only route <subnet> via <PublicIP> dev <uplink>.

Peers are programmed in batches (`update`), linear in the batch: a peer costs its own three
netlink calls and a neighbour lookup, plus a route lookup with DirectRouting.

Everything acts on the calling thread's network namespace (see loader.netns.in_netns).
The BPF backend reuses this device as its kernel fallback path.
"""
from __future__ import annotations

import errno
import logging
import os
import threading
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network
from socket import AF_INET
from typing import Callable, Collection, Iterable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl import ndmsg

from flannel_bpf.loader.netdefs import DEFAULT_VNI, DEFAULT_VXLAN_PORT, VXLAN_OVERHEAD, check_vni, check_vtep_mac
from flannel_bpf.loader.peer import Peer
from flannel_bpf.loader.netlink.routes import (BackendError, NetlinkLookups, OurRoute, PeerBatches, PeerFailure,
                                       PeerRejected, delete_our_routes, delete_route, for_each_peer,
                                       link_index, our_route_table, prune_our_routes,
                                       replace_route, require_link)

log = logging.getLogger(__name__)

_PERMANENT = ndmsg.states["permanent"]
_NTF_SELF = ndmsg.flags["self"]

__all__ = ["KernelVxlanBackend", "VxlanDevice", "random_vtep_mac", "vxlan_device_name"]


def random_vtep_mac() -> str:
    """A random locally administered unicast MAC, as flannel makes for its VTEP."""
    b = bytearray(os.urandom(6))
    b[0] = (b[0] & 0xFE) | 0x02
    return ":".join(f"{x:02x}" for x in b)


def vxlan_device_name(vni: int) -> str:
    return f"flannel.{vni}"


@dataclass(frozen=True)
class VxlanDevice:
    name: str
    ifindex: int
    vni: int
    mac: str            # the VtepMAC to publish in the lease
    mtu: int
    local: IPv4Address
    port: int
    uplink_ifindex: int


class KernelVxlanBackend(PeerBatches):
    def __init__(self, *, uplink: str, public_ip: IPv4Address | str, subnet: IPv4Network | str,
                 vni: int = DEFAULT_VNI, port: int = 0, vtep_mac: str | None = None,
                 mtu: int | None = None, direct_routing: bool = False, learning: bool = False,
                 gbp: bool = False):
        """`subnet` is this node's own lease subnet; port 0 means the kernel default 8472;
        mtu None means uplink MTU - 50; vtep_mac None keeps an existing device's MAC or makes
        a random one."""
        check_vni(vni)
        if not isinstance(port, int) or not 0 <= port <= 65535:
            raise ValueError(f"bad VXLAN port {port!r}: must be 0..65535")
        if mtu is not None and not 576 <= mtu <= 65535:
            raise ValueError(f"bad VXLAN MTU {mtu!r}")
        self.uplink = uplink
        self.public_ip = IPv4Address(public_ip)
        self.subnet = IPv4Network(subnet)
        self.vni = vni
        self.port = port or DEFAULT_VXLAN_PORT
        self.vtep_mac = None if vtep_mac is None else check_vtep_mac(vtep_mac, "vtep_mac")
        self.mtu = mtu
        self.direct_routing = direct_routing
        self.learning = learning
        self.gbp = gbp
        self.name = vxlan_device_name(vni)

    # ------------------------------------------------------------------ the device

    def setup(self) -> VxlanDevice:
        """Create flannel.<VNI>, or reuse a matching one (a mismatched one is replaced)."""
        with IPRoute() as ipr:
            uplink_idx = require_link(ipr, self.uplink, "uplink")
            uplink = ipr.link("get", index=uplink_idx)[0]
            mtu = self.mtu or uplink.get_attr("IFLA_MTU") - VXLAN_OVERHEAD
            idx = link_index(ipr, self.name)
            existing = ipr.link("get", index=idx)[0] if idx is not None else None
            if existing is not None and not self._matches(existing, uplink_idx):
                log.info("replacing %s: its settings differ from the wanted ones", self.name)
                ipr.link("del", index=idx)
                existing = None
            if existing is None:
                mac = self.vtep_mac or random_vtep_mac()
                try:
                    ipr.link("add", ifname=self.name, kind="vxlan", vxlan_id=self.vni,
                             vxlan_local=str(self.public_ip), vxlan_link=uplink_idx,
                             vxlan_port=self.port, vxlan_learning=int(self.learning),
                             address=mac, mtu=mtu, **({"vxlan_gbp": True} if self.gbp else {}))
                except NetlinkError as e:
                    raise BackendError(f"cannot create {self.name}: {e}") from e
                idx = require_link(ipr, self.name, "VXLAN device")
            else:
                mac = existing.get_attr("IFLA_ADDRESS")
                changes = {}
                if self.vtep_mac and mac != self.vtep_mac:
                    changes["address"] = mac = self.vtep_mac
                if existing.get_attr("IFLA_MTU") != mtu:
                    changes["mtu"] = mtu
                if changes:
                    ipr.link("set", index=idx, **changes)
            self._ensure_only_address(ipr, idx)
            ipr.link("set", index=idx, state="up")
            self.vtep_mac = mac
            return VxlanDevice(self.name, idx, self.vni, mac, mtu, self.public_ip, self.port,
                               uplink_idx)

    def _matches(self, link, uplink_idx: int) -> bool:
        info = link.get_attr("IFLA_LINKINFO")
        if info is None or info.get_attr("IFLA_INFO_KIND") != "vxlan":
            return False
        data = info.get_attr("IFLA_INFO_DATA")
        return (data.get_attr("IFLA_VXLAN_ID") == self.vni
                and data.get_attr("IFLA_VXLAN_LOCAL") == str(self.public_ip)
                and data.get_attr("IFLA_VXLAN_LINK") == uplink_idx
                and data.get_attr("IFLA_VXLAN_PORT") == self.port
                and bool(data.get_attr("IFLA_VXLAN_LEARNING")) == self.learning
                and (data.get_attr("IFLA_VXLAN_GBP") is not None) == self.gbp)

    def _ensure_only_address(self, ipr: IPRoute, idx: int) -> None:
        # flannel's EnsureV4AddressOnLink: <subnet .0>/32 and no other IPv4 address.
        wanted = IPv4Interface(f"{self.subnet.network_address}/32")
        present = False
        for a in ipr.get_addr(index=idx, family=2):
            have = IPv4Interface(f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}")
            if have == wanted:
                present = True
            else:
                ipr.addr("del", index=idx, address=str(have.ip), prefixlen=a["prefixlen"])
        if not present:
            ipr.addr("add", index=idx, address=str(wanted.ip), prefixlen=32)

    def device(self) -> VxlanDevice | None:
        """The current device, if it exists."""
        with IPRoute() as ipr:
            idx = link_index(ipr, self.name)
            if idx is None:
                return None
            link = ipr.link("get", index=idx)[0]
            data = link.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_DATA")
            return VxlanDevice(self.name, idx, data.get_attr("IFLA_VXLAN_ID"),
                               link.get_attr("IFLA_ADDRESS"), link.get_attr("IFLA_MTU"),
                               IPv4Address(data.get_attr("IFLA_VXLAN_LOCAL")),
                               data.get_attr("IFLA_VXLAN_PORT"), data.get_attr("IFLA_VXLAN_LINK"))

    # ------------------------------------------------------------------ peers

    def update(self, apply: Iterable[Peer] = (), remove: Iterable[Peer] = (), *,
               keep: Collection[IPv4Network] | None = None, cancel: threading.Event | None = None,
               done: Callable[[Peer], None] | None = None) -> list[PeerFailure]:
        """One batch over peers of distinct subnets: remove `remove`, program `apply`, then, with
        `keep` (a full sync), remove our routes through the uplink or flannel.<VNI> and the VTEP
        neighbours (with their FDB entries) of every subnet not in `keep`.

        Linear in the batch whatever the table holds: links are resolved once, each peer's .0
        neighbour is asked for by address; only with `keep` are the tables read, with one dump
        each (neighbours, FDB, routes) that the prune needs anyway, and then a peer the kernel
        already holds exactly is not written again (an agent restarting on 10,000 peers finds
        them all in place). `done(peer)` follows each peer; once `cancel` is set the batch stops
        early. Returns the peers that could not be programmed, with reasons."""
        apply, remove = list(apply), list(remove)
        if not apply and not remove and keep is None:
            return []
        with IPRoute() as ipr:
            lookups = NetlinkLookups(ipr)
            if apply:
                vx = lookups.require_link(self.name, "VXLAN device (call setup() first)")
                uplink = lookups.require_link(self.uplink, "uplink")
            else:
                vx, uplink = lookups.link(self.name), lookups.link(self.uplink)
            vteps = None if vx is None else VtepNeighbours(ipr, vx, dump=keep is not None)
            held = None if keep is None else KernelHolds(ipr, vx, uplink, vteps)
            failures = for_each_peer(remove, lambda p: self._remove(ipr, vx, vteps, p), "remove",
                                     cancel, done)
            failures += for_each_peer(apply, lambda p: self._apply(ipr, lookups, vx, uplink, vteps, p, held),
                                      "program", cancel, done)
            if keep is not None and not (cancel is not None and cancel.is_set()):
                self._prune(ipr, vx, uplink, vteps, set(keep), cancel, held.routes)
            return failures

    def _prune(self, ipr: IPRoute, vx: int | None, uplink: int | None, vteps: "VtepNeighbours | None",
               keep: set[IPv4Network], cancel: threading.Event | None,
               present_routes: Collection[IPv4Network]) -> None:
        routes = prune_our_routes(ipr, [i for i in (vx, uplink) if i is not None], keep, cancel,
                                  present=present_routes)
        kept = {subnet.network_address for subnet in keep}
        stale = [] if vteps is None else [ip for ip, (_, state) in vteps.entries.items()
                                          if state & _PERMANENT and ip not in kept]
        for ip in stale:
            if cancel is not None and cancel.is_set():
                break
            self._forget_vtep(ipr, vx, vteps, ip)
        if routes or stale:
            log.info("removed %d routes and %d VTEP neighbours of peers that are gone (left by an "
                     "earlier agent)", len(routes), len(stale))

    def teardown(self) -> None:
        """Remove the device (its routes, neighbours and FDB go with it) and our direct routes."""
        with IPRoute() as ipr:
            idx = link_index(ipr, self.name)
            if idx is not None:
                ipr.link("del", index=idx)
            uplink = link_index(ipr, self.uplink)
            if uplink is not None:
                delete_our_routes(ipr, oif=uplink)

    def _apply(self, ipr: IPRoute, lookups: NetlinkLookups, vx: int, uplink: int,
               vteps: "VtepNeighbours", peer: Peer, held: "KernelHolds | None" = None) -> None:
        if peer.vni != self.vni:
            raise PeerRejected(f"peer VNI {peer.vni} differs from ours ({self.vni})")
        direct = lookups.routes_directly(peer, self.direct_routing)
        if held is not None and held.exactly(peer, direct):
            return
        ours = held is not None and peer.subnet in held.routes
        if direct:
            self._forget_vtep(ipr, vx, vteps, peer.vtep_ip)
            replace_route(ipr, peer.subnet, peer.public_ip, uplink, ours=ours)
            return
        if peer.vtep_mac is None:
            raise PeerRejected("peer has no VtepMAC")
        self._forget_vtep(ipr, vx, vteps, peer.vtep_ip, keep_mac=peer.vtep_mac)
        ipr.neigh("replace", ifindex=vx, dst=str(peer.vtep_ip), lladdr=peer.vtep_mac,
                  state=_PERMANENT)
        vteps.entries[peer.vtep_ip] = (peer.vtep_mac, _PERMANENT)
        ipr.fdb("replace", ifindex=vx, lladdr=peer.vtep_mac, dst=str(peer.public_ip),
                state=_PERMANENT, flags=_NTF_SELF)
        # Last, as flannel does: the neighbour above spares the kernel an ARP for the gateway.
        replace_route(ipr, peer.subnet, peer.vtep_ip, vx, onlink=True, ours=ours)

    def _remove(self, ipr: IPRoute, vx: int | None, vteps: "VtepNeighbours | None", peer: Peer) -> None:
        delete_route(ipr, peer.subnet)
        if vx is not None:
            forgotten = self._forget_vtep(ipr, vx, vteps, peer.vtep_ip)
            if peer.vtep_mac and peer.vtep_mac != forgotten:
                _delete_fdb(ipr, vx, peer.vtep_mac)

    def _forget_vtep(self, ipr: IPRoute, vx: int, vteps: "VtepNeighbours", vtep_ip: IPv4Address,
                     keep_mac: str | None = None) -> str | None:
        """Drop the neighbour of a peer's .0 and the FDB entry of its MAC, unless that MAC is
        `keep_mac`: a peer that changed VtepMAC or went direct leaves no stale entries.
        Returns the MAC dropped, if any."""
        mac = vteps.mac(vtep_ip)
        if not mac or mac == keep_mac:
            return None
        _delete_fdb(ipr, vx, mac)
        try:
            ipr.neigh("del", ifindex=vx, dst=str(vtep_ip))
        except NetlinkError as e:
            if e.code != errno.ENOENT:
                raise
        vteps.entries.pop(vtep_ip, None)
        return mac


class KernelHolds:
    """What the kernel holds for peers right now, read once for a full sync: our routes, the
    VTEP neighbours (shared with the batch's VtepNeighbours) and the FDB of flannel.<VNI>."""

    def __init__(self, ipr: IPRoute, vx: int | None, uplink: int | None, vteps: "VtepNeighbours | None"):
        self.vx, self.uplink, self.vteps = vx, uplink, vteps
        self.routes = our_route_table(ipr, [i for i in (vx, uplink) if i is not None])
        self.fdb: dict[str, str] = {}  # VtepMAC -> peer PublicIP, permanent entries only
        if vx is not None:
            for entry in ipr.fdb("dump", ifindex=vx):
                if entry["ifindex"] == vx and entry["state"] & _PERMANENT and entry.get_attr("NDA_DST"):
                    self.fdb[entry.get_attr("NDA_LLADDR")] = entry.get_attr("NDA_DST")

    def exactly(self, peer: Peer, direct: bool) -> bool:
        """Whether the kernel already holds what _apply() would write for `peer`, and nothing
        of an older state of it (a VTEP neighbour left from before DirectRouting, say)."""
        neighbour = None if self.vteps is None else self.vteps.entries.get(peer.vtep_ip)
        if direct:
            return neighbour is None and self.routes.get(peer.subnet) == OurRoute(peer.public_ip, self.uplink, False)
        return (neighbour == (peer.vtep_mac, _PERMANENT)
                and self.fdb.get(peer.vtep_mac) == str(peer.public_ip)
                and self.routes.get(peer.subnet) == OurRoute(peer.vtep_ip, self.vx, True))


class VtepNeighbours:
    """The neighbours of flannel.<VNI> (peer .0 address -> (MAC, NUD state)) as one batch needs
    them: read whole with one dump (`dump`: a full sync, whose prune needs them all), else asked
    one address at a time, so that a batch costs per peer in it, not per entry of the table
    (a dump costs ~0.1 ms per entry: per batch of 100 on a table of 10,000, 1 s)."""

    def __init__(self, ipr: IPRoute, vx: int, dump: bool):
        self.ipr, self.vx = ipr, vx
        self.entries: dict[IPv4Address, tuple[str | None, int]] = {}
        self._complete = dump
        if self._complete:
            for n in ipr.neigh("dump", ifindex=vx, family=AF_INET):
                if n["ifindex"] == vx and n.get_attr("NDA_DST"):
                    self.entries[IPv4Address(n.get_attr("NDA_DST"))] = (n.get_attr("NDA_LLADDR"), n["state"])

    def mac(self, ip: IPv4Address) -> str | None:
        if ip not in self.entries and not self._complete:
            try:
                found = self.ipr.neigh("get", ifindex=self.vx, dst=str(ip))
            except NetlinkError as e:
                if e.code != errno.ENOENT:
                    raise
                found = ()
            if found:
                self.entries[ip] = (found[0].get_attr("NDA_LLADDR"), found[0]["state"])
        return self.entries.get(ip, (None, 0))[0]


def _delete_fdb(ipr: IPRoute, vx: int, mac: str) -> None:
    try:
        ipr.fdb("del", ifindex=vx, lladdr=mac)
    except NetlinkError as e:
        if e.code != errno.ENOENT:
            raise
