"""Netlink pieces shared by the kernel backends (vxlan, host-gw): routes we own, on-link
checks, per-batch lookups, and applying a batch of peers without one bad peer stopping the rest.

Every call here is one netlink round trip (~0.3-0.6 ms with pyroute2 0.9), a dump one per
entry: batches resolve links and addresses once and never dump per peer."""
from __future__ import annotations

import errno
import logging
import threading
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from socket import AF_INET
from typing import Callable, Collection, Iterable

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from flannel_bpf.loader.peer import Peer

log = logging.getLogger(__name__)

# Routes we add carry this rtm_protocol (flanneld's carry "boot"): forwarding is identical,
# and teardown can find exactly our routes after a crash without any saved state.
ROUTE_PROTO = 251
MAIN_TABLE = 254
_RTN_UNICAST = 1
_RTN_LOCAL = 2
_RTNH_F_ONLINK = 4
_GONE = (errno.ENOENT, errno.ESRCH, errno.ENODEV)


class PeerBatches:
    """The one-purpose batches of a kernel backend, each its `update()` with one argument:
    program peers, remove peers (whichever mode they were in), prune what `keep` does not need.
    Each returns the peers that could not be handled, with reasons."""

    def apply_peers(self, peers: Iterable["Peer"], cancel: threading.Event | None = None) -> list["PeerFailure"]:
        return self.update(apply=peers, cancel=cancel)

    def remove_peers(self, peers: Iterable["Peer"], cancel: threading.Event | None = None) -> list["PeerFailure"]:
        return self.update(remove=peers, cancel=cancel)

    def prune(self, keep: Collection[IPv4Network], cancel: threading.Event | None = None) -> list["PeerFailure"]:
        return self.update(keep=keep, cancel=cancel)


class BackendError(RuntimeError):
    """The backend as a whole cannot work (missing uplink, device creation refused...)."""


class PeerRejected(ValueError):
    """This peer cannot be programmed by this backend (the reason says why)."""


@dataclass(frozen=True)
class PeerFailure:
    peer: Peer
    reason: str


def find_link(ipr: IPRoute, ifname: str):
    """The link message of `ifname` (one RTM_GETLINK by name, no dump), None if there is none."""
    try:
        return ipr.link("get", ifname=ifname)[0]
    except NetlinkError as e:
        if e.code in _GONE:
            return None
        raise


def link_index(ipr: IPRoute, ifname: str) -> int | None:
    """The ifindex of `ifname`, None if there is none."""
    link = find_link(ipr, ifname)
    return None if link is None else link["index"]


def require_link(ipr: IPRoute, ifname: str, role: str) -> int:
    return _required(link_index(ipr, ifname), ifname, role)


def _required(idx: int | None, ifname: str, role: str) -> int:
    if idx is None:
        raise BackendError(f"{role} {ifname!r} does not exist in this network namespace")
    return idx


def route_kind(ip: IPv4Address | str, ipr: IPRoute | None = None) -> str:
    """How the kernel reaches `ip`: "local" (one of our addresses), "onlink" (directly, on an
    attached L2 segment), "gateway" (through a router) or "unreachable"."""
    ip = IPv4Address(ip)
    if ipr is None:
        with IPRoute() as own:
            return route_kind(ip, own)
    try:
        routes = ipr.route("get", dst=str(ip))
    except NetlinkError as e:
        if e.code in (errno.ENETUNREACH, errno.EHOSTUNREACH):
            return "unreachable"
        raise
    if len(routes) != 1:
        return "gateway"
    if routes[0]["type"] == _RTN_LOCAL:
        return "local"
    if routes[0]["type"] != _RTN_UNICAST:
        return "unreachable"
    return "onlink" if routes[0].get_attr("RTA_GATEWAY") is None else "gateway"


def is_on_link(ip: IPv4Address | str, ipr: IPRoute | None = None) -> bool:
    """Whether `ip` is reached without a gateway, i.e. on one of our L2 segments: flannel's
    test for DirectRouting (a single route to it, with no gateway)."""
    return route_kind(ip, ipr) == "onlink"


