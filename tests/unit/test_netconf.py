"""Network config parsing: flannel's defaults and every check, each with a clear error."""
import json
from ipaddress import IPv4Address, IPv4Network

import pytest

from flannel_bpf.controller.config import ConfigError, load_network_config_file, parse_network_config


def conf(**fields) -> str:
    fields.setdefault("Network", "10.244.0.0/16")
    fields.setdefault("Backend", {"Type": "vxlan"})
    return json.dumps(fields)


@pytest.mark.parametrize("network, subnet_len, subnet_min, subnet_max", [
    # prefix <= 22: /24 subnets; the first subnet is skipped, SubnetMax is the last subnet.
    ("10.244.0.0/16", 24, "10.244.1.0", "10.244.255.0"),
    ("10.5.0.0/22", 24, "10.5.1.0", "10.5.3.0"),
    # prefix > 22: prefix + 2 (four subnets, the first skipped).
    ("10.5.0.0/23", 25, "10.5.0.128", "10.5.1.128"),
    ("10.5.0.0/28", 30, "10.5.0.4", "10.5.0.12"),
])
def test_defaults_follow_flannel(network, subnet_len, subnet_min, subnet_max):
    config = parse_network_config(conf(Network=network))
    assert config.subnet_len == subnet_len
    assert config.subnet_min == IPv4Address(subnet_min)
    assert config.subnet_max == IPv4Address(subnet_max)


def test_full_bpf_config_and_case_insensitive_names():
    config = parse_network_config(json.dumps({
        "network": "10.244.0.0/16", "SUBNETLEN": 26, "subnetMin": "10.244.1.0", "SubnetMax": "10.244.2.0",
        "backend": {"type": "bpf", "vni": 7, "PORT": 4789, "directrouting": True, "mtu": 1400, "Decap": "XDP"},
    }))
    assert config.network == IPv4Network("10.244.0.0/16")
    assert config.subnet_len == 26
    backend = config.backend
    assert (backend.type, backend.vni, backend.port, backend.udp_port) == ("bpf", 7, 4789, 4789)
    assert backend.direct_routing and backend.mtu == 1400 and backend.decap == "xdp"
    assert [str(s) for s in config.subnets()][:2] == ["10.244.1.0/26", "10.244.1.64/26"]
    assert len(list(config.subnets())) == 5


def test_backend_defaults_and_mtu():
    vxlan = parse_network_config(conf()).backend
    assert (vxlan.vni, vxlan.port, vxlan.udp_port, vxlan.direct_routing, vxlan.decap) == (1, 0, 8472, False, "auto")
    assert vxlan.pod_mtu(1500) == 1450
    hostgw = parse_network_config(conf(Backend={"Type": "host-gw"})).backend
    assert hostgw.pod_mtu(1500) == 1500
    assert parse_network_config(conf(Backend={"Type": "bpf", "MTU": 1300})).backend.pod_mtu(1500) == 1300


def test_network_host_bits_are_masked():
    assert parse_network_config(conf(Network="10.244.7.9/16")).network == IPv4Network("10.244.0.0/16")


def test_fits_is_flannels_compat_check():
    config = parse_network_config(conf(SubnetMin="10.244.10.0", SubnetMax="10.244.20.0"))
    assert config.fits(IPv4Network("10.244.10.0/24"))
    assert config.fits(IPv4Network("10.244.20.0/24"))
    assert not config.fits(IPv4Network("10.244.21.0/24"))
    assert not config.fits(IPv4Network("10.244.10.0/25"))


