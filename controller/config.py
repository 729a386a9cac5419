"""The network configuration (flannel's net-conf.json), parsed and checked as flanneld does.

Field names match case-insensitively, as Go's encoding/json matches them. Defaults and checks
follow flannel's CheckNetworkConfig; on top of those, unknown fields, wrong JSON types, an empty
SubnetMin..SubnetMax range and unsupported backends are errors. Every error is a ConfigError
whose message names the field and the rule it breaks.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path
from typing import Any, Iterator

from flannel_bpf.loader.netdefs import DEFAULT_VNI, DEFAULT_VXLAN_PORT, MAX_VNI, MIN_VNI, VXLAN_OVERHEAD

BACKEND_TYPES = ("bpf", "vxlan", "host-gw")
DECAP_HOOKS = ("auto", "xdp", "tc")

# Top-level fields flannel knows. IPv6 ones are accepted (and ignored) only while EnableIPv6 is false.
_TOP_LEVEL_FIELDS = ("Network", "SubnetLen", "SubnetMin", "SubnetMax", "EnableIPv4", "EnableIPv6",
                     "IPv6Network", "IPv6SubnetLen", "IPv6SubnetMin", "IPv6SubnetMax",
                     "EnableNFTables", "Backend")
# Backend options per type; "Type" is common to all.
_BACKEND_OPTIONS = {
    "bpf": ("VNI", "Port", "DirectRouting", "MTU", "Decap"),
    "vxlan": ("VNI", "Port", "GBP", "Learning", "DirectRouting", "MTU", "MacPrefix"),
    "host-gw": (),
}


class ConfigError(ValueError):
    """A bad network configuration. `field` names the offending field (e.g. "Backend.VNI")."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}" if field_name else message)
        self.field = field_name


@dataclass(frozen=True)
class BackendConfig:
    type: str
    vni: int = DEFAULT_VNI
    port: int = 0
    direct_routing: bool = False
    mtu: int = 0  # 0: derived from the uplink MTU
    decap: str = "auto"
    gbp: bool = False
    learning: bool = False

    @property
    def udp_port(self) -> int:
        """The VXLAN UDP port on the wire (Port 0 means the kernel default, 8472)."""
        return self.port or DEFAULT_VXLAN_PORT

    @property
    def encapsulates(self) -> bool:
        return self.type in ("bpf", "vxlan")

    def pod_mtu(self, uplink_mtu: int) -> int:
        """FLANNEL_MTU for this backend: an explicit MTU, else the uplink's minus the VXLAN
        overhead when encapsulating (flannel's vxlan), else the uplink's (host-gw)."""
        if self.mtu:
            return self.mtu
        return uplink_mtu - VXLAN_OVERHEAD if self.encapsulates else uplink_mtu


@dataclass(frozen=True)
class NetworkConfig:
    network: IPv4Network
    subnet_len: int
    subnet_min: IPv4Address
    subnet_max: IPv4Address
    backend: BackendConfig
    enable_nftables: bool = False
    source: dict = field(default_factory=dict, compare=False, repr=False)

    def fits(self, subnet: IPv4Network) -> bool:
        """flannel's isSubnetConfigCompat: right length and within SubnetMin..SubnetMax."""
        return (subnet.prefixlen == self.subnet_len
                and self.subnet_min <= subnet.network_address <= self.subnet_max)

    def subnets(self) -> Iterator[IPv4Network]:
        """Every subnet from SubnetMin to SubnetMax, in address order."""
        step = 1 << (32 - self.subnet_len)
        for start in range(int(self.subnet_min), int(self.subnet_max) + 1, step):
            yield IPv4Network((start, self.subnet_len))


