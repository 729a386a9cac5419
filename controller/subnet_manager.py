"""The node's side of flannel's etcd subnet registry: lease, subnet.env, keep-alive, peer watch.

start() acquires a subnet lease as flanneld does (reuse the lease of our public IP, else the
previous subnet from subnet.env, else a random one of the first 100 free), writes subnet.env,
and starts three threads:
- the keeper renews the lease at expiry minus the renew margin (retrying every renew_retry
  seconds while etcd fails) and re-acquires it when it is lost (flanneld exits there);
- the watcher lists the leases at revision R, watches from R+1, resumes from the last revision
  after etcd goes away (backoff 100 ms doubling to 5 s) and re-lists and diffs when that
  revision was compacted;
- the dispatcher calls the consumer's hooks, one at a time, in order.
"""
from __future__ import annotations

import logging
import queue
import random
import threading
import time
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Callable, Iterable

from flannel_bpf.controller.config import NetworkConfig
from flannel_bpf.controller.lease import Lease, LeaseAttrs, subnet_key
from flannel_bpf.controller.lease_check import (BAD_KEY, BAD_VALUE, LeaseProblem, SkippedLeases, lease_problem,
                                                subnet_problem)
from flannel_bpf.controller.peers import PeerEvent, PeerSink, PeerTable
from flannel_bpf.controller.registry import (EtcdError, InvalidEntry, LeaseChange, LeaseListing, LeaseWatch,
                       SubnetRegistry, WatchCompacted)
from flannel_bpf.controller.subnet_env import check_subnet_file, read_previous_subnet, write_subnet_env
from flannel_bpf.loader.netdefs import DEFAULT_SUBNET_FILE

log = logging.getLogger(__name__)

SUBNET_TTL = 24 * 3600  # seconds, as flanneld
DEFAULT_RENEW_MARGIN = 60 * 60  # seconds (--subnet-lease-renew-margin 60 minutes)
DEFAULT_RENEW_RETRY = 60.0
FREE_SUBNETS_TO_PICK_FROM = 100
_MAX_ACQUIRE_ROUNDS = 200  # each lost round means another node took a subnet; bounded regardless


class OutOfSubnets(RuntimeError):
    """Every subnet from SubnetMin to SubnetMax is leased."""


class SubnetAcquireError(RuntimeError):
    """No lease could be created (e.g. lost every race)."""


class LeaseConflict(RuntimeError):
    """Our subnet, on which pods live, is held in etcd by another node: taking another subnet
    would renumber them, so we take none and keep serving them until the key is free again."""


def first_free_subnets(config: NetworkConfig, taken: Iterable[IPv4Network],
                       limit: int = FREE_SUBNETS_TO_PICK_FROM) -> list[IPv4Network]:
    """Up to `limit` subnets of SubnetMin..SubnetMax that overlap no taken subnet, lowest first."""
    taken = set(taken)
    same_size = {t for t in taken if t.prefixlen == config.subnet_len}
    other_sizes = [t for t in taken if t.prefixlen != config.subnet_len]  # left over from an older config
    free = []
    for candidate in config.subnets():
        if candidate in same_size or any(candidate.overlaps(t) for t in other_sizes):
            continue
        free.append(candidate)
        if len(free) >= limit:
            break
    return free


