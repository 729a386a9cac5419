"""Pod-to-pod network benchmark: every backend side by side, in one run.

One two-host lab per path is brought up at once (hosts are namespaces, so they coexist):
bpf with tc decap, bpf with XDP decap, bpf with pods on routed veths and on netkit
(flannel-bpf-cni; the netkit path is skipped with a warning on a kernel without netkit), kernel
vxlan as flanneld sets it up, host-gw; the bare underlay is measured host to host in the vxlan
lab. Rounds are interleaved (for each round,
for each measurement, every path in turn), so machine noise hits all paths alike; medians are
reported, with ratios against kernel vxlan and the underlay from the same run.

Measurements (client and server pinned apart with iperf3 -A / taskset, bounded durations):
TCP throughput with 1 and 4 streams, UDP 64-byte packet rate (received), request/response
latency p50/p99 (sockperf ping-pong, full round trip), CPU seconds per GB moved (all CPUs'
busy time during the single-stream TCP run, from /proc/stat).
"""
from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import time
from dataclasses import dataclass
from typing import Protocol

from flannel_bpf.bench.common import median, metric
from flannel_bpf.lab.orchestrator import LabSpec, down, up
from flannel_bpf.lab.run import popen_in_netns, run_in_netns
from flannel_bpf.lab.topology import Lab, LabError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Path:
    name: str
    spec: LabSpec | None        # None: measured host to host in another path's lab
    underlay_of: str = ""       # for the underlay: the path whose lab it uses
    optional: bool = False      # a lab that cannot come up (a kernel without netkit) is skipped


PATHS = (
    Path("bpf-tc", LabSpec(name="bn-bpftc", hosts=2, pods=1, backend="bpf", decap="tc")),
    Path("bpf-xdp", LabSpec(name="bn-bpfxdp", hosts=2, pods=1, backend="bpf", decap="xdp")),
    Path("bpf-routed", LabSpec(name="bn-bpfrt", hosts=2, pods=1, backend="bpf", decap="tc",
                               pod_devices=("routed-veth",))),
    Path("bpf-netkit", LabSpec(name="bn-bpfnk", hosts=2, pods=1, backend="bpf", decap="tc",
                               pod_devices=("netkit",)), optional=True),
    Path("vxlan", LabSpec(name="bn-vxlan", hosts=2, pods=1, backend="vxlan")),
    Path("host-gw", LabSpec(name="bn-hostgw", hosts=2, pods=1, backend="host-gw")),
    Path("underlay", None, underlay_of="vxlan"),
)
MEASUREMENTS = ("tcp1", "tcp4", "udp64", "rr")
IPERF_PORT = 5201
SOCKPERF_PORT = 11111
CLIENT_CPU, SERVER_CPU = 0, 1


class Shell(Protocol):
    """Where a benchmark command runs: this machine's namespaces, or a VM (bench/vms.py).
    `netns` None is the machine's own network namespace."""
    slack: float  # seconds a bounded command may take beyond its traffic (start-up, teardown)

    def run(self, netns: str | None, argv: list[str], timeout: float) -> subprocess.CompletedProcess: ...
    def start(self, netns: str | None, argv: list[str]) -> None: ...
    def busy_cpu_seconds(self) -> float: ...


