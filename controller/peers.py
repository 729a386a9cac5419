"""Peer events and the table that turns etcd changes and snapshots into them.

The consumer (the data plane) implements PeerSink and receives PeerEvents from one thread, in
order: "added" for a subnet not seen before, "changed" when what a peer publishes (public IP,
backend type or backend data) changes, "removed" when its lease is deleted, expires, or turns
unparseable. A renewal that only refreshes the TTL is not an event.
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass
from ipaddress import IPv4Network
from typing import Literal, Protocol

from flannel_bpf.controller.lease import Lease

log = logging.getLogger(__name__)

PeerEventKind = Literal["added", "changed", "removed"]


@dataclass(frozen=True)
class PeerEvent:
    kind: PeerEventKind
    lease: Lease  # for "removed": the lease as it was last seen

    def describe(self) -> str:
        return f"peer {self.kind}: {self.lease.describe()}"


class PeerSink(Protocol):
    def on_peer_event(self, event: PeerEvent) -> None:
        """Called from the subnet manager's event thread, one event at a time, in order."""


class PeerTable:
    """The current peers by subnet. Not thread-safe: one owner applies changes."""

    def __init__(self):
        self._peers: dict[IPv4Network, Lease] = {}

    def __len__(self) -> int:
        return len(self._peers)

    def __contains__(self, subnet: IPv4Network) -> bool:
        return subnet in self._peers

    def snapshot(self) -> dict[IPv4Network, Lease]:
        return dict(self._peers)

    def apply(self, subnet: IPv4Network, lease: Lease | None) -> PeerEvent | None:
        """Set (lease) or clear (None) one subnet; the event it causes, if any."""
        previous = self._peers.get(subnet)
        if lease is None:
            if previous is None:
                return None
            del self._peers[subnet]
            return PeerEvent("removed", previous)
        self._peers[subnet] = lease
        if previous is None:
            return PeerEvent("added", lease)
        if previous.published != lease.published:
            return PeerEvent("changed", lease)
        return None

    def reset(self, leases: dict[IPv4Network, Lease]) -> list[PeerEvent]:
        """Replace the whole table with a fresh listing; the events that turn the old into the new."""
        events = [self.apply(subnet, None) for subnet in list(self._peers) if subnet not in leases]
        events += [self.apply(subnet, lease) for subnet, lease in leases.items()]
        return [event for event in events if event is not None]


class PeerEventThread:
    """Delivers peer events to a sink on one thread ("flannel-bpf-events"), in order; a failing
    sink is logged and the stream goes on."""

    def __init__(self, sink: PeerSink | None):
        self.sink = sink
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="flannel-bpf-events", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, event: PeerEvent) -> None:
        if self.sink is not None:
            self._queue.put(event)

    def stop(self, timeout: float = 10.0) -> None:
        """Deliver what is queued, then end (also when called from the sink itself)."""
        self._queue.put(None)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _run(self) -> None:
        while (event := self._queue.get()) is not None:
            try:
                self.sink.on_peer_event(event)
            except Exception:  # a consumer bug must not stop the stream
                log.exception("peer event consumer failed on %s", event.describe())
