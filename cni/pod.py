"""One pod's routed device: a netkit pair (L3) or a veth pair, no bridge.

The host side is named from the container ID and interface name (`lxc` + 11 hex digits for
netkit, as Cilium names its devices; `veth` + 11 for veth), so DEL and CHECK find it without
state of their own. The pod gets its address as a /32 and one default route: through eth0
itself on netkit (no ARP on an L3 device), through the gateway on a veth, whose MAC both
sides know from permanent neighbour entries (no ARP either). The host reaches the pod by a /32
route through the host side; the data plane finds it in fl_endpoints.
"""
from __future__ import annotations

import errno
import hashlib
import os
from dataclasses import dataclass
from ipaddress import IPv4Address

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from flannel_bpf.cni.spec import CHECK_FAILED, DEVICE_FAILURE, UNKNOWN_CONTAINER, CniError
from flannel_bpf.loader.netlink.netkit import NetkitError, add_netkit_pair, netkit_info
from flannel_bpf.loader.netns import NetnsNotFound, in_netns_path, write_sysctl

POD_DEVICES = ("netkit", "veth")
NUD_PERMANENT = 0x80
NO_MAC = "00:00:00:00:00:00"
ENCAP_HEADROOM = 64  # what a vxlan device asks for: VXLAN_OVERHEAD rounded up


def host_ifname(device: str, container_id: str, ifname: str) -> str:
    digest = hashlib.sha256(f"{container_id}/{ifname}".encode()).hexdigest()[:11]
    return ("lxc" if device == "netkit" else "veth") + digest


@dataclass(frozen=True)
class PodDevice:
    host_ifname: str
    host_ifindex: int
    host_mac: str
    pod_ifname: str
    pod_mac: str
    ip: IPv4Address
    gateway: IPv4Address | None   # None on netkit: the default route is the device itself


def _netlink_error(err: NetlinkError) -> str:
    return err.args[1] if len(err.args) > 1 else os.strerror(err.code)


def _open_netns(path: str) -> int:
    try:
        return os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise CniError(UNKNOWN_CONTAINER, f"network namespace {path} does not exist") from None
    except OSError as err:
        raise CniError(UNKNOWN_CONTAINER, f"network namespace {path}: {err.strerror}") from None


def create(device: str, netns: str, container_id: str, ifname: str, ip: IPv4Address,
           gateway: IPv4Address, mtu: int) -> PodDevice:
    """Make the pair, address the pod, route both ways. On failure nothing of it is left."""
    host = host_ifname(device, container_id, ifname)
    fd = _open_netns(netns)
    try:
        with in_netns_path(netns), IPRoute() as pod_ipr:
            if pod_ipr.link_lookup(ifname=ifname):
                raise CniError(DEVICE_FAILURE, f"{netns} already has an interface {ifname}")
        with IPRoute() as ipr:
            try:
                if device == "netkit":
                    # room for the VXLAN headers in front of every packet the pod sends, as the
                    # bridge gives its ports (kernels without IFLA_NETKIT_HEADROOM ignore it)
                    add_netkit_pair(ipr, host, ifname, peer_netns_fd=fd, mtu=mtu, headroom=ENCAP_HEADROOM)
                else:
                    ipr.link("add", ifname=host, kind="veth", mtu=mtu,
                             peer={"ifname": ifname, "net_ns_fd": fd, "mtu": mtu})
            except NetkitError as err:
                raise CniError(DEVICE_FAILURE, str(err)) from None
            except NetlinkError as err:
                raise CniError(DEVICE_FAILURE, f"cannot add veth {host}/{ifname}: {_netlink_error(err)}") from None
            try:
                return _configure(ipr, device, netns, host, ifname, ip, gateway)
            except BaseException:
                _delete_host_side(ipr, host)
                raise
    finally:
        os.close(fd)