def parse_network_config(text: str | bytes) -> NetworkConfig:
    """Parse and check net-conf JSON; raises ConfigError naming the field and the rule."""
    try:
        document = json.loads(text)
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"the network config is not UTF-8 text ({exc.reason})") from None
    except json.JSONDecodeError as exc:
        raise ConfigError("", f"the network config is not valid JSON: {exc.msg} at line {exc.lineno} "
                              f"column {exc.colno}") from None
    if not isinstance(document, dict):
        raise ConfigError("", f"the network config must be a JSON object, not {_json_type(document)}")
    fields = _fold_fields(document, _TOP_LEVEL_FIELDS, "")

    if not _typed(fields, "EnableIPv4", bool, True):
        raise ConfigError("EnableIPv4", "must be true: flannel-bpf forwards IPv4 pod networks only")
    if _typed(fields, "EnableIPv6", bool, False):
        raise ConfigError("EnableIPv6", "IPv6 pod networks are not supported by flannel-bpf; set it to false")
    enable_nftables = _typed(fields, "EnableNFTables", bool, False)

    network = _parse_network(fields.get("Network"))
    subnet_len = _typed(fields, "SubnetLen", int, 0)
    if subnet_len < 0:
        raise ConfigError("SubnetLen", f"must be a positive prefix length, not {subnet_len}")
    if subnet_len > 0:
        if subnet_len > 30:
            raise ConfigError("SubnetLen", f"must be at most 30 so each subnet holds a host and a bridge "
                                           f"(got {subnet_len})")
        if subnet_len < network.prefixlen + 2:
            raise ConfigError("SubnetLen", f"must be at least the Network prefix + 2 = {network.prefixlen + 2}, "
                                           f"so that Network holds at least four subnets (got {subnet_len})")
    elif network.prefixlen > 28:
        raise ConfigError("Network", f"{network} is too small: the minimum useful network prefix is /28")
    elif network.prefixlen <= 22:
        subnet_len = 24
    else:
        subnet_len = network.prefixlen + 2

    subnet_size = 1 << (32 - subnet_len)
    subnet_min = _subnet_bound(fields, "SubnetMin", network, subnet_len,
                               default=network.network_address + subnet_size)
    subnet_max = _subnet_bound(fields, "SubnetMax", network, subnet_len,
                               default=IPv4Address(int(network.broadcast_address) + 1 - subnet_size))
    if subnet_min > subnet_max:
        raise ConfigError("SubnetMin", f"{subnet_min} is above SubnetMax {subnet_max}: no subnet to lease")

    return NetworkConfig(network=network, subnet_len=subnet_len, subnet_min=subnet_min,
                         subnet_max=subnet_max, backend=_parse_backend(fields.get("Backend")),
                         enable_nftables=enable_nftables, source=document)


def load_network_config_file(path: str | Path) -> NetworkConfig:
    """Read net-conf.json from a file (--net-config-path)."""
    try:
        text = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError("", f"cannot read the network config file {path}: {exc.strerror}") from None
    return parse_network_config(text)


def _parse_network(value: Any) -> IPv4Network:
    if value is None or value == "":
        raise ConfigError("Network", "missing: please define the pod network as a CIDR, e.g. \"10.244.0.0/16\"")
    if not isinstance(value, str):
        raise ConfigError("Network", f"must be a CIDR string like \"10.244.0.0/16\", not {_json_type(value)}")
    try:
        if "/" not in value:
            raise ValueError(value)
        # Host bits are masked, as Go's net.ParseCIDR does for flannel.
        return IPv4Network(value, strict=False)
    except ValueError:
        raise ConfigError("Network", f"{value!r} is not an IPv4 CIDR like \"10.244.0.0/16\"") from None


def _subnet_bound(fields: dict, name: str, network: IPv4Network, subnet_len: int,
                  default: IPv4Address) -> IPv4Address:
    value = fields.get(name)
    if value is None or value == "0.0.0.0":  # Go's zero value means "not set"
        return default
    if not isinstance(value, str):
        raise ConfigError(name, f"must be an IPv4 address string, not {_json_type(value)}")
    try:
        address = IPv4Address(value)
    except ValueError:
        raise ConfigError(name, f"{value!r} is not an IPv4 address") from None
    if address not in network:
        raise ConfigError(name, f"{address} is not in the range of the Network {network}")
    if int(address) % (1 << (32 - subnet_len)):
        raise ConfigError(name, f"{address} is not on a SubnetLen boundary (/{subnet_len})")
    return address