def reject_own_address(peer: Peer, kind: str) -> None:
    if kind == "local":
        raise PeerRejected(f"peer public IP {peer.public_ip} is one of this node's own addresses "
                           "(do several nodes report the same public IP?)")


def replace_route(ipr: IPRoute, dst: IPv4Network, gateway: IPv4Address, oif: int,
                  onlink: bool = False, ours: bool = False) -> None:
    """Our route to `dst`, added or replacing our earlier one (`ours`: the caller knows the
    route there is ours). A route to the same destination that the agent did not make (the pod
    bridge's own, an operator's) is never replaced: PeerRejected. A bare replace would take it
    over, and removing the peer later would delete it."""
    route = dict(dst=str(dst), gateway=str(gateway), oif=oif, table=MAIN_TABLE, proto=ROUTE_PROTO,
                 flags=_RTNH_F_ONLINK if onlink else 0)
    if not ours:
        try:
            ipr.route("add", **route)
            return
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise
        holder = _route_protocol(ipr, dst)
        if holder not in (None, ROUTE_PROTO):
            raise PeerRejected(f"a route to {dst} that flannel-bpf did not make (protocol {holder}) "
                               "is in the way: left alone")
    ipr.route("replace", **route)


def _route_protocol(ipr: IPRoute, dst: IPv4Network) -> int | None:
    """rtm_protocol of the main table's metric-0 route to exactly `dst`, if any (a dump: only
    asked when an add found a route there)."""
    for r in ipr.route("dump", table=MAIN_TABLE, family=AF_INET):
        if (r["dst_len"] == dst.prefixlen and (r.get_attr("RTA_DST") or "0.0.0.0") == str(dst.network_address)
                and not r.get_attr("RTA_PRIORITY")):
            return r["proto"]
    return None


def delete_route(ipr: IPRoute, dst: IPv4Network) -> bool:
    """Delete our route to `dst`; False if we had none (routes of others are never touched)."""
    try:
        ipr.route("del", dst=str(dst), table=MAIN_TABLE, proto=ROUTE_PROTO)
        return True
    except NetlinkError as e:
        if e.code in _GONE:
            return False
        raise


@dataclass(frozen=True)
class OurRoute:
    """Where one of our routes leads, as replace_route() writes it."""
    gateway: IPv4Address | None
    oif: int
    onlink: bool


def our_route_table(ipr: IPRoute, oif: int | Collection[int] | None = None) -> dict[IPv4Network, OurRoute]:
    """Our routes (by protocol) in the main table, through `oif` (one ifindex or several) or
    any device, by destination: one route dump."""
    oifs = None if oif is None else {oif} if isinstance(oif, int) else set(oif)
    table = {}
    for r in ipr.route("dump", table=MAIN_TABLE, family=AF_INET):
        if r["proto"] != ROUTE_PROTO or (oifs is not None and r.get_attr("RTA_OIF") not in oifs):
            continue
        gateway = r.get_attr("RTA_GATEWAY")
        table[IPv4Network(f"{r.get_attr('RTA_DST') or '0.0.0.0'}/{r['dst_len']}")] = OurRoute(
            IPv4Address(gateway) if gateway else None, r.get_attr("RTA_OIF"), bool(r["flags"] & _RTNH_F_ONLINK))
    return table


def our_routes(ipr: IPRoute, oif: int | Collection[int] | None = None) -> list[IPv4Network]:
    """Destinations of our routes (see our_route_table)."""
    return list(our_route_table(ipr, oif))


def delete_our_routes(ipr: IPRoute, oif: int | Collection[int] | None = None) -> int:
    return sum(delete_route(ipr, dst) for dst in our_routes(ipr, oif))


