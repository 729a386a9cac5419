"""Per-packet cost of the data-plane programs.

Two measurements:

1. BPF_PROG_TEST_RUN (`measure_testrun`): each program runs in the kernel on a fixed packet,
   `repeat` times per syscall. The kernel does not reset the packet between repeats, so the
   timed programs are the *timing build* of the unmodified sources: compiled with -DFL_TIMING,
   the one hook in ebpf/lib/timing.h turns every entry point into a wrapper that saves the
   packet's first bytes (TIMING_SAVE_BYTES: every byte the program may rewrite), runs the
   program and puts the packet back as it was: the head adjustment undone and the saved bytes
   stored back. That restore tail is inside the timed region. For encap the timing build
   passes bpf_skb_adjust_room only FIXED_GSO: the ENCAP_* flags mark the skb as a tunnel
   packet once and for good (a second run fails with EALREADY); without them the helper does
   the same memory work, and the flags' bookkeeping (a few field stores) is not timed.
   Every run is checked: the expected verdict counter must have counted exactly every run,
   and the packet after the last run must equal the input. Also reported: the unmodified
   programs run once per syscall (`single_shot`, median; this includes the kernel's timer
   reads, shown by the empty programs' single-shot figure), the empty programs (the test-run
   harness itself), and what the restore tail costs on a packet the program leaves alone.
2. Live (`measure_live`): the real programs attached in a two-host netns lab, pod-to-pod
   traffic, and the kernel's own run-time statistics (`run_time_ns / run_cnt` from each
   program's info, enabled with BPF_ENABLE_STATS for the window only, which is what
   `kernel.bpf_stats_enabled` toggles; the kernel turns it off again when the fd closes, even
   if this process is killed).
"""
from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import logging
import os
import re
import struct
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from flannel_bpf.bench.common import (bench_pin_dir, median, metric, percentile, perf_available, perf_record,
                                      pid_alive, run_cli, summarize_perf, wait_until)
from flannel_bpf.bench.testrun import SkBuff, prog_test_run
from flannel_bpf.lab.orchestrator import LabSpec, counter_deltas, down, read_counters, up
from flannel_bpf.lab.run import ping, popen_in_netns, run_in_netns
from flannel_bpf.lab.topology import destroy, list_labs
from flannel_bpf.loader.bpf import bpfsys
from flannel_bpf.loader.bpf.attach import open_pinned
from flannel_bpf.loader.bpf.layout import (Action, PeerMode, STAT_ACTION, Stat, TC_ACT_OK, TC_ACT_REDIRECT,
                                           TC_ACT_SHOT, XDP_DROP, XDP_PASS)
from flannel_bpf.loader.bpf.maps import DataPlaneMaps, EndpointEntry, NodeConfig, PeerEntry
from flannel_bpf.loader.bpf.program import LoadedPrograms, check_pin_dir, load_programs, program_pin
from flannel_bpf.loader.netdefs import DEFAULT_VNI, DEFAULT_VXLAN_PORT, mac_bytes

log = logging.getLogger(__name__)

XDP_DECAP_TARGET_NS = 60     # target: XDP decap (test-run) <= 60 ns
ENCAP_LIVE_TARGET_NS = 200   # target: encap program cost (live) <= 200 ns

# ---------------------------------------------------------------------------- the node

LO_IFINDEX = 1  # test-run skbs live on lo; redirects are never carried out
NODE = dict(underlay_ip="198.18.0.1", subnet="10.244.1.0/28", vtep_mac="02:fb:00:00:01:01",
            uplink_mac="02:aa:00:00:00:01", uplink_ifindex=LO_IFINDEX, vni=DEFAULT_VNI,
            vxlan_port=DEFAULT_VXLAN_PORT, mtu=1500, bridge_mac="02:bb:00:00:00:01", bridge_ifindex=LO_IFINDEX)
