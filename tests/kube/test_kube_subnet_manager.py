"""The kube subnet manager against a Kubernetes API (the stand-in, or a real cluster with
KUBECONFIG): the lease on the node as flanneld writes it, the podCIDR wait, peers from the node
watch, 410 Gone and outages."""
from __future__ import annotations

import json
import threading
import time
from ipaddress import IPv4Network

import pytest

from flannel_bpf.controller.config import parse_network_config
from flannel_bpf.controller.kube_annotations import annotation_keys
from flannel_bpf.controller.kube_subnet_manager import (NO_POD_CIDR, NOT_A_FLANNEL_NODE, KubeError,
                                                        KubeSubnetManager, own_node_name)
from flannel_bpf.controller.lease_check import BAD_VALUE, PUBLIC_IP_IS_OURS, UNUSABLE_VTEP_MAC
from flannel_bpf.controller.lease import node_lease_attrs
from flannel_bpf.controller.subnet_env import read_subnet_env
from recording_sink import RecordingSink

CONFIG = parse_network_config('{"Network": "10.244.0.0/16", "Backend": {"Type": "bpf"}}')
KEYS = annotation_keys()
OUR_MAC = "0a:58:c6:12:00:0b"
ATTRS = node_lease_attrs("bpf", "198.18.0.11", 1, OUR_MAC)
# What flanneld (vxlan backend, VNI 1) puts on a node whose public IP is 198.18.0.11.
FLANNELD_ANNOTATIONS = {
    "flannel.alpha.coreos.com/backend-data": '{"VNI":1,"VtepMAC":"0a:58:c6:12:00:0b"}',
    "flannel.alpha.coreos.com/backend-type": "vxlan",
    "flannel.alpha.coreos.com/kube-subnet-manager": "true",
    "flannel.alpha.coreos.com/public-ip": "198.18.0.11",
}


def peer_annotations(index: int) -> dict:
    return {
        "flannel.alpha.coreos.com/backend-data": '{"VNI":1,"VtepMAC":"0a:58:c6:12:00:%02x"}' % index,
        "flannel.alpha.coreos.com/backend-type": "vxlan",
        "flannel.alpha.coreos.com/kube-subnet-manager": "true",
        "flannel.alpha.coreos.com/public-ip": f"198.18.0.{index}",
    }


@pytest.fixture
def managers(kube_api, tmp_path):
    made = []

    def make(node: str, sink=None, **kwargs) -> KubeSubnetManager:
        manager = KubeSubnetManager(kube_api.client_for_manager(), node, CONFIG, ATTRS, KEYS, mtu=1450,
                                    subnet_file=tmp_path / f"{node}.env", sink=sink, poll_interval=0.1,
                                    backoff_initial=0.05, backoff_max=0.2, **kwargs)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        manager.stop()


def test_lease_is_published_as_flanneld_writes_it(kube_api, managers, tmp_path):
    name = kube_api.create_node(pod_cidr="10.244.7.0/24", annotations={"unrelated": "kept"})
    lease = managers(name).start()
    assert lease.subnet == IPv4Network("10.244.7.0/24")
    node = kube_api.get(name)
    assert node.metadata.annotations == {**FLANNELD_ANNOTATIONS, "unrelated": "kept"}
    env = read_subnet_env(tmp_path / f"{name}.env")
    assert (env["FLANNEL_NETWORK"], env["FLANNEL_SUBNET"], env["FLANNEL_MTU"]) == (
        "10.244.0.0/16", "10.244.7.1/24", "1450")
    condition = next(c for c in node.status.conditions if c.type == "NetworkUnavailable")
    assert (condition.status, condition.reason, condition.message) == (
        "False", "FlannelIsUp", "Flannel is running on this node")


