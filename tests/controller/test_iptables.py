"""flanneld's iptables rules (masq, forward) through the real iptables, in a throwaway namespace,
and the keeper that restores them when someone flushes or deletes them."""
import secrets
import subprocess
import time
from ipaddress import IPv4Network

import pytest

from flannel_bpf.controller import iptables
from flannel_bpf.controller.iptables import FORWARD, MASQ, RuleKeeper, forward_rules, masq_rules
from flannel_bpf.lab.netns import create_netns, remove_netns
from flannel_bpf.loader.netns import in_netns

NETWORK = IPv4Network("10.244.0.0/16")


@pytest.fixture
def netns(require_root):
    name = f"fbpf-ipt-{secrets.token_hex(3)}"
    create_netns(name)
    try:
        with in_netns(name):  # iptables, run from this thread, acts on the namespace
            yield name
    finally:
        remove_netns(name)


def ipt(*args: str) -> None:
    subprocess.run(["iptables", "-w", "5", *args], capture_output=True, text=True, check=True)


def rules(table: str) -> list[str]:
    out = subprocess.run(["iptables", "-w", "5", "-t", table, "-S"], capture_output=True, text=True,
                         check=True).stdout
    return [line for line in out.splitlines() if "FLANNEL" in line]


def flanneld_masq(subnet: str) -> list[str]:
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


FLANNELD_FORWARD = [
    "-N FLANNEL-FWD",
    '-A FORWARD -m comment --comment "flanneld forward" -j FLANNEL-FWD',
    '-A FLANNEL-FWD -s 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT',
    '-A FLANNEL-FWD -d 10.244.0.0/16 -m comment --comment "flanneld forward" -j ACCEPT',
]


def test_rules_are_flanneld_s_once_follow_a_new_subnet_and_go_away(netns):
    masq_rules(NETWORK, IPv4Network("10.244.7.0/24")).apply()
    masq_rules(NETWORK, IPv4Network("10.244.7.0/24")).apply()  # idempotent: no second jump or rule
    forward_rules(NETWORK).apply()
    forward_rules(NETWORK).apply()
    assert rules("nat") == flanneld_masq("10.244.7.0/24")
    assert rules("filter") == FLANNELD_FORWARD
    masq_rules(NETWORK, IPv4Network("10.244.9.0/24")).apply()  # our subnet changed
    assert rules("nat") == flanneld_masq("10.244.9.0/24")
    for _ in range(2):  # idempotent
        iptables.remove(MASQ)
        iptables.remove(FORWARD)
    assert rules("nat") == [] and rules("filter") == []


@pytest.mark.parametrize("damage", [
    ("-t", "filter", "-F", "FLANNEL-FWD"),                           # chain flushed
    ("-t", "filter", "-F", "FORWARD"),                               # the jump flushed with FORWARD
    ("-t", "nat", "-D", "FLANNEL-POSTRTG", "-s", "10.244.0.0/16", "!", "-d", "224.0.0.0/4", "-m", "comment",
     "--comment", "flanneld masq", "-j", "MASQUERADE", "--random-fully"),  # one rule deleted
], ids=["flushed-chain", "flushed-forward", "deleted-rule"])
def test_the_keeper_restores_what_someone_removed(netns, damage):
    keeper = RuleKeeper(period=3600)  # checks driven by hand below; the thread never fires
    try:
        keeper.keep(masq_rules(NETWORK, IPv4Network("10.244.7.0/24")))
        keeper.keep(forward_rules(NETWORK))
        keeper.check()
        assert keeper.restored == 0  # intact rules are left alone
        ipt(*damage)
        assert rules("nat") + rules("filter") != flanneld_masq("10.244.7.0/24") + FLANNELD_FORWARD
        keeper.check()
        assert keeper.restored == 1
        assert rules("nat") == flanneld_masq("10.244.7.0/24") and rules("filter") == FLANNELD_FORWARD
    finally:
        keeper.stop(remove_rules=True)
    assert rules("nat") == [] and rules("filter") == []


def test_the_keeper_thread_rechecks_on_its_own(netns):
    keeper = RuleKeeper(period=0.2)
    try:
        keeper.keep(forward_rules(NETWORK))
        ipt("-F", "FORWARD")  # the keeper's thread started in this thread's namespace, and stays there
        for _ in range(50):
            if keeper.restored:
                break
            time.sleep(0.1)
        assert keeper.restored >= 1 and rules("filter") == FLANNELD_FORWARD
    finally:
        keeper.stop(remove_rules=True)


def test_no_iptables_is_one_warning_never_an_error(monkeypatch, caplog):
    """A node without the iptables command: the agent goes on, warned once, retrying."""
    monkeypatch.setenv("PATH", "/nonexistent")
    keeper = RuleKeeper(period=3600)
    try:
        with caplog.at_level("WARNING"):
            keeper.keep(forward_rules(NETWORK))
            keeper.check()
            keeper.check()
    finally:
        keeper.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "FLANNEL-FWD" in warnings[0] and "iptables" in warnings[0]
