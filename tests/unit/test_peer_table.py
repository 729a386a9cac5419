"""Peer diffing and free-subnet search: the pure parts of the subnet manager."""
import json
from ipaddress import IPv4Address, IPv4Network

from flannel_bpf.controller.config import parse_network_config
from flannel_bpf.controller.lease import Lease
from flannel_bpf.controller.peers import PeerTable
from flannel_bpf.controller.subnet_manager import first_free_subnets


def lease(subnet: str, ip: str, mac: str = "02:00:00:00:00:01", **bookkeeping) -> Lease:
    return Lease(IPv4Network(subnet), IPv4Address(ip), "vxlan", {"VNI": 1, "VtepMAC": mac}, **bookkeeping)


def test_apply_added_changed_removed_and_silent_renewal():
    table = PeerTable()
    first = lease("10.244.1.0/24", "198.18.0.2")
    assert table.apply(first.subnet, first).kind == "added"
    assert table.apply(first.subnet, lease("10.244.1.0/24", "198.18.0.2", mod_revision=9)) is None  # TTL renewal
    moved = lease("10.244.1.0/24", "198.18.0.2", mac="02:00:00:00:00:99")
    event = table.apply(first.subnet, moved)
    assert (event.kind, event.lease.vtep_mac) == ("changed", "02:00:00:00:00:99")
    event = table.apply(first.subnet, None)
    assert (event.kind, event.lease) == ("removed", moved)
    assert table.apply(first.subnet, None) is None
    assert len(table) == 0


def test_reset_diffs_a_fresh_listing():
    table = PeerTable()
    stays, goes, changes = (lease("10.244.1.0/24", "198.18.0.2"), lease("10.244.2.0/24", "198.18.0.3"),
                            lease("10.244.3.0/24", "198.18.0.4"))
    table.reset({l.subnet: l for l in (stays, goes, changes)})
    changed = lease("10.244.3.0/24", "198.18.0.44")
    new = lease("10.244.4.0/24", "198.18.0.5")
    events = table.reset({stays.subnet: stays, changed.subnet: changed, new.subnet: new})
    assert [(e.kind, str(e.lease.subnet)) for e in events] == [
        ("removed", "10.244.2.0/24"), ("changed", "10.244.3.0/24"), ("added", "10.244.4.0/24")]
    assert set(table.snapshot()) == {stays.subnet, changed.subnet, new.subnet}


def config(**fields):
    fields.setdefault("Network", "10.244.0.0/16")
    fields.setdefault("Backend", {"Type": "vxlan"})
    return parse_network_config(json.dumps(fields))


def test_first_free_subnets_skips_taken_and_overlapping():
    cfg = config(SubnetMin="10.244.1.0", SubnetMax="10.244.6.0")
    taken = [IPv4Network("10.244.2.0/24"), IPv4Network("10.244.4.0/23")]  # the /23 is from an older config
    assert [str(s) for s in first_free_subnets(cfg, taken)] == ["10.244.1.0/24", "10.244.3.0/24", "10.244.6.0/24"]
    assert len(first_free_subnets(config(), [])) == 100  # flannel picks among the first 100 free
    assert first_free_subnets(cfg, [IPv4Network("10.244.0.0/20")]) == []
