"""Where a node's network config, subnet lease and peers come from: etcd or Kubernetes.

The agent, the backends and the health code see only these interfaces. Two implementations:
- EtcdControlPlane: flannel's etcd registry (controller/registry.py, controller/subnet_manager.py);
- KubeControlPlane (controller/kube_subnet_manager.py): flanneld's --kube-subnet-mgr, the lease
  in node annotations, the subnet from the node's podCIDR.
Both deliver the same PeerEvents, on one thread, in order, to the agent's PeerSink.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Callable, Protocol

from flannel_bpf.controller.config import NetworkConfig
from flannel_bpf.controller.flags import load_network_config
from flannel_bpf.controller.lease import Lease, LeaseAttrs
from flannel_bpf.controller.lease_check import SkippedLeases
from flannel_bpf.controller.peers import PeerSink
from flannel_bpf.controller.registry import SubnetRegistry
from flannel_bpf.controller.subnet_manager import EtcdSubnetManager


class SubnetManager(Protocol):
    """This node's lease (acquired, kept, written to subnet.env) and the peers' leases as events."""

    reconnect_count: int   # times the peer watch came back after its source went away
    reacquired_count: int  # times our lost lease was taken again
    skipped: SkippedLeases  # peers not programmed, and why
    conflict: str | None    # why we hold no lease on our subnet while another node does

    @property
    def lease(self) -> Lease | None: ...

    def start(self) -> Lease:
        """Acquire the lease and write subnet.env, then keep it and stream peer events."""

    def stop(self, release: bool = False, timeout: float = 10.0) -> None: ...

    def peers(self) -> dict[IPv4Network, Lease]: ...

    def wait_synced(self, timeout: float | None = None) -> bool:
        """True once the first full listing of the peers has been turned into events."""

    def watch_down_for(self) -> float | None:
        """Seconds the peer watch has been down (not yet up, or reconnecting); None while up."""


@dataclass(frozen=True)
class ManagerSettings:
    """What the agent asks of any subnet manager."""

    mtu: int
    subnet_file: str | Path | None
    sink: PeerSink
    on_lease_reacquired: Callable[[Lease, Lease], None]
    stop: threading.Event  # set when the agent stops (ends waits in start())
    # Whether this node still has pods in a subnet (a lease of ours is not given up while it has).
    holds_pods: Callable[[IPv4Network], bool] = lambda subnet: False
    ip_masq: bool = False
    ttl: int = 24 * 3600
    renew_margin: float = 3600.0
    own_addresses: frozenset[IPv4Address] = frozenset()  # a peer claiming one of these is skipped


class ControlPlane(Protocol):
    def network_config(self, stop: threading.Event) -> NetworkConfig:
        """The network config (ConfigError when it is bad), waiting for it where flanneld does."""

    def subnet_manager(self, config: NetworkConfig, attrs: LeaseAttrs, settings: ManagerSettings) -> SubnetManager: ...

    def close(self) -> None: ...


class EtcdControlPlane:
    """flannel's etcd registry: the config at <prefix>/config (or --net-config-path), leases
    under <prefix>/subnets/."""

    def __init__(self, registry: SubnetRegistry, net_config_path: str | None = None):
        self.registry = registry
        self.net_config_path = net_config_path

    def network_config(self, stop: threading.Event) -> NetworkConfig:
        return load_network_config(self.net_config_path, self.registry, stop)

    def subnet_manager(self, config: NetworkConfig, attrs: LeaseAttrs, settings: ManagerSettings) -> EtcdSubnetManager:
        return EtcdSubnetManager(
            self.registry, config, attrs, mtu=settings.mtu, ip_masq=settings.ip_masq,
            subnet_file=settings.subnet_file, sink=settings.sink, on_lease_reacquired=settings.on_lease_reacquired,
            holds_pods=settings.holds_pods,
            ttl=settings.ttl, renew_margin=settings.renew_margin, own_addresses=settings.own_addresses)

    def close(self) -> None:
        self.registry.close()
