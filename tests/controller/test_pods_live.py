"""Which subnets hold live pods (the agent never gives those up for another subnet), in a scratch
namespace: a pod bridge with an address and a port, or a routed pod of flannel-bpf-cni."""
from ipaddress import IPv4Network

import pytest

from flannel_bpf.bench.common import scratch_netns
from flannel_bpf.controller.agent import pods_live_on
from flannel_bpf.lab.run import run_in_netns
from flannel_bpf.loader.netns import in_netns

pytestmark = pytest.mark.usefixtures("require_root")

OURS, OTHER = IPv4Network("10.244.7.0/24"), IPv4Network("10.244.8.0/24")


def _ip(netns: str, *argv: str) -> None:
    run_in_netns(netns, ["ip", *argv])


def test_a_bridge_with_an_address_and_a_port_holds_live_pods():
    with scratch_netns("podslive") as netns:
        _ip(netns, "link", "add", "cni0", "type", "bridge")
        _ip(netns, "addr", "add", "10.244.7.1/24", "dev", "cni0")
        with in_netns(netns):
            assert not pods_live_on(OURS, "cni0")  # an address but no pod yet
        _ip(netns, "link", "add", "vethp1", "type", "veth", "peer", "name", "vethp1-pod")
        _ip(netns, "link", "set", "vethp1", "master", "cni0")
        with in_netns(netns):
            assert pods_live_on(OURS, "cni0")
            assert not pods_live_on(OTHER, "cni0")
            assert not pods_live_on(OURS, "docker0")  # another bridge: none of ours


def test_a_routed_pod_holds_its_subnet():
    with scratch_netns("podslive") as netns:
        _ip(netns, "link", "add", "vethcni", "type", "veth", "peer", "name", "vethcni-pod")
        _ip(netns, "link", "set", "vethcni", "up")
        with in_netns(netns):
            assert not pods_live_on(OURS, "cni0")
        _ip(netns, "route", "add", "10.244.7.5/32", "dev", "vethcni", "scope", "link")
        with in_netns(netns):
            assert pods_live_on(OURS, "cni0") and not pods_live_on(OTHER, "cni0")