def _configure(ipr: IPRoute, device: str, netns: str, host: str, ifname: str, ip: IPv4Address,
               gateway: IPv4Address) -> PodDevice:
    index = ipr.link_lookup(ifname=host)[0]
    host_mac = ipr.link("get", index=index)[0].get_attr("IFLA_ADDRESS") or NO_MAC
    ipr.link("set", index=index, state="up")
    try:
        with in_netns_path(netns), IPRoute() as pod:
            pod_index = pod.link_lookup(ifname=ifname)[0]
            pod_mac = pod.link("get", index=pod_index)[0].get_attr("IFLA_ADDRESS") or NO_MAC
            pod.link("set", index=pod_index, state="up")
            pod.addr("add", index=pod_index, address=str(ip), prefixlen=32)
            if device == "netkit":
                pod.route("add", dst="0.0.0.0/0", oif=pod_index)
            else:
                pod.route("add", dst=f"{gateway}/32", oif=pod_index, scope=253)  # link
                pod.neigh("add", dst=str(gateway), lladdr=host_mac, ifindex=pod_index, state=NUD_PERMANENT)
                pod.route("add", dst="0.0.0.0/0", gateway=str(gateway), oif=pod_index)
        if device == "veth":
            ipr.neigh("add", dst=str(ip), lladdr=pod_mac, ifindex=index, state=NUD_PERMANENT)
        ipr.route("add", dst=f"{ip}/32", oif=index, scope=253)
    except NetlinkError as err:
        raise CniError(DEVICE_FAILURE, f"configuring {host}/{ifname} for {ip}: {_netlink_error(err)}") from None
    return PodDevice(host, index, host_mac, ifname, pod_mac, ip, None if device == "netkit" else gateway)


def answer_arp_on_bridge(bridge: str) -> bool:
    """Pods on the node's pod bridge (cni0) hold the whole subnet as on-link, so they ARP for a
    routed pod's address there: with proxy ARP the host answers for the addresses it routes
    through another device (only those), and forwards. False when there is no such bridge."""
    with IPRoute() as ipr:
        if not ipr.link_lookup(ifname=bridge):
            return False
    write_sysctl(f"net/ipv4/conf/{bridge}/proxy_arp", 1)
    return True


def _delete_host_side(ipr: IPRoute, host: str) -> bool:
    """Deleting either end of a pair deletes both, with their routes and neighbours."""
    found = ipr.link_lookup(ifname=host)
    if not found:
        return False
    try:
        ipr.link("del", index=found[0])
    except NetlinkError as err:
        if err.code != errno.ENODEV:
            raise CniError(DEVICE_FAILURE, f"cannot delete {host}: {_netlink_error(err)}") from None
    return True


def find(device: str, container_id: str, ifname: str) -> tuple[int, list[IPv4Address]] | None:
    """(host ifindex, the pod addresses routed through it), None when there is no such device."""
    host = host_ifname(device, container_id, ifname)
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=host)
        if not found:
            return None
        ips = [IPv4Address(r.get_attr("RTA_DST")) for r in ipr.get_routes(family=2, oif=found[0])
               if r["dst_len"] == 32 and r.get_attr("RTA_DST")]
        return found[0], ips


def ifindexes() -> set[int]:
    with IPRoute() as ipr:
        return {link["index"] for link in ipr.link("dump")}


def delete(device: str, container_id: str, ifname: str) -> bool:
    with IPRoute() as ipr:
        return _delete_host_side(ipr, host_ifname(device, container_id, ifname))


def check(device: str, netns: str, container_id: str, ifname: str, ip: IPv4Address, mtu: int) -> int:
    """The host ifindex; CniError naming the first thing that is not as ADD made it."""
    host = host_ifname(device, container_id, ifname)
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=host)
        if not found:
            raise CniError(CHECK_FAILED, f"host device {host} is missing")
        link = ipr.link("get", index=found[0])[0]
        kind = "netkit" if netkit_info(link) else link.get_attr("IFLA_LINKINFO").get_attr("IFLA_INFO_KIND")
        if kind != device:
            raise CniError(CHECK_FAILED, f"{host} is a {kind} device, not {device}")
        if link.get_attr("IFLA_OPERSTATE") not in ("UP", "UNKNOWN"):
            raise CniError(CHECK_FAILED, f"{host} is not up")
        routes = [r for r in ipr.get_routes(family=2, oif=found[0]) if r.get_attr("RTA_DST") == str(ip)
                  and r["dst_len"] == 32]
        if not routes:
            raise CniError(CHECK_FAILED, f"no host route {ip}/32 via {host}")
    try:
        with in_netns_path(netns), IPRoute() as pod:
            found_pod = pod.link_lookup(ifname=ifname)
            if not found_pod:
                raise CniError(CHECK_FAILED, f"{netns} has no interface {ifname}")
            pod_link = pod.link("get", index=found_pod[0])[0]
            if pod_link.get_attr("IFLA_MTU") != mtu:
                raise CniError(CHECK_FAILED, f"{ifname} has MTU {pod_link.get_attr('IFLA_MTU')}, not {mtu}")
            addresses = {a.get_attr("IFA_ADDRESS") for a in pod.get_addr(family=2, index=found_pod[0])}
            if str(ip) not in addresses:
                raise CniError(CHECK_FAILED, f"{ifname} in {netns} does not have {ip}")
    except NetnsNotFound:
        raise CniError(UNKNOWN_CONTAINER, f"network namespace {netns} does not exist") from None
    return found[0]
