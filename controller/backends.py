"""The data-plane backends the node agent drives: `bpf`, and the stock-equivalent `vxlan` and
`host-gw`. Each turns this node's lease and the peer leases into kernel state.

The agent calls `prepare()` (slow work, before peers can see us), publishes the lease (for vxlan
and bpf with the `vtep_mac` the backend keeps from an existing device or makes), then calls
`start(lease)` (program this node; adopts what a previous agent left), `sync(peers)` to make the
kernel match a full peer listing exactly, then `apply_batch(leases)` with the latest lease (or
None) of every subnet that changed since the last batch; `reconcile()` every few seconds
(attach points that appeared, local pods); `stop(cleanup)`.

`programmed` is the desired state: the peers this node forwards to. The kernel's per-peer state
(neighbour, FDB entry, route, as flanneld programs them) follows it in linear batches: inline for
`vxlan` and `host-gw`; for `bpf` the maps are written first (the fast path forwards at once) and
a background thread programs that safety net, each subnet with its latest desired peer, so a
peer that changed again meanwhile is programmed once and a removed one is never put back.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
import threading
from ipaddress import IPv4Address, IPv4Network
from typing import Callable, Mapping

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from flannel_bpf.controller.coalesce import CoalescingWorker
from flannel_bpf.controller.config import BackendConfig
from flannel_bpf.controller.lease import Lease
from flannel_bpf.controller.uplink import Uplink
from flannel_bpf.loader.bpf import attach
from flannel_bpf.loader.bpf.layout import PeerMode
from flannel_bpf.loader.bpf.maps import EndpointEntry, NodeConfig, PeerEntry
from flannel_bpf.loader.bpf.program import CHILD_TIMEOUT, load_programs_in_child
from flannel_bpf.loader.netdefs import DEFAULT_BRIDGE, DEFAULT_VNI
from flannel_bpf.loader.netlink.headroom import HEADROOM_PORT, HeadroomError, ensure_headroom_port, remove_headroom_port
from flannel_bpf.loader.netlink.host_gw import KernelHostGwBackend
from flannel_bpf.loader.netlink.kernel_vxlan import KernelVxlanBackend, random_vtep_mac, vxlan_device_name
from flannel_bpf.loader.netlink.netkit import netkit_info
from flannel_bpf.loader.netlink.routes import NetlinkLookups, OwnAddresses, PeerRejected, find_link, link_index
from flannel_bpf.loader.netns import read_sysctl, write_sysctl
from flannel_bpf.loader.peer import Peer

log = logging.getLogger(__name__)

NO_MAC = "00:00:00:00:00:00"

# Neighbour states that name a pod we can deliver to (not INCOMPLETE/FAILED/NOARP).
_NUD_USABLE = 0x02 | 0x04 | 0x08 | 0x10 | 0x80  # REACHABLE STALE DELAY PROBE PERMANENT
_NUD_PERMANENT = 0x80


def peer_of(lease: Lease) -> Peer:
    """The loader's view of a peer lease (raises ValueError on a lease it cannot use)."""
    return Peer(subnet=lease.subnet, public_ip=lease.public_ip, vtep_mac=lease.vtep_mac,
                vni=lease.vni if lease.vni is not None else DEFAULT_VNI)


