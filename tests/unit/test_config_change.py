"""Which network configs contradict what a node runs (subnet.env, flannel.<VNI>)."""
import json
from ipaddress import IPv4Network

from flannel_bpf.controller.config import parse_network_config
from flannel_bpf.controller.config_change import RunningNode, contradictions

RUNNING = RunningNode(IPv4Network("10.244.0.0/16"), IPv4Network("10.244.7.0/24"), {"flannel.1": 1})


def config(**fields):
    doc = {"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}
    doc.update(fields)
    return parse_network_config(json.dumps(doc))


def test_the_same_config_and_a_fresh_node_contradict_nothing():
    assert contradictions(config(), RUNNING) == []
    assert contradictions(config(Network="10.9.0.0/16"), RunningNode(None, None, {})) == []


def test_a_changed_network_is_named_with_both_networks():
    (found,) = contradictions(config(Network="10.245.0.0/16"), RUNNING)
    assert "Network 10.245.0.0/16" in found and "10.244.0.0/16 (subnet.env)" in found


def test_subnet_bounds_that_leave_our_subnet_out():
    (found,) = contradictions(config(SubnetMin="10.244.10.0"), RUNNING)
    assert "leave out this node's subnet 10.244.7.0/24" in found
    (found,) = contradictions(config(SubnetLen=25), RUNNING)
    assert "/25" in found


def test_a_changed_vni_or_a_backend_without_vxlan_names_the_old_device():
    (found,) = contradictions(config(Backend={"Type": "vxlan", "VNI": 2}), RUNNING)
    assert found == "VNI 2, but this node runs flannel.1"
    (found,) = contradictions(config(Backend={"Type": "host-gw"}), RUNNING)
    assert found == "backend host-gw (no VXLAN), but this node runs flannel.1"
