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

