"""The multi-VM lab end to end: `vagrant/run.sh all` builds the box if needed, boots the VMs,
provisions them (etcd, agents, pods), runs the checks on every VM and destroys everything.

Slow (measured under TCG on 2 cores: 13 minutes with the box rebuilt, 11 with it cached): runs
only with --run-slow.
"""
import json
import os
import subprocess
from ipaddress import IPv4Network
from pathlib import Path

import pytest

from flannel_bpf.lab.node import CHECKED_PROBES, pod_addresses

RUN_SH = Path(__file__).resolve().parents[2] / "vagrant" / "run.sh"
RUN_TIMEOUT = 3300

pytestmark = [pytest.mark.vagrant, pytest.mark.slow, pytest.mark.usefixtures("require_root")]


@pytest.mark.timeout(RUN_TIMEOUT + 120)
def test_pods_reach_each_other_across_vms_through_native_xdp(tmp_path):
    results = tmp_path / "check.json"
    log = tmp_path / "run.log"
    env = {**os.environ, "FBPF_VAGRANT_RESULTS": str(results)}
    nodes = int(env.setdefault("FBPF_NODES", "2"))
    pods = int(env.setdefault("FBPF_PODS", "2"))
    with open(log, "w") as out:
        proc = subprocess.run([str(RUN_SH), "all"], env=env, stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, timeout=RUN_TIMEOUT)
    tail = "\n".join(log.read_text(errors="replace").splitlines()[-60:])
    assert results.exists(), f"run.sh wrote no report (exit {proc.returncode}):\n{tail}"
    report = json.loads(results.read_text())

    assert len(report["nodes"]) == nodes, tail
    subnets = {n["node"]: IPv4Network(n["subnet"]) for n in report["nodes"]}
    assert len(set(subnets.values())) == nodes, f"nodes share a subnet: {subnets}"
    for node in report["nodes"]:
        others = {s for name, s in subnets.items() if name != node["node"]}
        # Every peer was programmed, and every local pod pinged every pod of every other VM.
        assert {IPv4Network(p) for p in node["peers"]} == others, node
        local = {str(a.ip) for a in pod_addresses(subnets[node["node"]], pods)}
        remote = {str(a.ip) for s in others for a in pod_addresses(s, pods)}
        assert {(p["from"], p["to"]) for p in node["pings"]} == {(a, b) for a in local for b in remote}, node
        for p in node["pings"]:
            assert p["sent"] == CHECKED_PROBES and p["received"] == CHECKED_PROBES, (node["node"], p)
        # The replies came in as VXLAN and were decapsulated by XDP in the virtio driver.
        assert node["xdp_modes"] == ["native"], node
        assert node["decap_hook"] == "xdp", node
        assert node["counters_delta"]["decap_xdp"] >= len(node["pings"]) * CHECKED_PROBES, node
        assert node["counters_delta"]["encap_vxlan"] >= len(node["pings"]) * CHECKED_PROBES, node
        assert node["counters_delta"]["drop_unknown_peer"] == 0, node
        assert node["ok"] and not node["problems"], node
    assert report["ok"]
    assert proc.returncode == 0, tail
