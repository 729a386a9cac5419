"""netkit device pairs: a BPF-programmable veth whose programs run inside the transmit call.

pyroute2 0.9 knows no `netkit` kind and iproute2 6.1 cannot make one, so the IFLA_INFO_DATA
attributes (include/uapi/linux/if_link.h, IFLA_NETKIT_*) are declared here as a pyroute2 NLA
class and registered as the kind's data; pyroute2's link request then encodes them. The primary device stays in the caller's
namespace (the host side); the peer is created straight in the pod's namespace, so it never
shows up in the host under its name.

In L3 mode (the default) both ends are Ethernet devices with IFF_NOARP and an all-zero MAC:
frames keep a 14-byte header whose addresses are zero, and the kernel never resolves a
neighbour on them.
"""
from __future__ import annotations

import errno
import os
from dataclasses import dataclass

from pyroute2 import IPRoute
from pyroute2.netlink import nla
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg, ifinfveth

# enum netkit_mode
NETKIT_L2 = 0
NETKIT_L3 = 1
# enum netkit_action, as default policies (what a device does when no program decides)
NETKIT_PASS = 0
NETKIT_DROP = 2


class netkit_data(nla):
    """IFLA_INFO_DATA of kind netkit (uapi if_link.h, enum IFLA_NETKIT_*)."""

    prefix = "IFLA_"
    nla_map = (
        ("IFLA_NETKIT_UNSPEC", "none"),
        ("IFLA_NETKIT_PEER_INFO", "info_peer"),
        ("IFLA_NETKIT_PRIMARY", "uint8"),
        ("IFLA_NETKIT_POLICY", "uint32"),
        ("IFLA_NETKIT_PEER_POLICY", "uint32"),
        ("IFLA_NETKIT_MODE", "uint32"),
        ("IFLA_NETKIT_SCRUB", "uint32"),
        ("IFLA_NETKIT_PEER_SCRUB", "uint32"),
        ("IFLA_NETKIT_HEADROOM", "uint16"),
        ("IFLA_NETKIT_TAILROOM", "uint16"),
    )

    @staticmethod
    def info_peer(self, *argv, **kwarg):
        return ifinfveth  # an ifinfomsg with its own attributes, as veth's peer


ifinfmsg.ifinfo.register_link_kind(module={"netkit": netkit_data})


class NetkitError(RuntimeError):
    """A netkit pair could not be made as asked."""


class NetkitUnsupported(NetkitError):
    """The kernel has no netkit driver (CONFIG_NETKIT unset): RTM_NEWLINK knows no such kind."""


@dataclass(frozen=True)
class NetkitPair:
    primary: str          # host side (BPF_NETKIT_PRIMARY attaches here, by its ifindex)
    primary_ifindex: int
    peer: str             # pod side
    mode: int


def add_netkit_pair(ipr: IPRoute, primary: str, peer: str, *, peer_netns_fd: int | None = None,
                    mtu: int | None = None, mode: int = NETKIT_L3, headroom: int | None = None) -> NetkitPair:
    """Make a netkit pair: `primary` in the namespace of `ipr`, `peer` in the namespace of
    `peer_netns_fd` (the same one when None). Both ends are left down. `headroom` asks the
    kernel to reserve that many bytes in front of every packet the pod sends (kernels older
    than IFLA_NETKIT_HEADROOM ignore the attribute: netlink's lenient parse skips types
    beyond the kind's maximum)."""
    peer_attrs = [("IFLA_IFNAME", peer)]
    if peer_netns_fd is not None:
        peer_attrs.append(("IFLA_NET_NS_FD", peer_netns_fd))
    if mtu is not None:
        peer_attrs.append(("IFLA_MTU", mtu))
    # pyroute2 maps netkit_* keywords to the IFLA_NETKIT_* attributes of the class registered above
    data = {"netkit_mode": mode, "netkit_policy": NETKIT_PASS, "netkit_peer_policy": NETKIT_PASS,
            "netkit_peer_info": {"attrs": peer_attrs}}
    if headroom is not None:
        data["netkit_headroom"] = headroom
    if mtu is not None:
        data["mtu"] = mtu
    try:
        ipr.link("add", ifname=primary, kind="netkit", **data)
    except NetlinkError as e:
        if e.code == errno.EOPNOTSUPP:
            raise NetkitUnsupported(f"cannot add netkit pair {primary}/{peer}: this kernel has no netkit "
                                    "driver (CONFIG_NETKIT)") from e
        raise NetkitError(f"cannot add netkit pair {primary}/{peer}: "
                          f"{e.args[1] if len(e.args) > 1 else os.strerror(e.code)}") from e
    found = ipr.link_lookup(ifname=primary)
    if not found:
        raise NetkitError(f"netkit {primary} vanished right after it was made")
    return NetkitPair(primary, found[0], peer, mode)


def netkit_info(link) -> dict | None:
    """{'primary': bool, 'mode': int, 'peer_ifindex': int} of a link message, None when the
    link is not a netkit device."""
    info = link.get_attr("IFLA_LINKINFO")
    if info is None or info.get_attr("IFLA_INFO_KIND") != "netkit":
        return None
    data = info.get_attr("IFLA_INFO_DATA")
    return {"primary": bool(data.get_attr("IFLA_NETKIT_PRIMARY")) if data is not None else False,
            "mode": data.get_attr("IFLA_NETKIT_MODE") if data is not None else None,
            "peer_ifindex": link.get_attr("IFLA_LINK")}


def is_netkit_primary(ipr: IPRoute, ifindex: int) -> bool:
    try:
        link = ipr.link("get", index=ifindex)[0]
    except NetlinkError:
        return False
    info = netkit_info(link)
    return bool(info and info["primary"])
