"""Named network namespaces the lab and the benchmarks make and remove, and the processes in them.

Named namespaces are bind mounts in /run/netns, as `ip netns` makes them."""
from __future__ import annotations

import os

from pyroute2 import netns as _pyroute2_netns

from flannel_bpf.loader.netns import namespace_id, netns_path


def netns_exists(name: str) -> bool:
    return netns_path(name).exists()


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


def pids_by_netns(names: list[str]) -> dict[str, list[int]]:
    """For each named namespace, the PIDs whose (main thread's) network namespace it is:
    one pass over /proc for all of them."""
    by_id = {}
    for name in names:
        try:
            by_id[namespace_id(netns_path(name))] = name
        except FileNotFoundError:
            pass
    result: dict[str, list[int]] = {name: [] for name in names}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            name = by_id.get(namespace_id(f"/proc/{entry.name}/ns/net"))
        except OSError:  # gone, or a zombie that no longer has namespaces
            continue
        if name is not None:
            result[name].append(int(entry.name))
    return result


def pids_in_netns(name: str) -> list[int]:
    return pids_by_netns([name])[name]
