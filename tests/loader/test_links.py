"""bpf_link attachment (bpf(2) BPF_LINK_CREATE/UPDATE/DETACH) and netkit pairs, on real devices."""
import os
import struct
from types import SimpleNamespace

import pytest
from pyroute2 import IPRoute
from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

from flannel_bpf.lab.netns import create_netns, remove_netns
from flannel_bpf.lab.topology import temporary_lab
from flannel_bpf.loader.bpf import bpfsys
from flannel_bpf.loader.bpf.attach import PIN_ROOT, pin_object, program_id, unlink_pins
from flannel_bpf.loader.netlink.netkit import (NETKIT_L3, NetkitUnsupported, add_netkit_pair,
                                               netkit_info)
from flannel_bpf.loader.netns import in_netns

pytestmark = pytest.mark.usefixtures("require_root")

BPF_LINK_TYPE_TCX = 11
BPF_LINK_TYPE_NETKIT = 13


@pytest.fixture(scope="module")
def progs():
    from bcc import BPF
    bpf = BPF(text=b"int one(struct __sk_buff *skb) { return -1; }\n"
                   b"int two(struct __sk_buff *skb) { return -1; }\n")
    yield SimpleNamespace(one=bpf.load_func(b"one", BPF.SCHED_CLS).fd, two=bpf.load_func(b"two", BPF.SCHED_CLS).fd)
    bpf.cleanup()


@pytest.fixture
def host():
    with temporary_lab(prefix="tl", hosts=1) as lab:
        lab.add_pod(1, 1, "10.244.1.2/24", "10.244.1.1", 1450)
        yield lab.host(1)


def test_a_link_attaches_swaps_and_detaches(host, progs):
    """tcx takes the same BPF_LINK_CREATE as netkit: attach, pin, update, detach."""
    pin = PIN_ROOT / f"test-links-{os.getpid()}" / "link_eth0"
    with in_netns(host.netns):
        with IPRoute() as ipr:
            ifindex = ipr.link_lookup(ifname="eth0")[0]
        link = bpfsys.link_create(progs.one, ifindex, bpfsys.BPF_TCX_INGRESS)
        try:
            info = bpfsys.link_info(link)
            assert (info.type, info.ifindex, info.attach_type) == (BPF_LINK_TYPE_TCX, ifindex, bpfsys.BPF_TCX_INGRESS)
            assert info.prog_id == program_id(progs.one)
            pin_object(link, pin)
            bpfsys.link_update(link, progs.two)
            assert bpfsys.link_info(link).prog_id == program_id(progs.two)
            reopened = bpfsys.obj_get(str(pin))  # the pin is the same link
            assert bpfsys.link_info(reopened).id == info.id
            os.close(reopened)
            bpfsys.link_detach(link)
            assert bpfsys.link_info(link).ifindex == 0
        finally:
            os.close(link)
            unlink_pins(pin.parent)
    assert not pin.parent.exists()


def test_link_create_on_a_missing_device_says_so(progs):
    with pytest.raises(bpfsys.BpfError, match="BPF_LINK_CREATE.*ifindex 999999"):
        bpfsys.link_create(progs.one, 999999, bpfsys.BPF_TCX_INGRESS)


def _nested(data: bytes):
    """(type, payload) of each netlink attribute in `data`."""
    out, offset = [], 0
    while offset + 4 <= len(data):
        length, kind = struct.unpack_from("HH", data, offset)
        out.append((kind & 0x3FFF, data[offset + 4:offset + length]))
        offset += (length + 3) & ~3
    return out


def test_netkit_attributes_are_encoded_as_the_uapi_numbers_them():
    """IFLA_NETKIT_PEER_INFO = 1 (an ifinfomsg, then the peer's attributes), POLICY 3,
    PEER_POLICY 4, MODE 5, HEADROOM 8 (u16): what the kernel parses."""
    msg = ifinfmsg()
    msg["attrs"] = [("IFLA_LINKINFO", {"attrs": [
        ("IFLA_INFO_KIND", "netkit"),
        ("IFLA_INFO_DATA", {"attrs": [("IFLA_NETKIT_MODE", NETKIT_L3), ("IFLA_NETKIT_POLICY", 0),
                                      ("IFLA_NETKIT_PEER_POLICY", 2), ("IFLA_NETKIT_HEADROOM", 64),
                                      ("IFLA_NETKIT_PEER_INFO", {"attrs": [("IFLA_IFNAME", "eth0")]})]})]})]
    msg.encode()
    raw = bytes(msg.data[16 + 16:])  # past nlmsghdr and ifinfomsg
    (linkinfo_type, linkinfo), = _nested(raw)
    assert linkinfo_type == 18  # IFLA_LINKINFO
    info = dict(_nested(linkinfo))
    assert info[1].rstrip(b"\0") == b"netkit"
    data = dict(_nested(info[2]))
    assert struct.unpack("I", data[5]) == (NETKIT_L3,)
    assert struct.unpack("I", data[3]) == (0,) and struct.unpack("I", data[4]) == (2,)
    assert struct.unpack("H", data[8][:2]) == (64,)
    peer = data[1]
    assert len(peer) >= 16 and dict(_nested(peer[16:]))[3].rstrip(b"\0") == b"eth0"  # IFLA_IFNAME


def test_netkit_pair_or_a_clear_refusal(host, progs):
    """Where the kernel has netkit: a pair whose peer sits in the pod namespace, and a program
    on the pod's egress through a link. Where it does not: NetkitUnsupported, nothing made."""
    pod_ns = f"{host.netns}-nk"
    create_netns(pod_ns)
    try:
        fd = os.open(f"/run/netns/{pod_ns}", os.O_RDONLY)
        with in_netns(host.netns), IPRoute() as ipr:
            try:
                pair = add_netkit_pair(ipr, "nktest0", "eth0", peer_netns_fd=fd, mtu=1400)
            except NetkitUnsupported as err:
                assert "CONFIG_NETKIT" in str(err)
                assert not ipr.link_lookup(ifname="nktest0")
                return
            finally:
                os.close(fd)
            link_msg = ipr.link("get", index=pair.primary_ifindex)[0]
            assert netkit_info(link_msg)["primary"] and link_msg.get_attr("IFLA_MTU") == 1400
            link = bpfsys.link_create(progs.one, pair.primary_ifindex, bpfsys.BPF_NETKIT_PEER)
            try:
                info = bpfsys.link_info(link)
                assert (info.type, info.attach_type) == (BPF_LINK_TYPE_NETKIT, bpfsys.BPF_NETKIT_PEER)
            finally:
                os.close(link)
            ipr.link("del", index=pair.primary_ifindex)
    finally:
        remove_netns(pod_ns)
