"""flanneld's --ip-masq rules through the real iptables, in a throwaway namespace."""
import secrets
import subprocess
from ipaddress import IPv4Network

import pytest

from flannel_bpf.controller.ipmasq import IpMasq
from flannel_bpf.lab.netns import create_netns, remove_netns
from flannel_bpf.loader.netns import in_netns

NETWORK = IPv4Network("10.244.0.0/16")


@pytest.fixture
def netns(require_root):
    name = f"fbpf-masq-{secrets.token_hex(3)}"
    create_netns(name)
    try:
        with in_netns(name):  # iptables, run from this thread, acts on the namespace
            yield name
    finally:
        remove_netns(name)


def nat_rules() -> list[str]:
    out = subprocess.run(["iptables", "-w", "5", "-t", "nat", "-S"], capture_output=True, text=True,
                         check=True).stdout
    return [line for line in out.splitlines() if "FLANNEL" in line]


def flanneld_rules(subnet: str) -> list[str]:
    c = '-m comment --comment "flanneld masq"'
    return [
        "-N FLANNEL-POSTRTG",
        f"-A POSTROUTING {c} -j FLANNEL-POSTRTG",
        f"-A FLANNEL-POSTRTG -m mark --mark 0x4000/0x4000 {c} -j RETURN",
        f"-A FLANNEL-POSTRTG -s {subnet} -d 10.244.0.0/16 {c} -j RETURN",
        f"-A FLANNEL-POSTRTG -s 10.244.0.0/16 -d {subnet} {c} -j RETURN",
        f"-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d {subnet} {c} -j RETURN",
        f"-A FLANNEL-POSTRTG -s 10.244.0.0/16 ! -d 224.0.0.0/4 {c} -j MASQUERADE --random-fully",
        f"-A FLANNEL-POSTRTG ! -s 10.244.0.0/16 -d 10.244.0.0/16 {c} -j MASQUERADE --random-fully",
    ]


def test_rules_are_flanneld_s_once_follow_a_new_subnet_and_go_away(netns):
    IpMasq(NETWORK, IPv4Network("10.244.7.0/24")).apply()
    IpMasq(NETWORK, IPv4Network("10.244.7.0/24")).apply()  # idempotent: no second jump or rule
    assert nat_rules() == flanneld_rules("10.244.7.0/24")
    IpMasq(NETWORK, IPv4Network("10.244.9.0/24")).apply()  # our subnet changed
    assert nat_rules() == flanneld_rules("10.244.9.0/24")
    IpMasq.remove()
    IpMasq.remove()  # idempotent
    assert nat_rules() == []
