"""Fixtures for the control plane against a real etcd (127.0.0.1 only).

One etcd serves the whole session; every test works under its own key prefix. Tests that kill
members or need a cluster start their own with `etcd_cluster`. Everything started here is
stopped and removed at teardown, also when the test fails.
"""
from __future__ import annotations

import json
import logging
import threading
import uuid
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from flannel_bpf.controller.lease import Lease, LeaseAttrs, vxlan_backend_data
from flannel_bpf.controller.peers import PeerEvent
from flannel_bpf.controller.registry import EtcdOptions, SubnetRegistry
from flannel_bpf.controller.subnet_manager import EtcdSubnetManager
from flannel_bpf.lab.etcd import EtcdCluster
from recording_sink import RecordingSink

NETWORK = {"Network": "10.244.0.0/16", "Backend": {"Type": "vxlan", "VNI": 1}}


def vxlan_attrs(index: int) -> LeaseAttrs:
    """A node numbered `index`: public IP 198.18.<index/250>.<index%250+2>, a VtepMAC from it."""
    ip = IPv4Address(f"198.18.{index // 250}.{index % 250 + 2}")
    return LeaseAttrs(ip, "vxlan", vxlan_backend_data(1, "0e:2a:%02x:%02x:%02x:%02x" % tuple(ip.packed)))


@pytest.fixture(autouse=True)
def info_logs(caplog):
    """The control plane's info lines (leases, races, peers) are part of what tests check."""
    caplog.set_level(logging.INFO, logger="flannel_bpf")


@pytest.fixture(scope="session")
def node_attrs():
    """node_attrs(index) -> LeaseAttrs of node `index` (see vxlan_attrs)."""
    return vxlan_attrs


@pytest.fixture(scope="session")
def network_doc() -> dict:
    return json.loads(json.dumps(NETWORK))


@pytest.fixture(scope="session")
def etcd():
    with EtcdCluster(size=1) as cluster:
        yield cluster


@pytest.fixture
def etcd_cluster():
    """Start clusters of any size for one test: etcd_cluster(size) -> EtcdCluster."""
    clusters = []

    def start(size: int = 1, **options) -> EtcdCluster:
        cluster = EtcdCluster(size=size, **options)
        clusters.append(cluster)
        return cluster.start()

    yield start
    for cluster in clusters:
        cluster.destroy()


@pytest.fixture
def prefix() -> str:
    return f"/test-{uuid.uuid4().hex[:8]}/coreos.com/network"


@pytest.fixture
def open_registry():
    """open_registry(endpoints, prefix) -> SubnetRegistry, closed at teardown."""
    registries = []

    def make(endpoints, prefix: str, **options) -> SubnetRegistry:
        registry = SubnetRegistry(EtcdOptions(endpoints=tuple(endpoints), prefix=prefix, **options))
        registries.append(registry)
        return registry

    yield make
    for registry in registries:
        registry.close()


@pytest.fixture
def registry(etcd, prefix, open_registry) -> SubnetRegistry:
    return open_registry(etcd.endpoints, prefix)


@pytest.fixture
def agents(etcd, prefix, open_registry, tmp_path):
    """agents(index, ...) -> (EtcdSubnetManager, RecordingSink): a node agent, started unless
    start=False, stopped at teardown. Short TTLs and backoffs come in as keywords."""
    made: list[EtcdSubnetManager] = []

    def make(index: int, *, config=None, endpoints=None, prefix_=None, start: bool = True,
             subnet_file: Path | None = None, attrs: LeaseAttrs | None = None, ttl: int = 30,
             renew_margin: float = 10, etcd_options: dict | None = None, **keywords):
        registry = open_registry(endpoints or etcd.endpoints, prefix_ or prefix, **(etcd_options or {}))
        if config is None:
            config = registry.wait_for_network_config()
        sink = RecordingSink()
        manager = EtcdSubnetManager(registry, config, attrs or vxlan_attrs(index), mtu=1450,
                                subnet_file=subnet_file or tmp_path / f"agent{index}" / "subnet.env",
                                sink=sink, on_lease_reacquired=sink.on_lease_reacquired, ttl=ttl,
                                renew_margin=renew_margin, **keywords)
        made.append(manager)
        if start:
            manager.start()
        return manager, sink

    yield make
    for manager in made:
        manager.stop()


@pytest.fixture
def network_config(registry):
    """The default network config stored under this test's prefix."""
    return registry.put_network_config(json.dumps(NETWORK))
