"""The headroom port: pods' veths get room for the VXLAN headers, and nothing else about the
pod bridge changes (its MTU, its MAC, its forwarding)."""
import socket
import struct

import pytest
from pyroute2 import IPRoute

from flannel_bpf.lab.topology import temporary_lab
from flannel_bpf.loader.netlink.headroom import HEADROOM_PORT, HeadroomError, ensure_headroom_port, remove_headroom_port
from flannel_bpf.loader.netns import in_netns

pytestmark = pytest.mark.usefixtures("require_root")

IFLA_IFNAME, IFLA_HEADROOM = 3, 68  # IFLA_HEADROOM: kernel 6.2+, unknown to pyroute2 0.9
RTM_GETLINK, NLMSG_DONE = 18, 3


def headrooms() -> dict[str, int]:
    """needed_headroom of every link in this namespace, from a raw RTM_GETLINK dump."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0) as sock:
        sock.bind((0, 0))
        sock.send(struct.pack("=LHHLL", 32, RTM_GETLINK, 0x301, 1, 0) + bytes(16))
        found = {}
        while True:
            buf, offset = sock.recv(1 << 16), 0
            while offset < len(buf):
                length, kind = struct.unpack_from("=LH", buf, offset)
                if kind == NLMSG_DONE:
                    return found
                name, room, attr = None, None, offset + 32
                while attr < offset + length:
                    attr_len, attr_type = struct.unpack_from("=HH", buf, attr)
                    if attr_type == IFLA_IFNAME:
                        name = buf[attr + 4:attr + attr_len].rstrip(b"\0").decode()
                    elif attr_type == IFLA_HEADROOM:
                        room = struct.unpack_from("=H", buf, attr + 4)[0]
                    attr += (attr_len + 3) & ~3
                found[name] = room
                offset += (length + 3) & ~3


@pytest.fixture
def host():
    with temporary_lab(prefix="hr", hosts=1) as lab:
        lab.add_pod(1, 1, "10.244.1.2/24", "10.244.1.1", 1450)
        yield lab


def test_pods_get_room_for_vxlan_and_the_bridge_keeps_its_mtu_and_mac(host):
    h = host.host(1)
    with in_netns(h.netns), IPRoute() as ipr:
        bridge = ipr.link("get", ifname="cni0")[0]
        before = (bridge.get_attr("IFLA_MTU"), bridge.get_attr("IFLA_ADDRESS"))
        ports_before = {link.get_attr("IFLA_IFNAME") for link in ipr.link("dump", master=bridge["index"])}
        assert ensure_headroom_port(ipr, bridge["index"]) is True
        assert ensure_headroom_port(ipr, bridge["index"]) is False  # idempotent
        after = ipr.link("get", index=bridge["index"])[0]
        port = ipr.link("get", ifname=HEADROOM_PORT)[0]
        assert (after.get_attr("IFLA_MTU"), after.get_attr("IFLA_ADDRESS")) == before
        assert port.get_attr("IFLA_OPERSTATE") == "DOWN"
        (veth,) = ports_before
        assert headrooms()[veth] >= 50
    with in_netns(host.host(1).pod(1).netns):
        assert headrooms()["eth0"] >= 50  # what the pod's sockets reserve from
    with in_netns(h.netns), IPRoute() as ipr:
        assert remove_headroom_port(ipr) is True
        assert remove_headroom_port(ipr) is False
        assert headrooms()[veth] == 0
    with in_netns(host.host(1).pod(1).netns):
        assert headrooms()["eth0"] == 0


def test_a_device_of_someone_else_under_the_name_is_left_alone(host):
    with in_netns(host.host(1).netns), IPRoute() as ipr:
        ipr.link("add", ifname=HEADROOM_PORT, kind="veth", peer="hr-theirs")
        bridge = ipr.link("get", ifname="cni0")[0]["index"]
        with pytest.raises(HeadroomError, match="not our"):
            ensure_headroom_port(ipr, bridge)
        theirs = ipr.link("get", ifname=HEADROOM_PORT)[0]
        assert theirs.get_attr("IFLA_MASTER") is None
        assert remove_headroom_port(ipr) is False
        assert ipr.link("get", ifname=HEADROOM_PORT)  # still there
