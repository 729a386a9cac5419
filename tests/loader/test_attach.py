"""tc/XDP attach and detach, and pins, on real devices in a lab host namespace."""
import errno
import json
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

from flannel_bpf.lab.run import nsenter_argv, run_in_netns
from flannel_bpf.lab.topology import temporary_lab
from flannel_bpf.loader.bpf.attach import (PIN_ROOT, AttachError, XdpAttachment, attach_tc,
                                       attach_xdp, default_pin_dir, detach_tc, detach_xdp,
                                       list_tc, open_pinned, pin_program, program_id,
                                       unlink_pins, xdp_attachments)
from flannel_bpf.loader.netns import in_netns

pytestmark = pytest.mark.usefixtures("require_root")

PROGRAMS = b"""
int tc_pass(struct __sk_buff *skb) { return 0; }
int tc_pass_too(struct __sk_buff *skb) { return 0; }
int xdp_pass(struct xdp_md *ctx) { return XDP_PASS; }
"""


@pytest.fixture(scope="module")
def progs():
    from bcc import BPF
    bpf = BPF(text=PROGRAMS)
    yield SimpleNamespace(bpf=bpf, tc=bpf.load_func(b"tc_pass", BPF.SCHED_CLS).fd,
                          tc2=bpf.load_func(b"tc_pass_too", BPF.SCHED_CLS).fd,
                          xdp=bpf.load_func(b"xdp_pass", BPF.XDP).fd)
    bpf.cleanup()


@pytest.fixture
def host():
    """A lab host: eth0 is a veth (native XDP), cni0 a bridge (no native XDP)."""
    with temporary_lab(prefix="ta", hosts=1) as lab:
        lab.add_pod(1, 1, "10.244.1.2/24", "10.244.1.1", 1450)
        yield lab.host(1)


def tc_show(netns, dev):
    return {d: run_in_netns(netns, ["tc", "filter", "show", "dev", dev, d]).stdout
            for d in ("ingress", "egress")}


def has_clsact(netns, dev):
    return "clsact" in run_in_netns(netns, ["tc", "qdisc", "show", "dev", dev]).stdout


def test_tc_attach_is_idempotent_and_detach_leaves_nothing(host, progs):
    with in_netns(host.netns):
        ours = attach_tc("eth0", "ingress", progs.tc, "fbpf_test")
        assert ours.direct_action and ours.name == "fbpf_test"
        assert ours.prog_id == program_id(progs.tc)
        # Same name again: the program is swapped in place, never duplicated.
        swapped = attach_tc("eth0", "ingress", progs.tc2, "fbpf_test")
        assert swapped.prog_id == program_id(progs.tc2)
        assert list_tc("eth0") == [swapped]
        # A new priority moves our filter; ifindex works as well as a name.
        moved = attach_tc(swapped.ifindex, "ingress", progs.tc2, "fbpf_test", priority=7)
        assert list_tc("eth0") == [moved] and moved.priority == 7
        # Someone else's filter: left alone by ours, and blocks our slot with a clear error.
        foreign = attach_tc("eth0", "egress", progs.tc, "someone_else", priority=3)
        with pytest.raises(AttachError, match="someone_else"):
            attach_tc("eth0", "egress", progs.tc, "fbpf_test", priority=3)
        attach_tc("eth0", "egress", progs.tc, "fbpf_test", priority=1)
    shown = tc_show(host.netns, "eth0")
    assert "fbpf_test direct-action" in shown["ingress"] and "pref 7" in shown["ingress"]
    assert "someone_else" in shown["egress"] and "fbpf_test" in shown["egress"]

    with in_netns(host.netns):
        assert detach_tc("eth0", None, "fbpf_test") == 2
        assert list_tc("eth0") == [foreign]
    assert has_clsact(host.netns, "eth0")  # still used by the other filter
    with in_netns(host.netns):
        assert detach_tc("eth0", "egress", "someone_else") == 1
        assert detach_tc("eth0", None, "fbpf_test") == 0
        assert detach_tc("no-such-dev", None, "fbpf_test") == 0
        with pytest.raises(AttachError, match="no interface 'no-such-dev'"):
            attach_tc("no-such-dev", "ingress", progs.tc, "fbpf_test")
        with pytest.raises(ValueError, match="direction"):
            attach_tc("eth0", "sideways", progs.tc, "fbpf_test")
    assert not has_clsact(host.netns, "eth0")
    assert tc_show(host.netns, "eth0") == {"ingress": "", "egress": ""}


