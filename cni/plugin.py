"""flannel-bpf-cni: the CNI entry point (ADD, DEL, CHECK, VERSION, STATUS).

Network configuration (see deploy/cni-conf.json):

    {"cniVersion": "1.0.0", "name": "flannel-bpf", "type": "flannel-bpf-cni",
     "podDevice": "netkit",                      # or "veth"
     "subnetFile": "/run/flannel/subnet.env",    # written by flannel-bpf attach (or flanneld)
     "dataDir": "/var/lib/cni/networks",         # host-local's allocations (its default)
     "rangeStart": "10.244.1.100",               # optional: a part of the subnet (host-local's)
     "bridge": "cni0",                           # bridge pods of the node: proxy ARP for ours there
     "bpfPinDir": "/sys/fs/bpf/flannel-bpf/eth0"} # the agent's maps: pods go into fl_endpoints

Like flannel's plugin it reads the node's subnet and MTU from subnet.env. Without the agent's
maps (no bpfPinDir, or the agent not up yet) a pod still works: decapsulated traffic for it
takes the kernel path until the map knows it.
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
from ipaddress import IPv4Address, IPv4Interface

from flannel_bpf.cni import ipam, pod
from flannel_bpf.cni.spec import (INVALID_CONFIG, IO_FAILURE, PLUGIN_NOT_AVAILABLE, UNSUPPORTED_FIELD,
                                  CniError, Invocation, read_invocation, version_result)
from flannel_bpf.controller.subnet_env import SubnetEnvError, load_complete_subnet_env
from flannel_bpf.loader.bpf.bpfsys import BpfError, LayoutMismatch
from flannel_bpf.loader.bpf.maps import DataPlaneMaps, EndpointEntry
from flannel_bpf.loader.netdefs import DEFAULT_BRIDGE, DEFAULT_SUBNET_FILE

# Ours, and what runtimes add to every configuration they pass.
KNOWN_FIELDS = {"cniVersion", "name", "type", "podDevice", "bridge", "subnetFile", "dataDir", "rangeStart",
                "rangeEnd", "bpfPinDir", "prevResult", "runtimeConfig", "args", "capabilities"}


def node_subnet(inv: Invocation) -> tuple[IPv4Interface, int]:
    """(FLANNEL_SUBNET, FLANNEL_MTU) from subnet.env. A missing or half-written file is
    'plugin not available' (the agent holds no lease yet)."""
    path = inv.config.get("subnetFile", DEFAULT_SUBNET_FILE)
    if not isinstance(path, str) or not path:
        raise CniError(INVALID_CONFIG, "subnetFile must be a path")
    try:
        env = load_complete_subnet_env(path)
    except SubnetEnvError as err:
        raise CniError(PLUGIN_NOT_AVAILABLE, str(err)) from None
    return IPv4Interface(env["FLANNEL_SUBNET"]), int(env["FLANNEL_MTU"])


def pod_device(inv: Invocation) -> str:
    """The configuration's podDevice, once every field of it is one this plugin knows."""
    unknown = sorted(set(inv.config) - KNOWN_FIELDS)
    if unknown:
        raise CniError(UNSUPPORTED_FIELD, f"unknown field {unknown[0]!r} in the network configuration")
    device = inv.config.get("podDevice", "netkit")
    if device not in pod.POD_DEVICES:
        raise CniError(INVALID_CONFIG, f"podDevice {device!r}: expected {' or '.join(pod.POD_DEVICES)}")
    return device


def _maps(inv: Invocation) -> DataPlaneMaps | None:
    pin_dir = inv.config.get("bpfPinDir")
    if not pin_dir:
        return None
    if not isinstance(pin_dir, str):
        raise CniError(INVALID_CONFIG, "bpfPinDir must be a path")
    try:
        return DataPlaneMaps(pin_dir)
    except FileNotFoundError:
        return None  # the agent has not loaded its programs yet: the pod takes the kernel path
    except (BpfError, LayoutMismatch) as err:
        raise CniError(IO_FAILURE, f"opening the maps in {pin_dir}: {err}") from None


