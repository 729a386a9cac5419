"""Per-packet cost of the data-plane programs.

Two measurements:

1. BPF_PROG_TEST_RUN (`measure_testrun`): each program runs in the kernel on a fixed packet,
   `repeat` times per syscall. The kernel does not reset the packet between repeats, so the
   timed programs are *timing variants* built from the unmodified sources:
   - every entry point `int NAME(ctx)` becomes `static __always_inline int NAME__timed(ctx)`,
     called by a new `NAME` that first saves the packet's first bytes (up to 34 for encap,
     64 for XDP decap, 84 for tc decap: every byte the program may rewrite), and after the
     program puts the packet back as it was: the head adjustment undone
     (`bpf_skb_adjust_room` / `bpf_xdp_adjust_head` by the opposite amount) and the saved
     bytes stored back. That restore tail is inside the timed region.
   - encap only: `bpf_skb_adjust_room` is called without the ENCAP_* flags. With them the
     kernel marks the skb as a tunnel packet, once and for good (no helper clears
     skb->encapsulation), so a second run fails with EALREADY. Without them it does the same
     memory work (skb_cow_head, push, memmove); the flags' bookkeeping (inner header offsets,
     gso_type bits: a few field stores) is not timed.
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
from flannel_bpf.loader.bpf.program import (LoadError, PROGRAMS, check_pin_dir, ebpf_dir, expand_source, load_programs,
                                            program_pin)

log = logging.getLogger(__name__)

XDP_DECAP_TARGET_NS = 60     # target: XDP decap (test-run) <= 60 ns
ENCAP_LIVE_TARGET_NS = 200   # target: encap program cost (live) <= 200 ns

# ---------------------------------------------------------------------------- the node

LO_IFINDEX = 1  # test-run skbs live on lo; redirects are never carried out
NODE = dict(underlay_ip="198.18.0.1", subnet="10.244.1.0/28", vtep_mac="02:fb:00:00:01:01",
            uplink_mac="02:aa:00:00:00:01", uplink_ifindex=LO_IFINDEX, vni=1, vxlan_port=8472, mtu=1500,
            bridge_mac="02:bb:00:00:00:01", bridge_ifindex=LO_IFINDEX)
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

def _mac(text: str) -> bytes:
    return bytes.fromhex(text.replace(":", ""))


def _checksum(header: bytes) -> int:
    total = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ether(dst: str, src: str, payload: bytes, ethertype: int = 0x0800) -> bytes:
    return _mac(dst) + _mac(src) + struct.pack("!H", ethertype) + payload


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
# honestly and the difference to the timing variant is the restore tail's cost.
MISS_CASE = {"tc_encap_from_pods": "encap_miss", "xdp_decap": "xdp_miss", "tc_decap": "tc_decap_miss"}


def expected_retval(program: str, stat: Stat) -> int:
    action = STAT_ACTION[stat]
    if program.startswith("xdp"):
        return {Action.PASS: XDP_PASS, Action.DROP: XDP_DROP}[action]
    return {Action.PASS: TC_ACT_OK, Action.DROP: TC_ACT_SHOT, Action.REDIRECT: TC_ACT_REDIRECT}[action]


# ---------------------------------------------------------------------------- timing variants

# Bytes saved before and written back after the program: all it may rewrite in place. A packet
# shorter than that gets the small tier (Ethernet + IPv4 header) saved instead.
RESTORE_BYTES = {"tc_encap_from_pods": 34,  # Ethernet + IPv4 header (MACs, TTL, checksum)
                 "xdp_decap": 64,           # outer 50 + inner Ethernet (its destination MAC)
                 "tc_decap": 84}            # outer 50 + inner Ethernet + inner IPv4 (TTL, checksum)
RESTORE_BYTES_SMALL = 34

# The wrapper copies with direct packet access in 8-byte words (a few loads and stores), not
# with bpf_*_load_bytes/store_bytes (~60 ns a pair here) nor __builtin_memcpy (byte by byte on
# packet pointers of unknown alignment), whose cost would drown the programs'.
_COPY = """
static __always_inline void fl_bench_copy(void *dst, const void *src, const int size)
{
#pragma unroll
	for (int i = 0; i + 8 <= size; i += 8)
		*(__u64 *)(dst + i) = *(const __u64 *)(src + i);
	if (size % 8 >= 4)
		*(__u32 *)(dst + (size & ~7)) = *(const __u32 *)(src + (size & ~7));
	if (size % 4 >= 2)
		*(__u16 *)(dst + (size & ~3)) = *(const __u16 *)(src + (size & ~3));
}
"""
_WRAPPER = """
int {name}({ctx_type} *ctx)
{{
	__u64 saved[({big} + 7) / 8];
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	__u32 len_before = data_end - data;
	__u32 kept = 0;
	__u32 len_after;
	int verdict;

	if (data + {big} <= data_end) {{
		fl_bench_copy(saved, data, {big});
		kept = {big};
	}} else if (data + {small} <= data_end) {{
		fl_bench_copy(saved, data, {small});
		kept = {small};
	}}
	verdict = {name}__timed(ctx);
	len_after = (long)ctx->data_end - (long)ctx->data;
	if (len_after != len_before)
		{adjust};
	data = (void *)(long)ctx->data;
	data_end = (void *)(long)ctx->data_end;
	if (kept == {big} && data + {big} <= data_end)
		fl_bench_copy(data, saved, {big});
	else if (kept == {small} && data + {small} <= data_end)
		fl_bench_copy(data, saved, {small});
	return verdict;
}}
"""
_ADJUST = {
    "sched_cls": "bpf_skb_adjust_room(ctx, (__s32)len_before - (__s32)len_after, BPF_ADJ_ROOM_MAC, 0)",
    "xdp": "bpf_xdp_adjust_head(ctx, (int)len_after - (int)len_before)",
}
_CTX_TYPE = {"sched_cls": "struct __sk_buff", "xdp": "struct xdp_md"}

_EMPTY_PROGRAMS = """
#include <uapi/linux/pkt_cls.h>
int empty_tc(struct __sk_buff *skb) { return TC_ACT_OK; }
int empty_xdp(struct xdp_md *ctx) { return XDP_PASS; }
"""


class VariantError(RuntimeError):
    """The program source no longer has the shape the timing variant is built from."""


def _substitute_once(pattern: str, replacement: str, text: str, what: str) -> str:
    text, count = re.subn(pattern, replacement, text, flags=re.M)
    if count != 1:
        raise VariantError(f"timing variant: expected one {what} in the program source, found {count}")
    return text


def timing_variant_source(source: str, programs: list[str]) -> str:
    """The source file `source` (under ebpf/) with `programs` wrapped as the module note says."""
    text = expand_source(ebpf_dir() / source)
    if source == "tc_route.c":
        text = "#define FL_BENCH_ENCAP_FLAGS BPF_F_ADJ_ROOM_FIXED_GSO\n" + _substitute_once(
            r"BPF_ADJ_ROOM_MAC, ENCAP_FLAGS\)", "BPF_ADJ_ROOM_MAC, FL_BENCH_ENCAP_FLAGS)", text,
            "bpf_skb_adjust_room(..., ENCAP_FLAGS) call")
    text += _COPY
    for name in programs:
        text = _substitute_once(rf"^int {name}\((struct \w+ \*\w+)\)\s*$",
                                rf"static __always_inline int {name}__timed(\1)", text, f"entry point {name}")
        prog_type = PROGRAMS[name].prog_type
        text += _WRAPPER.format(name=name, ctx_type=_CTX_TYPE[prog_type], adjust=_ADJUST[prog_type],
                                big=RESTORE_BYTES[name], small=RESTORE_BYTES_SMALL)
    return text


@dataclass
class BenchPrograms:
    """fds of the timing variants, the unmodified programs and the empty programs."""

    timed: dict[str, int]
    plain: dict[str, int]
    empty: dict[str, int]
    _plain_loaded: object
    _modules: list

    def close(self) -> None:
        self._plain_loaded.close()
        for module in self._modules:
            with contextlib.suppress(Exception):
                module.cleanup()
        self._modules.clear()


def load_bench_programs(pin_dir: str) -> BenchPrograms:
    """Compile and load everything the test-run benchmark times, sharing maps in `pin_dir`."""
    from bcc import BPF


    pin_dir = check_pin_dir(pin_dir)
    types = {"sched_cls": BPF.SCHED_CLS, "xdp": BPF.XDP}
    plain = load_programs(pin_dir)
    loaded = BenchPrograms(timed={}, plain=dict(plain.prog_fds), empty={}, _plain_loaded=plain, _modules=[])
    try:
        wanted = sorted({case.program for case in CASES})
        for source in sorted({PROGRAMS[name].source for name in wanted}):
            names = [name for name in wanted if PROGRAMS[name].source == source]
            try:
                module = BPF(text=timing_variant_source(source, names).encode(),
                             cflags=[f'-DFL_PIN_DIR="{pin_dir}"'])
            except Exception as e:
                raise LoadError(f"compiling the timing variant of {source}: {e}") from e
            loaded._modules.append(module)
            for name in names:
                loaded.timed[name] = module.load_func(name.encode(), types[PROGRAMS[name].prog_type]).fd
        module = BPF(text=_EMPTY_PROGRAMS.encode())
        loaded._modules.append(module)
        loaded.empty = {"tc": module.load_func(b"empty_tc", BPF.SCHED_CLS).fd,
                        "xdp": module.load_func(b"empty_xdp", BPF.XDP).fd}
    except BaseException:
        loaded.close()
        raise
    return loaded


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
                    durations, problem = _steady(programs.timed[case.program], case, maps, repeat, rounds, True)
                    steady[case.name] = median(durations) if not problem else None
                    singles = _single_shots(programs.plain[case.program], case.packet, case.program, single_shots)
                    results.append(metric(
                        f"prog.{case.name}.testrun", steady[case.name], "ns/packet",
                        target=("<=", case.target_ns) if case.target_ns else None,
                        note=problem or f"{case.program}, timing variant (restores the packet), "
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
                                programs.timed[case.program], case, _profile_path(profile_dir, f"testrun-{case.name}"))
        finally:
            programs.close()
    return results


def _profile_path(profile_dir, tag: str) -> Path:
    directory = Path(profile_dir or "bench-results/profiles")
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"perf-{tag}-{os.getpid()}.data"


def _profile_case(fd: int, case: ProgCase, path: Path, seconds: float = 2.0) -> tuple[dict, str]:
    """perf samples of the timing variant running `case` for `seconds`: the share of each
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
    """Timing variant minus unmodified program on the miss case (no head adjustment there):
    what saving and storing back the bytes adds to every timed figure."""
    by_name = {case.name: case for case in CASES}
    out = []
    for program, case_name in MISS_CASE.items():
        case = by_name[case_name]
        durations, problem = _steady(programs.plain[program], case, maps, repeat, rounds, False)
        plain = median(durations) if not problem else None
        wrapped = steady.get(case_name)
        overhead = wrapped - plain if wrapped is not None and plain is not None else None
        out.append(metric(f"prog.{program}.restore_overhead", overhead, "ns/packet",
                          note=problem or f"{case_name}: timing variant {wrapped} ns - unmodified {plain} ns "
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