def _parse_backend(value: Any) -> BackendConfig:
    if value is None:
        raise ConfigError("Backend", "missing: flannel would default to the \"udp\" backend, which flannel-bpf "
                                     f"does not support; set Backend.Type to one of {', '.join(BACKEND_TYPES)}")
    if not isinstance(value, dict):
        raise ConfigError("Backend", f"must be a JSON object with a Type, not {_json_type(value)}")
    type_key = next((k for k in value if k.lower() == "type"), None)
    backend_type = value.get(type_key) if type_key else None
    if not isinstance(backend_type, str) or not backend_type:
        raise ConfigError("Backend.Type", f"missing: must be one of {', '.join(BACKEND_TYPES)}")
    backend_type = backend_type.lower()
    if backend_type not in BACKEND_TYPES:
        raise ConfigError("Backend.Type", f"{value[type_key]!r} is not supported; use one of "
                                          f"{', '.join(BACKEND_TYPES)}")
    known = _BACKEND_OPTIONS[backend_type]
    options = _fold_fields(value, ("Type", *known), "Backend.", context=f"for backend type {backend_type!r}")

    vni = _typed(options, "VNI", int, DEFAULT_VNI, "Backend.")
    if not MIN_VNI <= vni <= MAX_VNI:
        raise ConfigError("Backend.VNI", f"must be between {MIN_VNI} and {MAX_VNI} (got {vni})")
    port = _typed(options, "Port", int, 0, "Backend.")
    if not 0 <= port <= 65535:
        raise ConfigError("Backend.Port", f"must be a UDP port between 1 and 65535, or 0 for the "
                                          f"kernel default {DEFAULT_VXLAN_PORT} (got {port})")
    mtu = _typed(options, "MTU", int, 0, "Backend.")
    if mtu and not 68 <= mtu <= 65535:
        raise ConfigError("Backend.MTU", f"must be between 68 and 65535, or 0 to derive it from the uplink "
                                         f"(got {mtu})")
    decap = _typed(options, "Decap", str, "auto", "Backend.").lower()
    if decap not in DECAP_HOOKS:
        raise ConfigError("Backend.Decap", f"{decap!r} is not a decap hook; use one of {', '.join(DECAP_HOOKS)}")
    _typed(options, "MacPrefix", str, "", "Backend.")
    return BackendConfig(type=backend_type, vni=vni, port=port, mtu=mtu, decap=decap,
                         direct_routing=_typed(options, "DirectRouting", bool, False, "Backend."),
                         gbp=_typed(options, "GBP", bool, False, "Backend."),
                         learning=_typed(options, "Learning", bool, False, "Backend."))


def _fold_fields(document: dict, known: tuple[str, ...], path: str, context: str = "") -> dict:
    """Map each key onto its canonical field name, case-insensitively; unknown or repeated names
    are errors."""
    canonical = {name.lower(): name for name in known}
    folded: dict = {}
    for key, value in document.items():
        name = canonical.get(key.lower())
        if name is None:
            where = f" {context}" if context else ""
            raise ConfigError(path + key, f"unknown field{where}; known fields: {', '.join(known)}")
        if name in folded:
            raise ConfigError(path + name, "given more than once (field names are case-insensitive)")
        folded[name] = value
    return folded


def _typed(fields: dict, name: str, kind: type, default, path: str = ""):
    value = fields.get(name)
    if value is None:
        return default
    # JSON true/false are bools, which Python also counts as ints: keep them apart.
    ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool))
    if not ok:
        wanted = {bool: "true or false", int: "an integer", str: "a string"}[kind]
        raise ConfigError(path + name, f"must be {wanted}, not {_json_type(value)} {json.dumps(value)}")
    return value


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "null"
