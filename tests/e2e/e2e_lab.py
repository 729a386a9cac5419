"""End-to-end test helpers: whole labs (etcd + agents + pods) and what they must leave behind."""
from __future__ import annotations

import json
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from flannel_bpf.lab import orchestrator as orch
from flannel_bpf.lab.run import PingResult, nsenter_argv, parse_ping, run_in_netns
from flannel_bpf.lab.topology import Host, run_dir, state_path
from flannel_bpf.loader.bpf.attach import PIN_ROOT
from flannel_bpf.loader.bpf.maps import DataPlaneMaps
from flannel_bpf.loader.netns import list_netns

RUN_TAG = secrets.token_hex(2)
OUR_ROUTE_PROTO = "251"   # routes the agents install carry this protocol number


def lab_name(kind: str) -> str:
    """Unique per run, so a crashed earlier run never collides with this one."""
    return f"e2e{kind}{RUN_TAG}"


def cli(*args: str, timeout: float = 180.0, netns: str | None = None) -> subprocess.CompletedProcess:
    """`flannel-bpf ARGS` as a user runs it (optionally inside a namespace), output captured."""
    argv = [sys.executable, "-m", "flannel_bpf", *args]
    if netns:
        argv = ["nsenter", f"--net=/run/netns/{netns}", "--", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def wait_until(predicate, timeout: float, interval: float = 0.01, what: str = "condition") -> float:
    """Poll until predicate() is true; returns the seconds it took. Fails the test on timeout."""
    start = time.monotonic()
    while not predicate():
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what}: not true after {timeout} s")
        time.sleep(interval)
    return time.monotonic() - start


def map_subnets(host: Host) -> set[IPv4Network]:
    """Peer subnets in a bpf host's pinned peer map."""
    with DataPlaneMaps(host.agent.pin_dir) as maps:
        return {p.subnet for p in maps.list_peers()}


def peer_modes(host: Host) -> dict[IPv4Network, str]:
    with DataPlaneMaps(host.agent.pin_dir) as maps:
        return {p.subnet: p.mode.name for p in maps.list_peers()}


def route_subnets(host: Host) -> set[IPv4Network]:
    """Remote subnets the host's kernel routes (the agent's routes, any backend)."""
    out = run_in_netns(host.netns, ["ip", "-4", "-o", "route", "show", "proto", OUR_ROUTE_PROTO]).stdout
    return {IPv4Network(line.split()[0]) for line in out.splitlines() if line.strip()}


def programmed(host: Host, subnet: IPv4Network) -> bool:
    """The host forwards to `subnet`: kernel route, and for bpf hosts also the map entry."""
    if subnet not in route_subnets(host):
        return False
    return host.agent.backend != "bpf" or subnet in map_subnets(host)


def forgotten(host: Host, subnet: IPv4Network) -> bool:
    if subnet in route_subnets(host):
        return False
    return host.agent.backend != "bpf" or subnet not in map_subnets(host)


# bpf hosts write the maps first and the kernel safety net (routes, neighbours, FDB) from a
# background thread right after: the maps are timed strictly by the tests, the safety net
# only has to follow within this bound.
SAFETY_NET_FOLLOWS = 10.0


def wait_programmed(host: Host, subnet: IPv4Network) -> None:
    wait_until(lambda: programmed(host, subnet), SAFETY_NET_FOLLOWS,
               what=f"host {host.index} programs {subnet} (maps and kernel routes)")


def wait_forgotten(host: Host, subnet: IPv4Network) -> None:
    wait_until(lambda: forgotten(host, subnet), SAFETY_NET_FOLLOWS,
               what=f"host {host.index} forgets {subnet} (maps and kernel routes)")


def steady_ping(src_netns: str, dst_ip: str, count: int, interval: float) -> PingResult:
    """`count` probes `interval` s apart, each answered within 1 s or lost. Bounded, but with
    room for the slower pacing ping gets on a busy machine (10 ms probes go out ~17 ms apart here)."""
    argv = ["ping", "-n", "-q", "-c", str(count), "-i", str(interval), "-W", "1", dst_ip]
    proc = run_in_netns(src_netns, argv, timeout=count * interval * 3 + 10, check=False)
    return parse_ping(proc.stdout)


