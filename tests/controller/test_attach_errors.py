"""`flannel-bpf attach` and `detach` given bad flags, bad configs, a place it cannot listen or
write, an etcd it cannot reach, or a signal before it runs: one clear line each, never a
traceback, and nothing left behind. Every agent runs in a scratch namespace (its uplink eth0
leads nowhere) and reaches no etcd."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from flannel_bpf.bench.common import scratch_netns
from flannel_bpf.loader.bpf.attach import PIN_ROOT

DEAD_ETCD = "http://127.0.0.1:1"  # the namespace's own loopback: nothing listens
VXLAN = {"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}}


@pytest.fixture(scope="module")
def netns():
    with scratch_netns(f"err{uuid.uuid4().hex[:6]}") as name:
        yield name


def command(netns: str, *args: str) -> list[str]:
    return ["nsenter", f"--net=/run/netns/{netns}", "--", sys.executable, "-m", "flannel_bpf", *args]


def attach(netns: str, *args: str, timeout: float = 120, iface: str = "eth0") -> subprocess.CompletedProcess:
    argv = command(netns, "attach", "--iface", iface, "--etcd-endpoints", DEAD_ETCD, *args)
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def errors(result: subprocess.CompletedProcess) -> list[str]:
    """The error lines; a traceback fails the test at once."""
    assert "Traceback" not in result.stderr, result.stderr
    return [line for line in result.stderr.splitlines() if " ERROR " in line or ": error:" in line
            or line.startswith("flannel-bpf")]


@pytest.fixture
def config_file(tmp_path):
    def write(content) -> str:
        path = tmp_path / f"net-conf-{uuid.uuid4().hex[:6]}.json"
        path.write_bytes(content if isinstance(content, bytes) else json.dumps(content).encode())
        return str(path)
    return write


@pytest.mark.parametrize("args, message", [
    (("--healthz-port", "99999"), "99999 is out of range"),
    (("--healthz-ip", "not-an-ip"), "'not-an-ip' is not an IP address"),
    (("--subnet-lease-renew-margin", "0"), "0 is out of range"),
    (("--etcd-endpoints", "ftp://127.0.0.1:2379"), "is not a URL"),
    (("--etcd-endpoints", "http://127.0.0.1:99999"), "has a bad port"),
    (("--etcd-prefix", "no-slash"), "must be an etcd key path"),
    (("--net-config-path", "/tmp"), "/tmp is a directory, not a file"),
    (("--net-config-path", "/nonexistent/net-conf.json"), "no such file"),
    (("--subnet-file", "/tmp"), "'/tmp' is a directory"),
    (("--subnet-file", "/etc/hostname/subnet.env"), "/etc/hostname is not a directory"),
    (("--etcd-keyfile", "/nonexistent/key.pem"), "no such file"),
    (("--backend", "udp"), "invalid choice: 'udp'"),
    (("--reconcile-interval", "soon"), "invalid float value"),
])
def test_a_bad_flag_is_one_line_without_the_usage(netns, args, message):
    result = attach(netns, *args)
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1, result.stderr
    assert message in result.stderr and "usage:" not in result.stderr


@pytest.mark.parametrize("iface, args, message", [
    ("nope0", (), "nope0"),
    ("eth0", ("--etcd-certfile", "/etc/hostname"), "--etcd-keyfile and --etcd-certfile: give both or neither"),
    ("eth0", ("--etcd-username", "root"), "--etcd-username and --etcd-password: give both or neither"),
])
def test_flags_that_do_not_go_together_are_one_line(netns, iface, args, message):
    result = attach(netns, *args, iface=iface)
    assert result.returncode == 2
    assert errors(result) and message in errors(result)[0], result.stderr
    assert len(errors(result)) == 1


BAD_CONFIGS = [
    (b"", "not valid JSON"),
    (b"{oops", "not valid JSON"),
    (b'{"Network": "\xff"}', "not UTF-8"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan"}, "Junk": "' + b"x" * (1 << 20) + b'"}',
     "Junk: unknown field"),
    ({"Backend": {"Type": "vxlan"}}, "Network: missing"),
    ({"Network": 10, "Backend": {"Type": "vxlan"}}, "Network: must be a CIDR string"),
    ({"Network": "10.244.0.0/33", "Backend": {"Type": "vxlan"}}, "is not an IPv4 CIDR"),
    ({"Network": "10.244.0.0/16", "SubnetLen": "24", "Backend": {"Type": "vxlan"}}, "SubnetLen: must be an integer"),
    ({"Network": "10.244.0.0/16", "SubnetLen": 31, "Backend": {"Type": "vxlan"}}, "SubnetLen: must be at most 30"),
    ({"Network": "10.244.0.0/16", "SubnetMin": "10.245.0.0", "Backend": {"Type": "vxlan"}}, "not in the range"),
    ({"Network": "10.244.0.0/16"}, "Backend: missing"),
    ({"Network": "10.244.0.0/16", "Backend": {"Type": "udp"}}, "'udp' is not supported"),
    ({"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "VNI": 1 << 24}}, "Backend.VNI: must be between"),
    ({"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "VNI": "1"}}, "Backend.VNI: must be an integer"),
    ({"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "Port": 70000}}, "Backend.Port: must be a UDP port"),
    ({"Network": "10.244.0.0/16", "Backend": {"Type": "bpf", "Decap": "skb"}}, "'skb' is not a decap hook"),
    ({"Network": "10.244.0.0/16", "EnableIPv6": True, "Backend": {"Type": "vxlan"}}, "IPv6 pod networks"),
]


@pytest.mark.parametrize("content, message", BAD_CONFIGS, ids=range(len(BAD_CONFIGS)))
def test_a_bad_network_config_is_one_line(netns, config_file, content, message):
    result = attach(netns, "--net-config-path", config_file(content))
    assert result.returncode == 1
    assert len(errors(result)) == 1 and message in errors(result)[0], result.stderr
    assert len(errors(result)[0]) < 500


def test_places_it_cannot_listen_or_write_are_one_line(netns, config_file):
    config = config_file(VXLAN)
    result = attach(netns, "--net-config-path", config, "--healthz-ip", "192.0.2.1", "--healthz-port", "10256")
    assert result.returncode == 1
    assert len(errors(result)) == 1 and "--healthz-ip 192.0.2.1 --healthz-port 10256: cannot listen there" \
        in errors(result)[0], result.stderr
    result = attach(netns, "--net-config-path", config, "--subnet-file", "/proc/nonexistent/subnet.env")
    assert result.returncode == 1
    assert len(errors(result)) == 1 and "cannot write subnet.env to /proc/nonexistent/subnet.env" \
        in errors(result)[0], result.stderr


def test_an_unreachable_etcd_and_unusable_tls_files_are_one_line(netns, config_file, tmp_path):
    config = config_file(VXLAN)
    result = attach(netns, "--net-config-path", config)
    assert result.returncode == 1
    assert len(errors(result)) == 1 and "127.0.0.1:1" in errors(result)[0], result.stderr
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    result = attach(netns, "--net-config-path", config, "--etcd-endpoints", "https://127.0.0.1:1",
                    "--etcd-cafile", str(garbage), "--etcd-certfile", str(garbage), "--etcd-keyfile", str(garbage))
    assert result.returncode == 1
    assert len(errors(result)) == 1, result.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_while_waiting_for_etcd_is_a_clean_stop(netns, sig):
    argv = command(netns, "attach", "--iface", "eth0", "--etcd-endpoints", DEAD_ETCD)
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as agent:
        try:
            deadline = time.monotonic() + 30
            line = ""
            while "etcd unreachable" not in line:  # it is waiting
                line = agent.stderr.readline()
                assert line and time.monotonic() < deadline, "the agent never said it was waiting"
            agent.send_signal(sig)
            _, rest = agent.communicate(timeout=30)
        finally:
            if agent.poll() is None:
                agent.kill()
    assert agent.returncode == 0
    assert "Traceback" not in rest and "stopped while waiting for the network config" in rest, rest


def test_a_failed_start_with_cleanup_on_exit_leaves_no_pins(netns, config_file):
    """The programs are compiled and pinned before the lease is taken; etcd is unreachable."""
    pin_dir = PIN_ROOT / f"test-cleanup-{uuid.uuid4().hex[:6]}"
    try:
        result = attach(netns, "--net-config-path", config_file({**VXLAN, "Backend": {"Type": "bpf"}}),
                        "--pin-dir", str(pin_dir), "--cleanup-on-exit", timeout=300)
        assert result.returncode == 1
        assert len(errors(result)) == 1 and "127.0.0.1:1" in errors(result)[0], result.stderr
        assert "data plane removed" in result.stderr
        assert not pin_dir.exists(), sorted(p.name for p in pin_dir.iterdir())
    finally:
        if pin_dir.exists():
            subprocess.run(["rm", "-rf", str(pin_dir)], check=False)


def test_detach_of_an_interface_that_does_not_exist_fails_clearly(netns):
    result = subprocess.run(command(netns, "detach", "--iface", "nope0"), capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert len(errors(result)) == 1 and "--iface nope0: no such interface here" in errors(result)[0], result.stderr
    assert "detached" not in result.stderr
