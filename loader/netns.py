"""Network-namespace primitives of the kernel side: which namespace a thread is in, running a
block in another one, sysctls. Making and removing namespaces is the lab's (lab/netns.py).

Named namespaces live as bind mounts in /run/netns (as `ip netns` makes them). `in_netns`
switches only the calling thread (setns(2) is per thread), so a pyroute2 IPRoute() or a
/proc/sys file opened inside the block belongs to that namespace; sockets keep their
namespace after the block ends.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Iterator

from pyroute2 import netns as _pyroute2_netns

log = logging.getLogger(__name__)

NETNS_RUN_DIR = Path("/run/netns")
# The kernel gives the initial network namespace this fixed inode (PROC_NET_INIT_INO); it
# also works where /proc/1/ns/net is unreadable (as in some sandboxes, even for root).
PROC_NET_INIT_INO = 0xEFFFFFF9


class NetnsNotFound(LookupError):
    """The named network namespace does not exist."""


def netns_path(name: str) -> Path:
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"bad network namespace name {name!r}")
    return NETNS_RUN_DIR / name


def list_netns() -> list[str]:
    return sorted(_pyroute2_netns.listnetns(str(NETNS_RUN_DIR)))


def namespace_id(path: str | Path) -> tuple[int, int]:
    """(device, inode) of a namespace file: equal for two paths of the same namespace."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


def current_netns_name() -> str | None:
    """Name of the calling thread's network namespace.

    None in the init namespace; the /run/netns name when one matches;
    `netns-<inode>` for an unnamed, non-init namespace so callers still get a unique key.
    """
    mine = namespace_id("/proc/thread-self/ns/net")
    if mine[1] == PROC_NET_INIT_INO:
        return None
    with contextlib.suppress(OSError):
        if mine == namespace_id("/proc/1/ns/net"):
            return None
    for name in list_netns():
        with contextlib.suppress(OSError):
            if namespace_id(NETNS_RUN_DIR / name) == mine:
                return name
    return f"netns-{mine[1]}"


def _setns(fd: int) -> None:
    # pyroute2's setns takes an open fd and leaves it open (Python 3.11 has no os.setns).
    _pyroute2_netns.setns(fd)


@contextlib.contextmanager
def in_netns(name: str | None) -> Iterator[None]:
    """Run the block with the calling thread inside namespace `name` (None: stay put)."""
    if name is None:
        yield
        return
    with in_netns_path(netns_path(name)):
        yield


@contextlib.contextmanager
def in_netns_path(path: str | Path) -> Iterator[None]:
    """Run the block inside the namespace behind a file (a /run/netns bind mount, or
    /proc/PID/ns/net as container runtimes pass it)."""
    try:
        target = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise NetnsNotFound(f"network namespace {path} does not exist") from None
    saved = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    try:
        _setns(target)
        try:
            yield
        finally:
            _setns(saved)
    finally:
        os.close(target)
        os.close(saved)


def write_sysctl(key: str, value: str | int, netns: str | None = None) -> None:
    """Set a sysctl in a namespace: `net.ipv4.ip_forward` or a path like
    `net/ipv4/conf/flannel.1/rp_filter` (use the path form when a name has dots)."""
    rel = key if "/" in key else key.replace(".", "/")
    with in_netns(netns):
        with open(Path("/proc/sys") / rel, "w") as f:
            f.write(f"{value}\n")


def read_sysctl(key: str, netns: str | None = None) -> str:
    rel = key if "/" in key else key.replace(".", "/")
    with in_netns(netns):
        return (Path("/proc/sys") / rel).read_text().strip()
