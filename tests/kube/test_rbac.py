"""The ClusterRole of deploy/kube-flannel-bpf.yml grants exactly the calls the agent's subnet
manager makes: derived here from the requests the stand-in saw during a whole run."""
import time
from ipaddress import IPv4Network
from pathlib import Path

import yaml

from flannel_bpf.controller.config import parse_network_config
from flannel_bpf.controller.kube_annotations import annotation_keys
from flannel_bpf.controller.kube_subnet_manager import KubeSubnetManager, own_node_name
from flannel_bpf.controller.lease import node_lease_attrs
from recording_sink import RecordingSink

MANIFEST = Path(__file__).resolve().parents[2] / "deploy/kube-flannel-bpf.yml"


def verb_of(request) -> tuple[str, str]:
    parts = [p for p in request.path.split("/") if p][2:]
    if parts[0] == "namespaces":
        parts = parts[2:]
    resource = parts[0] if len(parts) < 3 else f"{parts[0]}/{parts[2]}"
    if request.method == "GET":
        verb = "watch" if request.query.get("watch") else ("get" if len(parts) >= 2 else "list")
    else:
        verb = request.method.lower()
    return resource, verb


def test_cluster_role_is_exactly_what_the_manager_calls(kube_api, standin, tmp_path):
    own = kube_api.create_node(pod_cidr="10.244.1.0/24")
    kube_api.create_node(pod_cidr="10.244.2.0/24", annotations={
        "flannel.alpha.coreos.com/backend-data": '{"VNI":1,"VtepMAC":"0a:58:c6:12:00:0c"}',
        "flannel.alpha.coreos.com/backend-type": "vxlan",
        "flannel.alpha.coreos.com/kube-subnet-manager": "true",
        "flannel.alpha.coreos.com/public-ip": "198.18.0.12"})
    standin.put_pod("kube-flannel", "kube-flannel-ds-x1", own)
    first = len(standin.requests)
    client = kube_api.client_for_manager()
    node = own_node_name(client, {"POD_NAME": "kube-flannel-ds-x1", "POD_NAMESPACE": "kube-flannel"})
    sink = RecordingSink()
    manager = KubeSubnetManager(client, node, parse_network_config('{"Network":"10.244.0.0/16","Backend":{"Type":"bpf"}}'),
                                node_lease_attrs("bpf", "198.18.0.11", 1, "0a:58:c6:12:00:0b"), annotation_keys(),
                                mtu=1450, subnet_file=tmp_path / "subnet.env", sink=sink)
    try:
        manager.start()
        sink.wait_for_peers([IPv4Network("10.244.2.0/24")])
        deadline = time.monotonic() + 10
        while not any(r.query.get("watch") for r in standin.requests[first:]):
            assert time.monotonic() < deadline, "the manager never watched the nodes"
            time.sleep(0.05)
    finally:
        manager.stop()
    used = {verb_of(r) for r in standin.requests[first:]}
    role = next(d for d in yaml.safe_load_all(MANIFEST.read_text()) if d and d["kind"] == "ClusterRole")
    granted = {(resource, verb) for rule in role["rules"] for resource in rule["resources"] for verb in rule["verbs"]}
    assert used == granted
