"""Peers programmed in batches, in a scratch namespace (a veth uplink eth0 on 198.18.0.1/15, so
every peer 198.18.x.y is on-link; no lab): the bpf backend's maps written at once and its kernel
safety net (neighbour, FDB entry, route) by the fallback thread, the vxlan backend's inline; the
resulting kernel state checked exactly, against `ip` and `bridge`, after a start with an earlier
agent's leftovers, VtepMAC changes and removals; and bursts of events coalescing into the latest
state, through the agent's peer sink."""
import json
import os
import select
import socket
from contextlib import contextmanager
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel_bpf.bench.common import SCRATCH_UPLINK, scratch_netns
from flannel_bpf.controller.agent import Agent, AgentOptions
from flannel_bpf.controller.backends import BpfBackend, HostGwBackend, VxlanBackend
from flannel_bpf.controller.config import BackendConfig
from flannel_bpf.controller.lease import Lease
from flannel_bpf.controller.netlink_waker import _may_concern_reconcile, attach_permanent_neighbour_filter
from flannel_bpf.controller.peers import PeerEvent
from flannel_bpf.controller.uplink import select_uplink
from flannel_bpf.lab.run import run_in_netns
from flannel_bpf.loader.bpf.attach import unlink_pins
from flannel_bpf.loader.bpf.maps import PeerEntry
from flannel_bpf.loader.netns import in_netns

pytestmark = pytest.mark.usefixtures("require_root")

PIN_ROOT = f"/sys/fs/bpf/flannel-bpf-test-batches-{os.getpid()}"
SUBNET_LEN = 28
OWN = IPv4Network("10.244.255.240/28")   # this node's lease: the last /28
FALLBACK_WAIT = 300.0                     # bound on waiting for the fallback thread (not a speed check)
DEVICE = "flannel.1"


def subnet(i: int) -> IPv4Network:
    return IPv4Network((int(IPv4Address("10.244.0.0")) + (i << (32 - SUBNET_LEN)), SUBNET_LEN))


def lease(i: int, generation: int = 1) -> Lease:
    """Peer i at 198.18.0.2+i; `generation` changes its VtepMAC."""
    mac = f"0e:2a:{i >> 8:02x}:{i & 0xff:02x}:00:{generation:02x}"
    return Lease(subnet(i), IPv4Address(int(IPv4Address("198.18.0.2")) + i), "vxlan",
                 {"VNI": 1, "VtepMAC": mac})


def ipj(netns: str, *argv: str) -> list:
    """`ip -j ARGV` (or `bridge -j ...` when argv starts with 'bridge'), parsed."""
    tool, args = ("bridge", argv[1:]) if argv[0] == "bridge" else ("ip", argv)
    out = run_in_netns(netns, [tool, "-j", *args], timeout=60).stdout
    return json.loads(out) if out.strip() else []


def kernel_state(netns: str) -> dict:
    """Our routes (protocol 251), flannel.1's neighbours and its FDB entries with a remote."""
    return {
        "routes": {(r["dst"], r.get("gateway"), r["dev"], "onlink" in r.get("flags", []))
                   for r in ipj(netns, "-4", "route", "show", "proto", "251")},
        "neighbours": {(n["dst"], n.get("lladdr"), tuple(n["state"]))
                       for n in ipj(netns, "-4", "neigh", "show", "dev", DEVICE)},
        "fdb": {(e["mac"], e["dst"], e["state"], "self" in e.get("flags", []))
                for e in ipj(netns, "bridge", "fdb", "show", "dev", DEVICE) if e.get("dst")},
    }


def expected_state(leases) -> dict:
    """flanneld's vxlan state for these peers: neigh permanent, FDB self permanent, route onlink."""
    return {
        "routes": {(str(x.subnet), str(x.subnet.network_address), DEVICE, True) for x in leases},
        "neighbours": {(str(x.subnet.network_address), x.vtep_mac, ("PERMANENT",)) for x in leases},
        "fdb": {(x.vtep_mac, str(x.public_ip), "permanent", True) for x in leases},
    }


def map_state(backend) -> set:
    return {(p.subnet, p.underlay_ip, p.vtep_mac, p.mode.name) for p in backend.maps.list_peers()}


def expected_map(leases) -> set:
    return {(x.subnet, x.public_ip, x.vtep_mac, "VXLAN") for x in leases}


def assert_programmed(netns: str, backend, leases, refused: dict | None = None) -> None:
    """Maps and kernel hold exactly `leases`; `refused`: the peers the kernel refused (desired,
    so in `programmed`, with their reason, and nothing of them in the kernel)."""
    leases, refused = list(leases), refused or {}
    if isinstance(backend, BpfBackend):
        assert backend.wait_fallback(FALLBACK_WAIT), f"fallback still has {backend.fallback_pending} peers"
        assert map_state(backend) == expected_map(leases)
    assert backend.fallback_pending == 0 and backend.netlink_failures == refused
    assert set(backend.programmed) == {x.subnet for x in leases} | set(refused)
    assert kernel_state(netns) == expected_state(leases)


