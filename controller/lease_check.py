"""Whether a peer's lease may be programmed: the one check every subnet manager runs on every
lease it hears of, before the lease reaches the data plane.

A lease that parses can still be hostile or stale: a key that names the underlay or the whole
address space would route non-pod traffic into VXLAN, and a PublicIP that no node can be would
send encapsulated frames to a broadcast, multicast or loopback address, into the pod network, or
back to ourselves. flannel's own rule for a subnet is "inside Network, exactly SubnetLen long";
SubnetMin..SubnetMax only bounds what a node may allocate, so it is not checked here.
"""
from __future__ import annotations

import hashlib
import logging
import threading
from collections import Counter
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Iterable

from flannel_bpf.controller.config import NetworkConfig
from flannel_bpf.controller.lease import Lease, lease_type_of, shorten
from flannel_bpf.loader.netdefs import check_public_ip, check_vtep_mac

log = logging.getLogger(__name__)

_LOGGED_REASON_CHARS = 300  # a hostile value may be a megabyte; its log line is not

# Metric labels of skipped leases, one per kind of problem.
NOT_A_SUBNET_OF_NETWORK = "not_in_network"
WRONG_SUBNET_LENGTH = "wrong_subnet_len"
UNUSABLE_PUBLIC_IP = "bad_public_ip"
PUBLIC_IP_IN_NETWORK = "public_ip_in_network"
PUBLIC_IP_IS_OURS = "public_ip_is_ours"
WRONG_BACKEND_TYPE = "wrong_backend_type"
UNUSABLE_VTEP_MAC = "bad_vtep_mac"
BAD_KEY = "bad_key"      # the key names no subnet (set by the registries, not here)
BAD_VALUE = "bad_value"  # the value does not parse (set by the registries, not here)


@dataclass(frozen=True)
class LeaseProblem:
    """Why a lease is skipped: `label` for metrics (a few fixed values), `message` for the log."""

    label: str
    message: str

    def __str__(self) -> str:
        return self.message


def subnet_problem(subnet: IPv4Network, config: NetworkConfig) -> LeaseProblem | None:
    """flannel's rule for a leased subnet: inside Network and exactly SubnetLen long."""
    if subnet.prefixlen != config.subnet_len:
        return LeaseProblem(WRONG_SUBNET_LENGTH, f"subnet {subnet} is not a /{config.subnet_len} "
                                                 f"(the network config's SubnetLen)")
    if not subnet.subnet_of(config.network):
        return LeaseProblem(NOT_A_SUBNET_OF_NETWORK, f"subnet {subnet} is not inside Network {config.network}")
    return None


def lease_problem(lease: Lease, config: NetworkConfig,
                  own_addresses: Iterable[IPv4Address] = ()) -> LeaseProblem | None:
    """None when a peer's lease may be programmed, else the reason it must be skipped.
    `own_addresses` are this node's underlay addresses (its PublicIP among them)."""
    problem = subnet_problem(lease.subnet, config)
    if problem is not None:
        return problem
    wanted = lease_type_of(config.backend.type)
    if lease.backend_type != wanted:
        return LeaseProblem(WRONG_BACKEND_TYPE, f"BackendType {lease.backend_type[:40]!r} is not {wanted!r}, "
                                                f"the type this network's backend reads")
    if lease.vtep_mac is not None:
        try:
            check_vtep_mac(lease.vtep_mac)
        except ValueError as err:
            return LeaseProblem(UNUSABLE_VTEP_MAC, str(err))
    try:
        public_ip = check_public_ip(lease.public_ip)
    except ValueError as err:
        return LeaseProblem(UNUSABLE_PUBLIC_IP, str(err))
    if public_ip in config.network:
        return LeaseProblem(PUBLIC_IP_IN_NETWORK, f"PublicIP {public_ip} is a pod address inside Network "
                                                  f"{config.network}, not a node's underlay address")
    if public_ip in set(own_addresses):
        return LeaseProblem(PUBLIC_IP_IS_OURS, f"PublicIP {public_ip} is this node's own address")
    return None


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode(errors="replace"), digest_size=16).digest()


class SkippedLeases:
    """Leases being skipped, for the log-once rule and the metrics. Per key it remembers only
    digests of the key and of the last reason (a few dozen bytes, however large the key or
    value), so memory is bounded by the number of keys etcd holds; a key is forgotten when it
    is deleted, turns valid, or is missing from a full listing. Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._reasons: dict[bytes, tuple[str, bytes]] = {}  # key digest -> (label, message digest)
        self.total: Counter = Counter()  # label -> skips logged (a new reason for a key)

    def skip(self, key: str, problem: LeaseProblem) -> None:
        """Record that `key` is skipped for `problem`; logs (and counts) only a new reason."""
        message = shorten(problem.message, _LOGGED_REASON_CHARS)
        memo = (problem.label, _digest(message))
        with self._lock:
            if self._reasons.get(_digest(key)) == memo:
                return
            self._reasons[_digest(key)] = memo
            self.total[problem.label] += 1
        log.warning("skipping lease %s: %s", shorten(key, 200), message)

    def forget(self, key: str) -> None:
        with self._lock:
            self._reasons.pop(_digest(key), None)

    def retain(self, keys: Iterable[str]) -> None:
        """Forget every key not in `keys` (after a full listing)."""
        kept = {_digest(key) for key in keys}
        with self._lock:
            self._reasons = {k: v for k, v in self._reasons.items() if k in kept}

    def current(self) -> Counter:
        """label -> keys skipped right now."""
        with self._lock:
            return Counter(label for label, _ in self._reasons.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._reasons)
