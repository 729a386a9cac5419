"""flanneld's flags: defaults, FLANNELD_* environment, precedence, and clear errors."""
import argparse
import re
from ipaddress import IPv4Address

import pytest

from flannel_bpf.controller.flags import (FlagError, add_flanneld_flags, env_name, etcd_options_from_args,
                                          load_network_config, renew_margin_seconds)


def parse(argv, environ=None):
    parser = argparse.ArgumentParser(prog="flannel-bpf", exit_on_error=False)
    add_flanneld_flags(parser, environ=environ or {})
    return parser.parse_args(argv)


def parse_error(argv, environ=None, capsys=None) -> str:
    parser = argparse.ArgumentParser(prog="flannel-bpf")
    add_flanneld_flags(parser, environ=environ or {})
    with pytest.raises(SystemExit) as caught:
        parser.parse_args(argv)
    assert caught.value.code == 2
    return capsys.readouterr().err


def test_defaults_are_flanneld_defaults():
    args = parse([])
    assert args.etcd_endpoints == ("http://127.0.0.1:2379",)
    assert args.etcd_prefix == "/coreos.com/network"
    assert args.subnet_file == "/run/flannel/subnet.env"
    assert args.subnet_lease_renew_margin == 60 and renew_margin_seconds(args) == 3600
    assert (args.iface, args.iface_regex, args.public_ip, args.net_config_path) == ([], [], None, None)
    assert args.ip_masq is False
    assert args.iptables_forward_rules is True and args.iptables_resync == 5
    assert (args.healthz_ip, args.healthz_port) == ("0.0.0.0", 0)
    options = etcd_options_from_args(args)
    assert options.endpoints == ("http://127.0.0.1:2379",) and options.config_key == "/coreos.com/network/config"


def test_command_line_values(tmp_path):
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    args = parse(["--etcd-endpoints", "http://10.0.0.1:2379, https://etcd.example:4001", "--etcd-prefix", "/p/",
                  "--etcd-cafile", str(ca), "--iface", "eth1", "--iface", "198.18.0.3", "--iface-regex", "^198",
                  "--public-ip", "198.18.0.9", "--subnet-lease-renew-margin", "5", "--ip-masq",
                  "--healthz-port", "8471", "--healthz-ip", "127.0.0.1"])
    assert args.etcd_endpoints == ("http://10.0.0.1:2379", "https://etcd.example:4001")
    assert args.etcd_prefix == "/p"
    assert args.iface == ["eth1", "198.18.0.3"]
    assert [r.pattern for r in args.iface_regex] == ["^198"]
    assert args.public_ip == IPv4Address("198.18.0.9")
    assert renew_margin_seconds(args) == 300
    assert args.ip_masq is True and args.healthz_port == 8471
    assert parse(["--ip-masq=false"]).ip_masq is False


def test_environment_is_read_and_the_command_line_wins():
    environ = {"FLANNELD_ETCD_ENDPOINTS": "http://127.0.0.1:1,http://127.0.0.1:2", "FLANNELD_IFACE": "eth1,eth2",
               "FLANNELD_IP_MASQ": "true", "FLANNELD_SUBNET_LEASE_RENEW_MARGIN": "30",
               "FLANNELD_ETCD_USERNAME": "flannel", "FLANNELD_ETCD_PASSWORD": "secret"}
    args = parse([], environ)
    assert args.etcd_endpoints == ("http://127.0.0.1:1", "http://127.0.0.1:2")
    assert args.iface == ["eth1", "eth2"]
    assert args.ip_masq is True and args.subnet_lease_renew_margin == 30
    assert etcd_options_from_args(args).username == "flannel"
    args = parse(["--iface", "eth9", "--etcd-endpoints", "http://127.0.0.1:3"], environ)
    assert args.iface == ["eth9"]  # replaces the environment's list, does not append to it
    assert args.etcd_endpoints == ("http://127.0.0.1:3",)