PEER_VXLAN = PeerEntry.make("10.244.2.0/28", "198.18.0.2", "02:fb:00:00:01:02", PeerMode.VXLAN)
PEER_DIRECT = PeerEntry.make("10.244.3.0/28", "198.18.0.3", "02:fb:00:00:01:03", PeerMode.DIRECT)
PEER_UPLINK_MAC = "02:aa:00:00:00:02"
POD = EndpointEntry.make("10.244.1.5", LO_IFINDEX, "02:cc:00:00:00:05")
# Other peers, so the lookups run against a cluster-sized trie: /28s in 10.244.128.0/17.
FILLER_NETWORK = ipaddress.IPv4Network("10.244.128.0/17")
FILLER_PREFIXLEN = 28
MAX_FILLER_PEERS = 1 << (FILLER_PREFIXLEN - FILLER_NETWORK.prefixlen)
FRAME_LEN = 64  # the classic small-packet size (without FCS)


def filler_peers(count: int) -> list[PeerEntry]:
    if not 0 <= count <= MAX_FILLER_PEERS:
        raise ValueError(f"extra peers {count!r}: must be 0..{MAX_FILLER_PEERS}")
    base = int(FILLER_NETWORK.network_address)
    step = 1 << (32 - FILLER_PREFIXLEN)
    return [PeerEntry.make(ipaddress.IPv4Network((base + i * step, FILLER_PREFIXLEN)),
                           ipaddress.IPv4Address(int(ipaddress.IPv4Address("198.18.1.0")) + i),
                           "02:fb:00:01:%02x:%02x" % divmod(i, 256), PeerMode.VXLAN)
            for i in range(count)]


# ---------------------------------------------------------------------------- packets

def _checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ether(dst: str, src: str, payload: bytes, ethertype: int = 0x0800) -> bytes:
    return mac_bytes(dst) + mac_bytes(src) + struct.pack("!H", ethertype) + payload


def ipv4(src: str, dst: str, payload: bytes, proto: int = 17, ttl: int = 64) -> bytes:
    header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0, ttl, proto, 0,
                         ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed)
    return header[:10] + struct.pack("!H", _checksum(header)) + header[12:] + payload


def udp(sport: int, dport: int, payload: bytes) -> bytes:
    return struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload  # checksum 0: none (IPv4)


def vxlan(vni: int, inner_frame: bytes) -> bytes:
    return struct.pack("!II", 0x08000000, vni << 8) + inner_frame


def udp_frame(eth_dst: str, eth_src: str, src: str, dst: str, *, sport=40000, dport=5201, ttl=64,
              length: int = FRAME_LEN) -> bytes:
    """An Ethernet frame of `length` bytes carrying UDP."""
    payload = b"\x00" * (length - 14 - 20 - 8)
    return ether(eth_dst, eth_src, ipv4(src, dst, udp(sport, dport, payload), ttl=ttl))


def from_pod(dst: str) -> bytes:
    """What a pod sends to a remote pod: to the gateway (cni0) MAC."""
    return udp_frame(NODE["bridge_mac"], POD.mac, str(POD.ip), dst)


def vxlan_to_pod() -> bytes:
    """VXLAN from the VXLAN peer, carrying a 64-byte frame for our pod."""
    inner = udp_frame(NODE["vtep_mac"], PEER_VXLAN.vtep_mac, "10.244.2.7", str(POD.ip), sport=5201,
                      dport=40000, ttl=63)
    return ether(NODE["uplink_mac"], PEER_UPLINK_MAC,
                 ipv4(str(PEER_VXLAN.underlay_ip), NODE["underlay_ip"],
                      udp(41234, NODE["vxlan_port"], vxlan(NODE["vni"], inner))))


def direct_to_pod() -> bytes:
    """Plain IPv4 from a pod of the DIRECT peer to our pod."""
    return udp_frame(NODE["uplink_mac"], PEER_UPLINK_MAC, "10.244.3.9", str(POD.ip), ttl=63)


def udp_to_host() -> bytes:
    """Ordinary traffic on the uplink (not VXLAN): what decap must pass untouched."""
    return udp_frame(NODE["uplink_mac"], PEER_UPLINK_MAC, str(PEER_VXLAN.underlay_ip), NODE["underlay_ip"],
                     sport=41234, dport=5201)


@dataclass(frozen=True)
class ProgCase:
    name: str
    program: str
    packet: bytes
    stat: Stat
    target_ns: float | None = None