class KernelBackend:
    """What the backends share: the desired peers (`programmed`, from leases of one accepted
    type, changed in batches) and the kernel's per-peer state made to match them through a
    loader kernel backend (`self.kernel`), inline."""

    name = ""
    lease_type = ""

    def __init__(self, config: BackendConfig, uplink: Uplink):
        self.config = config
        self.uplink = uplink
        self.kernel = None
        self.programmed: dict[IPv4Network, Peer] = {}
        self.netlink_failures: dict[IPv4Network, str] = {}  # desired peers the kernel refused
        self._skipped: set[tuple] = set()
        self._state_lock = threading.Lock()    # `programmed`, as netlink programming reads it
        self._netlink_lock = threading.Lock()  # one netlink programmer at a time

    def prepare(self) -> None:
        """Slow work that needs no lease, done before the lease is published: peers start
        sending to us as soon as they see it."""

    def start(self, lease: Lease) -> None:
        raise NotImplementedError

    # -- desired state -------------------------------------------------------------------------

    def _skip(self, subnet: IPv4Network, what: str, reason: str) -> None:
        if (subnet, reason) not in self._skipped:  # once per peer and reason, not per renewal
            self._skipped.add((subnet, reason))
            log.warning("ignoring peer %s: %s", what, reason)

    def _desired(self, lease: Lease) -> Peer | None:
        if lease.backend_type != self.lease_type:
            reason = f"backend type {lease.backend_type!r} is not {self.lease_type!r}"
        else:
            try:
                return peer_of(lease)
            except ValueError as err:
                reason = str(err)
        self._skip(lease.subnet, lease.describe(), reason)
        return None

    def apply_batch(self, leases: Mapping[IPv4Network, Lease | None]) -> None:
        """Make each subnet's peer the lease given for it (None: no peer), in one batch."""
        self._commit(self._wanted(leases), full=False)

    def sync(self, peers: Mapping[IPv4Network, Lease]) -> None:
        """Make the kernel hold exactly `peers`: also removes what an earlier agent left for
        peers that went away while no agent ran."""
        leases: dict[IPv4Network, Lease | None] = dict.fromkeys(self.programmed)
        leases.update(peers)
        self._commit(self._wanted(leases), full=True)

    def _wanted(self, leases: Mapping[IPv4Network, Lease | None]) -> dict[IPv4Network, Peer | None]:
        return {subnet: None if lease is None else self._desired(lease) for subnet, lease in leases.items()}

    def _record(self, wanted: Mapping[IPv4Network, Peer | None]) -> dict[IPv4Network, Peer | None]:
        """Make `programmed` hold `wanted`; returns the subnets that changed, each with the peer
        it had before (what the kernel was last asked to hold for it)."""
        before = {}
        with self._state_lock:
            for subnet, peer in wanted.items():
                old = self.programmed.get(subnet)
                if old == peer:
                    continue
                before[subnet] = old
                if peer is None:
                    del self.programmed[subnet]
                else:
                    self.programmed[subnet] = peer
        return before

    def _commit(self, wanted: Mapping[IPv4Network, Peer | None], full: bool) -> None:
        self._program_kernel(self._record(wanted), prune=full)

    # -- the kernel's per-peer state ---------------------------------------------------------------

    def _program_kernel(self, dirty: Mapping[IPv4Network, Peer | None], prune: bool = False,
                        cancel: threading.Event | None = None, done: Callable[[Peer], None] | None = None) -> None:
        """Bring the kernel's state for the `dirty` subnets (each with the peer it was last
        given, or None) to what `programmed` holds for them now, read under the lock: whatever
        changed meanwhile, the latest desired peer is what gets programmed. With `prune`, then
        remove our routes and neighbours for subnets no peer holds (an earlier agent's)."""
        with self._netlink_lock:
            with self._state_lock:
                latest = {subnet: self.programmed.get(subnet) for subnet in dirty}
                keep = set(self.programmed) if prune else None
            apply = [peer for peer in latest.values() if peer is not None]
            remove = [self._last_given(subnet, dirty) for subnet, peer in latest.items() if peer is None]
            failures = self.kernel.update(apply=apply, remove=remove, keep=keep, cancel=cancel, done=done)
            refused = {f.peer.subnet: f.reason for f in failures if latest.get(f.peer.subnet) is not None}
            if refused:  # what the kernel held for them before (a route, an older MAC) goes
                self.kernel.update(remove=[self._last_given(subnet, dirty) for subnet in refused], cancel=cancel)
            with self._state_lock:
                for subnet in dirty:
                    self.netlink_failures.pop(subnet, None)
                self.netlink_failures.update(refused)

    def _last_given(self, subnet: IPv4Network, dirty: Mapping[IPv4Network, Peer | None]) -> Peer:
        """The peer whose kernel state a removal undoes: the last one given for the subnet (its
        VtepMAC names the FDB entry), or when none is known, just its subnet."""
        return dirty.get(subnet) or Peer(subnet=subnet, public_ip=self.uplink.ip)

    @property
    def fallback_pending(self) -> int:
        """Peers whose kernel state is not programmed yet (netlink runs inline here: none)."""
        return 0

    def reconcile(self) -> None:
        pass

    def stop(self, cleanup: bool) -> None:
        if cleanup and self.kernel is not None:
            with self._netlink_lock:
                self.kernel.teardown()

    def describe(self) -> dict:
        return {"backend": self.name, "peers_programmed": len(self.programmed),
                "fallback_pending": self.fallback_pending, "netlink_failures": len(self.netlink_failures)}