@contextmanager
def started_backend(kind: str):
    """A started backend of `kind` in a fresh scratch namespace; everything removed after."""
    pin_dir = f"{PIN_ROOT}/{kind}"
    backend = None
    with scratch_netns(f"batch-{kind}") as netns:
        try:
            with in_netns(netns):
                uplink = select_uplink([SCRATCH_UPLINK])
                config = BackendConfig(type=kind, vni=1)
                backend = (BpfBackend(config, uplink, pin_dir=pin_dir) if kind == "bpf"
                           else {"vxlan": VxlanBackend, "host-gw": HostGwBackend}[kind](config, uplink))
                backend.prepare()
                # Started in the namespace: the fallback thread lives there too.
                backend.start(Lease(OWN, uplink.ip, kind, {"VNI": 1, "VtepMAC": getattr(backend, "vtep_mac", None)}))
            yield netns, backend
        finally:
            if backend is not None:
                with in_netns(netns):
                    backend.stop(cleanup=True)
            unlink_pins(pin_dir)
            unlink_pins(PIN_ROOT)


def plant_leftovers(netns: str, backend) -> None:
    """What an agent that died with peer 4000 programmed left: its route, neighbour, FDB entry
    and map entry (the peer's lease is gone from etcd)."""
    gone = lease(4000)
    vtep = str(gone.subnet.network_address)
    for argv in (["ip", "neigh", "replace", vtep, "lladdr", gone.vtep_mac, "dev", DEVICE, "nud", "permanent"],
                 ["bridge", "fdb", "replace", gone.vtep_mac, "dev", DEVICE, "dst", str(gone.public_ip),
                  "self", "permanent"],
                 ["ip", "route", "replace", str(gone.subnet), "via", vtep, "dev", DEVICE, "onlink",
                  "proto", "251"]):
        run_in_netns(netns, argv)
    if isinstance(backend, BpfBackend):
        backend.maps.upsert_peers([PeerEntry.make(gone.subnet, gone.public_ip, gone.vtep_mac)])
    assert kernel_state(netns) == expected_state([gone])


@pytest.mark.parametrize("kind", ["bpf", "vxlan"])
def test_thousands_of_peers_exact_kernel_state_through_changes_and_removals(kind):
    with started_backend(kind) as (netns, backend):
        plant_leftovers(netns, backend)
        current = {i: lease(i) for i in range(1, 2001)}
        with in_netns(netns):
            backend.sync({x.subnet: x for x in current.values()})
        if kind == "bpf":  # the fast path holds every peer when sync returns
            assert map_state(backend) == expected_map(current.values())
        assert_programmed(netns, backend, current.values())

        # 100 VtepMACs change and 500 peers leave, in a few batches as events would come.
        changed = {i: lease(i, generation=2) for i in range(1, 101)}
        removed = range(1001, 1501)
        with in_netns(netns):
            backend.apply_batch({x.subnet: x for x in changed.values()})
            backend.apply_batch({subnet(i): None for i in removed[:250]})
            backend.apply_batch({subnet(i): None for i in removed[250:]})
        current.update(changed)
        for i in removed:
            del current[i]
        assert_programmed(netns, backend, current.values())

        # A lease of another backend type, or one without a VtepMAC, takes its peer out of the
        # kernel too: bpf refuses the latter before its map entry, vxlan when programming it.
        with in_netns(netns):
            backend.apply_batch({subnet(1): Lease(subnet(1), lease(1).public_ip, "host-gw"),
                                 subnet(2): Lease(subnet(2), lease(2).public_ip, "vxlan", {"VNI": 1})})
        del current[1], current[2]
        refused = {subnet(2): "peer has no VtepMAC"} if kind == "vxlan" else {}
        assert_programmed(netns, backend, current.values(), refused)


def test_a_burst_for_one_subnet_ends_in_its_latest_state_programmed_once():
    with started_backend("bpf") as (netns, backend):
        fallback = backend.fallback
        with in_netns(netns):
            backend.apply_batch({subnet(i): lease(i) for i in (1, 2, 3)})
        assert backend.wait_fallback(FALLBACK_WAIT)
        batches, items = fallback.batches, fallback.items
        with fallback.hold(), in_netns(netns):
            for generation in range(2, 12):  # peer 1: ten VtepMACs, one after another
                backend.apply_batch({subnet(1): lease(1, generation)})
                # The map follows each change at once, the kernel safety net waits.
                assert map_state(backend) >= expected_map([lease(1, generation)])
            backend.apply_batch({subnet(2): None})          # peer 2 leaves,
            backend.apply_batch({subnet(2): lease(2, 3)})   # comes back with a new MAC,
            backend.apply_batch({subnet(4): lease(4)})      # peer 4 comes and goes
            backend.apply_batch({subnet(4): None})
            backend.apply_batch({subnet(3): None})          # and peer 3 leaves for good
            assert backend.fallback_pending == 4
        latest = [lease(1, 11), lease(2, 3)]
        assert_programmed(netns, backend, latest)
        # Each subnet touched was programmed once, in one batch, with its latest state only.
        assert (fallback.batches - batches, fallback.items - items) == (1, 4)