class ContinuousPing:
    """Probes every `interval` s from a namespace until stop() (at most `max_count`), then
    which sequence numbers were answered. Output goes to a file: a pipe would fill and stall
    ping long before it is read."""

    def __init__(self, src_netns: str, dst_ip: str, interval: float = 0.01, max_count: int = 3000):
        self.out = tempfile.TemporaryFile(mode="w+")
        argv = ["ping", "-n", "-i", str(interval), "-c", str(max_count), "-W", "1", dst_ip]
        self.proc = subprocess.Popen(nsenter_argv(src_netns, argv), stdout=self.out,
                                     stderr=subprocess.STDOUT, text=True)

    def stop(self) -> tuple[int, set[int]]:
        """(probes sent, sequence numbers answered). A probe in flight when ping is stopped
        counts as sent and unanswered: callers allow that one."""
        self.proc.send_signal(signal.SIGINT)
        self.proc.wait(10)
        self.out.seek(0)
        text = self.out.read()
        return parse_ping(text).sent, {int(n) for n in re.findall(r"icmp_seq=(\d+)", text)}

    def __enter__(self) -> "ContinuousPing":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.out.close()


def fake_lease(vtep_mac: str = "0a:58:00:00:00:99", public_ip: str = "198.18.0.99") -> str:
    """A lease value as flannel writes it, for a node that never sends anything."""
    return json.dumps({"PublicIP": public_ip, "PublicIPv6": None, "BackendType": "vxlan",
                       "BackendData": {"VNI": 1, "VtepMAC": vtep_mac}}, separators=(",", ":"))


def counters(host: Host) -> dict[str, int]:
    return {name: packets for name, (packets, _) in orch.read_counters(host).items()}


# ---------------------------------------------------------------------------- leftovers


# What a lab could leave in the root namespace by mistake: its underlay subnets (198.18.0.0/24,
# 198.18.1.0/24), pod network and device names. Other work on this machine (the VM lab's
# libvirt bridges on 198.18.2-3.0/24) changes the root namespace too and must not count.
LAB_FOOTPRINT = re.compile(r"198\.18\.[01]\.|198\.18\.0\.0/15|10\.244\.|flannel|FLANNEL|cni0|fbpf-|"
                           r"br-ul|vethp\d|\bh\d+-eth0|rt-eth\d|own9|\b(lxc|veth)[0-9a-f]{11}\b")


def root_snapshot() -> dict[str, set[str]]:
    """The root namespace's links, routes and iptables rules that look like a lab's."""
    def lines(argv):
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10).stdout
        return {line.strip() for line in out.splitlines() if LAB_FOOTPRINT.search(line)}
    return {
        "links": lines(["ip", "-o", "link", "show"]),
        "routes": lines(["ip", "-4", "route", "show", "table", "all"]),
        "iptables": lines(["iptables", "-S"]) | lines(["iptables", "-t", "nat", "-S"]),
    }


def assert_lab_gone(name: str, before: dict[str, set[str]]) -> None:
    """No namespace, pin, process, file, root-namespace link, route or iptables rule of lab
    `name` remains."""
    assert [ns for ns in list_netns() if ns.startswith(f"fbpf-{name}-")] == []
    if PIN_ROOT.is_dir():
        assert [p.name for p in PIN_ROOT.iterdir() if p.name.startswith(f"fbpf-{name}-")] == []
    marker = str(run_dir(name))
    stray = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker in (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                    stray.append(proc.name)
            except OSError:
                pass
    assert stray == [], f"processes of lab {name} still run: {stray}"
    assert not run_dir(name).exists() and not state_path(name).exists()
    after = root_snapshot()
    for kind in ("links", "routes", "iptables"):
        assert after[kind] - before[kind] == set(), f"root namespace gained {kind}: {after[kind] - before[kind]}"