class VxlanBackend(KernelBackend):
    """flanneld's vxlan backend, exactly: flannel.<VNI>, and per peer neigh + FDB + route."""

    name = "vxlan"
    lease_type = "vxlan"

    def __init__(self, config: BackendConfig, uplink: Uplink):
        super().__init__(config, uplink)
        # As flanneld does: keep the VtepMAC of an existing device, so peers' FDBs stay valid.
        self.vtep_mac = existing_vtep_mac(config.vni) or random_vtep_mac()
        self.device = None

    def start(self, lease: Lease) -> None:
        self.kernel = KernelVxlanBackend(
            uplink=self.uplink.name, public_ip=self.uplink.ip, subnet=lease.subnet,
            vni=self.config.vni, port=self.config.port, vtep_mac=self.vtep_mac,
            mtu=self.config.mtu or None, direct_routing=self.config.direct_routing,
            learning=self.config.learning, gbp=self.config.gbp)
        self.device = self.kernel.setup()


class HostGwBackend(KernelBackend):
    """flanneld's host-gw backend: a route per peer via its public IP."""

    name = "host-gw"
    lease_type = "host-gw"

    def start(self, lease: Lease) -> None:
        self.kernel = KernelHostGwBackend(uplink=self.uplink.name)
        self.kernel.setup()


def existing_vtep_mac(vni: int) -> str | None:
    with IPRoute() as ipr:
        idx = link_index(ipr, vxlan_device_name(vni))
        return ipr.link("get", index=idx)[0].get_attr("IFLA_ADDRESS") if idx is not None else None


def link_kind(ipr: IPRoute, ifindex: int) -> str | None:
    info = ipr.link("get", index=ifindex)[0].get_attr("IFLA_LINKINFO")
    return info.get_attr("IFLA_INFO_KIND") if info else None


def choose_decap_hook(requested: str, uplink_kind: str | None) -> tuple[str, str]:
    """(hook, why). XDP on a veth turns off its peer's TSO and GRO (measured: TCP fell from
    ~16 to 2-7 Gb/s), so veth uplinks decap at tc ingress; real NICs and virtio take XDP."""
    if requested in ("xdp", "tc"):
        return requested, f"--decap {requested} was asked for"
    if uplink_kind == "veth":
        return "tc", "the uplink is a veth: XDP there would cost the peer its TSO"
    return "xdp", f"the uplink is a {uplink_kind or 'physical'} device: XDP runs before the stack"