def test_xdp_modes_and_detach(host, progs):
    with in_netns(host.netns):
        assert attach_xdp("eth0", progs.xdp) == "native"          # veth has a driver hook
        assert attach_xdp("eth0", progs.xdp, "auto") == "native"  # again: replaced, not doubled
        assert xdp_attachments("eth0") == [XdpAttachment("native", program_id(progs.xdp))]
        assert attach_xdp("eth0", progs.xdp, "generic") == "generic"  # switches modes cleanly
        assert xdp_attachments("eth0") == [XdpAttachment("generic", program_id(progs.xdp))]
        assert attach_xdp("cni0", progs.xdp, "auto") == "generic"    # bridges have no driver hook
        with pytest.raises(AttachError, match="native"):
            attach_xdp("cni0", progs.xdp, "native")
        # A failed attach leaves the program that was there.
        assert xdp_attachments("cni0") == [XdpAttachment("generic", program_id(progs.xdp))]
        with pytest.raises(ValueError, match="XDP mode"):
            attach_xdp("eth0", progs.xdp, "offload")
    links = run_in_netns(host.netns, ["ip", "-d", "link", "show"]).stdout
    assert "xdpgeneric" in links
    with in_netns(host.netns):
        assert detach_xdp("eth0") is True
        assert detach_xdp("cni0") is True
        assert detach_xdp("eth0") is False
        assert xdp_attachments("eth0") == [] and xdp_attachments("cni0") == []
    assert "prog/xdp" not in run_in_netns(host.netns, ["ip", "-d", "link", "show"]).stdout


def test_pins_live_per_namespace(host, progs):
    assert default_pin_dir("eth0") == PIN_ROOT / "eth0"
    with in_netns(host.netns):
        pin_dir = default_pin_dir("eth0")
    assert pin_dir == PIN_ROOT / host.netns / "eth0"
    try:
        pinned = pin_program(progs.tc, pin_dir / "tc_pass")
        pin_program(progs.tc2, pinned)  # an existing pin is replaced
        fd = open_pinned(pinned)
        try:
            assert program_id(fd) == program_id(progs.tc2)
        finally:
            os.close(fd)
        assert unlink_pins(pin_dir) == [pin_dir]
        assert not (PIN_ROOT / host.netns).exists()  # the emptied parent goes too
        assert PIN_ROOT.is_dir()
        assert unlink_pins(pin_dir) == []
        with pytest.raises(OSError) as missing:
            open_pinned(pinned)
        assert missing.value.errno == errno.ENOENT
        with pytest.raises(ValueError, match="not under /sys/fs/bpf"):
            pin_program(progs.tc, "/tmp/fbpf-not-bpffs")
    finally:
        unlink_pins(PIN_ROOT / host.netns)


CHILD = textwrap.dedent("""
    import json
    from bcc import BPF
    from flannel_bpf.loader.bpf.attach import attach_tc, default_pin_dir, list_tc, pin_program
    fd = BPF(text=b"int p(struct __sk_buff *s) { return 0; }").load_func(b"p", BPF.SCHED_CLS).fd
    f = attach_tc("eth0", "egress", fd, "fbpf_child", priority=2)
    pin = pin_program(fd, default_pin_dir("eth0") / "tc_egress")
    print(json.dumps({"pin": str(pin), "filters": [x.name for x in list_tc("eth0")]}))
""")


def test_works_under_nsenter(host):
    """The agent runs as `nsenter --net=... flannel-bpf attach`: same functions, its netns."""
    out = subprocess.run(nsenter_argv(host.netns, [sys.executable, "-c", CHILD]),
                         capture_output=True, text=True, timeout=60, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    try:
        assert result == {"pin": str(PIN_ROOT / host.netns / "eth0" / "tc_egress"),
                          "filters": ["fbpf_child"]}
        assert os.path.exists(result["pin"])  # bpffs is shared: visible from the init namespace
        # The filter outlives the process that attached it (the kernel holds the program).
        assert "fbpf_child" in tc_show(host.netns, "eth0")["egress"]
        with in_netns(host.netns):
            assert detach_tc("eth0", "egress", "fbpf_child") == 1
        assert not has_clsact(host.netns, "eth0")
    finally:
        unlink_pins(PIN_ROOT / host.netns)