def cmd_add(inv: Invocation) -> dict:
    device = pod_device(inv)
    subnet, mtu = node_subnet(inv)
    maps = _maps(inv)
    result = ipam.delegate(inv, "ADD", subnet)
    made = None
    try:
        ip = ipam.allocated_ip(result)
        made = pod.create(device, inv.netns, inv.container_id, inv.ifname, ip, subnet.ip, mtu)
        bridge = inv.config.get("bridge", DEFAULT_BRIDGE)
        try:
            pod.answer_arp_on_bridge(bridge)
            if maps is not None:
                maps.set_endpoints([EndpointEntry.make(ip, made.host_ifindex, made.pod_mac)])
        except OSError as err:
            raise CniError(IO_FAILURE, f"{ip}: proxy ARP on {bridge} or fl_endpoints: {err}") from None
    except BaseException:
        # Nothing half-made: the device (with its routes) and the address go back.
        if made is not None:
            pod.delete(device, inv.container_id, inv.ifname)
        with contextlib.suppress(CniError):
            ipam.delegate(inv, "DEL", subnet)  # the first error is the one to report
        raise
    finally:
        if maps is not None:
            maps.close()
    ip_entry = {"address": f"{ip}/32", "interface": 1}
    if made.gateway is not None:
        ip_entry["gateway"] = str(made.gateway)
    route = {"dst": "0.0.0.0/0"}
    if made.gateway is not None:
        route["gw"] = str(made.gateway)
    return {"cniVersion": inv.version,
            "interfaces": [{"name": made.host_ifname, "mac": made.host_mac},
                           {"name": made.pod_ifname, "mac": made.pod_mac, "sandbox": inv.netns}],
            "ips": [ip_entry], "routes": [route], "dns": {}}


def cmd_del(inv: Invocation) -> None:
    """Everything ADD made goes; what is already gone is fine (DEL may come twice, or after
    the namespace went)."""
    device = pod_device(inv)
    found = pod.find(device, inv.container_id, inv.ifname)
    maps = _maps(inv)
    try:
        if maps is not None:
            # Ours by address or device; and any whose device is gone (a namespace removed before DEL).
            present = pod.ifindexes()
            stale = [e.ip for e in maps.list_endpoints() if e.ifindex not in present or
                     (found is not None and (e.ip in found[1] or e.ifindex == found[0]))]
            maps.remove_endpoints(stale)
    finally:
        if maps is not None:
            maps.close()
    pod.delete(device, inv.container_id, inv.ifname)
    try:
        subnet, _ = node_subnet(inv)
    except CniError:
        subnet = None  # no subnet.env any more: host-local's range cannot be named, nothing to release
    if subnet is not None:
        ipam.delegate(inv, "DEL", subnet)


def cmd_check(inv: Invocation) -> None:
    device = pod_device(inv)
    subnet, mtu = node_subnet(inv)
    prev = inv.config.get("prevResult")
    if not isinstance(prev, dict):
        raise CniError(INVALID_CONFIG, "CHECK needs prevResult")
    try:
        ip = IPv4Interface(prev["ips"][0]["address"]).ip
    except (KeyError, IndexError, TypeError, ValueError):
        raise CniError(INVALID_CONFIG, "prevResult has no IPv4 address") from None
    ipam.delegate(inv, "CHECK", subnet, prev_result=prev)
    ifindex = pod.check(device, inv.netns, inv.container_id, inv.ifname, ip, mtu)
    maps = _maps(inv)
    if maps is not None:
        with maps:
            entry = {e.ip: e for e in maps.list_endpoints()}.get(IPv4Address(ip))
            if entry is None or entry.ifindex != ifindex:
                raise CniError(pod.CHECK_FAILED, f"fl_endpoints has no entry for {ip} via ifindex {ifindex}")


def cmd_status(inv: Invocation) -> None:
    node_subnet(inv)
    ipam.find_plugin(ipam.IPAM_PLUGIN, inv.path)


def run(environ: dict, stdin_text: str) -> tuple[int, dict | None]:
    """(exit status, JSON to print or None)."""
    version = "1.0.0"
    try:
        inv = read_invocation(environ, stdin_text)
        version = inv.version if inv.command != "VERSION" else version
        if inv.command == "VERSION":
            return 0, version_result(inv.config.get("cniVersion", ""))
        handler = {"ADD": cmd_add, "DEL": cmd_del, "CHECK": cmd_check, "STATUS": cmd_status}[inv.command]
        return 0, handler(inv)
    except CniError as err:
        return 1, err.to_json(version)
    except Exception as err:  # a bug or an unexpected kernel answer: still one spec-shaped line
        return 1, CniError(IO_FAILURE, f"{type(err).__name__}: {err}").to_json(version)


def main() -> int:
    status, out = run(dict(os.environ), sys.stdin.read())
    if out is not None:
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
