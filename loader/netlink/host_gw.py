"""Stock-equivalent host-gw backend: per peer, route <subnet> via <PublicIP> dev <uplink>.

Needs the peers on the uplink's L2 segment (flanneld's kernel route add fails otherwise;
here the peer is reported as a failure saying so). Acts on the calling thread's namespace.
Batches are linear: the uplink is resolved once, then per peer a route lookup and the route.
"""
from __future__ import annotations

import logging
import threading
from ipaddress import IPv4Network
from typing import Callable, Collection, Iterable

from pyroute2 import IPRoute

from flannel_bpf.loader.peer import Peer
from flannel_bpf.loader.netlink.routes import (NetlinkLookups, PeerBatches, PeerFailure, PeerRejected,
                                       delete_our_routes, delete_route, for_each_peer,
                                       link_index, prune_our_routes,
                                       reject_own_address, replace_route, require_link)

log = logging.getLogger(__name__)


class KernelHostGwBackend(PeerBatches):
    def __init__(self, *, uplink: str):
        self.uplink = uplink

    def setup(self) -> int:
        """Nothing to create; checks the uplink exists and returns its ifindex."""
        with IPRoute() as ipr:
            return require_link(ipr, self.uplink, "uplink")

    def update(self, apply: Iterable[Peer] = (), remove: Iterable[Peer] = (), *,
               keep: Collection[IPv4Network] | None = None, cancel: threading.Event | None = None,
               done: Callable[[Peer], None] | None = None) -> list[PeerFailure]:
        """One batch over peers of distinct subnets: remove `remove`, program `apply`, then with
        `keep` remove our routes through the uplink to subnets not in it (as KernelVxlanBackend)."""
        apply, remove = list(apply), list(remove)
        if not apply and not remove and keep is None:
            return []
        with IPRoute() as ipr:
            lookups = NetlinkLookups(ipr)
            uplink = lookups.require_link(self.uplink, "uplink") if apply else lookups.link(self.uplink)

            def program(peer: Peer) -> None:
                kind = lookups.route_kind(peer.public_ip)
                reject_own_address(peer, kind)
                if kind != "onlink":
                    raise PeerRejected(f"{peer.public_ip} is not on {self.uplink}'s L2 segment "
                                       "(host-gw needs every peer to be)")
                replace_route(ipr, peer.subnet, peer.public_ip, uplink)

            failures = for_each_peer(remove, lambda p: delete_route(ipr, p.subnet), "remove", cancel, done)
            failures += for_each_peer(apply, program, "program", cancel, done)
            if keep is not None and uplink is not None and not (cancel is not None and cancel.is_set()):
                removed = prune_our_routes(ipr, [uplink], keep, cancel)
                if removed:
                    log.info("removed %d routes of peers that are gone (left by an earlier agent)", len(removed))
            return failures

    def teardown(self) -> None:
        with IPRoute() as ipr:
            uplink = link_index(ipr, self.uplink)
            if uplink is not None:
                delete_our_routes(ipr, oif=uplink)