def test_patches_are_flanneld_s_requests(kube_api, standin, managers):
    """Same subresource, patch type and JSON document as flanneld's AcquireLease (a two-way
    strategic merge patch of the annotations) and CompleteLease."""
    name = kube_api.create_node(pod_cidr="10.244.7.0/24")
    managers(name).start()
    patches = [r for r in standin.requests if r.method == "PATCH"]
    assert [(r.path, r.content_type) for r in patches] == [
        (f"/api/v1/nodes/{name}/status", "application/strategic-merge-patch+json")] * 2
    assert json.loads(patches[0].body) == {"metadata": {"annotations": FLANNELD_ANNOTATIONS}}
    conditions = json.loads(patches[1].body)["status"]["conditions"]
    assert [(c["type"], c["status"], c["reason"]) for c in conditions] == [
        ("NetworkUnavailable", "False", "FlannelIsUp")]
    assert list(conditions[0]) == ["type", "status", "lastHeartbeatTime", "lastTransitionTime", "reason",
                                   "message"]  # NodeCondition's field order


def test_restart_patches_nothing_when_the_node_already_says_it(kube_api, standin, managers):
    name = kube_api.create_node(pod_cidr="10.244.7.0/24", annotations=FLANNELD_ANNOTATIONS)
    managers(name, set_network_unavailable=False).start()
    assert not [r for r in standin.requests if r.method == "PATCH"]


def test_other_conditions_are_kept(kube_api, standin, managers):
    name = kube_api.create_node(pod_cidr="10.244.7.0/24")
    kube_api.client.patch(type(kube_api.get(name)).Status, name, {"status": {"conditions": [
        {"type": "Ready", "status": "True", "reason": "KubeletReady"},
        {"type": "NetworkUnavailable", "status": "True", "reason": "NoRouteCreated"}]}})
    managers(name).start()
    conditions = {c.type: (c.status, c.reason) for c in kube_api.get(name).status.conditions}
    assert conditions == {"Ready": ("True", "KubeletReady"), "NetworkUnavailable": ("False", "FlannelIsUp")}


def test_public_ip_overwrite(kube_api, managers):
    name = kube_api.create_node(pod_cidr="10.244.7.0/24", annotations={
        "flannel.alpha.coreos.com/public-ip-overwrite": "198.18.1.77"})
    managers(name).start()
    assert kube_api.get(name).metadata.annotations["flannel.alpha.coreos.com/public-ip"] == "198.18.1.77"


def test_annotation_prefix(kube_api, managers, kube_api_prefix_keys=annotation_keys("example.com/fl")):
    name = kube_api.create_node(pod_cidr="10.244.7.0/24")
    manager = managers(name)
    manager.keys = kube_api_prefix_keys
    manager.start()
    annotations = kube_api.get(name).metadata.annotations
    assert annotations["example.com/fl-backend-type"] == "vxlan"
    assert not any(k.startswith("flannel.alpha.coreos.com/") for k in annotations)


def test_waits_while_the_pod_cidr_is_empty(kube_api, managers, tmp_path, caplog):
    name = kube_api.create_node()
    manager = managers(name)
    result = {}
    thread = threading.Thread(target=lambda: result.update(lease=manager.start()))
    thread.start()
    deadline = time.monotonic() + 10
    while "has no podCIDR assigned yet; waiting" not in caplog.text:
        assert time.monotonic() < deadline, "the manager never said it waits for the podCIDR"
        time.sleep(0.05)
    assert thread.is_alive() and not (tmp_path / f"{name}.env").exists()
    kube_api.set_pod_cidr(name, "10.244.9.0/24")
    thread.join(10)
    assert result["lease"].subnet == IPv4Network("10.244.9.0/24")
    assert read_subnet_env(tmp_path / f"{name}.env")["FLANNEL_SUBNET"] == "10.244.9.1/24"


def test_stop_ends_the_wait(kube_api, tmp_path):
    name = kube_api.create_node()
    stop = threading.Event()
    manager = KubeSubnetManager(kube_api.client_for_manager(), name, CONFIG, ATTRS, KEYS, mtu=1450,
                                subnet_file=tmp_path / "s.env", stop=stop, poll_interval=0.1)
    threading.Timer(0.3, stop.set).start()
    with pytest.raises(InterruptedError, match="stopped while waiting"):
        manager.start()