def prune_our_routes(ipr: IPRoute, oifs: Collection[int], keep: Collection[IPv4Network],
                     cancel: threading.Event | None = None,
                     present: Collection[IPv4Network] | None = None) -> list[IPv4Network]:
    """Delete our routes through `oifs` whose destination is not in `keep` (what an earlier
    agent left for peers that went away); returns the destinations deleted. `present`: our
    routes as the caller dumped them already (routes added since are all in `keep`)."""
    keep = set(keep)
    deleted = []
    for dst in (our_routes(ipr, oifs) if present is None else present):
        if cancel is not None and cancel.is_set():
            break
        if dst not in keep and delete_route(ipr, dst):
            deleted.append(dst)
    return deleted


class OwnAddresses:
    """This node's IPv4 addresses (what route_kind calls "local"), from one address dump: every
    address, and the whole prefix of a loopback address (127.0.0.0/8)."""

    def __init__(self, ipr: IPRoute):
        self.addresses: set[IPv4Address] = set()
        self.loopback: list[IPv4Network] = []
        for a in ipr.get_addr(family=AF_INET):
            address = IPv4Address(a.get_attr("IFA_LOCAL") or a.get_attr("IFA_ADDRESS"))
            self.addresses.add(address)
            if address.is_loopback:
                self.loopback.append(IPv4Network(f"{address}/{a['prefixlen']}", strict=False))

    def __contains__(self, ip: IPv4Address) -> bool:
        return ip in self.addresses or any(ip in net for net in self.loopback)


class NetlinkLookups:
    """What a batch of peers needs to know about this node, asked once per batch on one
    IPRoute: link indexes (by name, cached), our own addresses (one address dump, or `own`
    given), and how each peer address is reached (one route lookup per address, only where
    it matters)."""

    def __init__(self, ipr: IPRoute | None, own: OwnAddresses | None = None):
        self.ipr = ipr
        self._links: dict[str, int | None] = {}
        self._own = own
        self._kinds: dict[IPv4Address, str] = {}

    def link(self, ifname: str) -> int | None:
        if ifname not in self._links:
            self._links[ifname] = link_index(self.ipr, ifname)
        return self._links[ifname]

    def require_link(self, ifname: str, role: str) -> int:
        return _required(self.link(ifname), ifname, role)

    def route_kind(self, ip: IPv4Address) -> str:
        if ip not in self._kinds:
            self._kinds[ip] = route_kind(ip, self.ipr)
        return self._kinds[ip]

    def is_own_address(self, ip: IPv4Address) -> bool:
        if self._own is None:
            self._own = OwnAddresses(self.ipr)
        return ip in self._own

    def routes_directly(self, peer: Peer, direct_routing: bool) -> bool:
        """Whether `peer` is routed straight to its public IP (DirectRouting and on-link, as
        flannel decides it) rather than through VXLAN; raises PeerRejected when that IP is ours.
        Without DirectRouting no route lookup is needed, only our own addresses."""
        if direct_routing:
            kind = self.route_kind(peer.public_ip)
        else:
            kind = "local" if self.is_own_address(peer.public_ip) else "remote"
        reject_own_address(peer, kind)
        return direct_routing and kind == "onlink"


def for_each_peer(peers: Iterable[Peer], action: Callable[[Peer], None], verb: str,
                  cancel: threading.Event | None = None,
                  done: Callable[[Peer], None] | None = None) -> list[PeerFailure]:
    """Run `action` on every peer (until `cancel` is set), then `done(peer)`; collect, log and
    return the failures instead of raising, so one bad lease never keeps the others from being
    programmed."""
    failures = []
    for peer in peers:
        if cancel is not None and cancel.is_set():
            break
        try:
            action(peer)
        except (PeerRejected, NetlinkError) as e:
            reason = str(e) if isinstance(e, PeerRejected) else f"netlink: {e}"
            log.warning("cannot %s peer %s (%s): %s", verb, peer.subnet, peer.public_ip, reason)
            failures.append(PeerFailure(peer, reason))
        if done is not None:
            done(peer)
    return failures
