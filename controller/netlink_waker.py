"""Wakes the agent's reconcile loop on rtnetlink link and neighbour changes, filtered in the
kernel by a classic BPF socket filter so the agent's own permanent neighbours cost nothing."""
from __future__ import annotations

import ctypes
import errno
import logging
import select
import socket
import struct
import threading

log = logging.getLogger(__name__)

# rtnetlink, as <linux/rtnetlink.h> and <linux/neighbour.h> define it.
_RTMGRP_LINK, _RTMGRP_NEIGH = 0x1, 0x4
_RTM_NEWNEIGH, _RTM_DELNEIGH = 28, 29
_NUD_PERMANENT = 0x80
_NLMSG_HEADER = struct.Struct("=IH")  # nlmsg_len, nlmsg_type (flags, seq, pid follow)
_NDM_STATE_OFFSET = 16 + 8            # nlmsghdr, then ndmsg: family, pads, ifindex, state
_SO_ATTACH_FILTER = 26


class NetlinkWaker:
    """Wakes the reconcile loop when links or neighbours change in this namespace (the pod
    bridge appearing, a pod's first ARP), so attach points and local pods follow within
    milliseconds rather than at the next tick."""

    MIN_INTERVAL = 0.1  # neighbour churn must not turn into a reconcile storm

    def __init__(self, wake: threading.Event, stop: threading.Event):
        self.wake, self.stop = wake, stop
        self._subscribed = threading.Event()
        self.thread = threading.Thread(target=self._run, name="flannel-bpf-netlink", daemon=True)

    def start(self) -> None:
        """Returns once subscribed, so no change made after this call goes unnoticed."""
        self.thread.start()
        self._subscribed.wait(5.0)

    def _run(self) -> None:
        sock = None
        try:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
            try:
                attach_permanent_neighbour_filter(sock)
            except OSError as err:  # then each message is looked at here: slower, same outcome
                log.info("netlink events: no socket filter (%s)", err)
            sock.bind((0, _RTMGRP_LINK | _RTMGRP_NEIGH))
            self._subscribed.set()
            while not self.stop.is_set():
                if not select.select([sock], [], [], 0.5)[0]:
                    continue
                try:
                    relevant = _may_concern_reconcile(sock.recv(1 << 16))
                except OSError as err:
                    if err.errno != errno.ENOBUFS:
                        raise
                    relevant = True  # events were lost: any of them may have mattered
                if relevant:
                    self.wake.set()
                    self.stop.wait(self.MIN_INTERVAL)
        except Exception as err:  # the periodic tick still reconciles
            log.warning("netlink events: %s; reconciling on the periodic tick only", err)
        finally:
            self._subscribed.set()
            if sock is not None:
                sock.close()


def attach_permanent_neighbour_filter(sock) -> None:
    """A classic BPF socket filter that drops permanent neighbour messages in the kernel (see
    _may_concern_reconcile), so the waker thread does not even wake for the fallback's own
    writes. Netlink notifications carry one message each; the filter reads its header."""
    def big_endian(value: int) -> int:  # BPF_ABS loads are big-endian, netlink is host-endian
        return int.from_bytes(struct.pack("=H", value), "big")

    ld_half, jeq, jset, ret = 0x28, 0x15, 0x45, 0x06   # BPF_LD|H|ABS, JMP|JEQ|K, JMP|JSET|K, RET|K
    program = [
        (ld_half, 0, 0, 4),                             # nlmsg_type
        (jeq, 2, 0, big_endian(_RTM_NEWNEIGH)),
        (jeq, 1, 0, big_endian(_RTM_DELNEIGH)),
        (ret, 0, 0, 0xFFFFFFFF),                        # not a neighbour: keep it
        (ld_half, 0, 0, _NDM_STATE_OFFSET),             # ndm_state
        (jset, 0, 1, big_endian(_NUD_PERMANENT)),
        (ret, 0, 0, 0),                                 # permanent: drop
        (ret, 0, 0, 0xFFFFFFFF),
    ]
    code = ctypes.create_string_buffer(b"".join(struct.pack("=HBBI", *op) for op in program))
    fprog = struct.pack("HL", len(program), ctypes.addressof(code))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, fprog)


def _may_concern_reconcile(datagram: bytes) -> bool:
    """Whether a netlink datagram holds a link change or a neighbour that is not permanent (a
    pod's ARP entry, a MAC the pod bridge learned). Permanent neighbours are the kernel
    fallback's own VTEP neighbours and FDB entries (tens of thousands at start) and the bridge's
    own addresses, which reconcile never reads. Only headers are read: parsing every message
    (pyroute2, ~0.1 ms each) cost a quarter of the agent's CPU while the fallback ran."""
    offset = 0
    while offset + _NLMSG_HEADER.size <= len(datagram):
        length, kind = _NLMSG_HEADER.unpack_from(datagram, offset)
        if length < _NLMSG_HEADER.size:
            break
        if kind not in (_RTM_NEWNEIGH, _RTM_DELNEIGH):
            return True
        if offset + _NDM_STATE_OFFSET + 2 > len(datagram):
            return True
        (state,) = struct.unpack_from("=H", datagram, offset + _NDM_STATE_OFFSET)
        if not state & _NUD_PERMANENT:
            return True
        offset += (length + 3) & ~3  # NLMSG_ALIGN
    return False
