"""The node agent (`flannel-bpf attach`): flanneld's job with a BPF data plane.

Order of work, as flanneld: network config -> uplink -> backend prepared (VtepMAC known,
programs compiled) ->
subnet lease (subnet.env written) -> data plane started on the lease -> peers synced in one
batch -> ready (for bpf: once the maps hold every peer; the kernel safety net follows).
Peer events are coalesced: the subnet manager's event thread only records the latest lease per
subnet; the applier thread takes everything recorded and hands it to the backend as one batch,
so a burst of events costs one batch and no event waits behind another's netlink work. A
reconcile tick picks up what etcd never reports (the pod bridge appearing, local pods).
On SIGTERM/SIGINT the data plane stays as it is, pinned and forwarding, unless cleanup was
asked for: a restarted agent adopts it and reconciles it with etcd.
"""
from __future__ import annotations

import argparse
import logging
import threading
from dataclasses import dataclass, replace
from ipaddress import IPv4Address, IPv4Network
from socket import AF_INET

from pyroute2 import IPRoute

from flannel_bpf.controller.backends import BACKENDS, pod_ports
from flannel_bpf.controller.coalesce import CoalescingWorker
from flannel_bpf.controller.config import NetworkConfig
from flannel_bpf.controller.config_change import check_config_change
from flannel_bpf.controller.control_plane import ControlPlane, ManagerSettings, SubnetManager
from flannel_bpf.controller.flags import FlagError, renew_margin_seconds
from flannel_bpf.controller.health import HealthServer
from flannel_bpf.controller.iptables import DEFAULT_RESYNC, RuleKeeper, forward_rules, masq_rules
from flannel_bpf.controller.lease import Lease, node_lease_attrs
from flannel_bpf.controller.netlink_waker import NetlinkWaker
from flannel_bpf.controller.peers import PeerEvent
from flannel_bpf.controller.subnet_manager import SUBNET_TTL
from flannel_bpf.controller.uplink import Uplink
from flannel_bpf.loader.bpf.program import CHILD_TIMEOUT
from flannel_bpf.loader.netdefs import DEFAULT_BRIDGE, DEFAULT_SUBNET_FILE
from flannel_bpf.loader.netlink.routes import MAIN_TABLE, find_link

log = logging.getLogger(__name__)

BACKEND_CHOICES = ("bpf", "vxlan", "host-gw")
REMOVAL_GRACE = 0.5  # seconds a removed peer stays programmed, in case its owner puts it back


@dataclass(frozen=True)
class AgentOptions:
    backend: str | None = None          # overrides Backend.Type of the network config
    decap: str | None = None            # overrides Backend.Decap ("auto" | "xdp" | "tc")
    compile_timeout: float = CHILD_TIMEOUT  # for the bpf programs, at start
    bridge: str = DEFAULT_BRIDGE
    pin_dir: str | None = None
    cleanup_on_exit: bool = False
    reconcile_interval: float = 1.0
    lease_ttl: int = SUBNET_TTL
    renew_margin: float = 3600.0
    ip_masq: bool = False
    iptables_forward_rules: bool = True
    iptables_resync: float = DEFAULT_RESYNC
    subnet_file: str = DEFAULT_SUBNET_FILE
    healthz_ip: str = "0.0.0.0"
    healthz_port: int = 0
    accept_config_change: bool = False  # a config contradicting what this node runs is refused without it


