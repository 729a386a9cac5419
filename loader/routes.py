"""Netlink pieces shared by the kernel backends (vxlan, host-gw): routes we own, on-link
checks, and applying a batch of peers without one bad peer stopping the rest."""
from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Callable, Iterable

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


class BackendError(RuntimeError):
    """The backend as a whole cannot work (missing uplink, device creation refused...)."""


class PeerRejected(ValueError):
    """This peer cannot be programmed by this backend (the reason says why)."""


@dataclass(frozen=True)
class PeerFailure:
    peer: Peer
    reason: str


def link_index(ipr: IPRoute, ifname: str) -> int | None:
    found = ipr.link_lookup(ifname=ifname)
    return found[0] if found else None


def require_link(ipr: IPRoute, ifname: str, role: str) -> int:
    idx = link_index(ipr, ifname)
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
                  onlink: bool = False) -> None:
    ipr.route("replace", dst=str(dst), gateway=str(gateway), oif=oif, table=MAIN_TABLE,
              proto=ROUTE_PROTO, flags=_RTNH_F_ONLINK if onlink else 0)


def delete_route(ipr: IPRoute, dst: IPv4Network) -> bool:
    """Delete our route to `dst`; False if we had none (routes of others are never touched)."""
    try:
        ipr.route("del", dst=str(dst), table=MAIN_TABLE, proto=ROUTE_PROTO)
        return True
    except NetlinkError as e:
        if e.code in _GONE:
            return False
        raise


def our_routes(ipr: IPRoute, oif: int | None = None) -> list[IPv4Network]:
    result = []
    for r in ipr.route("dump", table=MAIN_TABLE):
        if r["proto"] != ROUTE_PROTO or (oif is not None and r.get_attr("RTA_OIF") != oif):
            continue
        result.append(IPv4Network(f"{r.get_attr('RTA_DST') or '0.0.0.0'}/{r['dst_len']}"))
    return result


def delete_our_routes(ipr: IPRoute, oif: int | None = None) -> int:
    return sum(delete_route(ipr, dst) for dst in our_routes(ipr, oif))


def for_each_peer(peers: Iterable[Peer], action: Callable[[Peer], None],
                  verb: str) -> list[PeerFailure]:
    """Run `action` on every peer; collect, log and return the failures instead of raising,
    so one bad lease never keeps the others from being programmed."""
    failures = []
    for peer in peers:
        try:
            action(peer)
        except (PeerRejected, NetlinkError) as e:
            reason = str(e) if isinstance(e, PeerRejected) else f"netlink: {e}"
            log.warning("cannot %s peer %s (%s): %s", verb, peer.subnet, peer.public_ip, reason)
            failures.append(PeerFailure(peer, reason))
    return failures
