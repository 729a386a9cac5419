"""Each benchmark function at tiny sizes: result shape and sanity, cleanup (also on failure).
Full-size runs are marked slow (`--run-slow`); nothing here asserts a speed."""
from __future__ import annotations

import json

import pytest

from flannel_bpf.bench import common as bench_common
from flannel_bpf.bench import control as bench_control
from flannel_bpf.bench import prog as bench_prog
from flannel_bpf.loader.bpf.program import PROGRAMS, ebpf_dir


# ---------------------------------------------------------------------------- helpers

def check_shape(results: list[dict]) -> None:
    """Every result is a plain record with the fields `lab bench` relies on."""
    assert results
    names = [r["metric"] for r in results]
    assert len(names) == len(set(names)), "metric names must be unique"
    for r in results:
        assert {"metric", "value", "unit", "target", "ok"} <= set(r), r
        assert isinstance(r["metric"], str) and r["unit"]
        assert r["ok"] in (True, False, None)
        assert (r["target"] is None) == (r["ok"] is None), r


def by_name(results: list[dict]) -> dict[str, dict]:
    return {r["metric"]: r for r in results}


def test_metric_verdicts_and_percentiles():
    assert bench_common.metric("a", 10, "ns", target=("<=", 60))["ok"] is True
    assert bench_common.metric("a", 61, "ns", target=("<=", 60))["ok"] is False
    assert bench_common.metric("a", None, "ns", target=(">=", 10))["ok"] is False  # not measured: missed
    assert bench_common.metric("a", 5, "s")["ok"] is None and bench_common.metric("a", 5, "s")["target"] is None
    with pytest.raises(ValueError, match="comparator"):
        bench_common.metric("a", 1, "s", target=("==", 1))
    values = list(range(1, 201))
    assert bench_common.percentile(values, 50) == 100
    assert bench_common.percentile(values, 99) == 198
    assert bench_common.percentile([], 50) is None


def test_results_json_and_table(tmp_path, capsys):
    results = [bench_common.metric("x.y", 1.5, "ms", target=("<=", 2), note="n", extra=[1, 2])]
    path = bench_common.write_json("unit", results, {"k": 1}, tmp_path)
    document = json.loads(path.read_text())
    assert document["results"] == results and document["params"] == {"k": 1}
    assert document["host"]["kernel"]
    bench_common.print_table(results, "t")
    assert "x.y" in capsys.readouterr().out


def test_the_timing_build_names_every_entry_point():
    """timing.h refuses to compile an entry point without its FL_TIMING_SAVE_<name>."""
    assert set(bench_prog.TIMING_SAVE_BYTES) == set(PROGRAMS)
    assert "-DFL_TIMING" in bench_prog.TIMING_CFLAGS
    for name in PROGRAMS:
        assert f"FL_PROGRAM({name}," in (ebpf_dir() / PROGRAMS[name].source).read_text()


def test_profile_summary_leaves_out_waiting_threads(tmp_path):
    raw = tmp_path / "p.txt"
    raw.write_text(
        "main (flannel_bpf/cli.py:53);Agent.start (controller/agent.py:102);"
        "KernelVxlanBackend._forget_vtep (loader/netlink/kernel_vxlan.py:230);decode_nlas (pyroute2/netlink/__init__.py:1612) 30\n"
        "main (flannel_bpf/cli.py:53);Agent.start (controller/agent.py:102);"
        "DataPlaneMaps.upsert_peers (loader/bpf/maps.py:200) 10\n"
        "Thread.run (threading.py:975);Condition.wait (threading.py:324) 500\n")
    summary = bench_control.summarize_profile(raw)
    assert summary["busy_samples"] == 40
    shares = {p["function"]: p["share"] for p in summary["project_innermost"]}
    assert shares == {"KernelVxlanBackend._forget_vtep (loader/netlink/kernel_vxlan.py)": 0.75,
                      "DataPlaneMaps.upsert_peers (loader/bpf/maps.py)": 0.25}
    assert summary["leaf"][0] == {"function": "decode_nlas (pyroute2/netlink/__init__.py)", "share": 0.75}


# ---------------------------------------------------------------------------- program cost