class Agent:
    def __init__(self, control: ControlPlane, uplink: Uplink, options: AgentOptions):
        self.control = control  # etcd or Kubernetes: nothing below knows which
        self.uplink = uplink
        self.options = options
        self.config: NetworkConfig | None = None
        self.backend = None
        self.manager: SubnetManager | None = None
        self.iptables = RuleKeeper(options.iptables_resync)
        self.health = None
        self._started = threading.Event()   # backend programmed with our lease: events may apply
        self._ready = threading.Event()
        self._stop = threading.Event()
        self._wake = threading.Event()  # reconcile now (netlink event or stop)
        self._backend_lock = threading.Lock()  # one writer of kernel state at a time
        # subnet -> latest Lease (None: removed), applied in batches once synced
        self.applier = CoalescingWorker("flannel-bpf-apply", self._apply_batch)

    # -- lifecycle ---------------------------------------------------------------------------

    def run(self) -> None:
        """Run until stop() (signal handlers call it). Raises on errors that make a node
        useless (bad config, out of subnets, unusable uplink)."""
        self._start_health()
        try:
            # Subscribed before start(): a pod bridge made while the data plane starts (the lab
            # creates pods as soon as subnet.env exists) must wake a reconcile, not wait a tick.
            NetlinkWaker(self._wake, self._stop).start()
            self.start()
            while not self._stop.is_set():
                self._wake.wait(self.options.reconcile_interval)
                self._wake.clear()
                if not self._stop.is_set():
                    self.reconcile()
        finally:
            self.shutdown()

    def start(self) -> Lease:

        self.config = self._load_config()
        check_config_change(self.config, self.options.subnet_file, self.options.accept_config_change)
        backend_type = self.config.backend.type
        log.info("network %s, subnets /%d, backend %s on %s (%s)", self.config.network,
                 self.config.subnet_len, backend_type, self.uplink.name, self.uplink.address)
        backend_class = BACKENDS[backend_type]
        kwargs = {}
        if backend_type == "bpf":
            kwargs = dict(bridge=self.options.bridge, pin_dir=self.options.pin_dir,
                          compile_timeout=self.options.compile_timeout)
        self.backend = backend_class(self.config.backend, self.uplink, **kwargs)
        vtep_mac = getattr(self.backend, "vtep_mac", None)
        attrs = node_lease_attrs(backend_type, self.uplink.public_ip, self.config.backend.vni, vtep_mac)
        self.manager = self.control.subnet_manager(self.config, attrs, ManagerSettings(
            mtu=self.config.backend.pod_mtu(self.uplink.mtu), subnet_file=self.options.subnet_file, sink=self,
            on_lease_reacquired=self._lease_reacquired, holds_pods=self._pods_live, stop=self._stop,
            ip_masq=self.options.ip_masq, ttl=self.options.lease_ttl, renew_margin=self.options.renew_margin,
            own_addresses=frozenset({self.uplink.ip})))
        self.backend.prepare()
        lease = self.manager.start()
        log.info("lease %s acquired; subnet.env written to %s", lease.subnet, self.options.subnet_file)
        with self._backend_lock:
            self.backend.start(lease)
            self._started.set()
        if self.options.ip_masq:
            self.iptables.keep(masq_rules(self.config.network, lease.subnet))
        if self.options.iptables_forward_rules:
            self.iptables.keep(forward_rules(self.config.network))
        self._sync_when_listed()
        self.applier.start()
        return lease

    def _load_config(self) -> NetworkConfig:
        config = self.control.network_config(self._stop)
        overrides = {}
        if self.options.backend:
            overrides["type"] = self.options.backend
        if self.options.decap:
            overrides["decap"] = self.options.decap
        if overrides:
            config = replace(config, backend=replace(config.backend, **overrides))
        return config

    def _sync_when_listed(self) -> None:
        """After the first full listing, make the kernel hold exactly those peers: this removes
        what an earlier agent programmed for peers that left while none ran."""
        while not self.manager.wait_synced(timeout=1.0):
            if self._stop.is_set():
                return
        with self._backend_lock:
            # The events recorded so far are all in this listing: one batch for everything.
            self.applier.take()
            self.backend.sync(self.manager.peers())
        self._ready.set()
        log.info("ready: %d peers programmed (kernel fallback pending for %d)",
                 len(self.backend.programmed), self.backend.fallback_pending)

    def reconcile(self) -> None:
        try:
            with self._backend_lock:
                self.backend.reconcile()
        except Exception as err:  # a tick must never end the agent; the next tick retries
            log.warning("reconcile: %s", err)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def shutdown(self) -> None:
        self._ready.clear()
        if self.manager is not None:
            self.manager.stop(release=self.options.cleanup_on_exit)
        self.applier.stop()
        # With cleanup, also after a failed start: prepare() may have pinned programs already.
        if self.backend is not None and (self._started.is_set() or self.options.cleanup_on_exit):
            with self._backend_lock:
                self.backend.stop(cleanup=self.options.cleanup_on_exit)
        self.iptables.stop(remove_rules=self.options.cleanup_on_exit)
        if self.health is not None:
            self.health.stop()
        if self.options.cleanup_on_exit:
            log.info("stopped; data plane removed")
        else:
            log.info("stopped; data plane %s", "left forwarding (pinned)" if self._started.is_set()
                     else "not started")

    # -- subnet manager hooks (its event thread) ---------------------------------------------

    def on_peer_event(self, event: PeerEvent) -> None:
        """Only records the latest lease of the subnet: the applier does the work. A removal
        waits REMOVAL_GRACE: a lease deleted by hand is put back by its owner within tens of
        ms, and its pods must not be cut off meanwhile; a put in that time replaces it."""
        if event.kind == "removed":
            self.applier.submit_later({event.lease.subnet: None}, REMOVAL_GRACE)
        else:
            self.applier.submit({event.lease.subnet: event.lease})

    def _apply_batch(self, leases: dict) -> None:
        """The applier thread: everything recorded since the last batch (a failing batch is
        retried by the worker, newer leases winning)."""
        with self._backend_lock:
            self.backend.apply_batch(leases)

    def _lease_reacquired(self, old: Lease, new: Lease) -> None:
        if old.subnet == new.subnet:
            log.info("lease %s taken again", new.subnet)
            return
        log.warning("our subnet changed from %s to %s: reprogramming this node", old.subnet, new.subnet)
        with self._backend_lock:
            self.backend.start(new)
        if self.options.ip_masq:
            self.iptables.keep(masq_rules(self.config.network, new.subnet))

    # -- health and metrics ------------------------------------------------------------------

    def is_ready(self) -> bool:
        """Programmed, still hearing from etcd (a dead peer watch means peers may be stale), and
        our subnet's key is ours (not while another node holds it)."""
        return (self._ready.is_set() and self.manager.watch_down_for() is None
                and not self.manager.conflict)

    def _pods_live(self, subnet: IPv4Network) -> bool:
        return pods_live_on(subnet, self.options.bridge)

    def _start_health(self) -> None:
        if not self.options.healthz_port:
            return
        self.health = HealthServer(self.options.healthz_ip, self.options.healthz_port, self.is_ready,
                                   self.metrics_snapshot)
        self.health.start()

    def metrics_snapshot(self) -> dict:
        maps = getattr(self.backend, "maps", None)
        counters, entries = {}, {}
        if maps is not None and self._started.is_set():
            counters = maps.read_counters()
            entries = {"peers": len(maps.list_peers()), "endpoints": len(maps.list_endpoints())}
        lease = self.manager.lease if self.manager else None
        return {
            "ready": self.is_ready(),
            "peers": len(self.backend.programmed) if self.backend is not None else 0,
            "leases_skipped": self.manager.skipped.current() if self.manager else {},
            "leases_skipped_total": self.manager.skipped.total.copy() if self.manager else {},
            "etcd_watch_up": bool(self.manager) and self.manager.watch_down_for() is None,
            "map_entries": entries,
            "counters": counters,
            "lease_expiry": lease.expires_at if lease else None,
            "etcd_reconnects": self.manager.reconnect_count if self.manager else 0,
            "lease_reacquired": self.manager.reacquired_count if self.manager else 0,
            "iptables_restored": self.iptables.restored,
            "lease_conflict": int(bool(self.manager and self.manager.conflict)),
            "peer_events_pending": self.applier.pending,
            "fallback_pending": self.backend.fallback_pending if self.backend is not None else 0,
            "netlink_failures": len(self.backend.netlink_failures) if self.backend is not None else 0,
        }


