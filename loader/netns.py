"""Network-namespace primitives shared by the loader and the lab.

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


def netns_exists(name: str) -> bool:
    return netns_path(name).exists()


def list_netns() -> list[str]:
    return sorted(_pyroute2_netns.listnetns(str(NETNS_RUN_DIR)))


def create_netns(name: str) -> None:
    if netns_exists(name):
        raise FileExistsError(f"network namespace {name} already exists")
    _pyroute2_netns.create(name)


def remove_netns(name: str) -> bool:
    """Unmount and unlink a named namespace; False if it was not there."""
    if not netns_exists(name):
        return False
    try:
        _pyroute2_netns.remove(name)
    except FileNotFoundError:  # removed meanwhile by another cleanup (e.g. `ip netns del`)
        return False
    return True


def _ns_id(path: str | Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def current_netns_name() -> str | None:
    """Name of the calling thread's network namespace.

    None in the init namespace; the /run/netns name when one matches;
    `netns-<inode>` for an unnamed, non-init namespace so callers still get a unique key.
    """
    mine = _ns_id("/proc/thread-self/ns/net")
    if mine[1] == PROC_NET_INIT_INO:
        return None
    with contextlib.suppress(OSError):
        if mine == _ns_id("/proc/1/ns/net"):
            return None
    for name in list_netns():
        with contextlib.suppress(OSError):
            if _ns_id(NETNS_RUN_DIR / name) == mine:
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
    path = netns_path(name)
    try:
        target = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise NetnsNotFound(f"network namespace {name} does not exist ({path})") from None
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


def pids_by_netns(names: list[str]) -> dict[str, list[int]]:
    """For each named namespace, the PIDs whose (main thread's) network namespace it is:
    one pass over /proc for all of them."""
    by_id = {}
    for name in names:
        try:
            by_id[_ns_id(netns_path(name))] = name
        except FileNotFoundError:
            pass
    result: dict[str, list[int]] = {name: [] for name in names}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            name = by_id.get(_ns_id(f"/proc/{entry.name}/ns/net"))
        except OSError:  # gone, or a zombie that no longer has namespaces
            continue
        if name is not None:
            result[name].append(int(entry.name))
    return result


def pids_in_netns(name: str) -> list[int]:
    return pids_by_netns([name])[name]
