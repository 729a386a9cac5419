"""Stock-equivalent host-gw backend: per peer, route <subnet> via <PublicIP> dev <uplink>.

Needs the peers on the uplink's L2 segment (flanneld's kernel route add fails otherwise;
here the peer is reported as a failure saying so). Acts on the calling thread's namespace.
"""
from __future__ import annotations

from typing import Iterable

from pyroute2 import IPRoute

from flannel_bpf.loader.peer import Peer
from flannel_bpf.loader.routes import (BackendError, PeerFailure, PeerRejected,
                                       delete_our_routes, delete_route, for_each_peer,
                                       is_on_link, link_index, reject_own_address,
                                       replace_route, require_link, route_kind)

__all__ = ["HostGwBackend", "Peer", "PeerFailure", "BackendError", "is_on_link"]


class HostGwBackend:
    def __init__(self, *, uplink: str):
        self.uplink = uplink

    def setup(self) -> int:
        """Nothing to create; checks the uplink exists and returns its ifindex."""
        with IPRoute() as ipr:
            return require_link(ipr, self.uplink, "uplink")

    def apply_peers(self, peers: Iterable[Peer]) -> list[PeerFailure]:
        with IPRoute() as ipr:
            uplink = require_link(ipr, self.uplink, "uplink")

            def apply(peer: Peer) -> None:
                kind = route_kind(peer.public_ip, ipr)
                reject_own_address(peer, kind)
                if kind != "onlink":
                    raise PeerRejected(f"{peer.public_ip} is not on {self.uplink}'s L2 segment "
                                       "(host-gw needs every peer to be)")
                replace_route(ipr, peer.subnet, peer.public_ip, uplink)

            return for_each_peer(peers, apply, "program")

    def remove_peers(self, peers: Iterable[Peer]) -> list[PeerFailure]:
        with IPRoute() as ipr:
            return for_each_peer(peers, lambda p: delete_route(ipr, p.subnet), "remove")

    def teardown(self) -> None:
        with IPRoute() as ipr:
            uplink = link_index(ipr, self.uplink)
            if uplink is not None:
                delete_our_routes(ipr, oif=uplink)