@pytest.mark.parametrize("text, field, words", [
    # JSON and shape
    ("{not json", "", "not valid JSON"),
    ("[1, 2]", "", "must be a JSON object"),
    # Network
    (conf(Network=None), "Network", "missing"),
    (json.dumps({"Backend": {"Type": "vxlan"}}), "Network", "missing"),
    (conf(Network="10.244.0.0"), "Network", "not an IPv4 CIDR"),
    (conf(Network="banana/16"), "Network", "not an IPv4 CIDR"),
    (conf(Network="fd00::/64"), "Network", "not an IPv4 CIDR"),
    (conf(Network=42), "Network", "must be a CIDR string"),
    (conf(Network="10.0.0.0/29"), "Network", "too small"),
    # SubnetLen
    (conf(SubnetLen=31), "SubnetLen", "at most 30"),
    (conf(SubnetLen=17), "SubnetLen", "at least the Network prefix + 2 = 18"),
    (conf(SubnetLen="24"), "SubnetLen", "must be an integer"),
    (conf(SubnetLen=24.5), "SubnetLen", "must be an integer"),
    (conf(SubnetLen=True), "SubnetLen", "must be an integer"),
    (conf(SubnetLen=-4), "SubnetLen", "positive"),
    # SubnetMin / SubnetMax
    (conf(SubnetMin="10.245.1.0"), "SubnetMin", "not in the range of the Network"),
    (conf(SubnetMax="10.0.0.0"), "SubnetMax", "not in the range of the Network"),
    (conf(SubnetMin="10.244.1.7"), "SubnetMin", "not on a SubnetLen boundary"),
    (conf(SubnetMax="10.244.9.128"), "SubnetMax", "not on a SubnetLen boundary"),
    (conf(SubnetMin="10.244.9.0", SubnetMax="10.244.3.0"), "SubnetMin", "above SubnetMax"),
    (conf(SubnetMin="nope"), "SubnetMin", "not an IPv4 address"),
    (conf(SubnetMax=5), "SubnetMax", "must be an IPv4 address string"),
    # address families
    (conf(EnableIPv6=True, IPv6Network="fd00::/48"), "EnableIPv6", "not supported"),
    (conf(EnableIPv4=False), "EnableIPv4", "must be true"),
    (conf(EnableIPv4="yes"), "EnableIPv4", "true or false"),
    # unknown and repeated fields
    (conf(Networks=["10.1.0.0/16"]), "Networks", "unknown field"),
    ('{"Network": "10.244.0.0/16", "network": "10.1.0.0/16", "Backend": {"Type": "vxlan"}}', "Network",
     "more than once"),
    # Backend
    (json.dumps({"Network": "10.244.0.0/16"}), "Backend", "udp"),
    (conf(Backend="vxlan"), "Backend", "JSON object"),
    (conf(Backend={}), "Backend.Type", "missing"),
    (conf(Backend={"Type": "udp"}), "Backend.Type", "not supported"),
    (conf(Backend={"Type": "wireguard"}), "Backend.Type", "not supported"),
    (conf(Backend={"Type": "vxlan", "VNI": -1}), "Backend.VNI", "between 0 and 65535"),
    (conf(Backend={"Type": "vxlan", "VNI": 70000}), "Backend.VNI", "between 0 and 65535"),
    (conf(Backend={"Type": "bpf", "VNI": "1"}), "Backend.VNI", "must be an integer"),
    (conf(Backend={"Type": "bpf", "Port": 65536}), "Backend.Port", "UDP port"),
    (conf(Backend={"Type": "bpf", "MTU": 40}), "Backend.MTU", "between 68 and 65535"),
    (conf(Backend={"Type": "bpf", "Decap": "skb"}), "Backend.Decap", "auto, xdp, tc"),
    (conf(Backend={"Type": "bpf", "DirectRouting": "yes"}), "Backend.DirectRouting", "true or false"),
    (conf(Backend={"Type": "bpf", "GBP": True}), "Backend.GBP", "unknown field for backend type 'bpf'"),
    (conf(Backend={"Type": "host-gw", "VNI": 1}), "Backend.VNI", "unknown field for backend type 'host-gw'"),
    (conf(Backend={"Type": "vxlan", "Decap": "xdp"}), "Backend.Decap", "unknown field"),
])
def test_bad_config_names_field_and_rule(text, field, words):
    with pytest.raises(ConfigError) as caught:
        parse_network_config(text)
    assert caught.value.field == field
    assert words in str(caught.value)
    if field:
        assert str(caught.value).startswith(f"{field}: ")


def test_stock_flannel_fields_are_accepted():
    config = parse_network_config(conf(EnableIPv4=True, EnableIPv6=False, IPv6Network="fd00::/48",
                                       EnableNFTables=True,
                                       Backend={"Type": "vxlan", "VNI": 1, "Port": 0, "GBP": False,
                                                "Learning": False, "DirectRouting": False, "MTU": 0}))
    assert config.enable_nftables and config.backend.type == "vxlan"


def test_config_file(tmp_path):
    path = tmp_path / "net-conf.json"
    path.write_text(conf(Backend={"Type": "host-gw"}))
    assert load_network_config_file(path).backend.type == "host-gw"
    with pytest.raises(ConfigError, match="cannot read the network config file"):
        load_network_config_file(tmp_path / "missing.json")