def test_env_names():
    assert env_name("--subnet-lease-renew-margin") == "FLANNELD_SUBNET_LEASE_RENEW_MARGIN"
    assert env_name("--etcd-endpoints") == "FLANNELD_ETCD_ENDPOINTS"


@pytest.mark.parametrize("argv, words", [
    (["--etcd-endpoints", "127.0.0.1:2379"], "not a URL like http://127.0.0.1:2379"),
    (["--etcd-endpoints", "ftp://x:1"], "not a URL"),
    (["--etcd-endpoints", "http://x:99999"], "bad port"),
    (["--etcd-endpoints", ","], "no endpoint given"),
    (["--etcd-prefix", "coreos.com"], "must be an etcd key path starting with '/'"),
    (["--etcd-keyfile", "/nonexistent/key.pem"], "no such file"),
    (["--iface", "has/slash"], "neither an IPv4 address nor an interface name"),
    (["--iface", "a-very-long-interface-name"], "neither an IPv4 address nor an interface name"),
    (["--iface-regex", "("], "not a regular expression"),
    (["--public-ip", "198.18.0.300"], "not an IPv4 address"),
    (["--subnet-lease-renew-margin", "0"], "out of range"),
    (["--subnet-lease-renew-margin", "1440"], "out of range"),
    (["--subnet-lease-renew-margin", "ten"], "not a whole number"),
    (["--healthz-port", "70000"], "out of range"),
    (["--healthz-ip", "localhost"], "not an IP address"),
    (["--ip-masq=maybe"], "not true or false"),
    (["--iptables-forward-rules=perhaps"], "not true or false"),
    (["--iptables-resync", "0"], "out of range"),
    (["--net-config-path", "/nonexistent/net-conf.json"], "no such file"),
])
def test_bad_flag_values(argv, words, capsys):
    error = parse_error(argv, capsys=capsys)
    assert f"argument {argv[0].split('=')[0]}: " in error
    assert words in error


def test_bad_environment_value_names_the_variable(capsys):
    error = parse_error([], {"FLANNELD_SUBNET_LEASE_RENEW_MARGIN": "2000"}, capsys=capsys)
    assert "argument --subnet-lease-renew-margin" in error
    assert "FLANNELD_SUBNET_LEASE_RENEW_MARGIN='2000'" in error
    error = parse_error([], {"FLANNELD_IFACE": "eth0,bad/name"}, capsys=capsys)
    assert re.search(r"argument --iface: .*bad/name.* \(from FLANNELD_IFACE='eth0,bad/name'\)", error)


def test_inconsistent_flags(tmp_path):
    key = tmp_path / "key.pem"
    key.write_text("x")
    with pytest.raises(FlagError, match="--etcd-username and --etcd-password"):
        etcd_options_from_args(parse(["--etcd-username", "me"]))
    with pytest.raises(FlagError, match="--etcd-keyfile and --etcd-certfile"):
        etcd_options_from_args(parse(["--etcd-keyfile", str(key)]))


def test_net_config_path_is_read_without_etcd(tmp_path):
    path = tmp_path / "net-conf.json"
    path.write_text('{"Network": "10.244.0.0/16", "Backend": {"Type": "bpf", "Decap": "tc"}}')
    config = load_network_config(parse(["--net-config-path", str(path)]).net_config_path, registry=None)
    assert config.backend.decap == "tc"


def test_forward_rules_are_on_unless_turned_off_as_flanneld_s():
    assert parse(["--iptables-forward-rules=false"]).iptables_forward_rules is False
    assert parse([], {"FLANNELD_IPTABLES_FORWARD_RULES": "false"}).iptables_forward_rules is False
    assert parse(["--iptables-forward-rules"], {"FLANNELD_IPTABLES_FORWARD_RULES": "false"}).iptables_forward_rules
    assert parse([], {"FLANNELD_IPTABLES_RESYNC": "30"}).iptables_resync == 30
