"""flanneld's iptables rules, through the iptables command as its go-iptables does, so that they
read the same in `iptables -S`:
- the --ip-masq rules: nat chain FLANNEL-POSTRTG, jumped to from POSTROUTING, comment "flanneld masq";
- the forward rules (--iptables-forward-rules): filter chain FLANNEL-FWD, jumped to from FORWARD,
  accepting what comes from or goes to the flannel network (Docker sets FORWARD's policy to DROP,
  which would kill the kernel path), comment "flanneld forward".
A RuleKeeper re-checks its rule sets every few seconds and rebuilds one that someone flushed or
changed, as flanneld does every --iptables-resync seconds.
"""
from __future__ import annotations

import logging
import subprocess
import threading
from dataclasses import dataclass
from ipaddress import IPv4Network

log = logging.getLogger(__name__)

DEFAULT_RESYNC = 5.0   # flanneld's --iptables-resync
KUBE_PROXY_MARK = "0x4000/0x4000"


class IptablesError(RuntimeError):
    pass


@dataclass(frozen=True)
class Chain:
    table: str
    name: str
    parent: str     # the built-in chain that jumps to it
    comment: str

    def tagged(self, *spec: str) -> list[str]:
        """A rule's match, flanneld's comment, then its target (everything from -j on)."""
        at = spec.index("-j")
        return [*spec[:at], "-m", "comment", "--comment", self.comment, *spec[at:]]

    @property
    def jump(self) -> list[str]:
        return [self.parent, *self.tagged("-j", self.name)]


MASQ = Chain("nat", "FLANNEL-POSTRTG", "POSTROUTING", "flanneld masq")
FORWARD = Chain("filter", "FLANNEL-FWD", "FORWARD", "flanneld forward")


def _iptables(table: str, *args: str, check: bool = True) -> bool:
    try:
        done = subprocess.run(["iptables", "-w", "5", "-t", table, *args], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise IptablesError(f"iptables -t {table} {' '.join(args)}: {err}") from None
    if check and done.returncode != 0:
        raise IptablesError(f"iptables -t {table} {' '.join(args)}: {done.stderr.strip()}")
    return done.returncode == 0


def _listing(table: str, chain: str) -> list[str] | None:
    """`iptables -S CHAIN`'s lines; None when the chain does not exist."""
    try:
        done = subprocess.run(["iptables", "-w", "5", "-t", table, "-S", chain], capture_output=True, text=True,
                              timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise IptablesError(f"iptables -t {table} -S {chain}: {err}") from None
    return done.stdout.splitlines() if done.returncode == 0 else None


def _as_listed(chain: str, *rule: str) -> str:
    """A rule as `iptables -S` prints it (arguments with spaces in double quotes)."""
    return " ".join(["-A", chain, *(f'"{arg}"' if " " in arg else arg for arg in rule)])


@dataclass(frozen=True)
class RuleSet:
    chain: Chain
    rules: tuple[tuple[str, ...], ...]

    def present(self) -> bool:
        """The chain holds exactly these rules, in order, and its parent jumps to it: two
        listings (`iptables -S`): a `-C` per rule, as flanneld checks, costs three times as much."""
        chain = self.chain
        rules = _listing(chain.table, chain.name)
        jumps = _listing(chain.table, chain.parent)
        return (rules == [f"-N {chain.name}", *(_as_listed(chain.name, *rule) for rule in self.rules)]
                and jumps is not None and _as_listed(*chain.jump) in jumps)

    def apply(self) -> None:
        """Idempotent: the chain is rebuilt with exactly these rules, the jump added once."""
        table, name = self.chain.table, self.chain.name
        if not _iptables(table, "-S", name, check=False):
            _iptables(table, "-N", name)
        _iptables(table, "-F", name)
        for rule in self.rules:
            _iptables(table, "-A", name, *rule)
        if not _iptables(table, "-C", *self.chain.jump, check=False):
            _iptables(table, "-A", *self.chain.jump)


def masq_rules(network: IPv4Network, subnet: IPv4Network) -> RuleSet:
    """flanneld's masq rules for our subnet, in its order."""
    net, sub, tag = str(network), str(subnet), MASQ.tagged
    return RuleSet(MASQ, tuple(tuple(rule) for rule in (
        tag("-m", "mark", "--mark", KUBE_PROXY_MARK, "-j", "RETURN"),
        tag("-s", sub, "-d", net, "-j", "RETURN"),
        tag("-s", net, "-d", sub, "-j", "RETURN"),
        tag("!", "-s", net, "-d", sub, "-j", "RETURN"),
        tag("-s", net, "!", "-d", "224.0.0.0/4", "-j", "MASQUERADE", "--random-fully"),
        tag("!", "-s", net, "-d", net, "-j", "MASQUERADE", "--random-fully"),
    )))


def forward_rules(network: IPv4Network) -> RuleSet:
    net, tag = str(network), FORWARD.tagged
    return RuleSet(FORWARD, (tuple(tag("-s", net, "-j", "ACCEPT")), tuple(tag("-d", net, "-j", "ACCEPT"))))


def remove(chain: Chain) -> None:
    """Idempotent: removes the jump(s) and the chain if present."""
    while _iptables(chain.table, "-D", *chain.jump, check=False):
        pass
    if _iptables(chain.table, "-S", chain.name, check=False):
        _iptables(chain.table, "-F", chain.name)
        _iptables(chain.table, "-X", chain.name)


class RuleKeeper:
    """Applies rule sets and keeps them in place: a thread re-checks them every `period` s and
    rebuilds a set that lost a rule, its chain or its jump."""

    def __init__(self, period: float = DEFAULT_RESYNC):
        self.period = period
        self.restored = 0
        self._sets: dict[Chain, RuleSet] = {}
        self._failing: dict[Chain, str] = {}  # the last error of each chain, warned about once
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def keep(self, rule_set: RuleSet) -> None:
        """Apply `rule_set` now and keep it from then on; it replaces the set of the same chain
        (a changed subnet). If iptables refuses, a warning: the re-checks retry it."""
        chain = rule_set.chain
        with self._lock:
            self._sets[chain] = rule_set
            try:
                rule_set.apply()
                self._failing.pop(chain, None)
                log.info("iptables rules in %s/%s", chain.table, chain.name)
            except IptablesError as err:
                self._warn_once(chain, err)
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="flannel-bpf-iptables", daemon=True)
            self._thread.start()

    def check(self) -> None:
        """One re-check of every set; a failure is a warning, retried at the next one."""
        with self._lock:
            for rule_set in self._sets.values():
                chain = rule_set.chain
                try:
                    if not rule_set.present():
                        rule_set.apply()
                        self.restored += 1
                        log.warning("iptables rules in %s/%s were changed by someone else: restored",
                                    chain.table, chain.name)
                    self._failing.pop(chain, None)
                except IptablesError as err:
                    self._warn_once(chain, err)

    def _warn_once(self, chain: Chain, err: IptablesError) -> None:
        if self._failing.get(chain) != str(err):
            self._failing[chain] = str(err)
            log.warning("iptables rules in %s/%s not in place (retried every %g s): %s",
                        chain.table, chain.name, self.period, err)

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self.check()

    def stop(self, remove_rules: bool = False) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if remove_rules:
            with self._lock:
                for chain in self._sets:
                    remove(chain)
