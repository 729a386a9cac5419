"""The lab bench's summaries: medians, ratios to kernel vxlan and the underlay, the performance
targets, the side-by-side table and the chart, from hand-made samples (no traffic)."""
import json
import subprocess
import sys

import pytest

from flannel_bpf.bench import run as bench

from flannel_bpf.bench import net as bench_net


def samples(bpf_udp: float) -> dict:
    figures = {"tcp1_gbps": [10.0, 12.0, 11.0], "tcp4_gbps": [12.0], "udp64_kpps": [50.0, 60.0, 55.0],
               "rr_p50_us": [60.0], "rr_p99_us": [900.0], "cpu_s_per_gb": [1.0]}
    return {
        "vxlan": figures,
        "underlay": {name: [v * 2 for v in values] for name, values in figures.items()},
        "host-gw": {**figures, "udp64_kpps": [70.0]},
        "bpf-tc": {"tcp1_gbps": [15.0], "tcp4_gbps": [24.0], "udp64_kpps": [bpf_udp],
                   "rr_p50_us": [30.0], "rr_p99_us": [300.0], "cpu_s_per_gb": [0.5]},
    }


def by_metric(results):
    return {r["metric"]: r for r in results}


def test_medians_and_ratios_against_vxlan_and_underlay():
    results = by_metric(bench_net.summarize(samples(bpf_udp=121.0)))
    assert results["net.vxlan.tcp1_gbps"]["value"] == 11.0  # median of 10, 12, 11
    assert results["net.bpf-tc.tcp1_gbps"]["vs_vxlan"] == pytest.approx(15 / 11, abs=1e-3)
    assert results["net.bpf-tc.tcp1_gbps"]["vs_underlay"] == pytest.approx(15 / 22, abs=1e-3)
    assert results["net.bpf-tc.udp64_kpps"]["samples"] == 1


@pytest.mark.parametrize("bpf_udp, ok", [(121.0, True), (109.0, False)])
def test_udp_target_is_twice_kernel_vxlan(bpf_udp, ok):
    results = by_metric(bench_net.summarize(samples(bpf_udp)))
    record = results["net.bpf-tc.udp64_kpps.vs_vxlan"]
    assert record["target"] == ">= 2" and record["ok"] is ok
    assert results["net.bpf-tc.rr_p50_us.vs_vxlan"]["ok"] is True  # 30 us vs 60 us <= 0.75
    assert results["net.bpf-tc.tcp1_gbps.vs_underlay"]["ok"] is False  # 15 vs 22 < 0.9


def test_a_missing_reference_path_gives_no_ratio_and_a_missed_target():
    partial = samples(121.0)
    del partial["host-gw"]
    record = by_metric(bench_net.summarize(partial))["net.bpf-tc.udp64_kpps.vs_host-gw"]
    assert record["value"] is None and record["ok"] is False


def test_report_writes_json_and_chart(tmp_path):
    results = bench_net.summarize(samples(121.0))
    json_path, png_path = bench.report(results, {"parts": ["net"]}, tmp_path)
    document = json.loads(json_path.read_text())
    assert document["benchmark"] == "bench" and len(document["results"]) == len(results)
    assert png_path is not None and png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_command_rejects_unknown_parts():
    done = subprocess.run([sys.executable, "-m", "flannel_bpf", "lab", "bench", "--only", "net,speed"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "unknown part(s) speed" in done.stderr


@pytest.mark.slow
def test_quick_bench_of_every_part_runs_end_to_end(tmp_path):
    done = subprocess.run([sys.executable, "-m", "flannel_bpf", "lab", "bench", "--quick", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    document = json.loads(next(tmp_path.glob("bench-*.json")).read_text())
    names = {r["metric"] for r in document["results"]}
    assert {"net.bpf-tc.tcp1_gbps", "net.vxlan.udp64_kpps", "net.underlay.rr_p50_us"} <= names
    assert any(n.startswith("prog.") for n in names) and any(n.startswith("control.") for n in names)


def test_the_vm_bench_reports_through_the_same_code_with_its_notice(tmp_path, capsys):
    notice = "SOFTWARE EMULATION: not performance"
    json_path, png_path = bench.report(bench_net.summarize(samples(121.0), targets=()), {"where": "vms"},
                                       tmp_path, benchmark="vm-bench", title="between VMs", notice=notice)
    document = json.loads(json_path.read_text())
    assert json_path.name.startswith("vm-bench-") and document["params"] == {"where": "vms", "notice": notice}
    assert not [r for r in document["results"] if r["target"]]  # no verdicts on emulated figures
    assert png_path is not None and png_path.exists()
    out = capsys.readouterr().out
    assert out.count(notice) == 2 and "between VMs, medians" in out


def test_busy_cpu_seconds_from_proc_stat():
    # user nice system idle iowait irq softirq steal guest guest_nice, in clock ticks
    assert bench_net.busy_seconds("cpu  100 20 30 1000 50 5 5 40 0 0", 100) == pytest.approx(2.0)


def test_one_kernel_is_counted_once_and_two_machines_both():
    class Machine:
        slack = 0.0

        def __init__(self, busy):
            self.busy = busy

        def busy_cpu_seconds(self):
            return self.busy

    one, other = Machine(3.0), Machine(4.0)
    assert bench_net.Endpoints("a", "b", "10.0.0.1", one, one).busy_cpu_seconds() == 3.0
    assert bench_net.Endpoints("a", "b", "10.0.0.1", one, other).busy_cpu_seconds() == 7.0


def test_vm_rounds_alternate_their_order_and_start_where_the_last_ended():
    from flannel_bpf.bench import vms

    first, second = vms.round_order(vms.PATHS, 0), vms.round_order(vms.PATHS, 1)
    assert [p.name for p in first] == ["bpf-xdp", "bpf-tc", "vxlan", "underlay", "host-gw"]
    assert second == tuple(reversed(first)) and second[0] == first[-1]
    # The underlay sits between kernel vxlan and host-gw: measured with no program on the uplink.
    names = [p.name for p in first]
    assert {names[names.index("underlay") - 1], names[names.index("underlay") + 1]} == {"vxlan", "host-gw"}
