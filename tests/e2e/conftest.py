"""Every end-to-end test builds namespaces, BPF programs and etcd: root only."""
import pytest


@pytest.fixture(autouse=True)
def _root(require_root):
    pass
