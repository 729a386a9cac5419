"""The agent's way of loading the data plane: a child process compiles, loads and pins the
programs, the caller opens the pins and never imports bcc. Real compiles, real kernel."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid

import pytest

from flannel_bpf.loader.bpf import bpfsys
from flannel_bpf.loader.bpf.attach import open_pinned, unlink_pins
from flannel_bpf.loader.bpf.layout import MAPS
from flannel_bpf.loader.bpf.maps import NodeConfig
from flannel_bpf.loader.bpf.program import (KERNEL_PROG_TYPES, PROGRAMS, LoadError, diagnostic_summary,
                                        load_programs_in_child, program_pin)

pytestmark = pytest.mark.usefixtures("require_root")

EXPECTED_PINS = {*MAPS, *(f"prog_{name}" for name in PROGRAMS)}


@pytest.fixture
def pin_dir():
    """A pin directory of this test alone, removed even when the test fails."""
    path = f"/sys/fs/bpf/flannel-bpf-test-child-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        yield path
    finally:
        unlink_pins(path)


def prog_id_at(path) -> int:
    fd = open_pinned(path)
    try:
        return bpfsys.prog_info(fd).id
    finally:
        os.close(fd)


# Runs in a fresh interpreter: pytest itself has bcc loaded by other tests.
CALLER = textwrap.dedent("""
    import json, sys
    from flannel_bpf.loader.bpf import bpfsys
    from flannel_bpf.loader.bpf.program import load_programs_in_child
    from flannel_bpf.bench.testrun import prog_test_run

    with load_programs_in_child(sys.argv[1]) as loaded:
        def packets():
            return sum(packets for packets, _ in loaded.maps.read_counters().values())
        before = packets()
        arp = bytes(12) + b"\\x08\\x06" + bytes(46)
        verdict = prog_test_run(loaded.prog_fds["xdp_decap"], arp).retval
        programs = {name: [bpfsys.prog_info(fd).type, bpfsys.prog_info(fd).name.decode(),
                           bpfsys.prog_info(fd).id] for name, fd in loaded.prog_fds.items()}
        print(json.dumps({
            "programs": programs, "xdp_verdict": verdict,
            "counted": packets() - before,
            "bcc_imported": "bcc" in sys.modules,
            "libbcc_mapped": "libbcc" in open("/proc/self/maps").read()}))
""")


def test_programs_load_in_a_child_and_the_caller_never_imports_bcc(pin_dir):
    done = subprocess.run([sys.executable, "-c", CALLER, pin_dir], capture_output=True, text=True,
                          timeout=180)
    assert done.returncode == 0, done.stderr
    seen = json.loads(done.stdout)
    assert seen["bcc_imported"] is False and seen["libbcc_mapped"] is False
    assert set(seen["programs"]) == set(PROGRAMS)
    for name, (prog_type, kernel_name, prog_id) in seen["programs"].items():
        assert prog_type == KERNEL_PROG_TYPES[PROGRAMS[name].prog_type], name
        assert kernel_name == name[:15]  # the kernel keeps 15 characters of a program's name
        # Pinned: the programs outlive both processes, the ones handed out are the pinned ones.
        assert prog_id_at(program_pin(pin_dir, name)) == prog_id
    # The programs run in the kernel on the maps of pin_dir: an ARP frame passes, counted once.
    assert seen["xdp_verdict"] == 2 and seen["counted"] == 1  # XDP_PASS
    assert set(os.listdir(pin_dir)) == EXPECTED_PINS


def test_loading_again_replaces_the_program_pins_and_keeps_the_maps(pin_dir):
    config = NodeConfig.make(underlay_ip="198.18.0.1", subnet="10.244.1.0/24", vtep_mac="02:00:00:00:00:01",
                             uplink_mac="02:00:00:00:00:02", uplink_ifindex=2, vni=1,
                             vxlan_port=8472, mtu=1500, vxlan_ifindex=3)
    with load_programs_in_child(pin_dir, max_peers=64, max_endpoints=32) as first:
        assert (first.maps.map("fl_peers").max_entries, first.maps.map("fl_endpoints").max_entries) == (64, 32)
        first.maps.set_local_config(config)
        first_ids = {name: bpfsys.prog_info(fd).id for name, fd in first.prog_fds.items()}
    # An agent restart: the old programs stay pinned until the new ones replace them.
    with load_programs_in_child(pin_dir) as second:
        # The same maps, reused with their contents (new ones would have the default sizes).
        assert second.maps.get_local_config() == config
        assert second.maps.map("fl_peers").max_entries == 64
        for name, fd in second.prog_fds.items():
            new_id = bpfsys.prog_info(fd).id
            assert new_id != first_ids[name] and prog_id_at(program_pin(pin_dir, name)) == new_id
    assert set(os.listdir(pin_dir)) == EXPECTED_PINS  # no staging pin left behind


def test_a_compile_error_names_the_file_and_what_the_compiler_said(pin_dir):
    missing = "/nonexistent/flannel-bpf-missing.h"
    with pytest.raises(LoadError) as failure:
        load_programs_in_child(pin_dir, extra_cflags=(f"-include{missing}",))
    message = str(failure.value)
    assert "tc_route.c" in message and f"'{missing}' file not found" in message
    assert "\n" not in message and len(message) < 800
    assert not any(name.startswith("prog_") for name in os.listdir(pin_dir))


def test_a_bad_pin_dir_is_a_load_error_that_says_why(tmp_path):
    with pytest.raises(LoadError, match=f"pin directory {tmp_path}/pins: not on a bpf filesystem"):
        load_programs_in_child(f"{tmp_path}/pins")
    assert not os.path.exists(f"{tmp_path}/pins")
    with pytest.raises(LoadError, match="pin directory '/sys/fs/bpf/has space': must be an absolute path"):
        load_programs_in_child("/sys/fs/bpf/has space")


def test_a_child_over_its_time_is_killed_and_reported(pin_dir):
    with pytest.raises(LoadError, match=r"took over 0\.2 s \(the loader child was killed\)"):
        load_programs_in_child(pin_dir, timeout=0.2)


def test_the_verifier_complaint_is_what_the_summary_keeps():
    # A real verifier log: a packet read without a bounds check.
    script = textwrap.dedent("""
        from bcc import BPF
        bpf = BPF(text=b"int f(struct __sk_buff *skb) { return ((char *)(long)skb->data)[10]; }")
        try:
            bpf.load_func(b"f", BPF.SCHED_CLS)
        except Exception:
            pass
    """)
    log = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60).stderr
    assert "processed" in log, log
    summary = diagnostic_summary(log)
    assert "invalid access to packet" in summary and "processed" not in summary
    assert diagnostic_summary("x.c:1:2: error: one\nx.c:3:4: error: two\nx.c:5:6: error: three\n3 errors generated.") \
        == "x.c:1:2: error: one; x.c:3:4: error: two"