CASES = (
    ProgCase("encap_vxlan", "tc_encap_from_pods", from_pod("10.244.2.7"), Stat.ENCAP_VXLAN),
    ProgCase("encap_direct", "tc_encap_from_pods", from_pod("10.244.3.9"), Stat.FWD_DIRECT),
    ProgCase("encap_miss", "tc_encap_from_pods", from_pod("10.244.9.9"), Stat.PASS_NO_ROUTE),
    ProgCase("xdp_decap", "xdp_decap", vxlan_to_pod(), Stat.DECAP_XDP, XDP_DECAP_TARGET_NS),
    ProgCase("xdp_miss", "xdp_decap", udp_to_host(), Stat.PASS_NOT_VXLAN),
    ProgCase("tc_decap", "tc_decap", vxlan_to_pod(), Stat.DECAP_TO_POD),
    ProgCase("tc_direct_to_pod", "tc_decap", direct_to_pod(), Stat.DIRECT_TO_POD),
    ProgCase("tc_decap_miss", "tc_decap", udp_to_host(), Stat.PASS_NOT_VXLAN),
)
# The miss case of each program: it leaves the packet alone, so the unmodified program repeats
# honestly and the difference to the timing build is the restore tail's cost.
MISS_CASE = {"tc_encap_from_pods": "encap_miss", "xdp_decap": "xdp_miss", "tc_decap": "tc_decap_miss"}


def expected_retval(program: str, stat: Stat) -> int:
    action = STAT_ACTION[stat]
    if program.startswith("xdp"):
        return {Action.PASS: XDP_PASS, Action.DROP: XDP_DROP}[action]
    return {Action.PASS: TC_ACT_OK, Action.DROP: TC_ACT_SHOT, Action.REDIRECT: TC_ACT_REDIRECT}[action]


# ---------------------------------------------------------------------------- timing build

# What the timing build (ebpf/lib/timing.h) saves before and stores back after each program:
# every byte it may rewrite in place. Every entry point needs one, timed or not.
TIMING_SAVE_BYTES = {"tc_encap_from_pods": 34,  # Ethernet + IPv4 header (MACs, TTL, checksum)
                     "tc_encap_from_host": 34,
                     "tc_from_routed_pod": 34,
                     "nk_from_pod": 34,
                     "xdp_decap": 64,           # outer 50 + inner Ethernet (its destination MAC)
                     "tc_decap": 84}            # outer 50 + inner Ethernet + inner IPv4 (TTL, checksum)
TIMING_CFLAGS = ("-DFL_TIMING", *(f"-DFL_TIMING_SAVE_{name}={size}" for name, size in TIMING_SAVE_BYTES.items()))

_EMPTY_PROGRAMS = """
#include <uapi/linux/pkt_cls.h>
int empty_tc(struct __sk_buff *skb) { return TC_ACT_OK; }
int empty_xdp(struct xdp_md *ctx) { return XDP_PASS; }
"""


@dataclass
class BenchPrograms:
    """fds of the timing build, the product build and the empty programs."""

    timed: LoadedPrograms
    plain: LoadedPrograms
    empty: dict[str, int]
    _empty_module: object

    def close(self) -> None:
        self.timed.close()
        self.plain.close()
        with contextlib.suppress(Exception):
            self._empty_module.cleanup()


def load_bench_programs(pin_dir: str) -> BenchPrograms:
    """Compile and load everything the test-run benchmark times, sharing maps in `pin_dir`."""
    from bcc import BPF

    pin_dir = check_pin_dir(pin_dir)
    plain = load_programs(pin_dir)
    try:
        timed = load_programs(pin_dir, extra_cflags=TIMING_CFLAGS)
    except BaseException:
        plain.close()
        raise
    try:
        module = BPF(text=_EMPTY_PROGRAMS.encode())
        empty = {"tc": module.load_func(b"empty_tc", BPF.SCHED_CLS).fd,
                 "xdp": module.load_func(b"empty_xdp", BPF.XDP).fd}
    except BaseException:
        timed.close()
        plain.close()
        raise
    return BenchPrograms(timed=timed, plain=plain, empty=empty, _empty_module=module)


