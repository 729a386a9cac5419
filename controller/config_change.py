"""A network config that contradicts what this node already runs is refused until the operator
accepts the change (`--accept-config-change`).

What the node runs is read from what it left: subnet.env (FLANNEL_NETWORK, FLANNEL_SUBNET) and
the VXLAN devices flannel.<VNI>. A changed Network (or SubnetLen, SubnetMin/Max that no longer
hold our subnet) would make the agent drop its lease and take one elsewhere while its pods keep
their old addresses; a changed VNI (or a backend without VXLAN) would leave the old flannel.<VNI>
up, decapsulating VXLAN from anyone. Accepted, the agent takes a subnet of the new network
(subnet.env rewritten) and removes every flannel.<VNI> the new config does not use.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path

from pyroute2 import IPRoute

from flannel_bpf.controller.config import NetworkConfig
from flannel_bpf.controller.subnet_env import read_subnet_env

log = logging.getLogger(__name__)

_VXLAN_DEVICE = re.compile(r"flannel\.(\d+)")


class ConfigChangeRefused(RuntimeError):
    """The network config contradicts what this node runs (one line saying what and how to go on)."""


@dataclass(frozen=True)
class RunningNode:
    network: IPv4Network | None      # FLANNEL_NETWORK of subnet.env
    subnet: IPv4Network | None       # FLANNEL_SUBNET's network
    vxlan_devices: dict[str, int]    # flannel.<VNI> devices here -> VNI


def running_node(subnet_file: str | Path) -> RunningNode:
    network = subnet = None
    try:
        env = read_subnet_env(subnet_file)
        network = IPv4Network(env["FLANNEL_NETWORK"]) if env.get("FLANNEL_NETWORK") else None
        subnet = IPv4Interface(env["FLANNEL_SUBNET"]).network if env.get("FLANNEL_SUBNET") else None
    except (OSError, ValueError):
        pass  # an unreadable or damaged subnet.env says nothing about what runs
    devices = {}
    with IPRoute() as ipr:
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            info = link.get_attr("IFLA_LINKINFO")
            match = _VXLAN_DEVICE.fullmatch(name or "")
            if match and info is not None and info.get_attr("IFLA_INFO_KIND") == "vxlan":
                devices[name] = int(match.group(1))
    return RunningNode(network, subnet, devices)


def _vni(config: NetworkConfig) -> int | None:
    """The VNI the config's backend runs VXLAN with; None for one without VXLAN."""
    return config.backend.vni if config.backend.encapsulates else None


def contradictions(config: NetworkConfig, node: RunningNode) -> list[str]:
    """What in `config` contradicts `node`, one phrase each."""
    found = []
    if node.network is not None and node.network != config.network:
        found.append(f"Network {config.network}, but this node runs in {node.network} (subnet.env)")
    elif node.subnet is not None and not config.fits(node.subnet):
        found.append(f"subnets /{config.subnet_len} from {config.subnet_min} to {config.subnet_max}, "
                     f"which leave out this node's subnet {node.subnet} (subnet.env)")
    wanted = _vni(config)
    stale = sorted(name for name, vni in node.vxlan_devices.items() if vni != wanted)
    if stale:
        now = f"VNI {wanted}" if wanted is not None else f"backend {config.backend.type} (no VXLAN)"
        found.append(f"{now}, but this node runs {', '.join(stale)}")
    return found


def check_config_change(config: NetworkConfig, subnet_file: str | Path, accept: bool) -> None:
    """ConfigChangeRefused if `config` contradicts this node and `accept` is not given; with it,
    say what changes and remove the VXLAN devices the new config does not use."""
    node = running_node(subnet_file)
    found = contradictions(config, node)
    if not found:
        return
    if not accept:
        raise ConfigChangeRefused(
            f"the network config says {'; and '.join(found)}: refusing to renumber this node's pods or "
            "leave its old VXLAN device up; restart with --accept-config-change to switch")
    log.warning("network config changed (--accept-config-change): %s", "; and ".join(found))
    with IPRoute() as ipr:
        for name, vni in node.vxlan_devices.items():
            if vni != _vni(config):
                for index in ipr.link_lookup(ifname=name):
                    ipr.link("del", index=index)
                    log.info("removed %s (VNI %d, not in the new config)", name, vni)
