"""Benchmark smoke tests: every benchmark function at tiny sizes, checked for the shape and
sanity of its results (never for speed), and for leaving nothing behind."""
from __future__ import annotations

import os

import pytest

from flannel_bpf.bench.common import BENCH_PIN_ROOT, RUN_PREFIX
from flannel_bpf.loader.netns import list_netns

pytestmark = pytest.mark.usefixtures("require_root")


def pytest_configure(config):
    # etcd3 0.12's generated protobuf modules use descriptor calls newer protobuf deprecates.
    config.addinivalue_line("filterwarnings", r"ignore:Call to deprecated create function:DeprecationWarning")


@pytest.fixture(autouse=True)
def nothing_left_behind():
    """After each test: no scratch namespace and no pin directory of this run."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    yield
    assert [ns for ns in list_netns() if ns.startswith(f"{RUN_PREFIX}-")] == []
    assert not BENCH_PIN_ROOT.exists()


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
