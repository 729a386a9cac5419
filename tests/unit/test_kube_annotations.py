"""flanneld's annotation rules: key names from --kube-annotation-prefix, the values a node
publishes (byte for byte as flanneld's Go code writes them), and nodeToLease."""
from datetime import datetime, timezone
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel_bpf.controller.kube_annotations import (annotation_keys, annotation_patch, network_available_patch,
                                                     node_lease, pod_cidr, published_annotations)
from flannel_bpf.controller.lease import LeaseAttrs, LeaseFormatError, node_lease_attrs

# flanneld's own test table for newAnnotations (prefix -> backend-type key, None: an error).
PREFIX_CASES = [
    ("flannel.alpha.coreos.com", "flannel.alpha.coreos.com/backend-type"),
    ("flannel.alpha.coreos.com/", "flannel.alpha.coreos.com/backend-type"),
    ("flannel.alpha.coreos.com/prefix", "flannel.alpha.coreos.com/prefix-backend-type"),
    ("flannel.alpha.coreos.com/prefix-", "flannel.alpha.coreos.com/prefix-backend-type"),
    ("org.com", "org.com/backend-type"),
    ("org9.com", "org9.com/backend-type"),
    ("org.com/9", "org.com/9-backend-type"),
    ("org", None),
    ("org/", None),
    ("org/prefix", None),
    ("org.COM", None),
    ("org.com/PREFIX", None),
    ("a.b/c/d", None),
]
KEYS = annotation_keys()
MAC = "0a:58:c6:12:00:0b"
# What flanneld writes on a vxlan node at 198.18.0.11 with VNI 1 (vxlanLeaseAttrs marshalled by
# encoding/json: fields in declaration order, no spaces).
FLANNELD_VXLAN = {
    "flannel.alpha.coreos.com/backend-data": '{"VNI":1,"VtepMAC":"0a:58:c6:12:00:0b"}',
    "flannel.alpha.coreos.com/backend-type": "vxlan",
    "flannel.alpha.coreos.com/kube-subnet-manager": "true",
    "flannel.alpha.coreos.com/public-ip": "198.18.0.11",
}


@pytest.mark.parametrize("prefix,backend_type_key", PREFIX_CASES)
def test_prefix_rules_match_flanneld(prefix, backend_type_key):
    if backend_type_key is None:
        with pytest.raises(ValueError, match="--kube-annotation-prefix"):
            annotation_keys(prefix)
    else:
        assert annotation_keys(prefix).backend_type == backend_type_key


def test_all_key_names():
    keys = annotation_keys("example.com/x")
    assert (keys.kube_subnet_manager, keys.backend_data, keys.public_ip, keys.public_ip_overwrite) == (
        "example.com/x-kube-subnet-manager", "example.com/x-backend-data", "example.com/x-public-ip",
        "example.com/x-public-ip-overwrite")


def test_bpf_node_publishes_flanneld_vxlan_annotations_byte_for_byte():
    attrs = node_lease_attrs("bpf", "198.18.0.11", 1, MAC)
    assert published_annotations({}, attrs, KEYS) == FLANNELD_VXLAN
    assert published_annotations(None, attrs, KEYS) == FLANNELD_VXLAN


def test_nothing_to_patch_when_the_node_already_says_it():
    attrs = node_lease_attrs("bpf", "198.18.0.11", 1, MAC)
    assert published_annotations({**FLANNELD_VXLAN, "other": "x"}, attrs, KEYS) == {}


def test_only_changed_annotations_are_patched():
    attrs = node_lease_attrs("bpf", "198.18.0.11", 1, "0a:58:c6:12:00:0c")
    assert published_annotations(FLANNELD_VXLAN, attrs, KEYS) == {
        "flannel.alpha.coreos.com/backend-data": '{"VNI":1,"VtepMAC":"0a:58:c6:12:00:0c"}'}


def test_public_ip_overwrite_is_published_instead_of_ours():
    attrs = node_lease_attrs("bpf", "198.18.0.11", 1, MAC)
    node = {"flannel.alpha.coreos.com/public-ip-overwrite": "203.0.113.7"}
    changed = published_annotations(node, attrs, KEYS)
    assert changed["flannel.alpha.coreos.com/public-ip"] == "203.0.113.7"
    # Once published, nothing more to do (flanneld would send an empty patch).
    assert published_annotations({**node, **changed}, attrs, KEYS) == {}


def test_host_gw_publishes_null_backend_data():
    changed = published_annotations({}, LeaseAttrs(IPv4Address("198.18.0.11"), "host-gw"), KEYS)
    assert changed["flannel.alpha.coreos.com/backend-data"] == "null"
    assert changed["flannel.alpha.coreos.com/backend-type"] == "host-gw"


def test_patch_documents():
    assert annotation_patch({"b": "2", "a": "1"}) == {"metadata": {"annotations": {"a": "1", "b": "2"}}}
    patch = network_available_patch(datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc))
    assert patch == {"status": {"conditions": [{
        "type": "NetworkUnavailable", "status": "False", "lastHeartbeatTime": "2026-01-02T03:04:05Z",
        "lastTransitionTime": "2026-01-02T03:04:05Z", "reason": "FlannelIsUp",
        "message": "Flannel is running on this node"}]}}


def test_node_lease_reads_what_flanneld_writes():
    lease = node_lease(FLANNELD_VXLAN, IPv4Network("10.244.3.0/24"), KEYS)
    assert (lease.subnet, str(lease.public_ip), lease.backend_type, lease.vtep_mac, lease.vni) == (
        IPv4Network("10.244.3.0/24"), "198.18.0.11", "vxlan", MAC, 1)


@pytest.mark.parametrize("change,message", [
    ({"flannel.alpha.coreos.com/public-ip": ""}, "no flannel.alpha.coreos.com/public-ip"),
    ({"flannel.alpha.coreos.com/public-ip": "fe80::1"}, "not an IPv4 address"),
    ({"flannel.alpha.coreos.com/backend-data": "{"}, "not JSON"),
    ({"flannel.alpha.coreos.com/backend-data": '{"VNI":1}'}, "VtepMAC"),
])
def test_malformed_nodes_are_refused_with_the_reason(change, message):
    with pytest.raises(LeaseFormatError, match=message):
        node_lease({**FLANNELD_VXLAN, **change}, IPv4Network("10.244.3.0/24"), KEYS)


def test_pod_cidr_choice():
    assert pod_cidr(None, None) is None
    assert pod_cidr("", []) is None
    assert pod_cidr("10.244.1.0/24", None) == IPv4Network("10.244.1.0/24")
    assert pod_cidr("fd00::/64", ["fd00::/64", "10.244.2.0/24"]) == IPv4Network("10.244.2.0/24")
    with pytest.raises(LeaseFormatError, match="no IPv4"):
        pod_cidr("fd00::/64", None)
    with pytest.raises(LeaseFormatError, match="not an IPv4 subnet"):
        pod_cidr("10.244.1.0/33", None)
