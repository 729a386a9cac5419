"""The real programs, compiled once per session, run in the real kernel
through BPF_PROG_TEST_RUN; maps pinned under /sys/fs/bpf/flannel-bpf-test-<pid>/."""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

import fl_packets as P
from flannel_bpf.loader.bpf.attach import unlink_pins
from flannel_bpf.loader.bpf.layout import Stat
from flannel_bpf.loader.bpf.maps import DataPlaneMaps
from flannel_bpf.loader.bpf.program import LoadedPrograms, load_programs
from flannel_bpf.bench.testrun import SkBuff, TestRunResult, XdpMd, prog_test_run

pytestmark = pytest.mark.usefixtures("require_root")

TEST_PIN_ROOT = f"/sys/fs/bpf/flannel-bpf-test-{os.getpid()}"


@pytest.fixture(scope="session")
def pin_root():
    """Per-run pin root; removed with everything under it, even on failure."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    try:
        yield TEST_PIN_ROOT
    finally:
        unlink_pins(TEST_PIN_ROOT)


@pytest.fixture(scope="session")
def programs(pin_root) -> LoadedPrograms:
    loaded = load_programs(f"{pin_root}/main")
    try:
        yield loaded
    finally:
        loaded.close()


@pytest.fixture(scope="session")
def maps(programs) -> DataPlaneMaps:
    return programs.maps


@dataclass
class Outcome:
    result: TestRunResult
    counted: dict  # {Stat: (packets, bytes)} this run added

    @property
    def stats(self) -> list:
        return sorted(self.counted)


class DataPlane:
    """Runs one program on one packet and reports what it counted."""

    def __init__(self, programs: LoadedPrograms, maps: DataPlaneMaps):
        self.programs, self.maps = programs, maps

    def run(self, prog: str, pkt, **skb_fields) -> Outcome:
        data = bytes(pkt)
        ctx = None
        if prog.startswith(("tc_", "nk_")):
            ctx = SkBuff(ifindex=P.LO_IFINDEX, **skb_fields)
        elif skb_fields:
            ctx = XdpMd(**skb_fields)
        before = self.maps.read_counters()
        result = prog_test_run(self.programs.prog_fds[prog], data, ctx=ctx)
        after = self.maps.read_counters()
        counted = {Stat[name.upper()]: (after[name][0] - before[name][0], after[name][1] - before[name][1])
                   for name in after if after[name] != before[name]}
        return Outcome(result, counted)


@pytest.fixture
def node(programs, maps) -> DataPlane:
    """Node 1 configured with peers 2 (VXLAN) and 3 (DIRECT) and one pod."""
    maps.set_local_config(P.node_config())
    maps.sync_peers([P.PEER2, P.PEER3])
    maps.remove_endpoints([e.ip for e in maps.list_endpoints()])
    maps.set_endpoints([P.LOCAL_POD])
    maps.reset_counters()
    return DataPlane(programs, maps)
