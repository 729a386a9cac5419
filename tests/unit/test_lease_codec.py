"""Lease keys and values exactly as flanneld writes and reads them."""
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel_bpf.controller.lease import (Lease, LeaseAttrs, LeaseFormatError, decode_lease, encode_go_json,
                                          encode_lease_value, node_lease_attrs, parse_subnet_key, subnet_key,
                                          vxlan_backend_data)

PREFIX = "/coreos.com/network"
# Written by flanneld's vxlan backend (the example in flannel's documentation).
FLANNELD_VXLAN = b'{"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}'
# flanneld's host-gw backend leaves BackendData out (json.RawMessage, omitempty).
FLANNELD_HOSTGW = b'{"PublicIP":"198.18.0.7","PublicIPv6":null,"BackendType":"host-gw"}'


def test_flanneld_vxlan_lease_is_parsed():
    lease = decode_lease(f"{PREFIX}/subnets/10.5.52.0-24", FLANNELD_VXLAN)
    assert lease.subnet == IPv4Network("10.5.52.0/24")
    assert lease.public_ip == IPv4Address("192.168.64.3")
    assert lease.backend_type == "vxlan"
    assert (lease.vni, lease.vtep_mac) == (1, "c6:d2:32:6f:8f:44")
    assert lease.public_ipv6 is None


def test_our_vxlan_lease_is_byte_identical_to_flanneld():
    attrs = LeaseAttrs(IPv4Address("192.168.64.3"), "vxlan", vxlan_backend_data(1, "C6:D2:32:6F:8F:44"))
    assert encode_lease_value(attrs) == FLANNELD_VXLAN
    assert encode_lease_value(attrs.for_subnet(IPv4Network("10.5.52.0/24"))) == FLANNELD_VXLAN


def test_host_gw_lease_round_trip_is_byte_identical():
    lease = decode_lease(f"{PREFIX}/subnets/10.5.9.0-24", FLANNELD_HOSTGW)
    assert (lease.backend_type, lease.backend_data, lease.vtep_mac) == ("host-gw", None, None)
    assert encode_lease_value(LeaseAttrs(IPv4Address("198.18.0.7"), "host-gw")) == FLANNELD_HOSTGW
    assert encode_lease_value(lease) == FLANNELD_HOSTGW


def test_vxlan_without_vni_from_older_flannel_and_case_insensitive_names():
    value = b'{"publicip":"10.0.0.5","BACKENDTYPE":"vxlan","backenddata":{"vtepmac":"02:AA:bb:cc:dd:ee"},"Extra":1}'
    lease = decode_lease(f"{PREFIX}/subnets/10.5.1.0-24", value)
    assert lease.vni is None and lease.vtep_mac == "02:aa:bb:cc:dd:ee"
    assert lease.public_ip == IPv4Address("10.0.0.5")


def test_other_backend_types_are_kept_for_the_consumer_to_judge():
    lease = decode_lease(f"{PREFIX}/subnets/10.5.1.0-24",
                         b'{"PublicIP":"10.0.0.5","PublicIPv6":null,"BackendType":"udp","BackendData":{"x":1}}')
    assert lease.backend_type == "udp" and lease.backend_data == {"x": 1}


def test_keys():
    assert subnet_key(PREFIX, IPv4Network("10.5.52.0/24")) == "/coreos.com/network/subnets/10.5.52.0-24"
    assert subnet_key(PREFIX + "/", IPv4Network("10.5.52.0/24")) == "/coreos.com/network/subnets/10.5.52.0-24"
    assert parse_subnet_key("/coreos.com/network/subnets/10.5.52.0-24") == IPv4Network("10.5.52.0/24")
    assert parse_subnet_key(b"/x/subnets/10.5.52.0-24") == IPv4Network("10.5.52.0/24")
    # flannel's dual-stack keys carry the IPv4 subnet first.
    assert parse_subnet_key("/x/subnets/10.5.52.0-24&fc00::-64") == IPv4Network("10.5.52.0/24")


