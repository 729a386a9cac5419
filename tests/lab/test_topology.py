"""The netns lab: layout, state file, two underlay subnets, crash-proof destroy."""
import json
import subprocess
import time

import pytest

from flannel_bpf.lab.run import ping, popen_in_netns, run_in_netns
from flannel_bpf.lab.topology import (Lab, LabError, destroy, list_labs, read_state,
                                      state_path, temporary_lab)
from flannel_bpf.loader.bpf.attach import PIN_ROOT, pin_program
from flannel_bpf.lab.netns import pids_by_netns, pids_in_netns
from flannel_bpf.loader.netns import in_netns, list_netns, read_sysctl
from flannel_bpf.loader.netlink.routes import is_on_link

pytestmark = pytest.mark.usefixtures("require_root")


def ip(netns, *args):
    return run_in_netns(netns, ["ip", *args]).stdout


def lab_namespaces(name):
    return [ns for ns in list_netns() if ns.startswith(f"fbpf-{name}-")]


def test_layout_state_file_and_pods():
    with temporary_lab(hosts=2) as lab:
        h1, h2 = lab.host(1), lab.host(2)
        pod = lab.add_pod(1, 1, "10.244.1.2/24", "10.244.1.1", 1450)
        lab.add_pod(1, 2, "10.244.1.3/24", "10.244.1.1", 1450)

        # Underlay: the etcd address on br-ul, hosts on eth0 with MTU 1500, no way out.
        assert "inet 198.18.0.254/24" in ip(lab.state.underlay_netns, "-4", "addr", "show", "br-ul")
        link = ip(h1.netns, "-o", "link", "show", "eth0")
        assert "mtu 1500" in link and "master" not in link
        assert "inet 198.18.0.11/24" in ip(h1.netns, "-4", "addr", "show", "eth0")
        assert "inet 198.18.0.12/24" in ip(h2.netns, "-4", "addr", "show", "eth0")
        for host in (h1, h2):
            assert ip(host.netns, "route", "show", "default").strip() == ""
            assert read_sysctl("net.ipv4.ip_forward", host.netns) == "1"
        assert ping(h1.netns, h2.ip, count=2).ok
        assert ping(h2.netns, "198.18.0.254", count=2).ok
        # Nothing outside the lab is reachable.
        assert ping(h1.netns, "198.19.0.1", count=1).loss == 1.0

        # Pods: eth0 with the pod MTU, default route via the cni0 gateway.
        assert pod.netns == f"fbpf-{lab.name}-h1-p1"
        assert "mtu 1450" in ip(pod.netns, "-o", "link", "show", "eth0")
        assert ip(pod.netns, "route", "show", "default").split()[:3] == ["default", "via", "10.244.1.1"]
        assert "master cni0" in ip(h1.netns, "-o", "link", "show", "vethp1")
        assert "inet 10.244.1.1/24" in ip(h1.netns, "-4", "addr", "show", "cni0")
        assert ping(pod.netns, "10.244.1.3", count=2).ok
        assert ping(pod.netns, "10.244.1.1", count=2).ok

        # The state file says all of it, and reads back.
        data = json.loads(state_path(lab.name).read_text())
        assert data["underlay_netns"] == f"fbpf-{lab.name}-ul"
        assert data["bridges"] == [{"name": "br-ul", "address": "198.18.0.254/24"}]
        assert [h["address"] for h in data["hosts"]] == ["198.18.0.11/24", "198.18.0.12/24"]
        assert data["hosts"][0]["pods"][1]["address"] == "10.244.1.3/24"
        assert data["router"] is None
        assert read_state(lab.name) == Lab.load(lab.name).state == lab.state
        assert sorted(lab.state.namespaces()) == sorted(lab_namespaces(lab.name))
        assert lab.name in list_labs()

        with pytest.raises(LabError, match="already exists"):
            Lab.create(lab.name, hosts=1)
        with pytest.raises(LabError, match="outside the lab pod network"):
            lab.add_pod(2, 1, "10.99.0.2/24", "10.99.0.1", 1450)
        with pytest.raises(LabError, match="already has pod 1"):
            lab.add_pod(1, 1, "10.244.1.9/24", "10.244.1.1", 1450)
        with pytest.raises(LabError, match="already has 10.244.1.1/24"):
            lab.add_pod(1, 3, "10.244.7.2/24", "10.244.7.1", 1450)
        with pytest.raises(LabError, match="no host 9"):
            lab.add_pod(9, 1, "10.244.9.2/24", "10.244.9.1", 1450)
        name = lab.name
    assert lab_namespaces(name) == []
    assert not state_path(name).exists()
    assert destroy(name).namespaces == []  # idempotent


