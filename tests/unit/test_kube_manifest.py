"""deploy/kube-flannel-bpf.yml: every document valid against the Kubernetes JSON schemas of a
current release (kubernetes-validate, offline, strict), and saying what the agent needs."""
import argparse
import json
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from flannel_bpf.commands.attach import add_agent_flags
from flannel_bpf.controller.config import parse_network_config
from flannel_bpf.controller.flags import add_flanneld_flags

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((REPO / "deploy").rglob("*.yml")) + sorted((REPO / "deploy").rglob("*.yaml"))
KUBERNETES = kubernetes_validate.latest_version()


def documents(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def by_kind(kind: str) -> dict:
    return next(d for d in documents(REPO / "deploy/kube-flannel-bpf.yml") if d["kind"] == kind)


def test_validator_is_for_a_current_kubernetes():
    assert tuple(int(x) for x in KUBERNETES.split(".")[:2]) >= (1, 34)
    assert REPO / "deploy/kube-flannel-bpf.yml" in MANIFESTS


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_manifest_is_valid(path):
    for document in documents(path):
        kubernetes_validate.validate(document, KUBERNETES, strict=True)


def test_the_validator_rejects_a_broken_daemonset():
    broken = by_kind("DaemonSet")
    broken["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilities"]["add"] = "NET_ADMIN"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES, strict=True)


def test_config_map_holds_a_bpf_network_and_flannel_s_cni_chain():
    data = by_kind("ConfigMap")["data"]
    assert parse_network_config(data["net-conf.json"]).backend.type == "bpf"
    assert [p["type"] for p in json.loads(data["cni-conf.json"])["plugins"]] == ["flannel", "portmap"]


def test_agent_container():
    pod = by_kind("DaemonSet")["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    agent = next(c for c in pod["containers"] if c["name"] == "kube-flannel")
    security = agent["securityContext"]
    assert security["privileged"] is False and security["capabilities"]["drop"] == ["ALL"]
    assert set(security["capabilities"]["add"]) == {"NET_ADMIN", "SYS_ADMIN"}
    # The command line is one our own parser accepts, in Kubernetes mode, with health on.
    parser = argparse.ArgumentParser()
    add_flanneld_flags(parser, environ={})
    add_agent_flags(parser)
    assert agent["command"][-1] == "attach"
    args = parser.parse_args(agent["args"])
    assert args.kube_subnet_mgr is True and args.ip_masq is True
    assert agent["livenessProbe"]["httpGet"] == {"host": args.healthz_ip, "port": args.healthz_port, "path": "/healthz"}
    assert agent["readinessProbe"]["httpGet"] == {"host": args.healthz_ip, "port": args.healthz_port, "path": "/readyz"}
    assert {e["name"] for e in agent["env"]} == {"POD_NAME", "POD_NAMESPACE"}
    mounts = {m["mountPath"]: m for m in agent["volumeMounts"]}
    assert {"/run/flannel", "/etc/kube-flannel/", "/sys/fs/bpf", "/lib/modules", "/usr/src"} <= set(mounts)
    assert agent["resources"]["requests"]


def test_bpffs_is_mounted_bidirectionally_by_the_only_privileged_container():
    pod = by_kind("DaemonSet")["spec"]["template"]["spec"]
    privileged = [c["name"] for c in pod["initContainers"] + pod["containers"]
                  if c.get("securityContext", {}).get("privileged")]
    assert privileged == ["mount-bpffs"]
    mount = next(c for c in pod["initContainers"] if c["name"] == "mount-bpffs")["volumeMounts"][0]
    assert (mount["mountPath"], mount["mountPropagation"]) == ("/sys/fs/bpf", "Bidirectional")
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mount["name"]]["hostPath"]["path"] == "/sys/fs/bpf"
    assert {"path": "/etc/cni/net.d"} == volumes["cni"]["hostPath"]


def test_cluster_role_grants_exactly_the_agent_s_calls():
    rules = {(r["resources"][0], verb) for r in by_kind("ClusterRole")["rules"] for verb in r["verbs"]}
    assert all(len(r["resources"]) == 1 for r in by_kind("ClusterRole")["rules"])
    # tests/kube/test_rbac.py derives the same set from the requests the manager makes.
    assert rules == {("pods", "get"), ("nodes", "get"), ("nodes", "list"), ("nodes", "watch"),
                     ("nodes/status", "patch")}
