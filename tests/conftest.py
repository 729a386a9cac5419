"""Suite-wide options. Fixtures live in each test folder's own conftest.py."""
import os

import pytest


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run slow tests (benchmarks, VM lab)")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="slow: needs --run-slow")
    for item in items:
        if "slow" in item.keywords or "vagrant" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def require_root():
    if os.geteuid() != 0:
        pytest.skip("needs root")
