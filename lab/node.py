"""One real node of the VM lab (vagrant/): pods on this machine, and the cross-node check.

    python -m flannel_bpf.lab.node pods  [--count 2] [--subnet-file /run/flannel/subnet.env]
    python -m flannel_bpf.lab.node check --iface eth1 [--count 2] [--expect-peers N]
    python -m flannel_bpf.lab.node nic   --iface eth1

`pods` does what the CNI bridge plugin does with flannel's subnet.env, with the netns lab's
helpers: bridge cni0 holding FLANNEL_SUBNET's first address, and pod J as network namespace
fbpf-podJ with eth0 = the subnet's address 1+J, FLANNEL_MTU and a default route via cni0.
Unlike the netns lab, the host is this machine's own network namespace. It is idempotent.

`check` pings every pod of every peer (peers as `flannel-bpf status --json` lists them, each
assumed to run the same number of pods) from every local pod, and reads the status again to show
where decapsulation happened: the uplink's XDP attach mode and the counters' growth. It prints
one JSON document and exits 0 only when every ping got every reply, XDP ran in native mode and
decapsulated the replies.

`nic` says, as the kernel sees it, what XDP runs with: the NIC's driver (ethtool -i), its queue
pairs (ethtool -l) against the vCPUs, the XDP attach mode (ip -d link), the uplink's address
and the virtualization (systemd-detect-virt). virtio_net gives XDP one transmit queue per CPU
beside the queues in use; with fewer, XDP_TX and XDP_REDIRECT share queues under a lock.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
from ipaddress import IPv4Interface, IPv4Network

from pyroute2 import IPRoute

from flannel_bpf.controller.subnet_env import read_subnet_env
from flannel_bpf.lab.netns import netns_exists
from flannel_bpf.lab.run import ping
from flannel_bpf.lab.topology import (POD_IFNAME, add_bridge, configure_interface, new_namespace, plug_veth,
                                      prepare_namespace)
from flannel_bpf.loader.netdefs import DEFAULT_BRIDGE, DEFAULT_SUBNET_FILE

MAX_PODS = 200
WARMUP_PROBES = 2       # the first packets of a flow may wait for ARP on both sides
CHECKED_PROBES = 3      # these must all be answered


class NodeError(RuntimeError):
    """The node cannot do what was asked; the message says why."""


POD_PREFIX = "fbpf-pod"


def pod_netns(index: int, prefix: str = POD_PREFIX) -> str:
    return f"{prefix}{index}"


def pod_addresses(subnet: IPv4Network, count: int) -> list[IPv4Interface]:
    """Addresses of pods 1..count in a node's subnet: .2, .3, ... (.1 is the bridge)."""
    if not 1 <= count <= min(MAX_PODS, subnet.num_addresses - 3):
        raise NodeError(f"pod count must be 1..{min(MAX_PODS, subnet.num_addresses - 3)} for {subnet}, got {count}")
    return [IPv4Interface((subnet.network_address + 1 + j, subnet.prefixlen)) for j in range(1, count + 1)]


def _lease(subnet_file: str) -> tuple[IPv4Interface, int]:
    env = read_subnet_env(subnet_file)
    try:
        return IPv4Interface(env["FLANNEL_SUBNET"]), int(env["FLANNEL_MTU"])
    except KeyError as missing:
        raise NodeError(f"{subnet_file} has no {missing.args[0]} (is flannel-bpf attach running?)") from None
    except ValueError as err:
        raise NodeError(f"{subnet_file}: {err}") from None


