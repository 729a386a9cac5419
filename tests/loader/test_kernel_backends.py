"""The stock-equivalent kernel backends (flanneld's vxlan and host-gw) in a real netns lab."""
import json
from ipaddress import IPv4Network

import pytest

from flannel_bpf.lab.run import ping, run_in_netns, tcp_transfer
from flannel_bpf.lab.topology import temporary_lab
from pyroute2 import IPRoute

from flannel_bpf.loader.netlink import kernel_vxlan
from flannel_bpf.loader.netlink.host_gw import KernelHostGwBackend
from flannel_bpf.loader.netlink.kernel_vxlan import KernelVxlanBackend, random_vtep_mac
from flannel_bpf.loader.peer import Peer
from flannel_bpf.loader.netns import in_netns
from flannel_bpf.loader.netlink.routes import BackendError

pytestmark = pytest.mark.usefixtures("require_root")


def subnet_of(host):
    return IPv4Network(f"10.244.{host.index}.0/24")


def add_pods(lab, per_host, mtu):
    for host in lab.hosts:
        for j in range(1, per_host + 1):
            lab.add_pod(host.index, j, f"10.244.{host.index}.{1 + j}/24", f"10.244.{host.index}.1", mtu)


def ipj(netns, *args):
    """`ip -j ...` (or `bridge -j ...` with args starting 'bridge') parsed."""
    argv = list(args) if args[0] == "bridge" else ["ip", *args]
    out = run_in_netns(netns, [argv[0], "-j", *argv[1:]]).stdout
    return json.loads(out) if out.strip() else []


def route(netns, dst):
    found = ipj(netns, "route", "show", dst)
    return found[0] if found else None


def reaches(src_ns, dst_ip):
    return ping(src_ns, dst_ip, count=2, wait=1).ok


def unreachable(src_ns, dst_ip):
    return ping(src_ns, dst_ip, count=1, wait=0.5).received == 0


def vxlan_cluster(lab, **options):
    """A KernelVxlanBackend per host, set up and given every other host as a peer."""
    backends, peers = {}, {}
    for host in lab.hosts:
        with in_netns(host.netns):
            backend = KernelVxlanBackend(uplink="eth0", public_ip=host.ip, subnet=subnet_of(host), **options)
            device = backend.setup()
        backends[host.index] = backend
        peers[host.index] = Peer(subnet_of(host), host.ip, device.mac, 1)
    for host in lab.hosts:
        with in_netns(host.netns):
            assert backends[host.index].apply_peers(
                [p for i, p in peers.items() if i != host.index]) == []
    return backends, peers


def test_kernel_vxlan_as_flanneld_programs_it():
    with temporary_lab(prefix="tv", hosts=2) as lab:
        add_pods(lab, 2, 1450)
        h1, h2 = lab.hosts
        backends, peers = vxlan_cluster(lab)

        (link,) = ipj(h1.netns, "-d", "link", "show", "flannel.1")
        data = link["linkinfo"]["info_data"]
        assert link["mtu"] == 1450 and link["address"] == peers[1].vtep_mac
        assert int(link["address"][:2], 16) & 0b11 == 0b10  # locally administered, unicast
        assert (data["id"], data["local"], data["link"], data["port"], data["learning"]) == \
            (1, "198.18.0.11", "eth0", 8472, False)
        (addr,) = ipj(h1.netns, "-4", "addr", "show", "flannel.1")
        assert [(a["local"], a["prefixlen"]) for a in addr["addr_info"]] == [("10.244.1.0", 32)]
        assert [(n["dst"], n["lladdr"], n["state"]) for n in ipj(h1.netns, "neigh", "show", "dev", "flannel.1")] \
            == [("10.244.2.0", peers[2].vtep_mac, ["PERMANENT"])]
        fdb = [e for e in ipj(h1.netns, "bridge", "fdb", "show", "dev", "flannel.1") if e.get("dst")]
        assert [(e["mac"], e["dst"], e["state"]) for e in fdb] == [(peers[2].vtep_mac, "198.18.0.12", "permanent")]
        assert "self" in fdb[0]["flags"]
        r = route(h1.netns, "10.244.2.0/24")
        assert (r["gateway"], r["dev"], r["flags"]) == ("10.244.2.0", "flannel.1", ["onlink"])

        p11, p12 = h1.pods
        p21, p22 = h2.pods
        assert reaches(p11.netns, p21.ip) and reaches(p22.netns, p12.ip)
        assert reaches(h1.netns, p22.ip)   # host to remote pod, from its .0 address
        assert tcp_transfer(p11.netns, p22.netns, p22.ip)

        # Idempotent: same device, same MAC, nothing duplicated.
        with in_netns(h1.netns):
            again = backends[1].setup()
            assert (again.mac, again.ifindex) == (peers[1].vtep_mac, link["ifindex"])
            assert backends[1].apply_peers([peers[2]]) == []
        assert len(ipj(h1.netns, "neigh", "show", "dev", "flannel.1")) == 1

        # Removing the peer removes route, neighbour and FDB entry: unreachable.
        with in_netns(h1.netns):
            assert backends[1].remove_peers([peers[2]]) == []
            assert backends[1].remove_peers([peers[2]]) == []  # idempotent
        assert route(h1.netns, "10.244.2.0/24") is None
        assert ipj(h1.netns, "neigh", "show", "dev", "flannel.1") == []
        assert not [e for e in ipj(h1.netns, "bridge", "fdb", "show", "dev", "flannel.1") if e.get("dst")]
        assert unreachable(p11.netns, p21.ip) and unreachable(h1.netns, p22.ip)

        with in_netns(h1.netns):
            backends[1].teardown()
            backends[1].teardown()
        assert ipj(h1.netns, "link", "show") and not any(
            link["ifname"] == "flannel.1" for link in ipj(h1.netns, "link", "show"))


