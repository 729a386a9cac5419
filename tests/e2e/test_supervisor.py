"""The shipped supervisor program under a real supervisord (Debian's supervisor) in lab host 1,
against the lab's etcd, its paths moved below the lab's directory: the agent starts and
`supervisorctl status` says RUNNING (after startsecs=30); `supervisorctl stop` (stopsignal=QUIT)
ends the agent cleanly and the pods keep forwarding on the pinned data plane; `start` again
adopts the pinned maps and the same lease. Host 2 runs a plain lab agent with the remote pod."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

from flannel_bpf.controller.subnet_env import read_subnet_env
from flannel_bpf.lab import orchestrator as orch
from flannel_bpf.lab.run import ping
from flannel_bpf.lab.supervisor import Supervisord
from flannel_bpf.lab.topology import AgentState, Lab
from flannel_bpf.loader.bpf.attach import default_pin_dir
from flannel_bpf.loader.netns import in_netns

from e2e_lab import assert_lab_gone, counters, lab_name, map_subnets, root_snapshot, wait_until

pytestmark = pytest.mark.supervisor

RUNNING_AFTER = 30 + 30  # startsecs, and room for a busy machine


def _pins(pin_dir: str) -> dict[str, int]:
    """Pinned maps by name -> inode: a map created anew is pinned as a new file."""
    return {p.name: p.stat().st_ino for p in Path(pin_dir).iterdir() if not p.name.startswith("prog_")}


def _wait_status(sv: Supervisord, wanted: str, timeout: float) -> None:
    wait_until(lambda: sv.status() == wanted, timeout, 0.5, f"supervisorctl status {wanted}")


def _ready(host) -> bool:
    return orch.readyz(host, 1.0) == 200 and orch.pods_attached(host)


@pytest.fixture(scope="module")
def supervised():
    name = lab_name("sv")
    before = root_snapshot()
    sv = None
    try:
        lab = Lab.create(name, hosts=2)
        orch.start_etcd(lab)
        orch.write_network_config(lab, orch.network_config(["bpf", "bpf"]))
        orch.start_agent(lab, 2, "bpf")
        host = lab.host(1)
        directory = orch.host_dir(lab, host)
        with in_netns(host.netns):
            pin_dir = str(default_pin_dir(host.uplink))
        host.agent = AgentState(backend="bpf", pid=None, healthz_port=orch.HEALTHZ_BASE_PORT + 1,
                                log_path=str(directory / "supervisor" / "flannel-bpf.log"),
                                subnet_file=str(directory / "subnet.env"), pin_dir=pin_dir)
        lab.save()
        sv = Supervisord(host.netns, directory / "supervisor")
        sv.install_program({
            "FLANNELD_ETCD_ENDPOINTS": ",".join(lab.state.etcd.endpoints),
            "FLANNELD_ETCD_PREFIX": lab.state.etcd.prefix,
            "FLANNELD_IFACE": host.uplink,
            "FLANNELD_SUBNET_FILE": host.agent.subnet_file,
            "FLANNELD_HEALTHZ_PORT": str(host.agent.healthz_port),
            "FLANNEL_BPF": str(Path(sys.executable).parent / "flannel-bpf"),
            "FLANNEL_BPF_BRIDGE": "cni0",   # the lab's pods sit on cni0
        })
        sv.start()
        wait_until(lambda: Path(host.agent.subnet_file).exists(), 60, 0.1, "the supervised agent's subnet.env")
        orch.wait_for_subnet(lab, 2)
        for index in (1, 2):
            orch.add_pods(lab, index, 1)
        wait_until(lambda: _ready(lab.host(1)) and _ready(lab.host(2)), 60, 0.2, "both agents ready")
        yield lab, sv, before
    finally:
        if sv is not None:
            sv.stop()
        orch.down(name)


def _pod_ping_over_bpf(lab) -> None:
    src, dst = lab.host(1).pods[0], lab.host(2).pods[0]
    before = counters(lab.host(1)).get("encap_vxlan", 0)
    result = ping(src.netns, dst.ip, count=3, wait=2.0)
    assert result.received == 3, result
    assert counters(lab.host(1)).get("encap_vxlan", 0) - before >= 3


def test_the_shipped_program_starts_and_is_running(supervised):
    lab, sv, _ = supervised
    _wait_status(sv, "RUNNING", RUNNING_AFTER)
    # The wrapper execs: supervisor's signals go to the agent itself, not to a shell.
    argv = Path(f"/proc/{sv.program_pid()}/cmdline").read_bytes().split(b"\0")
    assert argv[0].endswith(b"python3") and b"attach" in argv and b"cni0" in argv, argv
    assert "bpf data plane on eth0" in sv.program_log.read_text()  # the log file is the agent's
    _pod_ping_over_bpf(lab)


def test_stop_sends_quit_the_agent_exits_cleanly_and_pods_keep_forwarding(supervised):
    lab, sv, _ = supervised
    pid = sv.program_pid()
    sv.ctl("stop", "flannel-bpf")
    assert sv.status() == "STOPPED"
    assert not Path(f"/proc/{pid}").exists()
    assert "stopped; data plane left forwarding (pinned)" in sv.program_log.read_text()
    # supervisord saw an exit, not a death by the signal (SIGQUIT's default would dump core).
    assert "stopped: flannel-bpf (exit status 0)" in sv.log_path.read_text()
    _pod_ping_over_bpf(lab)   # no agent runs on host 1


def test_start_adopts_the_pinned_state(supervised):
    lab, sv, _ = supervised
    host = lab.host(1)
    pins, subnet = _pins(host.agent.pin_dir), read_subnet_env(host.agent.subnet_file)["FLANNEL_SUBNET"]
    assert map_subnets(host)  # the peer survived in the pinned map
    started = time.monotonic()
    sv.ctl("start", "flannel-bpf")  # returns once RUNNING, after startsecs
    assert time.monotonic() - started >= 25 and sv.status() == "RUNNING"
    wait_until(lambda: _ready(host), 60, 0.2, "the restarted agent ready")
    assert _pins(host.agent.pin_dir) == pins, "the maps were adopted, not made anew"
    assert read_subnet_env(host.agent.subnet_file)["FLANNEL_SUBNET"] == subnet
    _pod_ping_over_bpf(lab)


def test_nothing_stays_behind(supervised):
    lab, sv, before = supervised
    sv.stop()  # SIGTERM to supervisord: it stops the program with SIGQUIT, then exits
    assert sv.process.returncode == 0
    assert sv.log_path.read_text().count("stopped: flannel-bpf (exit status 0)") == 2
    orch.down(lab.name)
    assert_lab_gone(lab.name, before)