def busy_seconds(stat_line: str, clock_ticks: int) -> float:
    """All CPUs' non-idle time (user+nice+system+irq+softirq+steal) from /proc/stat's cpu line."""
    fields = [int(v) for v in stat_line.split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / clock_ticks


class LocalShell:
    """The netns lab: commands run in this machine's namespaces; servers die with the lab."""
    slack = 20.0

    def run(self, netns: str | None, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
        return run_in_netns(netns, argv, check=False, timeout=timeout)

    def start(self, netns: str | None, argv: list[str]) -> None:
        popen_in_netns(netns, argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)

    def busy_cpu_seconds(self) -> float:
        with open("/proc/stat") as stat:
            return busy_seconds(stat.readline(), os.sysconf("SC_CLK_TCK"))


LOCAL = LocalShell()


@dataclass
class Endpoints:
    """Where a path's traffic starts and ends: two namespaces (on one or two machines), the
    server's address, and the CPUs client and server are pinned to."""
    client_ns: str | None
    server_ns: str | None
    server_ip: str
    client: Shell = LOCAL
    server: Shell = LOCAL
    client_cpu: int = CLIENT_CPU
    server_cpu: int = SERVER_CPU

    def busy_cpu_seconds(self) -> float:
        """Busy time of every machine the traffic crosses (one kernel in the netns lab)."""
        shells = [self.client] if self.server is self.client else [self.client, self.server]
        return sum(shell.busy_cpu_seconds() for shell in shells)


def endpoints(path: Path, labs: dict[str, Lab]) -> Endpoints:
    if path.spec is None:
        lab = labs[path.underlay_of]
        return Endpoints(lab.host(1).netns, lab.host(2).netns, str(lab.host(2).ip))
    lab = labs[path.name]
    client, server = lab.host(1).pods[0], lab.host(2).pods[0]
    return Endpoints(client.netns, server.netns, server.ip)


def start_servers(ep: Endpoints) -> None:
    """iperf3 and sockperf servers, pinned; bounded by whoever owns the server's namespace."""
    for argv in (["taskset", "-c", str(ep.server_cpu), "iperf3", "-s", "-p", str(IPERF_PORT)],
                 ["taskset", "-c", str(ep.server_cpu), "sockperf", "server", "-i", ep.server_ip,
                  "-p", str(SOCKPERF_PORT)]):
        ep.server.start(ep.server_ns, argv)
    deadline = time.monotonic() + 10 + ep.client.slack
    while time.monotonic() < deadline:  # the servers are up when the port answers
        done = ep.client.run(ep.client_ns, ["iperf3", "-c", ep.server_ip, "-p", str(IPERF_PORT), "-n", "1K"],
                             timeout=5 + ep.client.slack)
        if done.returncode == 0:
            return
        time.sleep(0.3)
    raise RuntimeError(f"iperf3 server in {ep.server_ns or 'the root namespace'} did not answer")


def iperf(ep: Endpoints, seconds: float, *extra: str) -> dict:
    argv = ["iperf3", "-c", ep.server_ip, "-p", str(IPERF_PORT), "-t", str(max(1, round(seconds))), "-J",
            "-A", f"{ep.client_cpu},{ep.server_cpu}", *extra]
    done = ep.client.run(ep.client_ns, argv, timeout=seconds + ep.client.slack)
    try:
        result = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise RuntimeError(f"iperf3 gave no JSON: {done.stderr.strip() or done.stdout[:200]}") from None
    if "error" in result:
        raise RuntimeError(f"iperf3: {result['error']}")
    return result["end"]


_PERCENTILE = re.compile(r"percentile\s+(\d+\.\d+)\s*=\s*([\d.]+)")


def measure(kind: str, ep: Endpoints, seconds: float) -> dict:
    """One measurement; returns {name: value} (several figures for some kinds)."""
    if kind == "tcp1":
        before = ep.busy_cpu_seconds()
        end = iperf(ep, seconds)
        cpu = ep.busy_cpu_seconds() - before
        moved = end["sum_received"]["bytes"]
        return {"tcp1_gbps": end["sum_received"]["bits_per_second"] / 1e9,
                "cpu_s_per_gb": cpu / (moved / 1e9) if moved else None}
    if kind == "tcp4":
        return {"tcp4_gbps": iperf(ep, seconds, "-P", "4")["sum_received"]["bits_per_second"] / 1e9}
    if kind == "udp64":
        total = iperf(ep, seconds, "-u", "-l", "64", "-b", "0")["sum"]
        return {"udp64_kpps": (total["packets"] - total["lost_packets"]) / total["seconds"] / 1e3}
    if kind == "rr":
        argv = ["taskset", "-c", str(ep.client_cpu), "sockperf", "ping-pong", "-i", ep.server_ip,
                "-p", str(SOCKPERF_PORT), "-t", f"{max(1, round(seconds))}", "--full-rtt"]
        done = ep.client.run(ep.client_ns, argv, timeout=seconds + ep.client.slack)
        percentiles = {float(p): float(v) for p, v in _PERCENTILE.findall(done.stdout + done.stderr)}
        if 50.0 not in percentiles:
            raise RuntimeError(f"sockperf gave no percentiles: {done.stderr.strip()[-200:]}")
        return {"rr_p50_us": percentiles[50.0], "rr_p99_us": percentiles.get(99.0)}
    raise ValueError(kind)


def measure_into(samples: dict[str, dict[str, list[float]]], path: str, kind: str, ep: Endpoints,
                 seconds: float) -> None:
    """One measurement of `path`, its figures appended to `samples` (a failure is a warning
    and a missing sample, never the end of the run)."""
    try:
        figures = measure(kind, ep, seconds)
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        log.warning("%s %s: %s", path, kind, err)
        figures = {}
    for name, value in figures.items():
        if value is not None:
            samples.setdefault(path, {}).setdefault(name, []).append(value)


def run(rounds: int = 3, seconds: float = 3.0, paths: tuple[Path, ...] = PATHS,
        progress=None) -> tuple[list[dict], dict]:
    """Bring the labs up, measure, take them down. Returns (results, raw samples)."""
    labs: dict[str, Lab] = {}
    skipped: dict[str, str] = {}
    try:
        for path in paths:
            if path.spec is not None:
                down(path.spec.name)  # a lab left by a killed run
                try:
                    labs[path.name] = up(path.spec)
                except LabError as err:
                    if not path.optional:
                        raise
                    log.warning("%s: skipped, its lab did not come up: %s", path.name, err)
                    skipped[path.name] = str(err)
        measured = tuple(p for p in paths if p.name not in skipped)
        samples: dict[str, dict[str, list[float]]] = {p.name: {} for p in measured}
        eps = {p.name: endpoints(p, labs) for p in measured}
        for ep in eps.values():
            start_servers(ep)
        total = rounds * len(MEASUREMENTS) * len(measured)
        if progress:
            progress.stage("measuring", total)
        for _ in range(rounds):
            for kind in MEASUREMENTS:
                for path in measured:
                    measure_into(samples, path.name, kind, eps[path.name], seconds)
                    if progress:
                        progress.advance("measuring")
    finally:
        for path in paths:
            if path.spec is not None:
                down(path.spec.name)
    results = summarize(samples)
    results += [metric(f"net.{name}.skipped", None, "", note=reason) for name, reason in skipped.items()]
    return results, samples


UNITS = {"tcp1_gbps": "Gb/s", "tcp4_gbps": "Gb/s", "udp64_kpps": "kpps", "rr_p50_us": "us",
         "rr_p99_us": "us", "cpu_s_per_gb": "CPU s/GB"}
# The performance targets (docs/performance.md), as (figure, reference path, comparator, ratio).
TARGETS = (
    ("udp64_kpps", "vxlan", ">=", 2.0), ("udp64_kpps", "host-gw", ">=", 1.0),
    ("tcp1_gbps", "vxlan", ">=", 1.3), ("tcp4_gbps", "vxlan", ">=", 1.3),
    ("tcp1_gbps", "underlay", ">=", 0.9), ("tcp4_gbps", "underlay", ">=", 0.9),
    ("rr_p50_us", "vxlan", "<=", 0.75),
)


def summarize(samples: dict[str, dict[str, list[float]]], targets=TARGETS) -> list[dict]:
    medians = {path: {name: median(values) for name, values in figures.items() if values}
               for path, figures in samples.items()}
    results = []
    for path, figures in medians.items():
        for name, value in sorted(figures.items()):
            ratios = {f"vs_{ref}": round(value / medians[ref][name], 3)
                      for ref in ("vxlan", "underlay") if medians.get(ref, {}).get(name)}
            results.append(metric(f"net.{path}.{name}", round(value, 3), UNITS[name],
                                  samples=len(samples[path][name]),
                                  rounds=[round(v, 3) for v in samples[path][name]], **ratios))
    for bpf in (p for p in medians if p.startswith("bpf")):
        for name, ref, comparator, bound in targets:
            ours, theirs = medians[bpf].get(name), medians.get(ref, {}).get(name)
            ratio = round(ours / theirs, 3) if ours and theirs else None
            results.append(metric(f"net.{bpf}.{name}.vs_{ref}", ratio, "ratio", target=(comparator, bound)))
    return results