# ---------------------------------------------------------------------------- test-run

def _ctx(program: str):
    return None if program.startswith("xdp") else SkBuff(ifindex=LO_IFINDEX)


def _counted(maps: DataPlaneMaps, before: dict) -> dict:
    after = maps.read_counters()
    return {name: (after[name][0] - before[name][0], after[name][1] - before[name][1])
            for name in after if after[name] != before[name]}


def _steady(fd: int, case: ProgCase, maps: DataPlaneMaps, repeat: int, rounds: int,
            restored: bool) -> tuple[list[int], str | None]:
    """Per-round average ns/packet of `rounds` syscalls of `repeat` runs; and a problem, if
    the runs were not all the expected verdict on the expected packet."""
    durations, problem = [], None
    for _ in range(rounds):
        before = maps.read_counters()
        result = prog_test_run(fd, case.packet, ctx=_ctx(case.program), repeat=repeat)
        counted = _counted(maps, before)
        durations.append(result.duration_ns)
        want = {case.stat.counter_name: (repeat, repeat * len(case.packet))}
        if counted != want:
            problem = f"runs not idempotent: counted {counted}, expected {want}"
        elif result.retval != expected_retval(case.program, case.stat):
            problem = f"return code {result.retval:#x}, expected {expected_retval(case.program, case.stat)}"
        elif restored and result.data != case.packet:
            problem = "the packet after the runs differs from the input (restore failed)"
        if problem:
            break
    return durations, problem


def _single_shots(fd: int, packet: bytes, program: str, count: int) -> list[int]:
    return [prog_test_run(fd, packet, ctx=_ctx(program), repeat=1).duration_ns for _ in range(count)]


