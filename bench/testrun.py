"""BPF_PROG_TEST_RUN through libbpf's bpf_prog_test_run_opts: run a loaded
program on a packet in the kernel without any interface, and get back its
return code, the packet as the program left it, and the time it took.

Note: the kernel does not restore the packet between repeats, so repeat > 1
only measures honestly for programs that leave the packet as they found it.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

from flannel_bpf.loader.bpf import bpfsys

# Room for what a program may add (encap adds 50 bytes) on top of the input.
_GROWTH = 256


class SkBuff(ctypes.Structure):
    """struct __sk_buff (uapi/linux/bpf.h), the tc test-run context. Only
    mark, priority, ingress_ifindex, ifindex, cb, tstamp, wire_len,
    gso_segs and gso_size may be non-zero on input."""

    _fields_ = [
        ("len", ctypes.c_uint32),
        ("pkt_type", ctypes.c_uint32),
        ("mark", ctypes.c_uint32),
        ("queue_mapping", ctypes.c_uint32),
        ("protocol", ctypes.c_uint32),
        ("vlan_present", ctypes.c_uint32),
        ("vlan_tci", ctypes.c_uint32),
        ("vlan_proto", ctypes.c_uint32),
        ("priority", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32),
        ("ifindex", ctypes.c_uint32),
        ("tc_index", ctypes.c_uint32),
        ("cb", ctypes.c_uint32 * 5),
        ("hash", ctypes.c_uint32),
        ("tc_classid", ctypes.c_uint32),
        ("data", ctypes.c_uint32),
        ("data_end", ctypes.c_uint32),
        ("napi_id", ctypes.c_uint32),
        ("family", ctypes.c_uint32),
        ("remote_ip4", ctypes.c_uint32),
        ("local_ip4", ctypes.c_uint32),
        ("remote_ip6", ctypes.c_uint32 * 4),
        ("local_ip6", ctypes.c_uint32 * 4),
        ("remote_port", ctypes.c_uint32),
        ("local_port", ctypes.c_uint32),
        ("data_meta", ctypes.c_uint32),
        ("flow_keys", ctypes.c_uint64),
        ("tstamp", ctypes.c_uint64),
        ("wire_len", ctypes.c_uint32),
        ("gso_segs", ctypes.c_uint32),
        ("sk", ctypes.c_uint64),
        ("gso_size", ctypes.c_uint32),
        ("tstamp_type", ctypes.c_uint8),
        ("_pad", ctypes.c_uint8 * 3),
        ("hwtstamp", ctypes.c_uint64),
    ]


class XdpMd(ctypes.Structure):
    """struct xdp_md (uapi/linux/bpf.h), the XDP test-run context."""

    _fields_ = [
        ("data", ctypes.c_uint32),
        ("data_end", ctypes.c_uint32),
        ("data_meta", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32),
        ("rx_queue_index", ctypes.c_uint32),
        ("egress_ifindex", ctypes.c_uint32),
    ]


@dataclass(frozen=True)
class TestRunResult:
    retval: int        # the program's return code (TC_ACT_*, XDP_*)
    data: bytes        # the packet after the program
    duration_ns: int   # average time per run, as the kernel measured it
    ctx: bytes | None  # the context after the run, if one was given

    __test__ = False   # not a pytest test class


def prog_test_run(prog_fd: int, data: bytes, *, ctx: ctypes.Structure | None = None,
                  repeat: int = 1) -> TestRunResult:
    """Runs the program `repeat` times on `data` (see the module note)."""
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    data_in = ctypes.create_string_buffer(bytes(data), len(data))
    data_out = ctypes.create_string_buffer(len(data) + _GROWTH)
    opts = bpfsys.BpfTestRunOpts(
        data_in=ctypes.cast(data_in, ctypes.c_void_p), data_size_in=len(data),
        data_out=ctypes.cast(data_out, ctypes.c_void_p), data_size_out=len(data_out),
        repeat=repeat,
    )
    ctx_out = None
    if ctx is not None:
        ctx_out = type(ctx)()
        opts.ctx_in = ctypes.cast(ctypes.pointer(ctx), ctypes.c_void_p)
        opts.ctx_size_in = ctypes.sizeof(ctx)
        opts.ctx_out = ctypes.cast(ctypes.pointer(ctx_out), ctypes.c_void_p)
        opts.ctx_size_out = ctypes.sizeof(ctx_out)
    bpfsys.test_run(prog_fd, opts)
    return TestRunResult(
        retval=opts.retval,
        data=data_out.raw[:opts.data_size_out],
        duration_ns=opts.duration,
        ctx=bytes(ctx_out)[:opts.ctx_size_out] if ctx_out is not None else None,
    )


def per_packet_ns(prog_fd: int, data: bytes, *, ctx: ctypes.Structure | None = None, runs: int = 1000,
                  idempotent: bool = False) -> float:
    """Cost of one run in ns. For programs that leave the packet unchanged
    (`idempotent`, e.g. a pass path), one test-run with repeat=runs; otherwise
    the median of `runs` single runs, each on a fresh copy of the packet (each
    then includes the kernel's per-call timer overhead, a few ns)."""
    if idempotent:
        return float(prog_test_run(prog_fd, data, ctx=ctx, repeat=runs).duration_ns)
    samples = sorted(prog_test_run(prog_fd, data, ctx=ctx).duration_ns for _ in range(runs))
    return float(samples[len(samples) // 2])
