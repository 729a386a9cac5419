"""Uplink selection with pyroute2, inside a throw-away network namespace that has no way out."""
import subprocess
import uuid
from ipaddress import IPv4Address, IPv4Interface

import pytest

from flannel_bpf.controller.uplink import UplinkError, select_uplink


def ip(*args):
    subprocess.run(["ip", *args], check=True, capture_output=True)


@pytest.fixture
def netns(require_root):
    """Two veth pairs, both ends inside the namespace: uplink0 (198.18.250.2/24, MTU 1400, default
    route) and side0 (198.19.250.2/24)."""
    name = f"fbpf-uplink-{uuid.uuid4().hex[:6]}"
    ip("netns", "add", name)
    try:
        for dev, peer, address, mtu in (("uplink0", "uplink0p", "198.18.250.2/24", "1400"),
                                        ("side0", "side0p", "198.19.250.2/24", "1500")):
            ip("-n", name, "link", "add", dev, "mtu", mtu, "type", "veth", "peer", "name", peer, "mtu", mtu)
            ip("-n", name, "addr", "add", address, "dev", dev)
            ip("-n", name, "link", "set", dev, "up")
            ip("-n", name, "link", "set", peer, "up")
        ip("-n", name, "route", "add", "default", "via", "198.18.250.1", "dev", "uplink0")
        yield name
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def test_default_route_interface(netns):
    uplink = select_uplink(netns=netns)
    assert (uplink.name, uplink.mtu) == ("uplink0", 1400)
    assert uplink.address == IPv4Interface("198.18.250.2/24")
    assert uplink.public_ip == IPv4Address("198.18.250.2") and uplink.ifindex > 0


def test_iface_by_name_or_address_first_found_wins(netns):
    assert select_uplink(["missing0", "side0", "uplink0"], netns=netns).name == "side0"
    assert select_uplink(["198.19.250.2"], netns=netns).address == IPv4Interface("198.19.250.2/24")
    with pytest.raises(UplinkError, match="--iface missing0, 10.9.9.9: no interface"):
        select_uplink(["missing0", "10.9.9.9"], netns=netns)


def test_iface_regex_matches_addresses_then_names(netns):
    assert select_uplink(iface_regexes=[r"^198\.19\."], netns=netns).name == "side0"
    assert select_uplink(iface_regexes=["nothing", "^side0$"], netns=netns).name == "side0"
    with pytest.raises(UplinkError, match="no interface address or name matches"):
        select_uplink(iface_regexes=["^eth9$"], netns=netns)


def test_public_ip_overrides_the_address(netns):
    uplink = select_uplink(["uplink0"], public_ip="198.18.0.77", netns=netns)
    assert uplink.public_ip == IPv4Address("198.18.0.77") and uplink.ip == IPv4Address("198.18.250.2")


def test_no_default_route_and_no_address(netns):
    ip("-n", netns, "route", "del", "default")
    with pytest.raises(UplinkError, match="no IPv4 default route"):
        select_uplink(netns=netns)
    with pytest.raises(UplinkError, match="uplink0p has no IPv4 address"):
        select_uplink(["uplink0p"], netns=netns)