def test_vxlan_device_reuse_replacement_and_peer_errors():
    with temporary_lab(prefix="tv", hosts=1) as lab:
        h1 = lab.host(1)
        mac = random_vtep_mac()
        with in_netns(h1.netns):
            first = KernelVxlanBackend(uplink="eth0", public_ip=h1.ip, subnet="10.244.1.0/24",
                                       vtep_mac=mac).setup()
            assert first.mac == mac
            # A restart without a MAC keeps the device and its MAC (the lease stays valid),
            # and puts the address back to exactly <.0>/32.
            run_in_netns(h1.netns, ["ip", "addr", "add", "10.99.0.1/24", "dev", "flannel.1"])
            reused = KernelVxlanBackend(uplink="eth0", public_ip=h1.ip, subnet="10.244.1.0/24").setup()
            assert (reused.ifindex, reused.mac) == (first.ifindex, mac)
            (addr,) = ipj(h1.netns, "-4", "addr", "show", "flannel.1")
            assert [a["local"] for a in addr["addr_info"]] == ["10.244.1.0"]
            # A device with other settings (port) is replaced.
            backend = KernelVxlanBackend(uplink="eth0", public_ip=h1.ip, subnet="10.244.1.0/24",
                                         port=4789, mtu=1400)
            replaced = backend.setup()
            assert replaced.ifindex != first.ifindex and (replaced.port, replaced.mtu) == (4789, 1400)
            assert backend.device() == replaced

            good = Peer("10.244.2.0/24", "198.18.0.12", random_vtep_mac())
            failures = backend.apply_peers([
                Peer("10.244.3.0/24", "198.18.0.13", random_vtep_mac(), vni=2),
                Peer("10.244.4.0/24", "198.18.0.14", None),
                good,
                Peer("10.244.5.0/24", h1.ip, random_vtep_mac()),
            ])
            assert [(str(f.peer.subnet), f.reason.split(" (")[0]) for f in failures] == [
                ("10.244.3.0/24", "peer VNI 2 differs from ours"),
                ("10.244.4.0/24", "peer has no VtepMAC"),
                ("10.244.5.0/24", "peer public IP 198.18.0.11 is one of this node's own addresses"),
            ]
            assert route(h1.netns, "10.244.2.0/24")["dev"] == "flannel.1"  # the good one went in
            # A peer whose VtepMAC changed leaves no stale FDB entry behind.
            moved = Peer(good.subnet, good.public_ip, random_vtep_mac())
            assert backend.apply_peers([moved]) == []
            fdb = [e["mac"] for e in ipj(h1.netns, "bridge", "fdb", "show", "dev", "flannel.1") if e.get("dst")]
            assert fdb == [moved.vtep_mac]

            with pytest.raises(BackendError, match="uplink 'nope'"):
                KernelVxlanBackend(uplink="nope", public_ip=h1.ip, subnet="10.244.1.0/24").setup()
            with pytest.raises(BackendError, match="call setup"):
                KernelVxlanBackend(uplink="eth0", public_ip=h1.ip, subnet="10.244.1.0/24",
                                   vni=7).apply_peers([good])
    with pytest.raises(ValueError, match="peer vtep_mac"):
        Peer("10.244.2.0/24", "198.18.0.12", "01:00:5e:00:00:01")
    with pytest.raises(ValueError, match="peer subnet"):
        Peer("10.244.2.1/24", "198.18.0.12", None)
    with pytest.raises(ValueError, match="peer public_ip"):
        Peer("10.244.2.0/24", "198.18.0.300", None)
    with pytest.raises(ValueError, match="bad VNI 65536"):
        KernelVxlanBackend(uplink="eth0", public_ip="198.18.0.11", subnet="10.244.1.0/24", vni=65536)