class EtcdSubnetManager:
    """Acquire and keep this node's subnet lease, write subnet.env and stream peer events.

    Callbacks run on one thread ("flannel-bpf-events"), in order:
    `sink.on_peer_event(PeerEvent)` and `on_lease_reacquired(old_lease, new_lease)` (after our
    lease was lost and taken again; the subnet may differ, and subnet.env is already rewritten).
    """

    def __init__(self, registry: SubnetRegistry, config: NetworkConfig, attrs: LeaseAttrs, *,
                 mtu: int, ip_masq: bool = False, subnet_file: str | Path | None = DEFAULT_SUBNET_FILE,
                 previous_subnet: IPv4Network | None = None, sink: PeerSink | None = None,
                 on_lease_reacquired: Callable[[Lease, Lease], None] | None = None,
                 holds_pods: Callable[[IPv4Network], bool] = lambda subnet: False,
                 ttl: int = SUBNET_TTL, renew_margin: float = DEFAULT_RENEW_MARGIN,
                 renew_retry: float = DEFAULT_RENEW_RETRY, backoff_initial: float = 0.1,
                 backoff_max: float = 5.0, own_addresses: Iterable[IPv4Address] = ()):
        if int(ttl) < 1:
            raise ValueError(f"lease TTL must be at least 1 s (got {ttl})")
        if not 0 <= renew_margin < ttl:
            raise ValueError(f"renew margin {renew_margin} s must be below the lease TTL {ttl} s")
        if renew_retry <= 0 or backoff_initial <= 0 or backoff_max < backoff_initial:
            raise ValueError("renew_retry and backoffs must be positive, backoff_max >= backoff_initial")
        self.registry = registry
        self.config = config
        self.attrs = attrs
        self.mtu = mtu
        self.ip_masq = ip_masq
        self.subnet_file = Path(subnet_file) if subnet_file is not None else None
        if previous_subnet is None and self.subnet_file is not None:
            previous_subnet = read_previous_subnet(self.subnet_file)
        self.previous_subnet = previous_subnet
        self.sink = sink
        self.on_lease_reacquired = on_lease_reacquired
        self.holds_pods = holds_pods
        self.ttl = int(ttl)
        self.renew_margin = renew_margin
        self.renew_retry = renew_retry
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        # A peer lease naming one of these as its PublicIP is skipped (our own lease aside).
        self.own_addresses = frozenset({attrs.public_ip, *own_addresses})

        self._lease: Lease | None = None
        self._peers = PeerTable()
        # Held while our own subnet changes and while the watcher classifies changes, so that our
        # own new lease is never taken for a peer.
        self._own_lock = threading.RLock()
        self._peers_lock = threading.Lock()
        self._stopping = threading.Event()
        self._wake_keeper = threading.Event()
        self._lease_lost = threading.Event()
        self._resync = threading.Event()
        self._synced = threading.Event()
        self._stream: LeaseWatch | None = None
        self._stream_lock = threading.Lock()
        self._events: queue.Queue = queue.Queue()
        self._threads: list[threading.Thread] = []
        self.skipped = SkippedLeases()
        self.reacquired_count = 0
        self.conflict: str | None = None  # why we hold no lease on our subnet, while another node does
        self.reconnect_count = 0  # etcd outages the watch came back from
        self._watch_down_since: float | None = time.monotonic()  # None while the watch is up

    # -- public ------------------------------------------------------------------------------

    @property
    def lease(self) -> Lease | None:
        return self._lease

    def peers(self) -> dict[IPv4Network, Lease]:
        """The peers as the watcher knows them now (it may be ahead of the delivered events)."""
        with self._peers_lock:
            return self._peers.snapshot()

    def watch_down_for(self) -> float | None:
        """Seconds the peer watch has been down (not yet up, or broken and reconnecting);
        None while it is up."""
        since = self._watch_down_since
        return None if since is None else time.monotonic() - since

    def wait_synced(self, timeout: float | None = None) -> bool:
        """True once the first full peer listing has been turned into events."""
        return self._synced.wait(timeout)

    def start(self) -> Lease:
        """Acquire the lease and write subnet.env (raising OutOfSubnets, SubnetAcquireError or
        EtcdError when that fails, SubnetEnvError when subnet.env cannot be written), then start
        keeping it and watching peers."""
        if self.subnet_file is not None:
            check_subnet_file(self.subnet_file)  # before a lease is taken that nobody could use
        with self._own_lock:
            try:
                self._lease = self._acquire(self.previous_subnet)
            except LeaseConflict:
                # Serve the pods on our subnet as subnet.env has it; the keeper takes the key
                # back as soon as it is free.
                self._lease = self.attrs.for_subnet(self.previous_subnet)
                self._lease_lost.set()
        self._write_subnet_env()
        for name, target in (("flannel-bpf-events", self._dispatch), ("flannel-bpf-watch", self._watch),
                             ("flannel-bpf-lease", self._keep)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self._lease

    def stop(self, release: bool = False, timeout: float = 10.0) -> None:
        """Stop the threads (events already queued are still delivered). With release, delete
        our lease from etcd; otherwise it stays until it expires, as flanneld leaves it."""
        self._stopping.set()
        self._wake_keeper.set()
        self._cancel_stream()
        # (stop() may be called from a callback, on the events thread itself.)
        others = [t for t in self._threads if t is not threading.current_thread()]
        for thread in others:
            if thread.name != "flannel-bpf-events":
                thread.join(timeout)
        self._events.put(None)
        for thread in others:
            thread.join(timeout)
        self._threads = []
        if release and self._lease is not None:
            try:
                if self.registry.delete_lease(self._lease):
                    log.info("released lease %s", self._lease.subnet)
            except EtcdError as exc:
                log.warning("could not release lease %s: %s", self._lease.subnet, exc)

    # -- acquiring ---------------------------------------------------------------------------

    def _acquire(self, previous: IPv4Network | None) -> Lease:
        """Our lease on `previous` (renewed, or created while free); else, unless pods live on
        `previous` and another node holds it (LeaseConflict), the lease that carries our public
        IP, as flanneld takes it; else a free subnet."""
        lost_races: set[IPv4Network] = set()
        for _ in range(_MAX_ACQUIRE_ROUNDS):
            listing = self.registry.list_leases()
            self._check_conflict(listing, previous)
            reused = self._reuse_own_lease(listing, previous)
            if reused == "retry":
                continue
            if reused is not None:
                self._set_conflict(None)
                return reused
            # Only keys that are subnets of this network take a subnet: a key such as /16 or
            # 0.0.0.0-0 is never programmed, so it must not stop new nodes joining either.
            taken = {t for t in listing.taken() if subnet_problem(t, self.config) is None} | lost_races
            subnet = self._previous_if_free(previous, taken)
            if subnet is None:
                free = first_free_subnets(self.config, taken)
                if not free:
                    raise OutOfSubnets(f"out of subnets: every /{self.config.subnet_len} from "
                                       f"{self.config.subnet_min} to {self.config.subnet_max} is leased")
                subnet = random.choice(free)
            created = self.registry.create_lease(subnet, self.attrs, self.ttl)
            if created is not None:
                log.info("acquired lease %s for %s", subnet, self.attrs.public_ip)
                self._set_conflict(None)
                return created
            log.info("lost the race for %s to another node; trying another subnet", subnet)
            lost_races.add(subnet)
        raise SubnetAcquireError(f"no subnet lease after {_MAX_ACQUIRE_ROUNDS} rounds of lost races")

    def _check_conflict(self, listing: LeaseListing, previous: IPv4Network | None) -> None:
        """LeaseConflict when another node holds `previous` while pods live on it."""
        if previous is None:
            return
        holder = next((l for l in listing.leases if l.subnet == previous), None)
        if holder is not None and holder.public_ip != self.attrs.public_ip and self.holds_pods(previous):
            self._set_conflict(f"our subnet {previous} is held in etcd by {holder.public_ip}, and pods live on "
                               "it: not taking another subnet (that would renumber them); serving them and "
                               "waiting for the key to be ours or free")
            raise LeaseConflict(self.conflict)

    def _set_conflict(self, conflict: str | None) -> None:
        if conflict != self.conflict:
            if conflict is not None:
                log.error("lease conflict: %s", conflict)
            else:
                log.warning("lease conflict over: our subnet's key is ours again")
        self.conflict = conflict

    def _reuse_own_lease(self, listing: LeaseListing, previous: IPv4Network | None) -> Lease | str | None:
        """flanneld's first choice: the lease that already carries our public IP; when several
        do (another node wrote one with our IP), the one on our previous subnet, and when that
        one is free, none: a lease we did not write never renumbers our pods."""
        ours = [lease for lease in listing.leases if lease.public_ip == self.attrs.public_ip]
        mine = [lease for lease in ours if lease.subnet == previous]
        if not mine and ours and previous is not None and self.config.fits(previous) \
                and previous not in listing.taken():
            log.warning("ignoring lease(s) %s that name our public IP %s: our subnet %s (subnet.env) is free",
                        ", ".join(str(l.subnet) for l in ours), self.attrs.public_ip, previous)
            return None
        if mine and len(ours) > 1:
            log.warning("lease(s) %s also name our public IP %s: not ours, left alone",
                        ", ".join(str(l.subnet) for l in ours if l.subnet != previous), self.attrs.public_ip)
        for lease in mine or ours:
            if not self.config.fits(lease.subnet):
                log.info("deleting lease %s of our public IP %s: it does not fit the network config",
                         lease.subnet, lease.public_ip)
                self.registry.delete_lease(lease)
                return "retry"
            renewed = self.registry.update_lease(lease, self.attrs, self.ttl)
            if renewed is None:
                return "retry"  # it changed under us: look again
            log.info("reusing lease %s held by our public IP %s", lease.subnet, lease.public_ip)
            return renewed
        return None

    def _previous_if_free(self, previous: IPv4Network | None, taken: set[IPv4Network]) -> IPv4Network | None:
        if previous is None:
            return None
        if not self.config.fits(previous):
            log.warning("previous subnet %s does not fit the network config; not reusing it", previous)
            return None
        if any(previous.overlaps(t) for t in taken):
            log.info("previous subnet %s is leased by another node; picking a new one", previous)
            return None
        log.info("trying our previous subnet %s", previous)
        return previous

    def _write_subnet_env(self) -> None:
        if self.subnet_file is None:
            return
        write_subnet_env(self.subnet_file, self.config.network, self._lease.subnet, self.mtu, self.ip_masq)
        log.info("wrote %s (subnet %s, MTU %d)", self.subnet_file, self._lease.subnet, self.mtu)

    # -- keeping the lease -------------------------------------------------------------------

    def _renew_due(self) -> float:
        """time.monotonic() at which to renew: expiry minus the margin."""
        remaining = (self._lease.expires_at or time.time()) - time.time()
        return time.monotonic() + max(0.0, remaining - self.renew_margin)

    def _keep(self) -> None:
        due = self._renew_due()
        reacquire = False
        while True:
            self._wake_keeper.wait(max(0.0, due - time.monotonic()))
            self._wake_keeper.clear()
            if self._stopping.is_set():
                return
            if self._lease_lost.is_set():
                self._lease_lost.clear()
                reacquire, due = True, time.monotonic()
            if time.monotonic() < due:
                continue
            try:
                if reacquire:
                    self._reacquire()
                    reacquire = False
                elif not self._renew():
                    reacquire = True
                    continue
                due = self._renew_due()
            except LeaseConflict:  # logged when it began; the key is looked at again each retry
                due = time.monotonic() + self.renew_retry
            except Exception as exc:  # EtcdError and running out of subnets are expected
                action = "re-acquire" if reacquire else "renew"
                if isinstance(exc, (EtcdError, OutOfSubnets, SubnetAcquireError)):
                    log.warning("could not %s lease %s: %s; retrying in %g s", action, self._lease.subnet,
                                exc, self.renew_retry)
                else:
                    log.exception("could not %s lease %s; retrying in %g s", action, self._lease.subnet,
                                  self.renew_retry)
                due = time.monotonic() + self.renew_retry

    def _renew(self) -> bool:
        """Renew with a fresh TTL; False when the lease turned out to be lost."""
        renewed = self.registry.update_lease(self._lease, self.attrs, self.ttl)
        if renewed is None:
            log.warning("our lease %s changed or vanished in etcd; re-acquiring", self._lease.subnet)
            return False
        self._lease = renewed
        log.info("renewed lease %s until %s", renewed.subnet,
                 time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(renewed.expires_at)))
        return True

    def _reacquire(self) -> None:
        with self._own_lock:
            old = self._lease
            new = self._acquire(previous=old.subnet)  # LeaseConflict: keep serving `old`
            self._lease = new
            # The new subnet may still be in the peer table if its previous holder's DELETE is
            # not processed yet: it is gone (we created the key), so remove it now.
            with self._peers_lock:
                gone = self._peers.apply(new.subnet, None)
            if gone is not None:
                self._announce(gone)
            self.reacquired_count += 1
            if new.subnet != old.subnet:
                log.warning("re-acquired a different subnet: %s (was %s)", new.subnet, old.subnet)
                self._write_subnet_env()
            else:
                log.info("re-acquired lease %s", new.subnet)
            if self.on_lease_reacquired is not None:
                self._events.put((self.on_lease_reacquired, (old, new)))
        # Changes to other nodes' keys on our old subnet were ignored while we held it: re-list.
        self._resync.set()
        self._cancel_stream()

    def _signal_lease_lost(self, why: str) -> None:
        log.warning("our lease %s %s; re-acquiring", self._lease.subnet, why)
        self._lease_lost.set()
        self._wake_keeper.set()

    # -- watching peers ----------------------------------------------------------------------

    def _watch(self) -> None:
        revision = None
        backoff = self.backoff_initial
        outage = None
        while not self._stopping.is_set():
            try:
                if revision is None or self._resync.is_set():
                    self._resync.clear()
                    listing = self.registry.list_leases()
                    outage = self._end_outage(outage)
                    self._apply_listing(listing)
                    revision = listing.revision
                stream = self.registry.watch_leases(revision + 1)
                with self._stream_lock:
                    self._stream = stream
                if self._stopping.is_set() or self._resync.is_set():
                    stream.cancel()
                for changes in stream:
                    outage = self._end_outage(outage)
                    self._watch_down_since = None
                    backoff = self.backoff_initial
                    for change in changes:
                        self._apply_change(change)
                        revision = max(revision, change.revision)
            except WatchCompacted as exc:
                self._watch_down()
                log.warning("watch from revision %d fell behind etcd compaction (%s); re-listing", revision + 1,
                            exc.compact_revision)
                revision = None
            except Exception as exc:  # EtcdError is expected; anything else is a bug, but keep watching
                self._watch_down()
                if not isinstance(exc, EtcdError):
                    log.exception("peer watch failed unexpectedly")
                elif outage is None:
                    outage = str(exc)
                    log.warning("etcd watch interrupted (%s); reconnecting with backoff up to %g s",
                                exc, self.backoff_max)
                self.registry.next_endpoint()
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, self.backoff_max)
            finally:
                with self._stream_lock:
                    self._stream = None

    def _watch_down(self) -> None:
        if self._watch_down_since is None:
            self._watch_down_since = time.monotonic()

    def _end_outage(self, outage: str | None) -> None:
        """Log and count the end of an outage (if there was one); returns the new outage state, None."""
        if outage is not None:
            self.reconnect_count += 1
            log.info("etcd watch re-established after: %s", outage)

    def _cancel_stream(self) -> None:
        with self._stream_lock:
            if self._stream is not None:
                self._stream.cancel()

    def _apply_listing(self, listing: LeaseListing) -> None:
        with self._own_lock:
            own = self._lease
            self.skipped.retain(entry.key for entry in listing.invalid)  # forget keys that are gone
            for entry in listing.invalid:
                self._skip_invalid(entry)
            leases = {lease.subnet: lease for lease in listing.leases}
            if listing.revision >= own.mod_revision:
                mine = leases.get(own.subnet)
                if mine is None or mine.public_ip != own.public_ip:
                    self._signal_lease_lost("is missing from etcd" if mine is None
                                            else f"is now held by {mine.public_ip}")
            leases.pop(own.subnet, None)
            peers = {}
            for subnet, lease in leases.items():
                problem = self._peer_problem(lease)
                if problem is None:
                    peers[subnet] = lease
                else:
                    self.skipped.skip(self._key_of(lease), problem)
            with self._peers_lock:
                events = self._peers.reset(peers)
            for event in events:
                self._announce(event)
        self._synced.set()

    def _apply_change(self, change: LeaseChange) -> None:
        if change.invalid is not None:
            self._skip_invalid(change.invalid)
        elif change.kind == "delete":
            self.skipped.forget(change.key)
        if change.subnet is None:
            return
        with self._own_lock:
            own = self._lease
            if change.subnet == own.subnet:
                if change.revision <= own.mod_revision:
                    return  # older than our own latest write
                if change.kind == "delete":
                    self._signal_lease_lost("was deleted from etcd (removed or expired)")
                elif change.lease is None or change.lease.public_ip != own.public_ip:
                    holder = change.lease.public_ip if change.lease else "an unparseable value"
                    self._signal_lease_lost(f"was overwritten by {holder}")
                return
            lease = change.lease
            if lease is not None:
                problem = self._peer_problem(lease)
                if problem is None:
                    self.skipped.forget(change.key)
                else:
                    self.skipped.skip(change.key, problem)
                    lease = None  # a peer whose lease turns unusable is removed
            with self._peers_lock:
                event = self._peers.apply(change.subnet, lease)
            if event is not None:
                self._announce(event)

    def _peer_problem(self, lease: Lease) -> LeaseProblem | None:
        return lease_problem(lease, self.config, self.own_addresses)

    def _key_of(self, lease: Lease) -> str:
        return subnet_key(self.registry.options.prefix, lease.subnet)

    def _skip_invalid(self, entry: InvalidEntry) -> None:
        self.skipped.skip(entry.key, LeaseProblem(BAD_KEY if entry.subnet is None else BAD_VALUE, entry.reason))

    def _announce(self, event: PeerEvent) -> None:
        log.info("%s", event.describe())
        if self.sink is not None:
            self._events.put((self.sink.on_peer_event, (event,)))

    # -- delivering --------------------------------------------------------------------------

    def _dispatch(self) -> None:
        while True:
            item = self._events.get()
            if item is None:
                return
            callback, args = item
            try:
                callback(*args)
            except Exception:  # a consumer bug must not stop the stream
                log.exception("event consumer %r failed", callback)
