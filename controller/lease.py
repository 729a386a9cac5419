"""Subnet leases as flannel stores them in etcd: the key codec and the JSON value codec.

Key:   <prefix>/subnets/10.5.52.0-24
Value: {"PublicIP":"192.168.64.3","PublicIPv6":null,"BackendType":"vxlan","BackendData":{"VNI":1,"VtepMAC":"c6:d2:32:6f:8f:44"}}

The value is written byte-for-byte as flanneld's Go encoding/json writes its LeaseAttrs struct:
fields in declaration order, no spaces, PublicIPv6 always present (null), BackendType and
BackendData left out when empty. Reading matches field names case-insensitively, like Go.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from typing import Any

from flannel_bpf.loader.netdefs import DEFAULT_VNI, check_vni, parse_mac

# flannel's subnetRegex (an optional "&<ipv6>-<len>" tail for dual stack).
_SUBNET_KEY = re.compile(r"(\d+\.\d+.\d+.\d+)-(\d+)(?:&([a-f\d:]+)-(\d+))?$")
_ATTR_FIELDS = ("PublicIP", "PublicIPv6", "BackendType", "BackendData", "BackendV6Data")


class LeaseFormatError(ValueError):
    """A subnet key or lease value that does not parse; the message says what is wrong."""


@dataclass(frozen=True)
class Lease:
    """One node's subnet lease. `backend_data` is the decoded BackendData object (or None)."""

    subnet: IPv4Network
    public_ip: IPv4Address
    backend_type: str
    backend_data: dict | None = None
    public_ipv6: str | None = None
    # Bookkeeping from etcd, not part of the published value.
    etcd_lease_id: int = field(default=0, compare=False)
    mod_revision: int = field(default=0, compare=False)
    expires_at: float | None = field(default=None, compare=False)  # time.time() of expiry, when known

    @property
    def vtep_mac(self) -> str | None:
        return (self.backend_data or {}).get("VtepMAC")

    @property
    def vni(self) -> int | None:
        return (self.backend_data or {}).get("VNI")

    @property
    def published(self) -> tuple:
        """What the lease tells peers; two leases with equal `published` program the same state."""
        return (self.subnet, self.public_ip, self.backend_type, encode_go_json(self.backend_data),
                self.public_ipv6)

    def describe(self) -> str:
        """One readable line, for logs."""
        text = f"{self.subnet} at {self.public_ip} ({self.backend_type or 'no backend type'}"
        if self.vtep_mac:
            text += f", VtepMAC {self.vtep_mac}"
        if self.vni is not None:
            text += f", VNI {self.vni}"
        return text + ")"


@dataclass(frozen=True)
class LeaseAttrs:
    """What a node publishes about itself (flannel's LeaseAttrs)."""

    public_ip: IPv4Address
    backend_type: str
    backend_data: dict | None = None

    def for_subnet(self, subnet: IPv4Network, **bookkeeping) -> Lease:
        return Lease(subnet=subnet, public_ip=self.public_ip, backend_type=self.backend_type,
                     backend_data=self.backend_data, **bookkeeping)


def vxlan_backend_data(vni: int, vtep_mac: str) -> dict:
    """BackendData of a vxlan lease, in flannel's field order ({"VNI":1,"VtepMAC":"..."})."""
    return {"VNI": check_vni(vni), "VtepMAC": parse_mac(vtep_mac, "VtepMAC")}


def lease_type_of(backend_type: str) -> str:
    """The BackendType a node with this Backend.Type publishes and reads from its peers."""
    return "vxlan" if backend_type == "bpf" else backend_type


def node_lease_attrs(backend_type: str, public_ip: IPv4Address | str, vni: int = DEFAULT_VNI,
                     vtep_mac: str | None = None) -> LeaseAttrs:
    """What a node with this Backend.Type publishes. "bpf" publishes flannel's vxlan lease (same
    BackendType and BackendData), so stock vxlan nodes program routes to it; "host-gw" publishes a
    host-gw lease without BackendData."""
    public_ip = IPv4Address(public_ip)
    if backend_type == "host-gw":
        return LeaseAttrs(public_ip, "host-gw")
    if backend_type not in ("bpf", "vxlan"):
        raise ValueError(f"backend type {backend_type!r} publishes no lease flannel-bpf knows")
    if vtep_mac is None:
        raise ValueError(f"a {backend_type} lease needs the VtepMAC of the node's flannel.{vni} device")
    return LeaseAttrs(public_ip, "vxlan", vxlan_backend_data(vni, vtep_mac))


def subnet_key(prefix: str, subnet: IPv4Network) -> str:
    return f"{prefix.rstrip('/')}/subnets/{subnet.network_address}-{subnet.prefixlen}"


def subnets_prefix(prefix: str) -> str:
    return f"{prefix.rstrip('/')}/subnets/"


