"""Per-packet cost of each program path via BPF_PROG_TEST_RUN (measured and
reported, never asserted: timing depends on the machine).

Paths that change the packet are timed as the median of single runs; paths
that leave it as it is run with repeat=N in one call. An empty program
measured the same two ways gives the test-run overhead to subtract."""
from __future__ import annotations

import pytest

import fl_packets as P
from flannel_bpf.bench.prog import TIMING_CFLAGS
from flannel_bpf.bench.testrun import SkBuff, XdpMd, per_packet_ns
from flannel_bpf.loader.bpf.layout import Stat
from flannel_bpf.loader.bpf.program import load_programs

pytestmark = pytest.mark.usefixtures("require_root")

SINGLE_RUNS = 2000
REPEAT = 20000

# (path, program, packet, counter it must hit, leaves the packet as it was)
PATHS = [
    ("encap vxlan (UDP 64 B)", "tc_encap_from_pods", P.from_pod(P.udp(payload=b"x" * 36)), Stat.ENCAP_VXLAN, False),
    ("encap vxlan (TCP 1400 B)", "tc_encap_from_pods", P.from_pod(P.tcp(flags="A", payload=b"x" * 1360)),
     Stat.ENCAP_VXLAN, False),
    ("forward direct", "tc_encap_from_pods", P.from_pod(P.udp(), dst="10.244.3.9"), Stat.FWD_DIRECT, False),
    ("encap miss (no route)", "tc_encap_from_pods", P.from_pod(P.udp(), dst="10.244.99.9"), Stat.PASS_NO_ROUTE,
     True),
    ("xdp decap", "xdp_decap", P.vxlan_from_peer(), Stat.DECAP_XDP, False),
    ("xdp pass (not vxlan)", "xdp_decap", P.direct_from_peer3(), Stat.PASS_NOT_VXLAN, True),
    ("tc decap to pod", "tc_decap", P.vxlan_from_peer(), Stat.DECAP_TO_POD, False),
    ("tc direct to pod", "tc_decap", P.direct_from_peer3(), Stat.DIRECT_TO_POD, False),
    ("tc pass (not local)", "tc_decap",
     P.vxlan_from_peer(P.IP(src="10.244.2.7", dst="10.244.1.77") / P.udp()), Stat.PASS_NOT_LOCAL_ENDPOINT, True),
]


@pytest.fixture(scope="module")
def empty_programs():
    from bcc import BPF
    bpf = BPF(text=b"int tc_empty(struct __sk_buff *skb) { return 0; }\n"
                   b"int xdp_empty(struct xdp_md *ctx) { return XDP_PASS; }")
    try:
        yield {"tc": bpf.load_func(b"tc_empty", BPF.SCHED_CLS).fd, "xdp": bpf.load_func(b"xdp_empty", BPF.XDP).fd}
    finally:
        bpf.cleanup()


def ctx_for(prog: str):
    return SkBuff(ifindex=P.LO_IFINDEX) if prog.startswith("tc_") else XdpMd()


def test_per_packet_cost(node, empty_programs, record_property):
    rows = []
    for path, prog, pkt, stat, idempotent in PATHS:
        assert node.run(prog, pkt).stats == [stat], path  # the path measured is the path named
        fd = node.programs.prog_fds[prog]
        runs = REPEAT if idempotent else SINGLE_RUNS
        cost = per_packet_ns(fd, bytes(pkt), ctx=ctx_for(prog), runs=runs, idempotent=idempotent)
        empty = per_packet_ns(empty_programs["tc" if prog.startswith("tc_") else "xdp"], bytes(pkt),
                              ctx=ctx_for(prog), runs=runs, idempotent=idempotent)
        rows.append((path, cost, empty))
        record_property(path, {"ns": cost, "empty_program_ns": empty})
        assert cost > 0
    print("\nper-packet cost, ns (median of single runs, or repeat=%d for unchanged packets)" % REPEAT)
    print(f"{'path':28} {'program':>8} {'empty':>8} {'net':>8}")
    for path, cost, empty in rows:
        print(f"{path:28} {cost:8.0f} {empty:8.0f} {cost - empty:8.0f}")


def test_xdp_decap_cost_with_repeats(pin_root, record_property):
    """The timing build of xdp_decap undoes its decap, so repeat=N times N full decaps."""
    bench = load_programs(f"{pin_root}/bench", extra_cflags=TIMING_CFLAGS)
    with bench:
        maps = bench.maps
        maps.set_local_config(P.node_config())
        maps.upsert_peers([P.PEER2])
        maps.reset_counters()
        pkt = bytes(P.vxlan_from_peer())
        fd = bench.prog_fds["xdp_decap"]
        assert per_packet_ns(fd, pkt, runs=3, idempotent=True) > 0
        assert maps.read_counters()["decap_xdp"][0] == 3  # every repeat was a decap
        cost = per_packet_ns(fd, pkt, runs=REPEAT, idempotent=True)
    record_property("xdp decap (repeat, incl. undo)", cost)
    print(f"\nxdp decap, repeat={REPEAT}: {cost:.0f} ns per packet (including the undo)")
