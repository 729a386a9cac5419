"""The Kubernetes API the kube subnet manager is tested against.

Without KUBECONFIG: the in-process Kubernetes API STAND-IN (flannel_bpf.lab.kube_standin),
served over real HTTP on 127.0.0.1 and driven through the real client library. With KUBECONFIG
set: that real cluster (its nodes are left alone; the tests create their own, uniquely named,
and delete them). Tests that need to break the API server (410 Gone, outages, recorded request
bytes) use `standin` and are skipped on a real cluster.
"""
from __future__ import annotations

import logging
import os
import secrets

import pytest
from lightkube import ApiError, Client, KubeConfig
from lightkube.models.core_v1 import NodeSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Node
from lightkube.types import PatchType

from flannel_bpf.controller.kube_subnet_manager import kube_client, server_config
from flannel_bpf.lab.kube_standin import KubeApiStandIn

RUN_TAG = secrets.token_hex(3)


class ApiUnderTest:
    """Nodes made by one test, on the stand-in or a real cluster."""

    def __init__(self, config: KubeConfig, standin: KubeApiStandIn | None):
        self.config = config
        self.standin = standin
        self.client = kube_client(config)
        self.made: list[str] = []
        self._count = 0

    def client_for_manager(self) -> Client:
        return kube_client(self.config)

    def name(self) -> str:
        self._count += 1
        return f"fbpf-test-{RUN_TAG}-{self._count}"

    def create_node(self, name: str | None = None, pod_cidr: str | None = None,
                    annotations: dict | None = None) -> str:
        name = name or self.name()
        self.client.create(Node(metadata=ObjectMeta(name=name, annotations=annotations),
                                spec=NodeSpec(podCIDR=pod_cidr, podCIDRs=[pod_cidr] if pod_cidr else None)))
        self.made.append(name)
        return name

    def get(self, name: str) -> Node:
        return self.client.get(Node, name)

    def annotate(self, name: str, annotations: dict) -> None:
        self.client.patch(Node, name, {"metadata": {"annotations": annotations}}, patch_type=PatchType.MERGE)

    def set_pod_cidr(self, name: str, cidr: str) -> None:
        self.client.patch(Node, name, {"spec": {"podCIDR": cidr, "podCIDRs": [cidr]}})

    def delete(self, name: str) -> None:
        self.client.delete(Node, name)
        self.made.remove(name)

    def cleanup(self) -> None:
        for name in list(self.made):
            try:
                self.client.delete(Node, name)
            except ApiError:
                pass
        self.client.close()


@pytest.fixture
def kube_api():
    if os.environ.get("KUBECONFIG"):
        api = ApiUnderTest(KubeConfig.from_file(os.environ["KUBECONFIG"]), None)
        try:
            yield api
        finally:
            api.cleanup()
        return
    with KubeApiStandIn() as standin:
        api = ApiUnderTest(server_config(standin.url), standin)
        try:
            yield api
        finally:
            api.cleanup()


@pytest.fixture
def standin(kube_api) -> KubeApiStandIn:
    if kube_api.standin is None:
        pytest.skip("breaks or inspects the API server: stand-in only")
    return kube_api.standin


@pytest.fixture(autouse=True)
def info_logs(caplog):
    caplog.set_level(logging.INFO, logger="flannel_bpf")
