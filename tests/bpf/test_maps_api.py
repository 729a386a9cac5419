"""The typed map API the controller calls, on the real pinned maps."""
from __future__ import annotations

import ipaddress
import time

import pytest

import fl_packets as P
from flannel_bpf.loader.bpf.layout import PeerMode, Stat
from flannel_bpf.loader.bpf.maps import DataPlaneMaps, EndpointEntry, NodeConfig, PeerEntry

pytestmark = pytest.mark.usefixtures("require_root")


def peer(subnet, ip, mac="02:fb:00:00:00:01", mode=PeerMode.VXLAN):
    return PeerEntry.make(subnet, ip, mac, mode)


def ips(*addrs):
    return {ipaddress.IPv4Address(a) for a in addrs}


def test_known_peer_ips_follow_the_leases(node):
    maps = node.maps
    maps.sync_peers([])
    assert maps.known_peer_ips() == set()
    maps.upsert_peers([peer("10.244.5.0/24", "198.18.0.5"), peer("10.244.6.0/24", "198.18.0.6")])
    assert maps.known_peer_ips() == ips("198.18.0.5", "198.18.0.6")
    # A lease that moves to another address takes its trust along.
    maps.upsert_peers([peer("10.244.6.0/24", "198.18.0.66")])
    assert maps.known_peer_ips() == ips("198.18.0.5", "198.18.0.66")
    # Two subnets behind one address: trusted until the last one goes.
    maps.upsert_peers([peer("10.244.7.0/24", "198.18.0.5")])
    maps.remove_peers(["10.244.5.0/24"])
    assert maps.known_peer_ips() == ips("198.18.0.5", "198.18.0.66")
    assert maps.remove_peers(["10.244.7.0/24", "10.244.99.0/24"]) == 1  # unknown subnets are ignored
    assert maps.known_peer_ips() == ips("198.18.0.66")


def test_a_new_process_continues_from_the_maps(node):
    node.maps.sync_peers([peer("10.244.5.0/24", "198.18.0.5"), peer("10.244.6.0/24", "198.18.0.5")])
    with DataPlaneMaps(node.maps.pin_dir) as restarted:
        restarted.remove_peers(["10.244.5.0/24"])
        assert restarted.known_peer_ips() == ips("198.18.0.5")
        restarted.remove_peers(["10.244.6.0/24"])
        assert restarted.known_peer_ips() == set()


def test_sync_peers_writes_only_differences(node):
    maps = node.maps
    maps.sync_peers([P.PEER2, P.PEER3])
    moved = peer("10.244.3.0/24", "198.18.0.33", mode=PeerMode.VXLAN)
    assert maps.sync_peers([P.PEER2, moved, peer("10.244.4.0/24", "198.18.0.4")]) == (2, 0)
    assert maps.sync_peers([moved]) == (0, 2)
    assert maps.list_peers() == [moved]
    assert maps.known_peer_ips() == ips("198.18.0.33")


def test_endpoints(node):
    maps = node.maps
    maps.set_endpoints([EndpointEntry.make("10.244.1.9", 12, "02:cc:00:00:00:09"),
                        EndpointEntry.make("10.244.1.10", 13, "02:cc:00:00:00:0a")])
    assert [str(e.ip) for e in maps.list_endpoints()] == ["10.244.1.5", "10.244.1.9", "10.244.1.10"]
    assert maps.remove_endpoints(["10.244.1.9", "10.244.1.200"]) == 1
    assert EndpointEntry.make("10.244.1.10", 13, "02:cc:00:00:00:0a") in maps.list_endpoints()


@pytest.mark.parametrize("make, message", [
    (lambda: PeerEntry.make("10.244.5.1/24", "198.18.0.5"), "not an IPv4 subnet"),
    (lambda: PeerEntry.make("10.244.5.0/24", "198.18.0"), "not an IPv4 address"),
    (lambda: PeerEntry.make("10.244.5.0/24", "198.18.0.5", "02:00"), "bad MAC address"),
    (lambda: PeerEntry.make("10.244.5.0/24", "198.18.0.5", mode="host-gw"), "peer mode 'host-gw'"),
    (lambda: EndpointEntry.make("10.244.1.9", 0, "02:cc:00:00:00:09"), "endpoint ifindex 0"),
    (lambda: P.node_config(vni=1 << 16), "VNI 65536"),
    (lambda: P.node_config(vxlan_port=0), "VXLAN port 0"),
    (lambda: P.node_config(mtu=600), "MTU 600"),
    (lambda: P.node_config(src_port_min=5000, src_port_max=5000), "source port range 5000-5000"),
    (lambda: P.node_config(uplink_ifindex=-1), "uplink ifindex -1"),
    (lambda: P.node_config(vtep_mac="01:00:5e:00:00:01"), "vtep_mac 01:00:5e:00:00:01: must be a unicast"),
])
def test_bad_input_is_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_ten_thousand_peers_in_one_batch(node, record_property):
    maps = node.maps
    entries = [peer(f"10.{100 + i // 256}.{i % 256}.0/24", f"198.19.{i // 256}.{i % 256 or 1}")
               for i in range(10_000)]
    started = time.perf_counter()
    maps.upsert_peers(entries)
    upsert_s = time.perf_counter() - started
    assert len(maps.list_peers()) == 10_002  # and PEER2, PEER3
    assert len(maps.known_peer_ips()) == len({e.underlay_ip for e in entries}) + 2
    # The programs see them.
    out = node.run("tc_encap_from_pods", P.from_pod(dst="10.139.15.9"))
    assert out.stats == [Stat.ENCAP_VXLAN]
    started = time.perf_counter()
    maps.remove_peers([e.subnet for e in entries])
    remove_s = time.perf_counter() - started
    assert maps.list_peers() == [P.PEER2, P.PEER3]
    record_property("upsert_10k_peers_s", round(upsert_s, 3))
    record_property("remove_10k_peers_s", round(remove_s, 3))
    print(f"\n10,000 peers: upsert {upsert_s * 1000:.0f} ms, remove {remove_s * 1000:.0f} ms")


def test_config_round_trip_and_clear(node):
    cfg = NodeConfig.make(underlay_ip="198.18.7.7", subnet="10.244.77.0/24", vtep_mac="02:fb:00:00:07:07",
                          uplink_mac="02:aa:00:00:07:07", uplink_ifindex=3, vni=42, mtu=9000)
    node.maps.set_local_config(cfg)
    assert node.maps.get_local_config() == cfg
    node.maps.clear_local_config()
    assert node.maps.get_local_config() is None
    assert node.run("xdp_decap", P.vxlan_from_peer()).stats == [Stat.PASS_NO_CONFIG]
