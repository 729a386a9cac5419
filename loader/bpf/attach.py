"""Attach and detach BPF programs (tc clsact filters, XDP) and pin them in bpffs.

Program-agnostic: callers pass a loaded program's fd (e.g. bcc `load_func(...).fd`). Every
function works on the network namespace current for the calling thread, so it can run under
`nsenter --net`, or inside `flannel_bpf.loader.netns.in_netns(...)`.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.rtnl.ifinfmsg import XDP_FLAGS_DRV_MODE, XDP_FLAGS_SKB_MODE

from flannel_bpf.loader.bpf import bpfsys
from flannel_bpf.loader.netns import current_netns_name

log = logging.getLogger(__name__)

BPFFS = Path("/sys/fs/bpf")
PIN_ROOT = BPFFS / "flannel-bpf"

# ---------------------------------------------------------------------------- tc

TC_DIRECTIONS = {"ingress": 0xFFFFFFF2, "egress": 0xFFFFFFF3}   # clsact's two hooks
DEFAULT_TC_PRIORITY = 1
DEFAULT_TC_HANDLE = 1
_TCA_BPF_ID = 11          # pyroute2 0.9.7 does not decode this attribute
_TCA_BPF_FLAG_ACT_DIRECT = 1


class AttachError(RuntimeError):
    """A program could not be attached or detached as asked."""


@dataclass(frozen=True)
class TcFilter:
    ifindex: int
    direction: str          # "ingress" | "egress"
    priority: int
    handle: int
    name: str | None        # the name given at attach time (TCA_BPF_NAME)
    prog_id: int | None
    direct_action: bool


def _resolve(ipr: IPRoute, dev: str | int) -> int:
    if isinstance(dev, int):
        try:
            ipr.link("get", index=dev)
        except NetlinkError:
            raise AttachError(f"no interface with index {dev}") from None
        return dev
    found = ipr.link_lookup(ifname=dev)
    if not found:
        raise AttachError(f"no interface {dev!r} in network namespace "
                          f"{current_netns_name() or '(init)'}")
    return found[0]


def _direction(direction: str) -> int:
    try:
        return TC_DIRECTIONS[direction]
    except KeyError:
        raise ValueError(f"tc direction must be 'ingress' or 'egress', got {direction!r}") from None


def _bpf_prog_id(options) -> int | None:
    for name, value in options.get("attrs", []):
        if name == "UNKNOWN" and struct.unpack_from("HH", value.data, value.offset)[1] == _TCA_BPF_ID:
            return struct.unpack_from("I", value.data, value.offset + 4)[0]
    return None


def _filters(ipr: IPRoute, ifindex: int, direction: str) -> list[TcFilter]:
    try:
        msgs = list(ipr.get_filters(index=ifindex, parent=TC_DIRECTIONS[direction]))
    except NetlinkError as e:
        if e.code == errno.EINVAL:  # no clsact qdisc: no hook, no filters
            return []
        raise
    result = []
    for msg in msgs:
        options = msg.get_attr("TCA_OPTIONS")
        if msg.get_attr("TCA_KIND") != "bpf" or options is None:
            continue  # the per-priority chain header, or a filter of another kind
        flags = options.get_attr("TCA_BPF_FLAGS") or 0
        result.append(TcFilter(ifindex=ifindex, direction=direction, priority=msg["info"] >> 16,
                               handle=msg["handle"], name=options.get_attr("TCA_BPF_NAME"),
                               prog_id=_bpf_prog_id(options),
                               direct_action=bool(flags & _TCA_BPF_FLAG_ACT_DIRECT)))
    return result


def _has_clsact(ipr: IPRoute, ifindex: int) -> bool:
    return any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.tc("dump", index=ifindex)
               if q["index"] == ifindex)


def list_tc(dev: str | int) -> list[TcFilter]:
    """The bpf filters on both clsact hooks of a device (ours and anyone else's)."""
    with IPRoute() as ipr:
        ifindex = _resolve(ipr, dev)
        return [f for d in TC_DIRECTIONS for f in _filters(ipr, ifindex, d)]


def attach_tc(dev: str | int, direction: str, prog_fd: int, name: str,
              priority: int = DEFAULT_TC_PRIORITY, handle: int = DEFAULT_TC_HANDLE) -> TcFilter:
    """Attach a direct-action bpf filter called `name` at (priority, handle) of the clsact
    hook, adding clsact if missing. Idempotent: a filter of ours there is swapped atomically
    for the new program, ours elsewhere on the hook are removed afterwards, filters of others
    are left alone (one sitting at our (priority, handle) is an error)."""
    parent = _direction(direction)
    if not name:
        raise ValueError("a tc filter needs a name: it is how detach finds ours")
    with IPRoute() as ipr:
        ifindex = _resolve(ipr, dev)
        try:
            ipr.tc("add", "clsact", ifindex)
        except NetlinkError as e:
            if e.code != errno.EEXIST:
                raise AttachError(f"cannot add clsact to ifindex {ifindex}: {e}") from e
        existing = _filters(ipr, ifindex, direction)
        in_place = [f for f in existing if (f.priority, f.handle) == (priority, handle)]
        if in_place and in_place[0].name != name:
            raise AttachError(f"{direction} of ifindex {ifindex} already has filter "
                              f"{in_place[0].name!r} at priority {priority} handle {handle}")
        command = "replace-filter" if in_place else "add-filter"
        try:
            ipr.tc(command, "bpf", ifindex, handle, parent=parent, prio=priority, fd=prog_fd,
                   name=name, direct_action=True)
        except NetlinkError as e:
            raise AttachError(f"cannot attach {name!r} to {direction} of ifindex {ifindex}: {e}") from e
        for stale in existing:
            if stale.name == name and (stale.priority, stale.handle) != (priority, handle):
                _delete_filter(ipr, stale)
        for f in _filters(ipr, ifindex, direction):
            if (f.priority, f.handle) == (priority, handle):
                return f
    raise AttachError(f"{name!r} vanished from {direction} of ifindex {ifindex} right after attach")


def _delete_filter(ipr: IPRoute, f: TcFilter) -> None:
    try:
        ipr.tc("del-filter", "bpf", f.ifindex, f.handle, parent=TC_DIRECTIONS[f.direction],
               prio=f.priority)
    except NetlinkError as e:
        if e.code not in (errno.ENOENT, errno.EINVAL):
            raise


def detach_tc(dev: str | int, direction: str | None, name: str) -> int:
    """Remove our filters called `name` from one hook (or both with direction None); then
    drop clsact if no filter at all is left on it. Returns how many filters went. Idempotent."""
    directions = list(TC_DIRECTIONS) if direction is None else [direction]
    for d in directions:
        _direction(d)
    removed = 0
    with IPRoute() as ipr:
        try:
            ifindex = _resolve(ipr, dev)
        except AttachError:
            return 0  # the device is gone and its filters with it
        for d in directions:
            for f in _filters(ipr, ifindex, d):
                if f.name == name:
                    _delete_filter(ipr, f)
                    removed += 1
        # An empty clsact does nothing, so removing it can only undo what we added.
        if _has_clsact(ipr, ifindex) and not any(
                ipr.get_filters(index=ifindex, parent=p) for p in TC_DIRECTIONS.values()):
            try:
                ipr.tc("del", "clsact", ifindex)
            except NetlinkError as e:
                if e.code not in (errno.ENOENT, errno.EINVAL):
                    raise
    return removed


# ---------------------------------------------------------------------------- XDP

XDP_MODES = {"native": XDP_FLAGS_DRV_MODE, "generic": XDP_FLAGS_SKB_MODE}
_ATTACHED_TO_MODES = {"xdp": ["native"], "xdpgeneric": ["generic"],
                      "xdpmulti": ["native", "generic"]}


@dataclass(frozen=True)
class XdpAttachment:
    mode: str               # "native" | "generic"
    prog_id: int


def xdp_attachments(dev: str | int) -> list[XdpAttachment]:
    with IPRoute() as ipr:
        return _xdp_attachments(ipr, _resolve(ipr, dev))


def _xdp_attachments(ipr: IPRoute, ifindex: int) -> list[XdpAttachment]:
    xdp = ipr.link("get", index=ifindex)[0].get_attr("IFLA_XDP")
    if xdp is None:
        return []
    attached = xdp.get_attr("IFLA_XDP_ATTACHED")
    result = []
    for mode in _ATTACHED_TO_MODES.get(attached, []):
        key = "IFLA_XDP_DRV_PROG_ID" if mode == "native" else "IFLA_XDP_SKB_PROG_ID"
        prog_id = xdp.get_attr(key) or xdp.get_attr("IFLA_XDP_PROG_ID")
        result.append(XdpAttachment(mode, prog_id))
    return result


def _set_xdp(ipr: IPRoute, ifindex: int, fd: int, mode: str) -> None:
    ipr.link("set", index=ifindex,
             xdp={"attrs": [("IFLA_XDP_FD", fd), ("IFLA_XDP_FLAGS", XDP_MODES[mode])]})


def _attach_xdp_mode(ipr: IPRoute, ifindex: int, prog_fd: int, mode: str) -> None:
    try:
        _set_xdp(ipr, ifindex, prog_fd, mode)
        return
    except NetlinkError as e:
        if e.code != errno.EEXIST:
            raise
    # The kernel allows one mode at a time: clear the other one, and put it back if the
    # wanted mode then fails, so a failed attach never leaves the device without its program.
    others = [a for a in _xdp_attachments(ipr, ifindex) if a.mode != mode]
    for a in others:
        _set_xdp(ipr, ifindex, -1, a.mode)
    try:
        _set_xdp(ipr, ifindex, prog_fd, mode)
    except NetlinkError:
        for a in others:
            fd = bpfsys.prog_get_fd_by_id(a.prog_id)
            try:
                _set_xdp(ipr, ifindex, fd, a.mode)
            finally:
                os.close(fd)
        raise


def attach_xdp(dev: str | int, prog_fd: int, mode: str = "auto") -> str:
    """Attach an XDP program, replacing the device's XDP program; returns the mode used.
    "auto" tries native (driver) mode and falls back to generic. On failure the device keeps
    the program it had."""
    if mode not in ("auto", *XDP_MODES):
        raise ValueError(f"XDP mode must be auto, native or generic, got {mode!r}")
    with IPRoute() as ipr:
        ifindex = _resolve(ipr, dev)
        errors = []
        for attempt in (["native", "generic"] if mode == "auto" else [mode]):
            try:
                _attach_xdp_mode(ipr, ifindex, prog_fd, attempt)
            except NetlinkError as e:
                errors.append(f"{attempt}: {e.args[1] if len(e.args) > 1 else e}")
                continue
            if errors:
                log.info("XDP on ifindex %d: %s; using %s mode", ifindex, "; ".join(errors), attempt)
            return attempt
        raise AttachError(f"cannot attach XDP to ifindex {ifindex}: {'; '.join(errors)}")


def detach_xdp(dev: str | int) -> bool:
    """Remove the XDP program(s) of a device; False if there was none. Idempotent."""
    with IPRoute() as ipr:
        try:
            ifindex = _resolve(ipr, dev)
        except AttachError:
            return False
        attached = _xdp_attachments(ipr, ifindex)
        for a in attached:
            _set_xdp(ipr, ifindex, -1, a.mode)
        return bool(attached)


# ---------------------------------------------------------------------------- netkit

def attach_netkit_peer(primary_ifindex: int, prog_fd: int, pin: str | Path) -> None:
    """The program of a netkit pod's egress (BPF_NETKIT_PEER, attached by the primary's
    ifindex) through a bpf_link pinned at `pin`, so it outlives the caller. A live link
    already pinned there (an earlier agent's) gets the program swapped in atomically; a
    defunct one (its device gone, ifindex 0) is replaced."""
    p = _under_bpffs(pin)
    if p.exists():
        fd = bpfsys.obj_get(str(p))
        try:
            if bpfsys.link_info(fd).ifindex == primary_ifindex:
                bpfsys.link_update(fd, prog_fd)
                return
        finally:
            os.close(fd)
    fd = bpfsys.link_create(prog_fd, primary_ifindex, bpfsys.BPF_NETKIT_PEER)
    try:
        pin_object(fd, p)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- pins

def program_id(fd: int) -> int:
    """The kernel's id of the BPF program (or map) behind an fd, from /proc/self/fdinfo."""
    for line in Path(f"/proc/self/fdinfo/{fd}").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("prog_id", "map_id"):
            return int(value)
    raise ValueError(f"fd {fd} is not a BPF program or map")


def _under_bpffs(path: str | Path) -> Path:
    p = Path(path).absolute()
    if BPFFS not in p.parents:
        raise ValueError(f"{p} is not under {BPFFS}")
    return p


def default_pin_dir(ifname: str) -> Path:
    """/sys/fs/bpf/flannel-bpf/<ifname>, or .../<netns-name>/<ifname> when the caller runs in
    a named network namespace, so lab hosts that all have an `eth0` never collide."""
    if not ifname or "/" in ifname:
        raise ValueError(f"bad interface name {ifname!r}")
    netns = current_netns_name()
    return PIN_ROOT / netns / ifname if netns else PIN_ROOT / ifname


def pin_object(fd: int, path: str | Path) -> Path:
    """Pin a program or map at `path` (parents made). An older pin there is replaced
    atomically (pinned under a temporary name, renamed over it): a reader never finds the
    path empty."""
    p = _under_bpffs(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    staging = p.with_name(f"{p.name}_pinning_{os.getpid()}")  # bpffs refuses '.' in names
    staging.unlink(missing_ok=True)
    bpfsys.obj_pin(fd, str(staging))
    try:
        os.replace(staging, p)
    except BaseException:
        staging.unlink(missing_ok=True)
        raise
    return p


pin_program = pin_object


def open_pinned(path: str | Path) -> int:
    """A new fd for a pinned program or map; the caller closes it."""
    p = _under_bpffs(path)
    return bpfsys.obj_get(str(p))


def unlink_pins(*paths: str | Path) -> list[Path]:
    """Remove pinned objects, or whole pin directories, under /sys/fs/bpf. Removes empty
    parent directories up to (not including) PIN_ROOT. Missing paths are fine."""
    removed = []
    for path in paths:
        p = _under_bpffs(path)
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()
        else:
            continue
        removed.append(p)
        parent = p.parent
        while parent != PIN_ROOT and PIN_ROOT in parent.parents:
            try:
                parent.rmdir()
            except OSError:
                break
            parent = parent.parent
    return removed
