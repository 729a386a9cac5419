"""The lab in Kubernetes mode (`lab up --kube`): the Kubernetes API stand-in as its API server.

The stand-in (lab/kube_standin.py) runs in the underlay namespace on 198.18.0.254:6443, where
only the lab's hosts reach it. Every host gets a node object named after its namespace with a
podCIDR (10.244.I.0/24 for host I, as the controller manager would assign one), and its agent
runs with --kube-subnet-mgr, NODE_NAME and net-conf.json from a file, as a kube-flannel pod does.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from ipaddress import IPv4Network
from pathlib import Path

from lightkube import ApiError
from lightkube.models.core_v1 import NodeSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Node

from flannel_bpf.controller.kube_subnet_manager import kube_client, server_config
from flannel_bpf.lab.nshttp import http_get
from flannel_bpf.lab.run import nsenter_argv
from flannel_bpf.lab.topology import UNDERLAY_BRIDGE_ADDRESS, Host, KubeApiState, Lab, LabError, run_dir
from flannel_bpf.loader.netns import in_netns

KUBE_API_PORT = 6443
START_TIMEOUT = 20.0


def start_kube_api(lab: Lab) -> KubeApiState:
    """Start the stand-in in the underlay namespace and wait until it answers."""
    url = f"http://{UNDERLAY_BRIDGE_ADDRESS.ip}:{KUBE_API_PORT}"
    directory = run_dir(lab.name)
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / "kube-api.log"
    argv = [sys.executable, "-m", "flannel_bpf.lab.kube_standin", "--listen",
            f"{UNDERLAY_BRIDGE_ADDRESS.ip}:{KUBE_API_PORT}"]
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(nsenter_argv(lab.state.underlay_netns, argv), stdin=subprocess.DEVNULL,
                                   stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    lab.state.kube = KubeApiState(url=url, pid=process.pid, log_path=str(log_path),
                                  net_config_path=str(directory / "net-conf.json"))
    lab.save()
    deadline = time.monotonic() + START_TIMEOUT
    while http_get(lab.state.underlay_netns, f"{url}/api/v1/nodes", timeout=1.0)[0] != 200:
        if process.poll() is not None or time.monotonic() > deadline:
            raise LabError(f"the Kubernetes API stand-in did not come up at {url}; log {log_path}")
        time.sleep(0.1)
    return lab.state.kube


def write_net_conf(lab: Lab, config: dict) -> None:
    """net-conf.json as the kube-flannel ConfigMap holds it, in a file every agent reads."""
    Path(lab.state.kube.net_config_path).write_text(json.dumps(config, indent=2) + "\n")
    lab.state.network_config = config
    lab.save()


def node_name(host: Host) -> str:
    return host.netns


def pod_cidr(host: Host) -> IPv4Network:
    return IPv4Network(f"10.244.{host.index}.0/24")


def _call(lab: Lab, operation):
    """operation(client) from inside the underlay namespace (sockets are made there)."""
    if lab.state.kube is None:
        raise LabError(f"lab {lab.name} is not in Kubernetes mode")
    with in_netns(lab.state.underlay_netns):
        client = kube_client(server_config(lab.state.kube.url))
        try:
            return operation(client)
        finally:
            client.close()


def register_node(lab: Lab, host: Host) -> None:
    """The host's node object with its podCIDR (kept if it exists: a restarted agent's node)."""
    node = Node(metadata=ObjectMeta(name=node_name(host)),
                spec=NodeSpec(podCIDR=str(pod_cidr(host)), podCIDRs=[str(pod_cidr(host))]))

    def create(client):
        try:
            client.create(node)
        except ApiError as exc:
            if exc.status.code != 409:
                raise

    _call(lab, create)


def node_annotations(lab: Lab, host: Host) -> dict[str, str]:
    return dict(_call(lab, lambda c: c.get(Node, node_name(host))).metadata.annotations or {})


def agent_flags(lab: Lab) -> list[str]:
    return ["--kube-subnet-mgr", "--kube-api-url", lab.state.kube.url,
            "--net-config-path", lab.state.kube.net_config_path]