def test_agent_sink_coalesces_events_into_one_batch_of_latest_leases():
    """The agent's PeerSink side (what the subnet manager's event thread calls) wired to a real
    backend: events only recorded, then applied by the applier thread in one batch (and the
    removals in one more, after their grace)."""
    with started_backend("vxlan") as (netns, backend):
        agent = Agent(control=None, uplink=backend.uplink, options=AgentOptions())
        agent.backend = backend
        with in_netns(netns):
            agent.applier.start()  # its thread acts in this namespace
        try:
            with agent.applier.hold():
                for generation in range(1, 6):
                    for i in range(1, 51):
                        agent.on_peer_event(PeerEvent("changed" if generation > 1 else "added", lease(i, generation)))
                for i in range(41, 51):
                    agent.on_peer_event(PeerEvent("removed", lease(i, 5)))
                agent.on_peer_event(PeerEvent("added", lease(60)))
                agent.on_peer_event(PeerEvent("removed", lease(60)))
                assert agent.applier.pending == 51 and backend.programmed == {}
                assert agent.metrics_snapshot()["peer_events_pending"] == 51
            assert agent.applier.wait_idle(FALLBACK_WAIT)
            # The puts in one batch; the removals fall due REMOVAL_GRACE later, in another.
            assert (agent.applier.batches, agent.applier.items) == (2, 51)
            assert_programmed(netns, backend, [lease(i, 5) for i in range(1, 41)])
        finally:
            agent.applier.stop()


def test_host_gw_batches_and_prune():
    with started_backend("host-gw") as (netns, backend):
        gone = Lease(subnet(4000), IPv4Address("198.18.15.1"), "host-gw")
        run_in_netns(netns, ["ip", "route", "replace", str(gone.subnet), "via", str(gone.public_ip),
                             "dev", SCRATCH_UPLINK, "proto", "251"])
        peers = {i: Lease(subnet(i), lease(i).public_ip, "host-gw") for i in range(1, 301)}
        with in_netns(netns):
            backend.sync({x.subnet: x for x in peers.values()})
            backend.apply_batch({subnet(i): None for i in range(101, 201)})
        for i in range(101, 201):
            del peers[i]
        assert backend.netlink_failures == {} and set(backend.programmed) == {x.subnet for x in peers.values()}
        routes = {(r["dst"], r.get("gateway"), r["dev"]) for r in ipj(netns, "-4", "route", "show", "proto", "251")}
        assert routes == {(str(x.subnet), str(x.public_ip), SCRATCH_UPLINK) for x in peers.values()}


def test_netlink_waker_ignores_the_fallbacks_permanent_neighbours_only():
    """Real rtnetlink notifications as the agent's waker sees them: the kernel fallback's own
    permanent neighbours and FDB entries do not wake reconcile, a pod's neighbour and a new link
    (the pod bridge) do; both with the socket filter (dropped in the kernel) and without it
    (each datagram's headers read)."""
    changes = [
        (["ip", "neigh", "replace", "198.18.0.9", "lladdr", "0a:00:00:00:00:09", "dev", "eth0",
          "nud", "permanent"], False),
        (["bridge", "fdb", "append", "0a:00:00:00:00:11", "dev", "eth0", "self", "permanent"], False),
        (["ip", "neigh", "replace", "198.18.0.10", "lladdr", "0a:00:00:00:00:0a", "dev", "eth0",
          "nud", "reachable"], True),
        (["ip", "link", "add", "br9", "type", "bridge"], True),
    ]

    def received(sock) -> list[bytes]:
        datagrams = []
        while select.select([sock], [], [], 0.2)[0]:
            datagrams.append(sock.recv(1 << 16))
        return datagrams

    with scratch_netns("waker") as netns:
        with in_netns(netns):
            plain = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
            filtered = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        with plain, filtered:
            attach_permanent_neighbour_filter(filtered)
            for sock in (plain, filtered):
                sock.bind((0, 0x1 | 0x4))  # RTMGRP_LINK | RTMGRP_NEIGH
            for argv, wakes in changes:
                run_in_netns(netns, argv)
                everything = received(plain)
                assert everything, argv
                assert any(_may_concern_reconcile(d) for d in everything) == wakes, argv
                assert bool(received(filtered)) == wakes, argv