def test_host_gw_as_flanneld_programs_it():
    with temporary_lab(prefix="tg", hosts=2) as lab:
        add_pods(lab, 1, 1500)
        h1, h2 = lab.hosts
        backends = {h.index: KernelHostGwBackend(uplink="eth0") for h in lab.hosts}
        peers = {h.index: Peer(subnet_of(h), h.ip) for h in lab.hosts}
        for h, other in ((h1, h2), (h2, h1)):
            with in_netns(h.netns):
                backends[h.index].setup()
                assert backends[h.index].apply_peers([peers[other.index]]) == []
        r = route(h1.netns, "10.244.2.0/24")
        assert (r["gateway"], r["dev"]) == ("198.18.0.12", "eth0")
        assert reaches(h1.pods[0].netns, h2.pods[0].ip) and reaches(h2.netns, h1.pods[0].ip)
        assert tcp_transfer(h2.pods[0].netns, h1.pods[0].netns, h1.pods[0].ip)

        with in_netns(h1.netns):
            off_link = Peer("10.244.9.0/24", "198.18.1.50")
            myself = Peer("10.244.8.0/24", h1.ip)
            off, own = backends[1].apply_peers([off_link, myself])
            assert "not on eth0's L2 segment" in off.reason
            assert "own addresses" in own.reason
            assert backends[1].remove_peers([peers[2]]) == []
        assert route(h1.netns, "10.244.2.0/24") is None
        assert unreachable(h1.pods[0].netns, h2.pods[0].ip)

        with in_netns(h2.netns):
            backends[2].teardown()
        assert route(h2.netns, "10.244.1.0/24") is None
        assert route(h2.netns, "198.18.0.0/24") is not None  # the kernel's own route stays


def test_vxlan_direct_routing_on_same_l2_and_fallback_across_router():
    with temporary_lab(prefix="td", hosts=3, second_subnet=[3]) as lab:
        add_pods(lab, 1, 1450)
        h1, h2, h3 = lab.hosts
        backends, peers = vxlan_cluster(lab, direct_routing=True)

        direct = route(h1.netns, "10.244.2.0/24")
        assert (direct["gateway"], direct["dev"]) == ("198.18.0.12", "eth0")
        assert "onlink" not in direct.get("flags", [])
        encap = route(h1.netns, "10.244.3.0/24")  # host 3 is behind the router: VXLAN
        assert (encap["gateway"], encap["dev"]) == ("10.244.3.0", "flannel.1")
        assert [n["dst"] for n in ipj(h1.netns, "neigh", "show", "dev", "flannel.1")] == ["10.244.3.0"]
        assert route(h3.netns, "10.244.1.0/24")["dev"] == "flannel.1"

        p1, p2, p3 = (h.pods[0] for h in lab.hosts)
        assert reaches(p1.netns, p2.ip) and reaches(p1.netns, p3.ip) and reaches(p3.netns, p2.ip)
        assert tcp_transfer(p3.netns, p1.netns, p1.ip)

        # A peer that goes from VXLAN to direct loses its neighbour and FDB entry.
        with in_netns(h1.netns):
            plain = KernelVxlanBackend(uplink="eth0", public_ip=h1.ip, subnet=subnet_of(h1))
            assert plain.apply_peers([peers[2]]) == []
            assert route(h1.netns, "10.244.2.0/24")["dev"] == "flannel.1"
            assert backends[1].apply_peers([peers[2]]) == []
        assert route(h1.netns, "10.244.2.0/24")["dev"] == "eth0"
        assert [n["dst"] for n in ipj(h1.netns, "neigh", "show", "dev", "flannel.1")] == ["10.244.3.0"]

        with in_netns(h1.netns):
            backends[1].teardown()
        assert route(h1.netns, "10.244.2.0/24") is None and route(h1.netns, "10.244.3.0/24") is None


def test_backend_gbp_sets_the_device_flag_and_a_changed_setting_replaces_the_device():
    """Backend.GBP as flanneld applies it: the device carries `gbp`; a device made without it
    (or with it, when the config drops it) does not match and is replaced."""
    with temporary_lab(prefix="tg", hosts=2) as lab:
        host = lab.host(1)

        def device(gbp: bool):
            with in_netns(host.netns):
                return KernelVxlanBackend(uplink="eth0", public_ip=host.ip, subnet=subnet_of(host),
                                          gbp=gbp).setup()

        def has_gbp() -> bool:
            (link,) = ipj(host.netns, "-d", "link", "show", "flannel.1")
            return bool(link["linkinfo"]["info_data"].get("gbp"))

        plain = device(False)
        assert not has_gbp()
        with_gbp = device(True)
        assert has_gbp() and with_gbp.ifindex != plain.ifindex
        assert device(True).ifindex == with_gbp.ifindex  # a matching device is kept
        device(False)
        assert not has_gbp()