def test_pod_cidr_outside_the_network_stops_the_agent(kube_api, managers):
    name = kube_api.create_node(pod_cidr="10.99.1.0/24")
    with pytest.raises(KubeError, match="doesn't contain 10.99.1.0/24 PodCIDR"):
        managers(name).start()


def test_peers_follow_the_nodes(kube_api, managers):
    own = kube_api.create_node(pod_cidr="10.244.1.0/24")
    a = kube_api.create_node(pod_cidr="10.244.2.0/24", annotations=peer_annotations(12))
    bare = kube_api.create_node(pod_cidr="10.244.3.0/24")                         # no flannel on it
    no_cidr = kube_api.create_node(annotations=peer_annotations(14))              # no podCIDR yet
    bad = kube_api.create_node(pod_cidr="10.244.5.0/24",
                               annotations={**peer_annotations(15),
                                            "flannel.alpha.coreos.com/backend-data": '{"VNI":1}'})
    sink = RecordingSink()
    manager = managers(own, sink=sink)
    manager.start()
    sink.wait_for_peers([IPv4Network("10.244.2.0/24")])
    assert manager.skipped.current() == {NOT_A_FLANNEL_NODE: 1, NO_POD_CIDR: 1, BAD_VALUE: 1}
    assert sink.state()[IPv4Network("10.244.2.0/24")].vtep_mac == "0a:58:c6:12:00:0c"

    kube_api.annotate(bare, peer_annotations(13))                                 # flannel starts there
    kube_api.set_pod_cidr(no_cidr, "10.244.4.0/24")                               # gets its podCIDR
    sink.wait_for_peers([IPv4Network(f"10.244.{i}.0/24") for i in (2, 3, 4)])
    kube_api.annotate(a, {"flannel.alpha.coreos.com/backend-data": '{"VNI":1,"VtepMAC":"0a:58:c6:12:00:99"}'})
    sink.wait_for(lambda s: s.state()[IPv4Network("10.244.2.0/24")].vtep_mac == "0a:58:c6:12:00:99",
                  what="the changed VtepMAC")
    kube_api.delete(a)
    kube_api.annotate(bad, {"flannel.alpha.coreos.com/backend-data": '{"VNI":1,"VtepMAC":"0a:58:c6:12:00:0f"}'})
    sink.wait_for_peers([IPv4Network(f"10.244.{i}.0/24") for i in (3, 4, 5)])
    assert [e.kind for e in sink.events if e.lease.subnet == IPv4Network("10.244.2.0/24")] == [
        "added", "changed", "removed"]
    assert manager.skipped.current() == {}
    # A peer that turns malformed is removed, not left programmed with stale values.
    kube_api.annotate(bad, {"flannel.alpha.coreos.com/public-ip": "not-an-ip"})
    sink.wait_for_peers([IPv4Network(f"10.244.{i}.0/24") for i in (3, 4)])
    assert manager.skipped.current() == {BAD_VALUE: 1}
    assert len({*sink.threads}) == 1


def test_410_gone_lists_again(kube_api, standin, managers, caplog):
    own = kube_api.create_node(pod_cidr="10.244.1.0/24")
    a = kube_api.create_node(pod_cidr="10.244.2.0/24", annotations=peer_annotations(12))
    sink = RecordingSink()
    managers(own, sink=sink).start()
    sink.wait_for_peers([IPv4Network("10.244.2.0/24")])
    lists = lambda: sum(1 for r in standin.requests
                        if r.method == "GET" and r.path == "/api/v1/nodes" and "watch" not in r.query)
    assert lists() == 1
    # Changes whose history is gone before the watch saw them reach the manager only through
    # a new listing.
    with standin.watches_held():
        kube_api.delete(a)
        kube_api.create_node(pod_cidr="10.244.3.0/24", annotations=peer_annotations(13))
        standin.compact()
    sink.wait_for_peers([IPv4Network("10.244.3.0/24")])
    assert lists() == 2
    assert "is too old (410 Gone); listing again" in caplog.text


