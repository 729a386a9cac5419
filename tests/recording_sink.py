"""A PeerSink for tests: records every event and waits for conditions on them."""
from __future__ import annotations

import threading
from ipaddress import IPv4Network

from flannel_bpf.controller.lease import Lease
from flannel_bpf.controller.peers import PeerEvent


class RecordingSink:
    """A PeerSink that keeps every event and can wait for a condition on them."""

    def __init__(self):
        self.events: list[PeerEvent] = []
        self.reacquired: list[tuple[Lease, Lease]] = []
        self._changed = threading.Condition()
        self.threads: set[str] = set()

    def on_peer_event(self, event: PeerEvent) -> None:
        with self._changed:
            self.threads.add(threading.current_thread().name)
            self.events.append(event)
            self._changed.notify_all()

    def on_lease_reacquired(self, old: Lease, new: Lease) -> None:
        with self._changed:
            self.reacquired.append((old, new))
            self._changed.notify_all()

    def state(self) -> dict[IPv4Network, Lease]:
        """The peers as a consumer that applied every event in order sees them."""
        peers: dict[IPv4Network, Lease] = {}
        for event in list(self.events):
            if event.kind == "removed":
                peers.pop(event.lease.subnet, None)
            else:
                peers[event.lease.subnet] = event.lease
        return peers

    def wait_for(self, condition, timeout: float = 10.0, what: str = "condition"):
        with self._changed:
            if not self._changed.wait_for(lambda: condition(self), timeout):
                raise AssertionError(f"timed out after {timeout} s waiting for {what}; events: "
                                     + "; ".join(e.describe() for e in self.events))

    def wait_for_peers(self, subnets, timeout: float = 10.0):
        wanted = set(subnets)
        self.wait_for(lambda s: set(s.state()) == wanted, timeout, f"peers {sorted(map(str, wanted))}")
