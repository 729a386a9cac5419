"""Thousands of random and mutated packets through every program: only the
documented return codes, no error from the kernel, a packet passed to the
kernel is untouched (decap excepted), and the counters add up exactly."""
from __future__ import annotations

import random

import pytest
from scapy.layers.inet import IP
from scapy.layers.l2 import Ether

import fl_packets as P
from flannel_bpf.loader.bpf.layout import (TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT, XDP_DROP, XDP_PASS)
from flannel_bpf.bench.testrun import SkBuff, prog_test_run

pytestmark = pytest.mark.usefixtures("require_root")

RUNS_PER_PROGRAM = 2500
SEED = 20240611
MIN_FRAME = 14     # a test-run takes no less
MAX_FRAME = 3000   # nor much more than a page

# Packets each program's interesting paths start from; mutations walk away from them.
SEEDS = [
    P.from_pod(P.udp()), P.from_pod(P.tcp(flags="PA", payload=b"t" * 300)), P.from_pod(P.icmp_echo()),
    P.from_pod(P.udp(), dst="10.244.3.9"), P.from_host(P.udp()), P.with_ip_options(P.from_pod(P.udp())),
    P.vxlan_from_peer(), P.vxlan_from_peer(IP(src="10.244.2.7", dst="10.244.1.77") / P.udp()),
    P.vxlan_from_peer(src=P.STRANGER_IP), P.direct_from_peer3(), P.vlan_tagged(P.vxlan_from_peer()),
]
SEEDS = [bytes(s) for s in SEEDS]
# Offsets of the fields the parsers decide on (outer and inner headers).
HOT_OFFSETS = [12, 13, 14, 16, 17, 20, 21, 22, 23, 24, 25, 26, 30, 36, 37, 38, 39, 40, 41, 42, 43,
               46, 47, 48, 49, 50, 62, 63, 64, 72, 74]


def mutate(rng: random.Random, raw: bytes) -> bytes:
    data = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        if op == 0 and data:  # flip random bytes anywhere
            data[rng.randrange(len(data))] = rng.randrange(256)
        elif op == 1:  # hit a header field the parsers branch on
            off = rng.choice(HOT_OFFSETS)
            if off < len(data):
                data[off] = rng.choice([0, 1, 0x08, 0x45, 0x46, 0x4F, 0x11, 0x21, 0x40, 0xFF, rng.randrange(256)])
        elif op == 2:  # truncate
            del data[rng.randint(MIN_FRAME, max(MIN_FRAME, len(data))):]
        elif op == 3:  # extend with junk
            data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
        elif op == 4:  # replace a 16-bit length-like field with an edge value
            off = rng.choice([16, 38, 56, 58])
            if off + 2 <= len(data):
                data[off:off + 2] = rng.choice([0, 1, 20, 49, 50, 84, 1450, 1500, 0xFFFF]).to_bytes(2, "big")
        else:  # splice two seeds
            other = rng.choice(SEEDS)
            cut = rng.randint(MIN_FRAME, len(other))
            data = data[:cut] + bytearray(other[cut:])
    if len(data) < MIN_FRAME:
        data += bytes(MIN_FRAME - len(data))
    return bytes(data[:MAX_FRAME])


def random_frame(rng: random.Random) -> bytes:
    n = rng.randint(MIN_FRAME, 200)
    frame = bytearray(rng.randbytes(n))
    if rng.random() < 0.7:
        frame[12:14] = b"\x08\x00"  # mostly "IPv4", so the IPv4 parser gets exercised
        if n > 14 and rng.random() < 0.7:
            frame[14] = 0x45
    return bytes(frame)


def packets(seed: int) -> list[bytes]:
    rng = random.Random(seed)
    out = []
    for _ in range(RUNS_PER_PROGRAM):
        out.append(random_frame(rng) if rng.random() < 0.25 else mutate(rng, rng.choice(SEEDS)))
    return out


def refused_by_test_run(prog: str, frame: bytes) -> bool:
    """A tc test-run rejects an IPv4-ethertype frame without room for an IPv4
    header before any program runs (the stack never delivers such a frame)."""
    return prog.startswith(("tc_", "nk_")) and len(frame) < 34 and frame[12:14] == b"\x08\x00"


PROGRAMS = {
    # name: (allowed return codes, return code that means "handed on untouched")
    "tc_encap_from_pods": ({TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT}, TC_ACT_OK),
    "tc_encap_from_host": ({TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT}, TC_ACT_OK),
    "tc_from_routed_pod": ({TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT}, TC_ACT_OK),
    "nk_from_pod": ({TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT}, TC_ACT_OK),
    "tc_decap": ({TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT}, TC_ACT_OK),
    "xdp_decap": ({XDP_PASS, XDP_DROP}, XDP_PASS),
}


@pytest.mark.parametrize("prog", list(PROGRAMS))
def test_fuzzed_packets(node, prog):
    allowed, untouched_rc = PROGRAMS[prog]
    fd = node.programs.prog_fds[prog]
    frames = packets(SEED + list(PROGRAMS).index(prog))
    seen_rc = set()
    for frame in frames:
        ctx = SkBuff(ifindex=P.LO_IFINDEX) if prog.startswith(("tc_", "nk_")) else None
        if refused_by_test_run(prog, frame):
            with pytest.raises(OSError):
                prog_test_run(fd, frame, ctx=ctx)
            continue
        result = prog_test_run(fd, frame, ctx=ctx)
        assert result.retval in allowed, f"{prog} returned {result.retval} for {frame.hex()}"
        seen_rc.add(result.retval)
        if result.retval == untouched_rc and result.data != frame:
            # The only change allowed on a pass: XDP decap (inner frame, dst MAC = uplink).
            assert prog == "xdp_decap", f"{prog} changed a packet it passed: {frame.hex()}"
            assert result.data == P.decapped_xdp(Ether(frame)), frame.hex()
    counters = node.maps.read_counters()
    ran = [f for f in frames if not refused_by_test_run(prog, f)]
    assert sum(p for p, _ in counters.values()) == len(ran)
    assert sum(b for _, b in counters.values()) == sum(len(f) for f in ran)
    assert len(seen_rc) > 1, "the fuzz input should reach more than one outcome"