def test_two_underlay_subnets_joined_by_router():
    with temporary_lab(hosts=3, second_subnet=[3]) as lab:
        h1, h2, h3 = lab.hosts
        assert h3.address == "198.18.1.13/24" and h3.underlay_bridge == "br-ul2"
        assert lab.state.router.netns == f"fbpf-{lab.name}-rt"
        assert read_sysctl("net.ipv4.ip_forward", lab.state.router.netns) == "1"
        # Lab routes only: the /15 via the router leg, never a default route.
        assert ip(h3.netns, "route", "show", "198.18.0.0/15").split()[:3] == ["198.18.0.0/15", "via", "198.18.1.1"]
        assert ip(h1.netns, "route", "show", "198.18.1.0/24").split()[:3] == ["198.18.1.0/24", "via", "198.18.0.1"]
        for host in lab.hosts:
            assert ip(host.netns, "route", "show", "default").strip() == ""

        assert ping(h1.netns, h3.ip, count=2).ok
        assert ping(h3.netns, h2.ip, count=2).ok
        assert ping(h3.netns, "198.18.0.254", count=2).ok  # etcd's address, through the router

        with in_netns(h1.netns):
            assert is_on_link(h2.ip) is True
            assert is_on_link(h3.ip) is False
            assert is_on_link("203.0.113.9") is False  # no route at all
        with in_netns(h3.netns):
            assert is_on_link(h1.ip) is False


def test_ping_reports_loss_and_errors():
    with temporary_lab(hosts=1) as lab:
        h1 = lab.host(1)
        lost = ping(h1.netns, "198.18.0.99", count=2, wait=0.3)
        assert (lost.sent, lost.received, lost.loss, lost.ok) == (2, 0, 1.0, False)
        unreachable = ping(h1.netns, "10.244.200.1", count=1)
        assert unreachable.loss == 1.0 and "unreachable" in (unreachable.error or "").lower()
        good = ping(h1.netns, "198.18.0.254", count=2)
        assert good.loss == 0.0 and good.rtt_avg_ms is not None


def wait_until_inside(procs, namespaces, timeout=5.0):
    """A just-started nsenter joins its namespace a moment later; a crash comes much later."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        inside = {pid for pids in pids_by_netns(namespaces).values() for pid in pids}
        if {p.pid for p in procs} <= inside:
            return
        time.sleep(0.02)
    raise AssertionError("test processes did not enter their namespaces")


def test_destroy_after_crash_kills_processes_and_removes_pins():
    from bcc import BPF
    prog = BPF(text=b"int pass(struct __sk_buff *s) { return 0; }").load_func(b"pass", BPF.SCHED_CLS)
    with temporary_lab(hosts=2) as lab:
        name = lab.name
        lab.add_pod(2, 1, "10.244.2.2/24", "10.244.2.1", 1450)
        sleepers = [popen_in_netns(ns, ["sleep", "60"]) for ns in
                    (lab.host(1).netns, lab.host(2).pods[0].netns, lab.state.underlay_netns)]
        # A process that ignores SIGTERM must still go (SIGKILL after the grace period).
        stubborn = popen_in_netns(lab.host(2).netns, ["sh", "-c", "trap '' TERM; sleep 60"])
        wait_until_inside(sleepers + [stubborn], lab.state.namespaces())
        pin_dir = PIN_ROOT / lab.host(1).netns / "eth0"
        pin_program(prog.fd, pin_dir / "tc_pass")
        # The crash: the creator vanishes and so does the state file.
        state_path(name).unlink()

        report = destroy(name)
        try:
            for p in sleepers + [stubborn]:
                assert p.wait(timeout=10) is not None
                assert p.pid in report.killed_pids
        finally:
            for p in sleepers + [stubborn]:
                if p.poll() is None:
                    p.kill()
        assert lab_namespaces(name) == []
        assert sorted(report.namespaces) == sorted(lab.state.namespaces())
        assert not (PIN_ROOT / lab.host(1).netns).exists()
        assert str(PIN_ROOT / lab.host(1).netns) in report.pin_dirs
        for ns in lab.state.namespaces():
            assert pids_in_netns(ns) == []
        out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert f"fbpf-{name}-" not in out


def test_destroy_does_not_touch_a_lab_with_a_longer_name():
    with temporary_lab(hosts=1) as lab:
        # Lab "<a>-h1" has namespaces fbpf-<a>-h1-ul, fbpf-<a>-h1-h1: all start "fbpf-<a>-".
        longer = Lab.create(f"{lab.name}-h1", hosts=1)
        try:
            destroy(lab.name)
            assert sorted(lab_namespaces(lab.name)) == sorted(longer.state.namespaces())
            assert read_state(longer.name) == longer.state
        finally:
            destroy(longer.name)


def test_bad_lab_requests():
    with pytest.raises(LabError, match="bad lab name"):
        Lab.create("no/slash")
    with pytest.raises(LabError, match="hosts must be"):
        Lab.create("tbadhosts", hosts=0)
    with pytest.raises(LabError, match="do not exist"):
        Lab.create("tbadsubnet", hosts=2, second_subnet=[5])
    assert lab_namespaces("tbadhosts") == [] and lab_namespaces("tbadsubnet") == []
