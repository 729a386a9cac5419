"""One host through an agent's life: started before etcd has a network config (/readyz 503),
ready once config, lease and data plane exist (200, Prometheus /metrics), stopped leaving the
data plane pinned, then `flannel-bpf detach` inside the host namespace and `lab down` must leave
no program, pin, device, route, iptables rule, namespace or process behind."""
from __future__ import annotations

import signal
import time
from ipaddress import IPv4Network
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from flannel_bpf.lab import orchestrator as orch
from flannel_bpf.lab.nshttp import http_get
from flannel_bpf.lab.run import run_in_netns
from flannel_bpf.lab.topology import Lab, list_labs
from flannel_bpf.loader.bpf.program import PROGRAMS

from e2e_lab import (assert_lab_gone, cli, fake_lease, lab_name, root_snapshot, route_subnets,
                     wait_programmed, wait_until)

PEER = IPv4Network("10.244.254.0/24")


@pytest.fixture(scope="module")
def single():
    name = lab_name("s")
    before = root_snapshot()
    try:
        lab = Lab.create(name, hosts=1)
        orch.start_etcd(lab)
        yield lab, before
    finally:
        orch.down(name)


def _metrics(host) -> dict:
    return {f.name: f for f in text_string_to_metric_families(orch.metrics_text(host))}


def _sh(netns: str, *argv: str) -> str:
    return run_in_netns(netns, list(argv)).stdout


def test_readyz_is_503_until_config_lease_and_data_plane_then_200(single):
    lab, _ = single
    host = lab.host(1)
    orch.start_agent(lab, 1, "bpf", extra_args=["--ip-masq"])
    wait_until(lambda: orch.readyz(host, 1.0) != 0, 30, 0.05, "agent answering HTTP")
    assert http_get(host.netns, f"http://127.0.0.1:{host.agent.healthz_port}/healthz")[0] == 200
    # No network config in etcd: the agent waits (flanneld retries every second), not ready.
    time.sleep(1.5)
    assert orch.readyz(host) == 503
    assert not Path(host.agent.subnet_file).exists()
    assert _metrics(host)["flannel_bpf_ready"].samples[0].value == 0
    assert orch.agent_running(host)

    etcd = orch.etcd_client(lab)
    etcd.put(orch.lease_key(lab, PEER), fake_lease())
    orch.write_network_config(lab, orch.network_config(["bpf"]))
    orch.wait_for_subnet(lab, 1)
    orch.add_pods(lab, 1, 1)
    orch.wait_ready(lab, [1], timeout=60)
    assert orch.readyz(host) == 200

    metrics = _metrics(host)
    assert metrics["flannel_bpf_ready"].samples[0].value == 1
    assert metrics["flannel_bpf_peers"].samples[0].value == 1
    verdicts = {s.labels["verdict"] for s in metrics["flannel_bpf_packets"].samples}
    assert {"encap_vxlan", "decap_to_pod", "pass_not_local_endpoint"} <= verdicts
    assert metrics["flannel_bpf_lease_expiry_timestamp_seconds"].samples[0].value > time.time() + 3600
    wait_programmed(host, PEER)


def test_the_agent_never_maps_the_compiler_its_child_pinned_the_programs(single):
    """bcc (libbcc, clang, LLVM: ~150 MiB) runs only in the agent's short-lived loader child."""
    lab, _ = single
    host = lab.host(1)
    assert orch.agent_running(host)
    mapped = Path(f"/proc/{host.agent.pid}/maps").read_text()
    assert "libbpf.so" in mapped  # the agent's own libbpf binding: these are its mappings
    assert [lib for lib in ("libbcc", "libclang", "libLLVM") if lib in mapped] == []
    pins = {p.name for p in Path(host.agent.pin_dir).iterdir()}
    assert {f"prog_{name}" for name in PROGRAMS} <= pins


def test_lab_up_refuses_a_lab_that_is_already_up(single):
    lab, _ = single
    with pytest.raises(orch.LabError, match="already up"):
        orch.up(orch.LabSpec(name=lab.name, hosts=1))
    assert lab.name in list_labs() and orch.agent_running(lab.host(1))  # and left it alone


def test_detach_in_the_host_namespace_removes_everything_the_agent_made(single):
    lab, _ = single
    host = lab.host(1)
    assert orch.stop_agent(lab, 1, signal.SIGTERM)  # no --cleanup-on-exit: stays forwarding
    pin_dir = Path(host.agent.pin_dir)
    # What a stopped agent leaves in place, so that detach has something to remove.
    assert "tc_decap" in _sh(host.netns, "tc", "filter", "show", "dev", "eth0", "ingress")
    assert "tc_encap_from_pods" in _sh(host.netns, "tc", "filter", "show", "dev", "vethp1", "ingress")
    assert "flbpf-headroom" in _sh(host.netns, "ip", "link", "show", "master", "cni0")
    assert "tc_encap_from_host" in _sh(host.netns, "tc", "filter", "show", "dev", "flannel.1", "egress")
    assert pin_dir.is_dir() and any(pin_dir.iterdir())
    assert route_subnets(host) == {PEER}
    assert "FLANNEL-POSTRTG" in _sh(host.netns, "iptables", "-t", "nat", "-S")

    for attempt in range(2):  # idempotent: the second run finds nothing and succeeds
        detach = cli("detach", "--iface", "eth0", netns=host.netns, timeout=60)
        assert detach.returncode == 0, f"attempt {attempt}: {detach.stderr}"

    for dev, direction in (("eth0", "ingress"), ("cni0", "ingress"), ("vethp1", "ingress")):
        assert _sh(host.netns, "tc", "filter", "show", "dev", dev, direction).strip() == ""
    assert "clsact" not in _sh(host.netns, "tc", "qdisc", "show", "dev", "vethp1")
    links = _sh(host.netns, "ip", "-d", "-o", "link", "show")
    assert "flannel.1" not in links and "xdp" not in links and "flbpf-headroom" not in links
    assert not pin_dir.exists() and not pin_dir.parent.exists()
    assert route_subnets(host) == set()
    assert "FLANNEL" not in _sh(host.netns, "iptables", "-t", "nat", "-S")
    # The lab's own plumbing is untouched: the pod still reaches its gateway.
    assert "cni0" in links


def test_lab_down_leaves_nothing_behind(single):
    lab, before = single
    report = orch.down(lab.name)
    assert lab.state.underlay_netns in report.namespaces
    assert_lab_gone(lab.name, before)


def test_lab_up_that_fails_says_which_agent_and_why_and_removes_the_lab():
    name = lab_name("f")
    try:
        with pytest.raises(orch.LabError) as failure:
            orch.up(orch.LabSpec(name=name, hosts=1, pods=1, agent_args=("--no-such-flag",)))
        message = str(failure.value)
        assert "host 1" in message and "exited before writing subnet.env" in message
        assert "unrecognized arguments: --no-such-flag" in message  # the agent log's tail
        assert "(exit code 2)" in message
        assert name not in list_labs()
    finally:
        orch.down(name)