def test_prog_testrun_small():
    results = bench_prog.measure_testrun(repeat=100, rounds=1, single_shots=10, extra_peers=10, profile=False)
    check_shape(results)
    named = by_name(results)
    for case in bench_prog.CASES:
        timed = named[f"prog.{case.name}.testrun"]
        # None would mean the timing variant did not restore the packet (the note says how).
        assert timed["value"] is not None and timed["value"] > 0, timed
        assert timed["verdict"] == case.stat.counter_name and timed["unit"] == "ns/packet"
        assert named[f"prog.{case.name}.single_shot"]["value"] > 0
    assert named["prog.xdp_decap.testrun"]["target"] == "<= 60"
    for program in bench_prog.MISS_CASE:
        assert named[f"prog.{program}.restore_overhead"]["unmodified_ns"] > 0
    assert named["prog.empty_xdp.testrun"]["value"] > 0 and named["prog.empty_tc.single_shot"]["value"] > 0


@pytest.mark.slow
def test_prog_live_small(tmp_path):
    results = bench_prog.measure_live(duration=2.5, decap_hooks=("tc",), traffic=("udp64",), profile_dir=tmp_path)
    check_shape(results)
    encap = by_name(results)["prog.live.tc.udp64.sender.tc_encap_from_pods"]
    assert encap["runs"] > 0 and encap["value"] > 0 and encap["target"] == "<= 200"
    assert encap["verdicts"].get("encap_vxlan", 0) > 0, encap["verdicts"]
    if bench_common.perf_available():
        assert encap["profile"]["samples"] > 0
        assert any(leaf["function"] == "bpf_prog:tc_encap_from_pods" for leaf in encap["profile"]["leaf"])
    decap = by_name(results)["prog.live.tc.udp64.receiver.tc_decap"]
    assert decap["runs"] > 0 and decap["verdicts"].get("decap_to_pod", 0) > 0, decap["verdicts"]


# ---------------------------------------------------------------------------- control plane

def test_control_in_process_small():
    results = bench_control.measure_control(sizes=(10,), puts=0, agent=False, netlink_budget=30)
    check_shape(results)
    named = by_name(results)
    for name in ("etcd_list_decode", "map_program", "cold_map_path", "netlink_flanneld", "netlink_apply_peers"):
        assert named[f"control.{name}.10"]["value"] > 0, name
    assert not named["control.netlink_flanneld.10"]["partial"] and named["control.netlink_flanneld.10"]["done"] == 10
    assert named["control.ratio_netlink_flanneld_vs_map.10"]["value"] > 0
    assert not any(r["metric"].startswith("control.agent") for r in results)


@pytest.mark.slow
def test_control_agent_small(tmp_path):
    results = bench_control.measure_control(sizes=(10,), puts=10, netlink_budget=30, agent_budget=60,
                                            profile_dir=tmp_path)
    check_shape(results)
    named = by_name(results)
    for series, _ in bench_control.LATENCY_SERIES:
        p99 = named[f"control.lease_to_map.{series}.p99"]
        assert p99["samples"] == 10 and p99["missing"] == 0 and p99["target"] == "<= 50"
        assert named[f"control.lease_to_map.{series}.p50"]["value"] <= p99["value"]
    cold = named["control.agent_cold.10.peers_programmed"]
    assert not cold["partial"] and cold["entries"] == 10
    fallback = named["control.agent_cold.10.fallback_programmed"]
    assert not fallback["partial"] and fallback["routes"] == 10 and fallback["fallback_pending"] == 0
    assert named["control.agent_rss.idle"]["value"] > 0


def test_control_cleans_up_when_the_worker_fails(monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("worker failed on purpose")
    monkeypatch.setattr(bench_control, "_run_worker", fail)
    with pytest.raises(RuntimeError, match="on purpose"):
        bench_control.measure_control(sizes=(10,), puts=0, agent=False)
    # nothing_left_behind checks the namespace (and the etcd inside it) and the pins


def test_control_refuses_bad_sizes():
    with pytest.raises(ValueError, match="size"):
        bench_control.measure_control(sizes=(0,))
    with pytest.raises(ValueError, match="netlink_budget"):
        bench_control.measure_control(sizes=(10,), netlink_budget=0)


# ---------------------------------------------------------------------------- full runs

@pytest.mark.slow
def test_full_prog_benchmark():
    results = bench_prog.measure_testrun() + bench_prog.measure_live()
    check_shape(results)
    bench_common.print_table(results, "prog")
    bench_common.write_json("prog", results, {"via": "pytest"})


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_full_control_benchmark():
    results = bench_control.measure_control()
    check_shape(results)
    bench_common.print_table(results, "control")
    bench_common.write_json("control", results, {"via": "pytest"})
