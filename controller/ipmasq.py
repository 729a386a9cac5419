"""flanneld's --ip-masq rules (nat table, comment "flanneld masq"), through the iptables
command as flanneld's go-iptables does, so they read the same in `iptables -t nat -S`."""
from __future__ import annotations

import logging
import subprocess
from ipaddress import IPv4Network

log = logging.getLogger(__name__)

CHAIN = "FLANNEL-POSTRTG"
COMMENT = ["-m", "comment", "--comment", "flanneld masq"]
JUMP = ["POSTROUTING", *COMMENT, "-j", CHAIN]


class IpMasqError(RuntimeError):
    pass


def masq_rules(network: IPv4Network, subnet: IPv4Network) -> list[list[str]]:
    """The chain's rules in flanneld's order."""
    net, sub = str(network), str(subnet)
    return [
        ["-m", "mark", "--mark", "0x4000/0x4000", *COMMENT, "-j", "RETURN"],
        ["-s", sub, "-d", net, *COMMENT, "-j", "RETURN"],
        ["-s", net, "-d", sub, *COMMENT, "-j", "RETURN"],
        ["!", "-s", net, "-d", sub, *COMMENT, "-j", "RETURN"],
        ["-s", net, "!", "-d", "224.0.0.0/4", *COMMENT, "-j", "MASQUERADE", "--random-fully"],
        ["!", "-s", net, "-d", net, *COMMENT, "-j", "MASQUERADE", "--random-fully"],
    ]


def _iptables(*args: str, check: bool = True) -> bool:
    done = subprocess.run(["iptables", "-w", "5", "-t", "nat", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise IpMasqError(f"iptables -t nat {' '.join(args)}: {done.stderr.strip()}")
    return done.returncode == 0


class IpMasq:
    def __init__(self, network: IPv4Network, subnet: IPv4Network):
        self.rules = masq_rules(network, subnet)

    def apply(self) -> None:
        """Idempotent: the chain is rebuilt with exactly our rules; the jump added once."""
        if not _iptables("-S", CHAIN, check=False):
            _iptables("-N", CHAIN)
        _iptables("-F", CHAIN)
        for rule in self.rules:
            _iptables("-A", CHAIN, *rule)
        if not _iptables("-C", *JUMP, check=False):
            _iptables("-A", *JUMP)
        log.info("ip-masq rules in nat/%s", CHAIN)

    @staticmethod
    def remove() -> None:
        """Idempotent: removes the jump and the chain if present."""
        while _iptables("-D", *JUMP, check=False):
            pass
        if _iptables("-S", CHAIN, check=False):
            _iptables("-F", CHAIN)
            _iptables("-X", CHAIN)