class BpfBackend(VxlanBackend):
    """VXLAN on the wire, forwarded by BPF programs through maps. flanneld's vxlan kernel state
    is kept as well: host-originated traffic enters through flannel.<VNI> (whose egress program
    encapsulates), and on a map miss or with the programs gone traffic still flows the kernel way.
    Publishes a "vxlan" lease, so stock vxlan nodes and this node program each other."""

    name = "bpf"

    def __init__(self, config: BackendConfig, uplink: Uplink, *, bridge: str = DEFAULT_BRIDGE,
                 pin_dir: str | None = None, xdp_mode: str = "auto", compile_timeout: float = CHILD_TIMEOUT):
        super().__init__(config, uplink)
        self.bridge = bridge
        self.pin_dir = str(pin_dir or attach.default_pin_dir(uplink.name))
        self.xdp_mode = xdp_mode
        self.compile_timeout = compile_timeout
        self.programs = None
        self.maps = None
        self.decap_hook, self.decap_reason = "tc", ""
        self.attached: dict[str, str] = {}  # attach point -> program name
        self.node = None
        self._bridge_ifindex = 0
        self._pod_ports: dict[int, str] = {}  # ifindex -> name of pod veths carrying the encap
        self._pod_ports_refused: dict[int, str] = {}  # ... and of those whose attach failed
        self._routed_pods: dict[int, str] = {}  # ifindex -> name of routed pods' devices carrying theirs
        self._routed_refused: set[int] = set()
        self.fallback = CoalescingWorker("flannel-bpf-fallback", self._program_fallback)
        self._prune_wanted = False
        self._own_addresses = None  # this node's addresses, re-read on each reconcile tick

    def start(self, lease: Lease) -> None:
        """Program this node for `lease`. Called again when our subnet changes: the programs
        are compiled once per agent, only the node's config is rewritten."""
        super().start(lease)  # flannel.<VNI>: the routed device and safety net
        self.prepare()
        with IPRoute() as ipr:
            uplink = ipr.link("get", index=self.uplink.ifindex)[0]
            self.decap_hook, self.decap_reason = choose_decap_hook(
                self.config.decap, link_kind(ipr, self.uplink.ifindex))
            self.node = NodeConfig.make(
                underlay_ip=self.uplink.ip, subnet=lease.subnet, vtep_mac=self.device.mac,
                uplink_mac=uplink.get_attr("IFLA_ADDRESS"), uplink_ifindex=self.uplink.ifindex,
                vni=self.config.vni, vxlan_port=self.config.udp_port, mtu=self.uplink.mtu,
                vxlan_ifindex=self.device.ifindex, gbp=self.config.gbp)
        self._bridge_ifindex = -1  # re-read by reconcile() below, into the new config
        self._pod_ports.clear()    # re-attached by it too, with the programs of this start
        self._routed_pods.clear()
        self.maps.set_local_config(self.node)
        self._attach("tc_encap_from_host", self.device.name, "egress")
        if self.decap_hook == "xdp":
            attach.detach_tc(self.uplink.name, "ingress", "tc_decap")
            mode = attach.attach_xdp(self.uplink.name, self.programs.prog_fds["xdp_decap"], self.xdp_mode)
            self.attached[f"{self.uplink.name} xdp ({mode})"] = "xdp_decap"
            loosen_rp_filter(self.uplink.name)
        else:
            attach.detach_xdp(self.uplink.name)
            self._attach("tc_decap", self.uplink.name, "ingress")
        log.info("bpf data plane on %s: decap at %s (%s); maps pinned in %s", self.uplink.name,
                 self.decap_hook, self.decap_reason, self.pin_dir)
        self.fallback.start()  # in this thread's network namespace
        self.reconcile()

    def prepare(self) -> None:
        """Compile, load and pin the programs (seconds on a busy machine), once per agent, in a
        child process: bcc's clang and LLVM would stay in this one (~150 MiB)."""
        if self.programs is None:
            # Reuses the pinned maps: state survives restarts.
            self.programs = load_programs_in_child(self.pin_dir, timeout=self.compile_timeout)
            self.maps = self.programs.maps

    def _attach(self, program: str, dev: str | int, direction: str, label: str = "") -> None:
        attach.attach_tc(dev, direction, self.programs.prog_fds[program], program)
        self.attached[f"{label or dev} tc {direction}"] = program

    # -- peers: maps first (the fast path is ready at once), then the kernel's safety net --

    def _commit(self, wanted: Mapping[IPv4Network, Peer | None], full: bool) -> None:
        """The map entries of the whole batch in one write (with `full`, the peer map made
        exactly these), then the changed subnets handed to the fallback thread."""
        if not full:  # only what changed: events repeating the initial listing cost no writes
            with self._state_lock:
                wanted = {subnet: peer for subnet, peer in wanted.items() if self.programmed.get(subnet) != peer}
        entries = self._map_entries(wanted)
        wanted = {subnet: peer if entries.get(subnet) else None for subnet, peer in wanted.items()}
        if full:
            self.maps.sync_peers([e for e in entries.values() if e is not None])
        else:
            self.maps.remove_peers([subnet for subnet, peer in wanted.items() if peer is None])
            self.maps.upsert_peers([e for e in entries.values() if e is not None])
        self.fallback.submit(self._record(wanted), keep_first=True)
        if full:
            self._prune_wanted = True
            self.fallback.poke()

    def _map_entries(self, wanted: Mapping[IPv4Network, Peer | None]) -> dict:
        """subnet -> PeerEntry, or None for no peer or one the data plane cannot use (logged)."""
        entries = dict.fromkeys(wanted)
        peers = [peer for peer in wanted.values() if peer is not None]
        if not peers:
            return entries
        # Only DirectRouting needs a route lookup per peer; our own addresses are kept from the
        # last reconcile tick, so a batch without DirectRouting asks the kernel nothing.
        direct_routing = self.config.direct_routing
        with IPRoute() if direct_routing or self._own_addresses is None else contextlib.nullcontext() as ipr:
            lookups = NetlinkLookups(ipr, own=self._own_addresses)
            for peer in peers:
                try:
                    if peer.vni != self.config.vni:
                        raise PeerRejected(f"peer VNI {peer.vni} differs from ours ({self.config.vni})")
                    direct = lookups.routes_directly(peer, direct_routing)
                    if not direct and not peer.vtep_mac:
                        raise PeerRejected("peer has no VtepMAC")
                except (PeerRejected, NetlinkError) as err:
                    self._skip(peer.subnet, f"{peer.subnet} at {peer.public_ip}", str(err))
                    continue
                entries[peer.subnet] = PeerEntry.make(peer.subnet, peer.public_ip,
                                                      peer.vtep_mac or "00:00:00:00:00:00",
                                                      PeerMode.DIRECT if direct else PeerMode.VXLAN)
        return entries

    def _program_fallback(self, batch: dict) -> None:
        """The fallback thread's work: one coalesced batch of changed subnets (and after a
        full sync, the prune of what no peer holds)."""
        prune, self._prune_wanted = self._prune_wanted, False
        try:
            self._program_kernel(batch, prune=prune, cancel=self.fallback.cancel,
                                 done=lambda peer: self.fallback.item_done())
        except BaseException:
            self._prune_wanted = self._prune_wanted or prune  # the worker retries the batch
            raise

    @property
    def fallback_pending(self) -> int:
        """Peers whose kernel safety net (neighbour, FDB entry, route) is not programmed yet."""
        return self.fallback.pending

    def wait_fallback(self, timeout: float | None = None) -> bool:
        """True once the kernel safety net holds every peer in `programmed` (tests, benchmarks)."""
        return self.fallback.wait_idle(timeout)

    # -- attach points and local pods, which come and go without any etcd event --

    def reconcile(self) -> None:
        with IPRoute() as ipr:
            self._own_addresses = OwnAddresses(ipr)
            link = find_link(ipr, self.bridge)
            if link is not None and link["index"] != self._bridge_ifindex:
                self._ensure_headroom(ipr, link["index"])
                link = find_link(ipr, self.bridge)  # a new port may change the bridge's MAC
            # The bridge's MAC follows its ports' unless set: read each tick, it is the pods' gateway.
            bridge, mac = (0, NO_MAC) if link is None else (link["index"], link.get_attr("IFLA_ADDRESS"))
            if (bridge, mac) != (self._bridge_ifindex, self.node.bridge_mac):
                self._bridge_changed(bridge, mac)
            ports = pod_ports(ipr, bridge) if bridge else {}
            self._sync_pod_ports(ports)
            if bridge:
                self._sync_endpoints(ipr, bridge, ports)
            self._sync_routed_pods(ipr, ports)

    def _ensure_headroom(self, ipr: IPRoute, bridge: int) -> None:
        """The headroom port only saves a reallocation per packet: without it (no vxlan module,
        a name taken), the data plane works as well, a little slower."""
        try:
            ensure_headroom_port(ipr, bridge)
        except (NetlinkError, HeadroomError) as err:
            log.warning("%s: not added to %s (%s); encapsulation reallocates small packets",
                        HEADROOM_PORT, self.bridge, err)

    def _bridge_changed(self, bridge: int, mac: str) -> None:
        if bridge and bridge != self._bridge_ifindex:
            # Earlier versions encapsulated at the bridge: one hook per packet is enough.
            attach.detach_tc(bridge, "ingress", "tc_encap_from_pods")
            log.info("pod bridge %s found: its pods' traffic enters the bpf path at their veths",
                     self.bridge)
        self.node = dataclasses.replace(self.node, bridge_ifindex=bridge, bridge_mac=mac)
        self.maps.set_local_config(self.node)
        self._bridge_ifindex = bridge

    def _sync_pod_ports(self, ports: Mapping[int, str]) -> None:
        """tc_encap_from_pods on the ingress of every pod's host-side veth, as Cilium does:
        a pod's packet is encapsulated before the bridge sees it, so it skips the bridge, and
        bridge netfilter with it (Kubernetes sets bridge-nf-call-iptables). Until a new pod's
        port has it, that pod's traffic takes the kernel path."""
        for ifindex, ifname in ports.items():
            if self._pod_ports.get(ifindex) != ifname:
                try:
                    self._attach("tc_encap_from_pods", ifindex, "ingress", label=ifname)
                except attach.AttachError as err:  # gone meanwhile, or a hook we cannot share
                    if self._pod_ports_refused.get(ifindex) != ifname:  # retried each tick, said once
                        log.warning("pod port %s: encap not attached, its pod takes the kernel path: %s",
                                    ifname, err)
                    self._pod_ports_refused[ifindex] = ifname
                    continue
                self._pod_ports_refused.pop(ifindex, None)
                self._pod_ports[ifindex] = ifname
        for ifindex in [i for i in self._pod_ports if i not in ports]:
            self.attached.pop(f"{self._pod_ports.pop(ifindex)} tc ingress", None)
        for ifindex in [i for i in self._pod_ports_refused if i not in ports]:
            del self._pod_ports_refused[ifindex]

    def _sync_endpoints(self, ipr: IPRoute, bridge: int, bridge_ports: Mapping[int, str]) -> None:
        """Local pods for decap delivery: pod IP -> MAC from the bridge's neighbours, MAC ->
        host-side veth from its FDB. A pod the host has not yet talked to is missing here and
        reached through the kernel path, whose ARP then makes it known. Entries of pods off the
        bridge are flannel-bpf-cni's (its DEL removes them): left alone while their device is there."""
        ports = {}
        for entry in ipr.get_neighbours(family=socket.AF_BRIDGE):
            if entry.get_attr("NDA_MASTER") == bridge and not entry["state"] & _NUD_PERMANENT:
                ports[entry.get_attr("NDA_LLADDR")] = entry["ifindex"]
        wanted = {}
        for entry in ipr.get_neighbours(family=socket.AF_INET, ifindex=bridge):
            ip, mac = entry.get_attr("NDA_DST"), entry.get_attr("NDA_LLADDR")
            if entry["state"] & _NUD_USABLE and mac in ports and IPv4Address(ip) in self.node.subnet:
                wanted[IPv4Address(ip)] = EndpointEntry.make(ip, ports[mac], mac)
        current = {e.ip: e for e in self.maps.list_endpoints()}
        changed = [e for ip, e in wanted.items() if current.get(ip) != e]
        stale = [ip for ip, e in current.items() if ip not in wanted and e.ifindex in bridge_ports]
        off_bridge = [ip for ip, e in current.items() if ip not in wanted and e.ifindex not in bridge_ports]
        if off_bridge:
            present = {link["index"] for link in ipr.link("dump")}
            stale += [ip for ip in off_bridge if current[ip].ifindex not in present]
        if changed:
            self.maps.set_endpoints(changed)
        if stale:
            self.maps.remove_endpoints(stale)

    def _sync_routed_pods(self, ipr: IPRoute, bridge_ports: Mapping[int, str]) -> None:
        """The egress program of every pod flannel-bpf-cni made (whose fl_endpoints entry is
        off the bridge): tc_from_routed_pod on a veth's tc ingress, nk_from_pod through a
        pinned link on a netkit pair. Until its device has it, that pod takes the kernel path."""
        devices = {e.ifindex for e in self.maps.list_endpoints() if e.ifindex not in bridge_ports}
        for ifindex in devices - self._routed_pods.keys():
            try:
                link = ipr.link("get", index=ifindex)[0]
            except NetlinkError:
                continue  # gone: the plugin's DEL, or the next endpoint sync, drops its entry
            name = link.get_attr("IFLA_IFNAME")
            try:
                if netkit_info(link) is not None:
                    attach.attach_netkit_peer(ifindex, self.programs.prog_fds["nk_from_pod"],
                                              f"{self.pin_dir}/link_{name}")
                    self.attached[f"{name} netkit peer"] = "nk_from_pod"
                else:
                    self._attach("tc_from_routed_pod", ifindex, "ingress", label=name)
            except (attach.AttachError, OSError) as err:
                if ifindex not in self._routed_refused:  # retried each tick, said once
                    log.warning("routed pod device %s: program not attached, its pod takes the kernel "
                                "path: %s", name, err)
                    self._routed_refused.add(ifindex)
                continue
            self._routed_refused.discard(ifindex)
            self._routed_pods[ifindex] = name
        for ifindex in [i for i in self._routed_pods if i not in devices]:
            name = self._routed_pods.pop(ifindex)
            self.attached.pop(f"{name} tc ingress", None)
            if self.attached.pop(f"{name} netkit peer", None):
                attach.unlink_pins(f"{self.pin_dir}/link_{name}")
        self._routed_refused &= devices

    def stop(self, cleanup: bool) -> None:
        if not self.fallback.stop():
            log.warning("the kernel fallback thread did not stop in time")
        if cleanup:
            detach_bpf(self.uplink.name, self.config.vni, self.bridge, self.pin_dir)
        if self.programs is not None:
            self.programs.close()  # closes the maps too; attached programs stay in the kernel
        super().stop(cleanup)

    def describe(self) -> dict:
        return {**super().describe(), "decap_hook": self.decap_hook, "decap_reason": self.decap_reason,
                "attached": dict(self.attached), "pin_dir": self.pin_dir}