def parse_subnet_key(key: str | bytes) -> IPv4Network:
    """The subnet named by a lease key (flannel's ParseSubnetKey). Raises LeaseFormatError."""
    text = key.decode(errors="replace") if isinstance(key, bytes) else key
    match = _SUBNET_KEY.search(text)
    if not match:
        raise LeaseFormatError(f"key {shorten(text)!r} does not end in a subnet like 10.5.52.0-24")
    try:
        prefixlen = int(match.group(2))
        if prefixlen > 32:
            raise ValueError
        return IPv4Network((IPv4Address(match.group(1)), prefixlen))
    except ValueError:
        raise LeaseFormatError(f"key {shorten(text)!r} does not name an aligned IPv4 subnet") from None


def parse_lease_key(key: str | bytes, subnets_key_prefix: str) -> IPv4Network:
    """The subnet of a key directly under `subnets_key_prefix` (<prefix>/subnets/), spelled as
    flannel spells it. A deeper key or any other text around the subnet raises
    LeaseFormatError: two keys must never name the same subnet."""
    text = key.decode(errors="replace") if isinstance(key, bytes) else key
    name = text[len(subnets_key_prefix):] if text.startswith(subnets_key_prefix) else text
    subnet = parse_subnet_key(name)
    if name.split("&", 1)[0] != f"{subnet.network_address}-{subnet.prefixlen}":
        raise LeaseFormatError(f"key {shorten(text)!r} is not {subnets_key_prefix}"
                               f"{subnet.network_address}-{subnet.prefixlen}")
    return subnet


def shorten(text: str, limit: int = 120) -> str:
    """Text quoted in a message or log line: a hostile key or value may be a megabyte long."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"


def encode_go_json(value: Any) -> str:
    """JSON as Go's encoding/json writes it: compact, UTF-8, with <, > and & escaped."""
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                         ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, escape)
    return text


def encode_lease_value(lease: Lease | LeaseAttrs) -> bytes:
    """The etcd value flanneld writes for these attributes, byte for byte."""
    parts = [f'"PublicIP":{encode_go_json(str(lease.public_ip))}',
             f'"PublicIPv6":{encode_go_json(getattr(lease, "public_ipv6", None))}']
    if lease.backend_type:
        parts.append(f'"BackendType":{encode_go_json(lease.backend_type)}')
    if lease.backend_data is not None:
        parts.append(f'"BackendData":{encode_go_json(lease.backend_data)}')
    return ("{" + ",".join(parts) + "}").encode()


def decode_lease(key: str | bytes, value: bytes | str, **bookkeeping) -> Lease:
    """A Lease from an etcd key and value. Raises LeaseFormatError naming what is wrong."""
    subnet = parse_subnet_key(key)
    try:
        document = json.loads(value)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LeaseFormatError(f"value is not JSON ({getattr(exc, 'msg', exc)})") from None
    if not isinstance(document, dict):
        raise LeaseFormatError("value is not a JSON object")
    attrs = {}
    for name, item in document.items():
        canonical = next((f for f in _ATTR_FIELDS if f.lower() == name.lower()), None)
        if canonical is not None:  # Go ignores fields it does not know
            attrs[canonical] = item

    public_ip = attrs.get("PublicIP")
    if not isinstance(public_ip, str):
        raise LeaseFormatError(f"PublicIP is {'missing' if public_ip is None else 'not a string'}")
    try:
        public_ip = IPv4Address(public_ip)
    except ValueError:
        raise LeaseFormatError(f"PublicIP {shorten(public_ip)!r} is not an IPv4 address") from None
    public_ipv6 = attrs.get("PublicIPv6")
    if public_ipv6 is not None and not isinstance(public_ipv6, str):
        raise LeaseFormatError("PublicIPv6 is neither null nor a string")
    return lease_from_fields(subnet, public_ip, attrs.get("BackendType", ""), attrs.get("BackendData"),
                             public_ipv6=public_ipv6, **bookkeeping)


def lease_from_fields(subnet: IPv4Network, public_ip: IPv4Address, backend_type, backend_data,
                      **extra) -> Lease:
    """A Lease from its decoded fields, wherever they were stored (etcd value, node
    annotations). Raises LeaseFormatError naming what is wrong."""
    if not isinstance(backend_type, str):
        raise LeaseFormatError("BackendType is not a string")
    if backend_type == "vxlan":
        backend_data = _check_vxlan_data(backend_data)
    return Lease(subnet=subnet, public_ip=public_ip, backend_type=backend_type, backend_data=backend_data,
                 **extra)


def _check_vxlan_data(data: Any) -> dict:
    """A vxlan lease is only usable with a VtepMAC; VNI is optional (older flannel omits it)."""
    if not isinstance(data, dict):
        raise LeaseFormatError("vxlan lease has no BackendData object")
    folded = {k.lower(): v for k, v in data.items()}
    try:
        checked = {"VtepMAC": parse_mac(folded.get("vtepmac"), "vxlan BackendData.VtepMAC")}
        if "vni" in folded:
            checked = {"VNI": check_vni(folded["vni"], "vxlan BackendData.VNI"), **checked}
    except ValueError as err:
        raise LeaseFormatError(str(err)) from None
    return checked