@pytest.mark.parametrize("key, reason", [
    ("/coreos.com/network/subnets/garbage", "does not end in a subnet"),
    ("/coreos.com/network/subnets/10.5.52.0", "does not end in a subnet"),
    ("/coreos.com/network/subnets/10.5.52.1-24", "aligned IPv4 subnet"),
    ("/coreos.com/network/subnets/10.5.52.0-33", "aligned IPv4 subnet"),
    ("/coreos.com/network/subnets/300.5.52.0-24", "aligned IPv4 subnet"),
])
def test_bad_keys(key, reason):
    with pytest.raises(LeaseFormatError, match=reason):
        parse_subnet_key(key)


@pytest.mark.parametrize("value, reason", [
    (b"", "not JSON"),
    (b"{", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[]", "not a JSON object"),
    (b'"PublicIP"', "not a JSON object"),
    (b'{"BackendType":"host-gw"}', "PublicIP is missing"),
    (b'{"PublicIP":17}', "PublicIP is not a string"),
    (b'{"PublicIP":"10.0.0.256"}', "not an IPv4 address"),
    (b'{"PublicIP":"fd00::1"}', "not an IPv4 address"),
    (b'{"PublicIP":"10.0.0.1","PublicIPv6":5}', "PublicIPv6"),
    (b'{"PublicIP":"10.0.0.1","BackendType":7}', "BackendType is not a string"),
    (b'{"PublicIP":"10.0.0.1","BackendType":"vxlan"}', "no BackendData"),
    (b'{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":{"VNI":1}}', "VtepMAC None: expected six hex bytes"),
    (b'{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":{"VtepMAC":"zz:zz"}}', "VtepMAC 'zz:zz': expected six hex bytes"),
    (b'{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":{"VNI":"1","VtepMAC":"02:00:00:00:00:01"}}',
     "VNI '1': must be an integer 0..65535"),
    # flannel reads the lease VNI as a uint16: a larger one is a lease no stock node can decode.
    (b'{"PublicIP":"10.0.0.1","BackendType":"vxlan","BackendData":{"VNI":65536,"VtepMAC":"02:00:00:00:00:01"}}',
     "VNI 65536: must be an integer 0..65535"),
])
def test_malformed_values_raise_clear_errors(value, reason):
    with pytest.raises(LeaseFormatError, match=reason):
        decode_lease("/coreos.com/network/subnets/10.5.1.0-24", value)


def test_go_json_escapes_like_encoding_json():
    assert encode_go_json({"a": "<&>", "b": "é"}) == '{"a":"\\u003c\\u0026\\u003e","b":"é"}'


def test_published_ignores_bookkeeping():
    one = Lease(IPv4Network("10.5.1.0/24"), IPv4Address("10.0.0.1"), "host-gw", mod_revision=1, etcd_lease_id=5)
    two = Lease(IPv4Network("10.5.1.0/24"), IPv4Address("10.0.0.1"), "host-gw", mod_revision=9, etcd_lease_id=7)
    assert one.published == two.published
    assert "10.5.1.0/24 at 10.0.0.1 (host-gw)" == one.describe()


def test_bad_vtep_mac_is_refused_when_building_our_lease():
    with pytest.raises(ValueError, match="VtepMAC"):
        vxlan_backend_data(1, "not-a-mac")


def test_node_lease_attrs_per_backend():
    bpf = node_lease_attrs("bpf", "198.18.0.2", vni=1, vtep_mac="c6:d2:32:6f:8f:44")
    assert bpf == node_lease_attrs("vxlan", "198.18.0.2", vni=1, vtep_mac="c6:d2:32:6f:8f:44")
    assert encode_lease_value(bpf) == (b'{"PublicIP":"198.18.0.2","PublicIPv6":null,"BackendType":"vxlan",'
                                       b'"BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}')
    hostgw = node_lease_attrs("host-gw", IPv4Address("198.18.0.2"))
    assert encode_lease_value(hostgw) == b'{"PublicIP":"198.18.0.2","PublicIPv6":null,"BackendType":"host-gw"}'
    with pytest.raises(ValueError, match="needs the VtepMAC of the node's flannel.1 device"):
        node_lease_attrs("bpf", "198.18.0.2")
    with pytest.raises(ValueError, match="publishes no lease"):
        node_lease_attrs("udp", "198.18.0.2")