def measure_testrun(*, repeat: int = 100_000, rounds: int = 5, single_shots: int = 2000,
                    extra_peers: int = 1000, pin_dir: str | None = None, profile: bool = True,
                    profile_dir: str | Path | None = None) -> list[dict]:
    """ns/packet of every case in CASES through BPF_PROG_TEST_RUN (see the module note). With
    `profile` (and perf installed), a case that misses its target is sampled with perf for
    2 s more, and the metric carries where its time goes (`profile`)."""
    for name, value in (("repeat", repeat), ("rounds", rounds), ("single_shots", single_shots)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    peers = [PEER_VXLAN, PEER_DIRECT, *filler_peers(extra_peers)]
    context = contextlib.nullcontext(pin_dir) if pin_dir else bench_pin_dir("prog")
    results = []
    with context as pins:
        programs = load_bench_programs(pins)
        try:
            with DataPlaneMaps(pins) as maps:
                maps.set_local_config(NodeConfig.make(**NODE))
                maps.sync_peers(peers)
                maps.set_endpoints([POD])
                results += _empty_baselines(programs, single_shots, repeat, rounds)
                steady = {}
                for case in CASES:
                    durations, problem = _steady(programs.timed.prog_fds[case.program], case, maps, repeat,
                                                 rounds, True)
                    steady[case.name] = median(durations) if not problem else None
                    singles = _single_shots(programs.plain.prog_fds[case.program], case.packet, case.program,
                                            single_shots)
                    results.append(metric(
                        f"prog.{case.name}.testrun", steady[case.name], "ns/packet",
                        target=("<=", case.target_ns) if case.target_ns else None,
                        note=problem or f"{case.program}, timing build (restores the packet), "
                                        f"{len(case.packet)} B, median of {rounds} x {repeat} runs",
                        group="prog.testrun", program=case.program, verdict=case.stat.counter_name,
                        packet_bytes=len(case.packet), rounds_ns=durations, peers_in_map=len(peers)))
                    results.append(metric(
                        f"prog.{case.name}.single_shot", median(singles), "ns/packet",
                        note=f"unmodified program, one run per syscall, median of {single_shots} "
                             "(includes the timer reads: see prog.empty_*.single_shot)",
                        group="prog.testrun", program=case.program, p10=percentile(singles, 10), p90=percentile(singles, 90)))
                results += _restore_overhead(programs, maps, steady, repeat, rounds)
                if profile and perf_available():
                    for record in results:
                        case = next((c for c in CASES if record["metric"] == f"prog.{c.name}.testrun"), None)
                        if case is not None and record["ok"] is False:
                            record["profile"], record["profile_file"] = _profile_case(
                                programs.timed.prog_fds[case.program], case,
                                _profile_path(profile_dir, f"testrun-{case.name}"))
        finally:
            programs.close()
    return results


def _profile_path(profile_dir, tag: str) -> Path:
    directory = Path(profile_dir or "bench-results/profiles")
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"perf-{tag}-{os.getpid()}.data"


def _profile_case(fd: int, case: ProgCase, path: Path, seconds: float = 2.0) -> tuple[dict, str]:
    """perf samples of the timing build running `case` for `seconds`: the share of each
    leaf function under bpf_test_run (harness, program, helpers)."""
    with perf_record(path, seconds, delay=0.2):
        end = time.monotonic() + seconds + 0.5
        while time.monotonic() < end:
            prog_test_run(fd, case.packet, ctx=_ctx(case.program), repeat=50_000)
    return summarize_perf(path, "bpf_test_run"), str(path)


def _empty_baselines(programs: BenchPrograms, single_shots: int, repeat: int, rounds: int) -> list[dict]:
    out = []
    packets = {"tc": from_pod("10.244.9.9"), "xdp": udp_to_host()}
    for kind, fd in programs.empty.items():
        program = f"{kind}_empty"
        packet = packets[kind]
        durations = [prog_test_run(fd, packet, ctx=_ctx(program), repeat=repeat).duration_ns for _ in range(rounds)]
        out.append(metric(f"prog.empty_{kind}.testrun", median(durations), "ns/packet",
                          note="an empty program: the test-run harness's own cost per run", group="prog.testrun"))
        out.append(metric(f"prog.empty_{kind}.single_shot", median(_single_shots(fd, packet, program, single_shots)),
                          "ns/packet", note="an empty program, one run per syscall: timer reads + harness",
                          group="prog.testrun"))
    return out


def _restore_overhead(programs: BenchPrograms, maps: DataPlaneMaps, steady: dict, repeat: int,
                      rounds: int) -> list[dict]:
    """Timing build minus unmodified program on the miss case (no head adjustment there):
    what saving and storing back the bytes adds to every timed figure."""
    by_name = {case.name: case for case in CASES}
    out = []
    for program, case_name in MISS_CASE.items():
        case = by_name[case_name]
        durations, problem = _steady(programs.plain.prog_fds[program], case, maps, repeat, rounds, False)
        plain = median(durations) if not problem else None
        wrapped = steady.get(case_name)
        overhead = wrapped - plain if wrapped is not None and plain is not None else None
        out.append(metric(f"prog.{program}.restore_overhead", overhead, "ns/packet",
                          note=problem or f"{case_name}: timing build {wrapped} ns - unmodified {plain} ns "
                                          "(save + store back; the head re-adjustment is not in it)",
                          group="prog.testrun", unmodified_ns=plain))
    return out


# ---------------------------------------------------------------------------- live

BPF_ENABLE_STATS = 32  # bpf(2) command
BPF_STATS_RUN_TIME = 0


@contextlib.contextmanager
def bpf_run_time_stats():
    """Program run-time statistics on while the block runs (what kernel.bpf_stats_enabled=1
    does), off again when the fd closes: also if this process dies."""
    libbpf = bpfsys.libbpf()
    libbpf.bpf_enable_stats.argtypes = [ctypes.c_int]
    libbpf.bpf_enable_stats.restype = ctypes.c_int
    fd = bpfsys.check(libbpf.bpf_enable_stats(BPF_STATS_RUN_TIME), "BPF_ENABLE_STATS")
    try:
        yield
    finally:
        os.close(fd)


def prog_run_stats(prog_fd: int) -> tuple[int, int]:
    """(run_time_ns, run_cnt) of a program, from its info (as /proc/self/fdinfo shows it)."""
    fields = {}
    for line in Path(f"/proc/self/fdinfo/{prog_fd}").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key.strip()] = value.strip()
    if "run_time_ns" not in fields:
        raise ValueError(f"fd {prog_fd} is not a BPF program (no run_time_ns in its fdinfo)")
    return int(fields["run_time_ns"]), int(fields["run_cnt"])