class CountingIPRoute:
    """A real IPRoute, counting the writes (route/neigh/fdb replace, add, del) sent through it."""
    writes = 0

    def __init__(self, *args, **kwargs):
        self._ipr = IPRoute(*args, **kwargs)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._ipr.close()

    def __getattr__(self, name):
        method = getattr(self._ipr, name)
        if name not in ("route", "neigh", "fdb"):
            return method

        def counted(command, *args, **kwargs):
            if command in ("replace", "add", "del"):
                CountingIPRoute.writes += 1
            return method(command, *args, **kwargs)
        return counted


def writes_during(action) -> int:
    CountingIPRoute.writes = 0
    action()
    return CountingIPRoute.writes


def test_a_full_sync_writes_nothing_for_peers_the_kernel_already_holds(monkeypatch):
    """An agent restarting on N peers finds them in place: the full sync must not rewrite them
    (3 netlink writes each), but must still fix one that differs and prune one that is gone."""
    monkeypatch.setattr(kernel_vxlan, "IPRoute", CountingIPRoute)
    with temporary_lab(prefix="tk", hosts=3) as lab:
        backends, peers = vxlan_cluster(lab)
        h1 = lab.host(1)
        others = [peers[2], peers[3]]
        keep = [p.subnet for p in others]

        def sync(apply):
            with in_netns(h1.netns):
                assert backends[1].update(apply=apply, keep=keep) == []

        def incremental():
            with in_netns(h1.netns):
                assert backends[1].update(apply=others) == []

        # An event batch always writes: neighbour, FDB entry, and a route add that finds our
        # route there, then its replace.
        assert writes_during(incremental) == 4 * len(others)
        assert writes_during(lambda: sync(others)) == 0

        moved = Peer(peers[3].subnet, peers[3].public_ip, random_vtep_mac(), 1)  # a new VtepMAC
        assert writes_during(lambda: sync([peers[2], moved])) == 5  # old FDB + neigh out, 3 in
        fdb = [e for e in ipj(h1.netns, "bridge", "fdb", "show", "dev", "flannel.1") if e.get("dst")]
        assert sorted(e["mac"] for e in fdb) == sorted([peers[2].vtep_mac, moved.vtep_mac])

        keep.remove(moved.subnet)  # host 3 gone: its route, neighbour and FDB entry are pruned
        sync([peers[2]])
        assert route(h1.netns, str(moved.subnet)) is None
        assert [n["dst"] for n in ipj(h1.netns, "neigh", "show", "dev", "flannel.1")] == ["10.244.2.0"]


def test_a_peer_on_a_route_the_agent_did_not_make_is_refused_and_that_route_survives():
    """A lease naming this host's own pod subnet must neither take over nor, once removed,
    delete the pod bridge's route (protocol kernel)."""
    with temporary_lab(prefix="to", hosts=2) as lab:
        add_pods(lab, 1, 1450)
        h1, h2 = lab.hosts
        backends, peers = vxlan_cluster(lab)
        run_in_netns(h1.netns, ["ip", "route", "add", "10.244.7.0/24", "dev", "cni0"])  # an operator's
        hostile = Peer(IPv4Network("10.244.7.0/24"), h2.ip, random_vtep_mac(), 1)
        with in_netns(h1.netns):
            (failure,) = backends[1].apply_peers([hostile])
            assert "did not make" in failure.reason
            assert backends[1].remove_peers([hostile]) == []
        r = route(h1.netns, "10.244.7.0/24")
        assert (r["dev"], r.get("protocol", "boot")) == ("cni0", "boot")
        with in_netns(h1.netns):  # host-gw: the pod bridge's own route
            gateway = KernelHostGwBackend(uplink="eth0")
            gateway.setup()
            (failure,) = gateway.apply_peers([Peer(subnet_of(h1), h2.ip)])
            assert "did not make" in failure.reason
            assert gateway.remove_peers([Peer(subnet_of(h1), h2.ip)]) == []
        r = route(h1.netns, "10.244.1.0/24")
        assert (r["dev"], r["protocol"]) == ("cni0", "kernel")
        assert reaches(h2.pods[0].netns, h1.pods[0].ip)
        with in_netns(h1.netns):  # our own routes are still replaced in place
            moved = Peer(subnet_of(h2), h2.ip, random_vtep_mac(), 1)
            assert backends[1].apply_peers([moved]) == []
        assert route(h1.netns, "10.244.2.0/24")["protocol"] == "251"
