"""Choosing the uplink (flanneld's external interface) from --iface, --iface-regex, --public-ip.

As flanneld: each --iface (a name, or an IPv4 address on the interface) is tried in order and the
first found wins; else each --iface-regex is matched against the interfaces' IPv4 addresses, then
their names; else the interface of the IPv4 default route. The public IP is --public-ip, else the
uplink's address.
"""
from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface
from typing import Iterable

from pyroute2 import IPRoute


class UplinkError(RuntimeError):
    """No interface matches the flags, or the chosen one is unusable; the message says which."""


@dataclass(frozen=True)
class Uplink:
    name: str
    ifindex: int
    address: IPv4Interface  # the uplink's IPv4 address with its prefix length
    mtu: int
    public_ip: IPv4Address

    @property
    def ip(self) -> IPv4Address:
        return self.address.ip


@dataclass(frozen=True)
class _Link:
    name: str
    index: int
    mtu: int
    addresses: tuple[IPv4Interface, ...]  # global scope first, kernel order otherwise


def select_uplink(ifaces: Iterable[str] = (), iface_regexes: Iterable[str | re.Pattern] = (),
                  public_ip: IPv4Address | str | None = None, netns: str | None = None) -> Uplink:
    """The uplink in the current network namespace (or `netns`, a name under /run/netns)."""
    ifaces, iface_regexes = list(ifaces), [re.compile(r) if isinstance(r, str) else r for r in iface_regexes]
    with IPRoute(netns=netns) if netns else IPRoute() as ipr:
        links = _links(ipr)
        if ifaces:
            link, address = _by_iface(links, ifaces)
        elif iface_regexes:
            link, address = _by_regex(links, iface_regexes)
        else:
            link, address = _by_default_route(ipr, links)
    if address is None:
        if not link.addresses:
            raise UplinkError(f"interface {link.name} has no IPv4 address")
        address = link.addresses[0]
    if link.mtu <= 0:
        raise UplinkError(f"interface {link.name} reports MTU {link.mtu}")
    return Uplink(name=link.name, ifindex=link.index, address=address, mtu=link.mtu,
                  public_ip=IPv4Address(public_ip) if public_ip is not None else address.ip)


def _links(ipr: IPRoute) -> list[_Link]:
    addresses: dict[int, list[tuple[bool, IPv4Interface]]] = {}
    for msg in ipr.get_addr(family=socket.AF_INET):
        local = msg.get("IFA_LOCAL") or msg.get("IFA_ADDRESS")
        is_global = msg["scope"] == 0  # RT_SCOPE_UNIVERSE
        addresses.setdefault(msg["index"], []).append((is_global, IPv4Interface(f"{local}/{msg['prefixlen']}")))
    links = []
    for msg in ipr.get_links():
        found = addresses.get(msg["index"], [])
        ordered = tuple(a for g, a in found if g) + tuple(a for g, a in found if not g)
        links.append(_Link(name=msg.get("IFLA_IFNAME"), index=msg["index"], mtu=msg.get("IFLA_MTU") or 0,
                           addresses=ordered))
    return links


def _by_iface(links: list[_Link], ifaces: list[str]) -> tuple[_Link, IPv4Interface | None]:
    for wanted in ifaces:
        try:
            ip = IPv4Address(wanted)
        except ValueError:
            for link in links:
                if link.name == wanted:
                    return link, None
            continue
        for link in links:
            for address in link.addresses:
                if address.ip == ip:
                    return link, address
    raise UplinkError(f"--iface {', '.join(ifaces)}: no interface with that name or IPv4 address")


def _by_regex(links: list[_Link], regexes: list[re.Pattern]) -> tuple[_Link, IPv4Interface | None]:
    for regex in regexes:
        for link in links:
            for address in link.addresses:
                if regex.search(str(address.ip)):
                    return link, address
        for link in links:
            if regex.search(link.name):
                return link, None
    raise UplinkError(f"--iface-regex {', '.join(r.pattern for r in regexes)}: no interface address or name matches")


def _by_default_route(ipr: IPRoute, links: list[_Link]) -> tuple[_Link, IPv4Interface | None]:
    routes = sorted(ipr.get_default_routes(family=socket.AF_INET), key=lambda r: r.get("RTA_PRIORITY") or 0)
    for route in routes:
        oif = route.get("RTA_OIF")
        for link in links:
            if link.index == oif:
                return link, None
    raise UplinkError("no IPv4 default route to pick the uplink from; name it with --iface or --iface-regex")
