"""A node's subnet lease as flanneld's Kubernetes subnet manager keeps it: in node annotations.

The subnet is the node's spec.podCIDR (assigned by the controller manager). What the node
publishes lives in annotations under a prefix (flanneld's --kube-annotation-prefix, default
flannel.alpha.coreos.com):

    flannel.alpha.coreos.com/backend-data: {"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}
    flannel.alpha.coreos.com/backend-type: vxlan
    flannel.alpha.coreos.com/kube-subnet-manager: "true"
    flannel.alpha.coreos.com/public-ip: 198.18.0.11

Only nodes with kube-subnet-manager "true" are peers. A node's public-ip-overwrite annotation,
when set, is published as its public-ip. The values are written byte for byte as flanneld's Go
code writes them, and only the annotations that differ are patched, as its two-way merge patch
does.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from ipaddress import IPv4Address, IPv4Network

from flannel_bpf.controller.lease import Lease, LeaseAttrs, LeaseFormatError, encode_go_json, lease_from_fields

DEFAULT_ANNOTATION_PREFIX = "flannel.alpha.coreos.com"
# flanneld's check of the prefix (Go's MatchString: not anchored at the start).
_PREFIX_FORMAT = re.compile(r"(?:[a-z0-9_-]+\.)+[a-z0-9_-]+/(?:[a-z0-9_-]+-)?$")
NETWORK_UNAVAILABLE_REASON = "FlannelIsUp"
NETWORK_UNAVAILABLE_MESSAGE = "Flannel is running on this node"


@dataclass(frozen=True)
class AnnotationKeys:
    """The annotation names under one prefix (flanneld's annotations struct)."""

    kube_subnet_manager: str
    backend_data: str
    backend_v6_data: str
    backend_type: str
    public_ip: str
    public_ipv6: str
    node_public_ip: str
    node_public_ipv6: str
    public_ip_overwrite: str
    public_ipv6_overwrite: str


def annotation_keys(prefix: str = DEFAULT_ANNOTATION_PREFIX) -> AnnotationKeys:
    """The keys under `prefix`, by flanneld's rules: at most one slash; without one, "/" is
    appended; a prefix that ends in neither "/" nor "-" gets a "-". ValueError otherwise."""
    slashes = prefix.count("/")
    if slashes > 1:
        raise ValueError(f"--kube-annotation-prefix {prefix!r}: the prefix can contain at most a single slash")
    if slashes == 0:
        prefix += "/"
    if not prefix.endswith(("/", "-")):
        prefix += "-"
    if not _PREFIX_FORMAT.search(prefix):
        raise ValueError(f"--kube-annotation-prefix {prefix!r}: the prefix must be in a format: fqdn/[0-9a-z-_]*")
    return AnnotationKeys(
        kube_subnet_manager=prefix + "kube-subnet-manager", backend_data=prefix + "backend-data",
        backend_v6_data=prefix + "backend-v6-data", backend_type=prefix + "backend-type",
        public_ip=prefix + "public-ip", public_ipv6=prefix + "public-ipv6",
        node_public_ip=prefix + "node-public-ip", node_public_ipv6=prefix + "node-public-ipv6",
        public_ip_overwrite=prefix + "public-ip-overwrite",
        public_ipv6_overwrite=prefix + "public-ipv6-overwrite")


def published_annotations(current: dict[str, str] | None, attrs: LeaseAttrs, keys: AnnotationKeys) -> dict[str, str]:
    """The annotations flanneld's AcquireLease changes on our node ({} when it would patch
    nothing): backend-type, backend-data, public-ip (the public-ip-overwrite annotation when
    set) and kube-subnet-manager "true"."""
    current = dict(current or {})
    data = encode_go_json(attrs.backend_data)  # Go's RawMessage of nothing is null
    public_ip = str(attrs.public_ip)
    overwrite = current.get(keys.public_ip_overwrite, "")
    if (current.get(keys.backend_data) == data and current.get(keys.backend_type) == attrs.backend_type
            and current.get(keys.public_ip) == public_ip and current.get(keys.kube_subnet_manager) == "true"
            and overwrite in ("", public_ip)):
        return {}
    wanted = dict(current)
    wanted[keys.backend_type] = attrs.backend_type
    if attrs.backend_type != "vxlan" or data != "null":
        wanted[keys.backend_data] = data
        wanted[keys.public_ip] = overwrite or public_ip
    wanted[keys.kube_subnet_manager] = "true"
    return {key: value for key, value in wanted.items() if current.get(key) != value}


def annotation_patch(changed: dict[str, str]) -> dict:
    """The strategic merge patch of the node that sets `changed` (flanneld sends it to the
    node's status subresource, which keeps metadata changes)."""
    return {"metadata": {"annotations": dict(sorted(changed.items()))}}


def network_available_patch(now: datetime | None = None) -> dict:
    """flanneld's CompleteLease: the NetworkUnavailable condition set to False, reason
    FlannelIsUp (a strategic merge patch of the status subresource: conditions merge by type)."""
    stamp = (now or datetime.now(timezone.utc)).astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"status": {"conditions": [{
        "type": "NetworkUnavailable", "status": "False", "lastHeartbeatTime": stamp,
        "lastTransitionTime": stamp, "reason": NETWORK_UNAVAILABLE_REASON,
        "message": NETWORK_UNAVAILABLE_MESSAGE}]}}


def pod_cidr(spec_pod_cidr: str | None, spec_pod_cidrs: list[str] | None) -> IPv4Network | None:
    """The node's IPv4 pod subnet as flanneld picks it (podCIDRs when given, else podCIDR);
    None while none is assigned. LeaseFormatError for a malformed or IPv6-only one."""
    cidrs = list(spec_pod_cidrs or []) or ([spec_pod_cidr] if spec_pod_cidr else [])
    if not cidrs:
        return None
    if len(cidrs) > 2:
        raise LeaseFormatError(f"pod CIDRs {cidrs} should be IPv4/IPv6 only or dual stack")
    for text in cidrs:
        if ":" in text:
            continue
        try:
            return IPv4Network(text, strict=False)
        except ValueError:
            raise LeaseFormatError(f"pod CIDR {text!r} is not an IPv4 subnet") from None
    raise LeaseFormatError(f"pod CIDRs {cidrs} hold no IPv4 subnet (flannel-bpf is IPv4 only)")


def is_flannel_node(annotations: dict[str, str] | None, keys: AnnotationKeys) -> bool:
    return (annotations or {}).get(keys.kube_subnet_manager) == "true"


def node_lease(annotations: dict[str, str] | None, subnet: IPv4Network | None, keys: AnnotationKeys) -> Lease:
    """A peer's lease from its node (flanneld's nodeToLease). LeaseFormatError names what is
    missing or malformed."""
    annotations = annotations or {}
    if subnet is None:
        raise LeaseFormatError("no podCIDR assigned")
    public_ip = annotations.get(keys.public_ip)
    if not public_ip:
        raise LeaseFormatError(f"no {keys.public_ip} annotation")
    try:
        public_ip = IPv4Address(public_ip)
    except ValueError:
        raise LeaseFormatError(f"{keys.public_ip} {public_ip!r} is not an IPv4 address") from None
    raw = annotations.get(keys.backend_data, "null")
    try:
        backend_data = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise LeaseFormatError(f"{keys.backend_data} is not JSON ({exc.msg})") from None
    return lease_from_fields(subnet, public_ip, annotations.get(keys.backend_type, ""), backend_data)