def test_outage_reconnects_with_backoff(kube_api, standin, managers, caplog):
    own = kube_api.create_node(pod_cidr="10.244.1.0/24")
    sink = RecordingSink()
    manager = managers(own, sink=sink)
    manager.start()
    assert manager.wait_synced(10)
    assert standin.wait_for_watches(1), "the manager never opened its watch"
    standin.fail_next.extend([503] * 4)
    standin.drop_watches()
    deadline = time.monotonic() + 10
    while standin.fail_next:
        assert time.monotonic() < deadline, "the watch was never resumed"
        time.sleep(0.05)
    kube_api.create_node(pod_cidr="10.244.2.0/24", annotations=peer_annotations(12))
    sink.wait_for_peers([IPv4Network("10.244.2.0/24")])
    assert manager.reconnect_count == 1
    assert "node watch interrupted" in caplog.text and "re-established" in caplog.text


def test_node_name_from_the_pod(kube_api, standin):
    standin.put_pod("kube-flannel", "kube-flannel-ds-abcde", "worker-3")
    client = kube_api.client_for_manager()
    assert own_node_name(client, {"NODE_NAME": "n1"}) == "n1"
    assert own_node_name(client, {"POD_NAME": "kube-flannel-ds-abcde", "POD_NAMESPACE": "kube-flannel"}) == "worker-3"
    with pytest.raises(KubeError, match="POD_NAME and POD_NAMESPACE must be set"):
        own_node_name(client, {})
    with pytest.raises(KubeError, match="error retrieving pod spec for 'kube-flannel/gone'"):
        own_node_name(client, {"POD_NAME": "gone", "POD_NAMESPACE": "kube-flannel"})


def test_hostile_nodes_are_checked_at_the_door(kube_api, managers):
    """The same lease check as etcd leases: a broadcast VtepMAC, or our own address as a
    peer's public IP, is skipped and counted by reason."""
    own = kube_api.create_node(pod_cidr="10.244.1.0/24")
    kube_api.create_node(pod_cidr="10.244.2.0/24", annotations={
        **peer_annotations(12), "flannel.alpha.coreos.com/backend-data": '{"VNI":1,"VtepMAC":"ff:ff:ff:ff:ff:ff"}'})
    kube_api.create_node(pod_cidr="10.244.3.0/24", annotations={
        **peer_annotations(13), "flannel.alpha.coreos.com/public-ip": "198.18.0.11"})
    kube_api.create_node(pod_cidr="10.244.4.0/24", annotations=peer_annotations(14))
    sink = RecordingSink()
    manager = managers(own, sink=sink)
    manager.start()
    sink.wait_for_peers([IPv4Network("10.244.4.0/24")])
    assert manager.skipped.current() == {UNUSABLE_VTEP_MAC: 1, PUBLIC_IP_IS_OURS: 1}


def test_a_silently_dead_watch_is_noticed(kube_api, standin, managers, caplog):
    """A watch connection that goes quiet for longer than the server's watch timeout (a link
    that died without a FIN) is given up and resumed."""
    own = kube_api.create_node(pod_cidr="10.244.1.0/24")
    sink = RecordingSink()
    manager = managers(own, sink=sink, watch_timeout=1)
    manager.start()
    assert manager.wait_synced(10)
    assert standin.wait_for_watches(1), "the manager never opened its watch"
    standin.silent_watches = True
    standin.drop_watches()
    deadline = time.monotonic() + 20
    while manager.watch_down_for() is None:
        assert time.monotonic() < deadline, "the dead watch was never noticed"
        time.sleep(0.1)
    standin.silent_watches = False
    kube_api.create_node(pod_cidr="10.244.2.0/24", annotations=peer_annotations(12))
    sink.wait_for_peers([IPv4Network("10.244.2.0/24")], timeout=20)
    assert manager.watch_down_for() is None and manager.reconnect_count == 1
