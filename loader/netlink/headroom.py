"""Headroom for encapsulation in pods' packets, through the pod bridge.

A pod's socket reserves in each skb the headroom its eth0 asks for (LL_RESERVED_SPACE): 16
bytes on a plain veth, where the encap needs 50 more. Without it bpf_skb_adjust_room()
reallocates the head of every small packet (pskb_expand_head: a quarter of the encap's cost
in the UDP 64 B profile). veth has no netlink knob for this, but the bridge has one built in:
it raises every port's rx headroom to the largest needed_headroom among its ports, and a
veth passes that on to its peer, the pod's eth0 (br_if.c update_headroom(),
veth.c veth_set_rx_headroom()). A vxlan device asks for 64. So a vxlan device kept down
as a port of the pod bridge gives every pod, present and future, room for our headers.

The port stays down: a disabled bridge port forwards nothing, and a down vxlan device opens
no socket. Its MTU is the largest allowed, so the bridge's automatic MTU (the smallest of its
ports') does not change; its MAC is the largest unicast one, so the bridge's automatic MAC
(the smallest of its ports', the pods' gateway MAC) does not change either.
"""
from __future__ import annotations

import errno
import logging

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from flannel_bpf.loader.netlink.routes import link_index

log = logging.getLogger(__name__)

HEADROOM_PORT = "flbpf-headroom"
# A VNI and port pair no real device uses: vxlan refuses two devices with the same pair.
HEADROOM_VNI = 0xFFFFFE
HEADROOM_UDP_PORT = 1
MAX_MTU = 65485  # a vxlan device without a lower device: IP_MAX_MTU - VXLAN_HEADROOM
LARGEST_UNICAST_MAC = "fe:ff:ff:ff:ff:ff"  # locally administered


class HeadroomError(RuntimeError):
    """The headroom port's name is taken by a device that is not ours."""


def _is_ours(link) -> bool:
    info = link.get_attr("IFLA_LINKINFO")
    return (info is not None and info.get_attr("IFLA_INFO_KIND") == "vxlan"
            and info.get_attr("IFLA_INFO_DATA").get_attr("IFLA_VXLAN_ID") == HEADROOM_VNI)


def ensure_headroom_port(ipr: IPRoute, bridge_ifindex: int) -> bool:
    """Make the headroom port exist, down, as a port of `bridge_ifindex`. True if anything
    had to change. A device of that name that is not ours is left alone (HeadroomError)."""
    index = link_index(ipr, HEADROOM_PORT)
    if index is not None and not _is_ours(ipr.link("get", index=index)[0]):
        raise HeadroomError(f"{HEADROOM_PORT} exists and is not our vxlan headroom port")
    if index is None:
        ipr.link("add", ifname=HEADROOM_PORT, kind="vxlan", vxlan_id=HEADROOM_VNI,
                 vxlan_port=HEADROOM_UDP_PORT, vxlan_learning=0, address=LARGEST_UNICAST_MAC)
        index = link_index(ipr, HEADROOM_PORT)
        ipr.link("set", index=index, mtu=MAX_MTU)
    link = ipr.link("get", index=index)[0]
    if link.get_attr("IFLA_MASTER") == bridge_ifindex:
        return False
    ipr.link("set", index=index, master=bridge_ifindex)
    log.info("%s: a down vxlan port on the pod bridge, so pods' packets carry room for the "
             "VXLAN headers", HEADROOM_PORT)
    return True


def remove_headroom_port(ipr: IPRoute) -> bool:
    """Delete the headroom port; the bridge lowers its ports' headroom again. True if it was
    there (a device of that name that is not ours stays)."""
    index = link_index(ipr, HEADROOM_PORT)
    if index is None or not _is_ours(ipr.link("get", index=index)[0]):
        return False
    try:
        ipr.link("del", index=index)
    except NetlinkError as e:
        if e.code != errno.ENODEV:
            raise
        return False
    return True