LIVE_PROGRAMS = ("tc_encap_from_pods", "tc_encap_from_host", "tc_decap", "xdp_decap")
IPERF_PORT = 5201
UDP_PAYLOAD = FRAME_LEN - 14 - 20 - 8  # 64-byte frames on the pod's veth
# Lab names carry the pid, so a later run can remove the lab of a killed one.
_LIVE_LAB = re.compile(r"^fbb(\d+)(tc|xdp|auto)$")


def live_lab_name(hook: str) -> str:
    return f"fbb{os.getpid()}{hook}"


def remove_stale_labs() -> list[str]:
    """Live-benchmark labs left by runs whose process is gone."""
    removed = []
    for name in list_labs():
        match = _LIVE_LAB.match(name)
        if match and int(match.group(1)) != os.getpid() and not pid_alive(int(match.group(1))):
            destroy(name)
            removed.append(f"lab {name}")
    return removed


def _open_programs(pin_dir: str) -> dict[str, int]:
    fds = {}
    for name in LIVE_PROGRAMS:
        path = program_pin(pin_dir, name)
        if path.exists():
            fds[name] = open_pinned(path)
    return fds


def _iperf(client_ns: str, server_ns: str, server_ip: str, kind: str, duration: float) -> dict:
    """One bounded iperf3 run; its JSON summary."""
    server = popen_in_netns(server_ns, ["iperf3", "-s", "-1", "-p", str(IPERF_PORT)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: run_in_netns(server_ns, ["ss", "-Hltn", f"sport = :{IPERF_PORT}"]).stdout.strip(),
                   5.0, what="iperf3 server")
        argv = ["iperf3", "-c", server_ip, "-p", str(IPERF_PORT), "-t", f"{duration:g}", "-J"]
        if kind == "udp64":
            argv += ["-u", "-b", "0", "-l", str(UDP_PAYLOAD)]
        proc = run_in_netns(client_ns, argv, timeout=duration + 15, check=False)
        try:
            return json.loads(proc.stdout)
        except ValueError:
            return {"error": (proc.stderr or proc.stdout).strip()[:200]}
    finally:
        if server.poll() is None:
            server.terminate()
        with contextlib.suppress(Exception):
            server.wait(5)


def _live_lab(hook: str, duration: float, traffic: tuple[str, ...], profile: bool,
              profile_dir) -> list[dict]:
    name = live_lab_name(hook)
    results = []
    lab = up(LabSpec(name=name, hosts=2, pods=1, backend="bpf", decap=hook))
    fds: dict[str, dict[str, int]] = {}
    try:
        sender, receiver = lab.hosts
        client, server = sender.pods[0], receiver.pods[0]
        # Traffic both ways first: neighbours, so the agents know the pods as endpoints.
        ping(client.netns, server.ip, count=3, wait=1)
        ping(server.netns, client.ip, count=3, wait=1)
        time.sleep(1.5)  # one agent reconcile tick
        roles = {"sender": sender, "receiver": receiver}
        fds = {role: _open_programs(host.agent.pin_dir) for role, host in roles.items()}
        for kind in traffic:
            counters_before = {role: read_counters(host) for role, host in roles.items()}
            stats_before = {role: {n: prog_run_stats(fd) for n, fd in progs.items()} for role, progs in fds.items()}
            sampling = profile and kind == "udp64" and duration >= 2 and perf_available()
            perf_path = _profile_path(profile_dir, f"live-{hook}-{kind}") if sampling else None
            with bpf_run_time_stats(), (perf_record(perf_path, duration - 1.5, delay=1.0) if sampling
                                        else contextlib.nullcontext()):
                summary = _iperf(client.netns, server.netns, server.ip, kind, duration)
            for role, progs in fds.items():
                verdicts = {k: v for k, v in counter_deltas(counters_before[role], read_counters(roles[role])).items() if v}
                for program, fd in progs.items():
                    run_time, runs = (a - b for a, b in zip(prog_run_stats(fd), stats_before[role][program]))
                    if runs <= 0:
                        continue
                    is_target = role == "sender" and program == "tc_encap_from_pods"
                    hot = (role, program) in (("sender", "tc_encap_from_pods"), ("receiver", f"{hook}_decap"),
                                              ("receiver", "tc_decap"))
                    profiled = {"profile": summarize_perf(perf_path, program), "profile_file": str(perf_path)} \
                        if sampling and hot else {}
                    results.append(metric(
                        f"prog.live.{hook}.{kind}.{role}.{program}", run_time / runs, "ns/run",
                        target=("<=", ENCAP_LIVE_TARGET_NS) if is_target else None,
                        note=f"{runs:,} runs in {duration:g} s of {kind} pod->pod, decap at {hook}"
                             + ("; a TCP run is one GSO packet of up to 64 KB" if kind == "tcp" else ""),
                        group="prog.live", runs=runs, run_time_ns=run_time, verdicts=verdicts,
                        iperf_error=summary.get("error"), **profiled))
    finally:
        for progs in fds.values():
            for fd in progs.values():
                os.close(fd)
        down(name)
    return results


def measure_live(*, duration: float = 5.0, decap_hooks: tuple[str, ...] = ("tc", "xdp"),
                 traffic: tuple[str, ...] = ("udp64", "tcp"), profile: bool = True,
                 profile_dir: str | Path | None = None) -> list[dict]:
    """ns per program run of the attached programs in a two-host lab with real agents
    (`lab up`), under iperf3 pod-to-pod traffic, one lab per decap hook. Run-time statistics
    are on only while iperf3 runs; they add two clock reads to every run they measure. With
    `profile` (and perf installed) the udp64 run is also sampled system-wide with perf, and the
    busy programs' metrics carry where their time goes (`profile`: leaf functions under them)."""
    if not 0 < duration <= 120:
        raise ValueError(f"duration {duration!r}: must be within (0, 120] seconds")
    for hook in decap_hooks:
        if hook not in ("tc", "xdp", "auto"):
            raise ValueError(f"decap hook {hook!r}: expected tc, xdp or auto")
    for kind in traffic:
        if kind not in ("udp64", "tcp"):
            raise ValueError(f"traffic {kind!r}: expected udp64 or tcp")
    remove_stale_labs()
    results = []
    for hook in decap_hooks:
        results += _live_lab(hook, duration, tuple(traffic), profile, profile_dir)
    return results


def _bench_cli_args(parser) -> None:
    parser.add_argument("--only", default="testrun,live", help="comma-separated parts: testrun, live")
    parser.add_argument("--repeat", type=int, default=100_000, help="runs per test-run syscall")
    parser.add_argument("--rounds", type=int, default=5, help="test-run syscalls per case (median)")
    parser.add_argument("--single-shots", type=int, default=2000, help="one-run syscalls per case (median)")
    parser.add_argument("--extra-peers", type=int, default=1000, help="peers in the map besides the two used")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds of traffic per live run")
    parser.add_argument("--no-profile", action="store_true", help="no perf profiles")


def _bench_cli_run(args):
    parts = {p.strip() for p in args.only.split(",") if p.strip()}
    unknown = parts - {"testrun", "live"}
    if unknown:
        raise SystemExit(f"--only: unknown part(s) {', '.join(sorted(unknown))} (expected testrun, live)")
    results = []
    if "testrun" in parts:
        results += measure_testrun(repeat=args.repeat, rounds=args.rounds, single_shots=args.single_shots,
                                   extra_peers=args.extra_peers, profile=not args.no_profile,
                                   profile_dir=Path(args.out) / "profiles")
    if "live" in parts:
        results += measure_live(duration=args.duration, profile=not args.no_profile,
                                profile_dir=Path(args.out) / "profiles")
    return results, vars(args)


def main() -> int:
    return run_cli("prog", "Per-packet cost of the flannel-bpf programs (test-run and live).",
                   _bench_cli_args, _bench_cli_run)


if __name__ == "__main__":
    raise SystemExit(main())