_SCOPE_LINK = 253


def pods_live_on(subnet: IPv4Network, bridge: str) -> bool:
    """Whether pods live on `subnet` on this node: the pod bridge carries an address in it and
    has ports, or a pod of flannel-bpf-cni is routed there (a /32 link route). Such a subnet is
    never given up for another: that would renumber them."""
    with IPRoute() as ipr:
        for route in ipr.get_routes(family=AF_INET, table=MAIN_TABLE):
            if (route["dst_len"] == 32 and route["scope"] == _SCOPE_LINK
                    and IPv4Address(route.get_attr("RTA_DST")) in subnet):
                return True
        link = find_link(ipr, bridge)
        if link is None:
            return False
        on_subnet = any(IPv4Address(a.get_attr("IFA_ADDRESS")) in subnet
                        for a in ipr.get_addr(family=AF_INET, index=link["index"]))
        return on_subnet and bool(pod_ports(ipr, link["index"]))


def options_from_args(args: argparse.Namespace) -> AgentOptions:
    """AgentOptions from the parsed flags; FlagError when they do not go together."""
    if renew_margin_seconds(args) >= args.subnet_lease_ttl:
        raise FlagError(f"--subnet-lease-renew-margin ({renew_margin_seconds(args)} s) must be shorter than "
                        f"the lease TTL ({args.subnet_lease_ttl} s)")
    if args.reconcile_interval <= 0:
        raise FlagError("--reconcile-interval must be positive")
    if args.compile_timeout <= 0:
        raise FlagError("--compile-timeout must be positive")
    return AgentOptions(
        backend=args.backend, decap=args.decap, compile_timeout=args.compile_timeout, bridge=args.bridge, pin_dir=args.pin_dir,
        cleanup_on_exit=args.cleanup_on_exit, reconcile_interval=args.reconcile_interval,
        lease_ttl=args.subnet_lease_ttl, renew_margin=renew_margin_seconds(args),
        ip_masq=bool(args.ip_masq), iptables_forward_rules=bool(args.iptables_forward_rules),
        iptables_resync=float(args.iptables_resync), subnet_file=args.subnet_file,
        healthz_ip=args.healthz_ip, healthz_port=int(args.healthz_port),
        accept_config_change=args.accept_config_change)