def ensure_pods(count: int, subnet_file: str = DEFAULT_SUBNET_FILE, bridge: str = DEFAULT_BRIDGE,
                prefix: str = POD_PREFIX) -> list[dict]:
    """Create whatever of cni0 and pods 1..count is missing; returns [{netns, address}]."""
    gateway, mtu = _lease(subnet_file)
    addresses = pod_addresses(gateway.network, count)
    prepare_namespace(None, forwarding=True)  # as every host of the netns lab
    with IPRoute() as ipr:
        if not ipr.link_lookup(ifname=bridge):
            add_bridge(ipr, bridge, gateway)
    pods = []
    for index, address in enumerate(addresses, start=1):
        netns = pod_netns(index, prefix)
        if not netns_exists(netns):
            new_namespace(netns, forwarding=False)
            plug_veth(None, f"vethp{index}", bridge, netns, POD_IFNAME, mtu)
            configure_interface(netns, POD_IFNAME, address, mtu, [("default", str(gateway.ip))])
        pods.append({"netns": netns, "address": str(address)})
    # The agent learns local pods from the bridge's neighbour table. Only now: a port joining
    # can change the bridge's MAC, which flushes its neighbours.
    for pod in pods:
        ping(pod["netns"], str(gateway.ip), count=1, wait=2.0)
    return pods


