"""The VM bench end to end: `vagrant/run.sh up`, then `bench` measures every path between
a pod on node1 and a pod on node2 (switched in place), writes the netns bench's table, JSON and
chart; `run.sh down` then leaves no VM, network, pool or daemon of the lab behind.

Slow (under TCG on 2 cores: ~10 minutes to bring the lab up, then a compile of the programs in
the VMs per switch to bpf): runs only with --run-slow. Nothing here asserts a speed.
"""
import json
import os
import subprocess
from pathlib import Path

import pytest

from flannel_bpf.bench.net import UNITS
from flannel_bpf.bench.vms import NOTICE, PATHS

RUN_SH = Path(__file__).resolve().parents[2] / "vagrant" / "run.sh"
RUN_TIMEOUT = 5400

pytestmark = [pytest.mark.vagrant, pytest.mark.slow, pytest.mark.usefixtures("require_root")]


POOL_CONFIG = Path("/etc/libvirt/storage/default.xml")


def virsh(*args: str) -> list[str]:
    done = subprocess.run(["virsh", "-q", "-c", "qemu:///system", *args], capture_output=True, text=True,
                          timeout=60)
    return done.stdout.split() if done.returncode == 0 else []


def daemons() -> set[str]:
    return {name for name in ("libvirtd", "virtlogd")
            if subprocess.run(["pgrep", "-x", name], capture_output=True).returncode == 0}


@pytest.mark.timeout(RUN_TIMEOUT + 600)
def test_every_path_measured_between_vms_through_the_netns_bench_report(tmp_path):
    log = tmp_path / "run.log"
    daemons_before, pool_before = daemons(), POOL_CONFIG.exists()
    env = {**os.environ, "FBPF_BENCH_OUT": str(tmp_path), "FBPF_NODES": "2"}
    try:
        with open(log, "w") as out:
            for command in ("up", "bench"):
                proc = subprocess.run([str(RUN_SH), command], env=env, stdout=out, stderr=subprocess.STDOUT,
                                      stdin=subprocess.DEVNULL, timeout=RUN_TIMEOUT)
                if proc.returncode != 0:
                    break
    finally:
        down = subprocess.run([str(RUN_SH), "down"], env=env, capture_output=True, text=True, timeout=600)
    text = log.read_text(errors="replace")
    tail = "\n".join(text.splitlines()[-80:])
    assert proc.returncode == 0, tail
    document = json.loads(next(tmp_path.glob("vm-bench-*.json")).read_text())
    assert next(tmp_path.glob("vm-bench-*.png")).read_bytes()[:4] == b"\x89PNG"

    # Every figure of every path, and the ratios to kernel vxlan of the same run.
    results = {r["metric"]: r for r in document["results"]}
    for path in PATHS:
        for figure in UNITS:
            record = results.get(f"net.{path.name}.{figure}")
            assert record is not None and record["value"] is not None and record["value"] > 0, (path, figure, tail)
            assert path.name == "vxlan" or record["vs_vxlan"] is not None
    params = document["params"]
    assert params["missing"] == [] and params["paths"] == [p.name for p in PATHS]
    # The VMs are left on the data plane they came up with (`run.sh test` checks bpf with XDP).
    assert params["backend_after"] == {"Type": "bpf", "VNI": 1, "Port": 8472, "DirectRouting": False,
                                       "Decap": "xdp"}, params["backend_after"]

    # The XDP path ran natively in virtio_net, with transmit queues of its own; the tc path had no XDP.
    for nic in params["nics"]["bpf-xdp"]:
        assert nic["driver"] == "virtio_net" and nic["xdp_mode"] == "native", nic
        assert nic["xdp_prog"].startswith("xdp_decap id ") and nic["xdp_tx_queues"] == "on their own queues", nic
    assert all(nic["xdp_mode"] is None for nic in params["nics"]["bpf-tc"])
    assert "driver virtio_net, XDP native (xdp_decap id " in text
    if params["emulated"]:
        assert params["notice"] == NOTICE and params["rounds"] == 1 and NOTICE in text
        assert not [r for r in document["results"] if r["target"]]

    # Nothing of the lab is left: no VM, network, volume, nor a pool or daemon it brought.
    assert down.returncode == 0, down.stdout + down.stderr
    if daemons_before:
        assert not [d for d in virsh("list", "--all", "--name") if d.startswith("fbpf-")]
        assert not [n for n in virsh("net-list", "--all", "--name") if n.startswith("fbpf-")]
        assert not [v for v in virsh("vol-list", "default") if v.startswith("fbpf-")]
    assert daemons() == daemons_before
    assert POOL_CONFIG.exists() == pool_before
    assert not list(Path("/etc/libvirt/qemu").glob("fbpf-*.xml"))
    assert not [n for n in Path("/etc/libvirt/qemu/networks").glob("fbpf-*.xml")]
    assert not (RUN_SH.parent / ".vagrant").exists()