def loosen_rp_filter(uplink: str) -> None:
    """XDP-decapped packets enter the stack on the uplink with a pod source address whose route
    points at flannel.<VNI>: strict reverse-path filtering (1) would drop them. Loose (2) keeps
    the spoofing check for addresses no route knows."""
    key = f"net/ipv4/conf/{uplink}/rp_filter"
    if read_sysctl(key) == "1":
        write_sysctl(key, 2)
        log.info("%s: rp_filter strict -> loose, so XDP-decapped pod traffic is not dropped", uplink)
    if read_sysctl("net/ipv4/conf/all/rp_filter") == "1":  # the kernel applies max(all, device)
        log.warning("net.ipv4.conf.all.rp_filter is 1 (strict): XDP-decapped pod traffic will be "
                    "dropped; set it to 0 or 2, or use --decap tc")


def pod_ports(ipr: IPRoute, bridge: int) -> dict[int, str]:
    """The pod bridge's ports (ifindex -> name), but for the headroom port."""
    return {link["index"]: link.get_attr("IFLA_IFNAME") for link in ipr.link("dump", master=bridge)
            if link.get_attr("IFLA_MASTER") == bridge and link.get_attr("IFLA_IFNAME") != HEADROOM_PORT}


def detach_bpf(uplink: str, vni: int, bridge: str, pin_dir: str) -> None:
    """Remove every program this backend attaches, and its pins. Idempotent; missing devices
    are fine."""
    with IPRoute() as ipr:
        present = {name for name in (uplink, vxlan_device_name(vni), bridge) if link_index(ipr, name)}
        ports = pod_ports(ipr, link_index(ipr, bridge)) if bridge in present else {}
        # Routed pods' devices have no master; their netkit links go with the pins below.
        routed = [link["index"] for link in ipr.link("dump") if not link.get_attr("IFLA_MASTER")
                  and link["index"] not in ports]
        remove_headroom_port(ipr)
    for ifindex in ports:
        attach.detach_tc(ifindex, "ingress", "tc_encap_from_pods")
    for ifindex in routed:
        attach.detach_tc(ifindex, "ingress", "tc_from_routed_pod")
    for dev, direction, program in ((uplink, "ingress", "tc_decap"),
                                    (vxlan_device_name(vni), "egress", "tc_encap_from_host"),
                                    (bridge, "ingress", "tc_encap_from_pods")):
        if dev in present:
            attach.detach_tc(dev, direction, program)
    if uplink in present:
        attach.detach_xdp(uplink)
    attach.unlink_pins(pin_dir)


BACKENDS = {"bpf": BpfBackend, "vxlan": VxlanBackend, "host-gw": HostGwBackend}