def read_status(iface: str) -> dict:
    """`flannel-bpf status --iface IFACE --json`, through the command line users run."""
    proc = subprocess.run([sys.executable, "-m", "flannel_bpf", "status", "--iface", iface, "--json"],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise NodeError(f"flannel-bpf status failed ({proc.returncode}): {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout)


def _packets(status: dict, counter: str) -> int:
    return status["counters"].get(counter, {}).get("packets", 0)


def check(iface: str, count: int, expect_peers: int | None = None,
          subnet_file: str = DEFAULT_SUBNET_FILE, prefix: str = POD_PREFIX) -> dict:
    gateway, _ = _lease(subnet_file)
    local = pod_addresses(gateway.network, count)
    before = read_status(iface)
    peers = sorted(IPv4Network(p["subnet"]) for p in before["peers"])
    pings = []
    for index, source in enumerate(local, start=1):
        for peer in peers:
            for target in pod_addresses(peer, count):
                ping(pod_netns(index, prefix), str(target.ip), count=WARMUP_PROBES, wait=2.0)
                result = ping(pod_netns(index, prefix), str(target.ip), count=CHECKED_PROBES, wait=2.0)
                pings.append({"from": str(source.ip), "to": str(target.ip), "sent": result.sent,
                              "received": result.received, "rtt_avg_ms": result.rtt_avg_ms,
                              "error": result.error})
    after = read_status(iface)
    xdp_modes = [p["hook"].split()[1] for p in after["attach_points"]
                 if p["device"] == iface and p["hook"].startswith("xdp")]
    counters = {name: _packets(after, name) - _packets(before, name)
                for name in ("encap_vxlan", "decap_xdp", "decap_to_pod", "drop_unknown_peer")}
    problems = [f"{p['from']} -> {p['to']}: {p['received']}/{p['sent']} replies" for p in pings
                if p["received"] != p["sent"] or not p["sent"]]
    if expect_peers is not None and len(peers) != expect_peers:
        problems.append(f"{len(peers)} peers programmed, expected {expect_peers}")
    if not pings:
        problems.append("no remote pod to ping")
    if xdp_modes != ["native"]:
        problems.append(f"XDP on {iface} is {xdp_modes or 'not attached'}, expected native")
    if counters["decap_xdp"] <= 0:
        problems.append("the XDP program decapsulated none of the replies")
    return {"node": socket.gethostname(), "iface": iface, "subnet": str(gateway.network),
            "underlay_ip": (after.get("node") or {}).get("underlay_ip"),
            "peers": [str(p) for p in peers], "pings": pings, "xdp_modes": xdp_modes,
            "decap_hook": after["decap"]["hook"], "counters_delta": counters,
            "ok": not problems, "problems": problems}


# `ip link` flags the attach mode of an XDP program with one of these words.
XDP_MODE_WORDS = {"xdp": "native", "xdpgeneric": "generic", "xdpoffload": "offload", "xdpmulti": "multi"}
_XDP_PROG = re.compile(r"prog/xdp\S* id (\d+)(?: name (\S+))?")
_COMBINED = re.compile(r"^Combined:\s+(\d+)", re.MULTILINE)


def parse_xdp(ip_link_details: str) -> tuple[str | None, str | None]:
    """(attach mode, "name id N") of the XDP program in `ip -d link show dev X`'s output."""
    words = ip_link_details.split("\n", 1)[0].split()
    mode = next((XDP_MODE_WORDS[w] for w in words if w in XDP_MODE_WORDS), None)
    prog = _XDP_PROG.search(ip_link_details)
    return mode, (f"{prog.group(2) or 'prog'} id {prog.group(1)}" if prog else None)


def parse_channels(ethtool_l: str) -> tuple[int | None, int | None]:
    """(maximum, in use) combined queue pairs from `ethtool -l`."""
    combined = [int(n) for n in _COMBINED.findall(ethtool_l)]
    return (combined[0], combined[1]) if len(combined) == 2 else (None, None)


def xdp_tx_queues(iface: str, driver: str | None, mode: str | None, queues_max: int | None,
                  queues_in_use: int | None, vcpus: int, kernel_log: str) -> str:
    """Whether virtio_net gives XDP_TX/XDP_REDIRECT transmit queues of their own (one per CPU,
    beside the queues in use) or shares queues under a lock. With XDP attached the queues in
    use include XDP's, so the kernel's own warning decides; without, the arithmetic predicts."""
    if driver != "virtio_net" or queues_max is None or queues_in_use is None:
        return "n/a"
    if mode == "native":
        locked = any(f"{iface}: XDP request" in line and "locked" in line for line in kernel_log.splitlines())
    else:
        locked = queues_in_use + vcpus > queues_max
    return "on shared queues (locked mode)" if locked else "on their own queues"


def _command(argv: list[str]) -> str:
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""


def nic_report(iface: str) -> dict:
    info = dict(line.split(": ", 1) for line in _command(["ethtool", "-i", iface]).splitlines() if ": " in line)
    queues_max, queues_in_use = parse_channels(_command(["ethtool", "-l", iface]))
    mode, prog = parse_xdp(_command(["ip", "-d", "link", "show", "dev", iface]))
    addresses = json.loads(_command(["ip", "-4", "-j", "addr", "show", "dev", iface]) or "[]")
    vcpus = os.cpu_count() or 1
    tx = xdp_tx_queues(iface, info.get("driver"), mode, queues_max, queues_in_use, vcpus,
                       _command(["dmesg"]) if mode == "native" else "")
    return {"iface": iface, "driver": info.get("driver"), "driver_version": info.get("version"),
            "bus_info": info.get("bus-info"), "vcpus": vcpus, "queues_max": queues_max,
            "queues_in_use": queues_in_use, "xdp_tx_queues": tx, "xdp_mode": mode, "xdp_prog": prog,
            "address": next((a["local"] for link in addresses for a in link.get("addr_info", [])), None),
            "virtualization": _command(["systemd-detect-virt"]).strip() or "none"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flannel_bpf.lab.node", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("nic").add_argument("--iface", required=True, help="the uplink")
    for name in ("pods", "check"):
        cmd = sub.add_parser(name)
        cmd.add_argument("--count", type=int, default=2, help="pods per node (default 2)")
        cmd.add_argument("--subnet-file", default=DEFAULT_SUBNET_FILE)
        cmd.add_argument("--prefix", default=POD_PREFIX, help="pod J is network namespace PREFIX<J>")
    sub.choices["check"].add_argument("--iface", required=True, help="the uplink given to attach")
    sub.choices["check"].add_argument("--expect-peers", type=int, help="fail unless this many peers")
    args = parser.parse_args(argv)
    try:
        if args.command == "nic":
            print(json.dumps(nic_report(args.iface)))
            return 0
        if args.command == "pods":
            print(json.dumps(ensure_pods(args.count, args.subnet_file, prefix=args.prefix)))
            return 0
        report = check(args.iface, args.count, args.expect_peers, args.subnet_file, args.prefix)
    except NodeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(report))
    for line in report["problems"]:
        print(f"problem: {line}", file=sys.stderr)
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
