"""flanneld's etcd, lease and interface flags for an argparse parser, each also read from the
environment as FLANNELD_<FLAG> (upper case, dashes to underscores), as flanneld reads them.

    parser = argparse.ArgumentParser()
    add_flanneld_flags(parser)
    args = parser.parse_args()
    etcd = etcd_options_from_args(args)      # raises FlagError for inconsistent flags

A command-line value beats the environment, which beats the default. Bad values are argparse
errors naming the flag (and the variable, when the value came from the environment).
"""
from __future__ import annotations

import argparse
import ipaddress
import os
import re
import threading
from pathlib import Path
from urllib.parse import urlsplit
from typing import Callable, Mapping

from flannel_bpf.controller.config import NetworkConfig, load_network_config_file
from flannel_bpf.controller.kube_annotations import DEFAULT_ANNOTATION_PREFIX
from flannel_bpf.controller.registry import DEFAULT_ENDPOINT, EtcdOptions, SubnetRegistry, parse_endpoint
from flannel_bpf.loader.netdefs import DEFAULT_ETCD_PREFIX, DEFAULT_SUBNET_FILE

ENV_PREFIX = "FLANNELD_"
_TRUE = {"1", "t", "true", "yes", "y", "on"}
_FALSE = {"0", "f", "false", "no", "n", "off"}


class FlagError(ValueError):
    """Flags that are each valid but do not go together."""


class _EnvValue(str):
    """A default taken from the environment: argparse converts string defaults through the
    flag's type, and this remembers which variable the text came from."""

    env_name: str

    def __new__(cls, text: str, env_name: str):
        value = super().__new__(cls, text)
        value.env_name = env_name
        return value


def env_name(flag: str) -> str:
    return ENV_PREFIX + flag.lstrip("-").upper().replace("-", "_")


def _fail(message: str):
    raise argparse.ArgumentTypeError(message)


def _endpoints(value: str) -> tuple[str, ...]:
    endpoints = tuple(e.strip() for e in value.split(",") if e.strip())
    if not endpoints:
        _fail("no endpoint given")
    for endpoint in endpoints:
        try:
            parse_endpoint(endpoint)
        except ValueError as exc:
            _fail(str(exc).removeprefix("--etcd-endpoints: "))
    return endpoints


def _prefix(value: str) -> str:
    if not value.startswith("/") or any(c.isspace() for c in value):
        _fail(f"{value!r} must be an etcd key path starting with '/', like {DEFAULT_ETCD_PREFIX}")
    return value.rstrip("/") or "/"


def _existing_file(value: str) -> str:
    path = Path(value)
    if path.is_dir():
        _fail(f"{value} is a directory, not a file")
    if not path.is_file():
        _fail(f"{value}: no such file")
    return value


def _file_to_write(value: str) -> str:
    path = Path(value)
    if not value or path.is_dir():
        _fail(f"{value!r} is a directory, not a file to write" if value else "must not be empty")
    parent = next((p for p in path.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        _fail(f"{value}: {parent} is not a directory")
    return value


def _api_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        _fail(f"{value!r} is not a URL like https://10.0.0.1:6443")
    return value


def _text(value: str) -> str:
    if not value:
        _fail("must not be empty")
    return value


def _iface(value: str) -> str:
    """An interface name or an IPv4 address on it."""
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        pass
    if not 1 <= len(value) <= 15 or "/" in value or any(c.isspace() for c in value) or value in (".", ".."):
        _fail(f"{value!r} is neither an IPv4 address nor an interface name (1-15 characters, no '/' or spaces)")
    return value


def _regex(value: str) -> re.Pattern:
    try:
        return re.compile(value)
    except re.error as exc:
        _fail(f"{value!r} is not a regular expression: {exc}")


def _ipv4(value: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(value)
    except ValueError:
        _fail(f"{value!r} is not an IPv4 address")


def _ip(value: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        _fail(f"{value!r} is not an IP address")


def _integer(value: str, low: int, high: int, what: str) -> int:
    try:
        number = int(value)
    except ValueError:
        _fail(f"{value!r} is not a whole number")
    if not low <= number <= high:
        _fail(f"{number} is out of range: {what}")
    return number


def _renew_margin(value: str) -> int:
    # flanneld's rule: above 0 and below a day, in minutes.
    return _integer(value, 1, 24 * 60 - 1, "minutes between 1 and 1439 (less than the 24 h lease)")


def _resync(value: str) -> int:
    return _integer(value, 1, 3600, "seconds between 1 and 3600")


def _port(value: str) -> int:
    return _integer(value, 0, 65535, "a TCP port between 1 and 65535, or 0 to disable")


def _bool(value: str) -> bool:
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    _fail(f"{value!r} is not true or false")


def _from_flag_or_env(convert: Callable, repeatable: bool) -> Callable:
    """The flag's argparse type: converts one command-line value, or the whole environment value
    (comma-separated for a repeatable flag), naming the variable in errors."""

    def parse(value):
        try:
            if repeatable and isinstance(value, _EnvValue):
                return [convert(item.strip()) for item in value.split(",") if item.strip()]
            return convert(value)
        except argparse.ArgumentTypeError as exc:
            if isinstance(value, _EnvValue):
                raise argparse.ArgumentTypeError(f"{exc} (from {value.env_name}={str(value)!r})") from None
            raise

    parse.__name__ = convert.__name__.lstrip("_")
    return parse


class _AppendOverDefault(argparse.Action):
    """append, except that the first command-line use replaces the environment's list."""

    def __call__(self, parser, namespace, values, option_string=None):
        current = getattr(namespace, self.dest, None)
        items = [] if current is self.default or not isinstance(current, list) else list(current)
        items.append(values)
        setattr(namespace, self.dest, items)


# (flag, type, default, repeatable, metavar, help)
_FLAGS = (
    ("--etcd-endpoints", _endpoints, DEFAULT_ENDPOINT, False, "URLS", "comma-separated etcd client URLs"),
    ("--etcd-prefix", _prefix, DEFAULT_ETCD_PREFIX, False, "PATH", "etcd key prefix of the flannel network"),
    ("--etcd-keyfile", _existing_file, None, False, "FILE", "TLS key file for etcd"),
    ("--etcd-certfile", _existing_file, None, False, "FILE", "TLS certificate file for etcd"),
    ("--etcd-cafile", _existing_file, None, False, "FILE", "CA bundle that signs etcd's certificate"),
    ("--etcd-username", _text, None, False, "NAME", "etcd user name"),
    ("--etcd-password", _text, None, False, "PASSWORD", "etcd password"),
    ("--iface", _iface, None, True, "NAME|IP", "uplink interface, by name or address (repeatable: first found wins)"),
    ("--iface-regex", _regex, None, True, "REGEX",
     "pick the uplink whose address or name matches (repeatable; used when --iface is not given)"),
    ("--public-ip", _ipv4, None, False, "IP", "IP address other nodes reach this node at (default: the uplink's)"),
    ("--subnet-file", _file_to_write, DEFAULT_SUBNET_FILE, False, "FILE", "where to write subnet.env"),
    ("--subnet-lease-renew-margin", _renew_margin, "60", False, "MINUTES",
     "renew the 24 h lease this many minutes before it expires"),
    ("--net-config-path", _existing_file, None, False, "FILE",
     "read the network config from this file instead of etcd <prefix>/config"),
    ("--ip-masq", _bool, "false", False, "BOOL", "set up flannel's IP masquerade rules for traffic leaving the network"),
    ("--iptables-forward-rules", _bool, "true", False, "BOOL",
     "accept forwarding from and to the flannel network in iptables' FORWARD chain (chain FLANNEL-FWD)"),
    ("--iptables-resync", _resync, "5", False, "SECONDS", "re-check the iptables rules this often, restoring them"),
    ("--kube-subnet-mgr", _bool, "false", False, "BOOL",
     "use the Kubernetes API (node podCIDR and annotations) instead of etcd"),
    ("--kube-api-url", _api_url, None, False, "URL",
     "Kubernetes API server URL (default: the kubeconfig's server, else in-cluster)"),
    ("--kubeconfig-file", _existing_file, None, False, "FILE", "kubeconfig file (default: in-cluster config)"),
    ("--kube-annotation-prefix", _text, DEFAULT_ANNOTATION_PREFIX, False, "PREFIX",
     "prefix of the node annotations that hold the lease"),
    ("--set-node-network-unavailable", _bool, "true", False, "BOOL",
     "set the node's NetworkUnavailable condition to False once the lease is published"),
    ("--healthz-ip", _ip, "0.0.0.0", False, "IP", "address for the /healthz and /readyz endpoints"),
    ("--healthz-port", _port, "0", False, "PORT", "port for /healthz and /readyz (0: no health server)"),
)


def add_flanneld_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup,
                       environ: Mapping[str, str] | None = None) -> None:
    """Add flanneld's flags to `parser` (or an argument group), with defaults from FLANNELD_*."""
    environ = os.environ if environ is None else environ
    for flag, convert, default, repeatable, metavar, help_text in _FLAGS:
        variable = env_name(flag)
        if variable in environ:
            default = _EnvValue(environ[variable], variable)
        elif repeatable:
            default = []
        shown_default = f"; default {default}" if type(default) is str else ""
        help_text = f"{help_text} (env {variable}{shown_default})"
        options = dict(type=_from_flag_or_env(convert, repeatable), default=default, metavar=metavar,
                       help=help_text, dest=flag.lstrip("-").replace("-", "_"))
        if repeatable:
            options["action"] = _AppendOverDefault
        elif convert is _bool:  # --flag alone is true, as Go's boolean flags
            options.update(nargs="?", const=True)
        parser.add_argument(flag, **options)


def etcd_options_from_args(args: argparse.Namespace, timeout: float = 5.0) -> EtcdOptions:
    """EtcdOptions from the parsed flags; FlagError when the flags do not go together."""
    try:
        return EtcdOptions(endpoints=tuple(args.etcd_endpoints), prefix=args.etcd_prefix,
                           keyfile=args.etcd_keyfile, certfile=args.etcd_certfile, cafile=args.etcd_cafile,
                           username=args.etcd_username, password=args.etcd_password, timeout=timeout)
    except ValueError as exc:
        raise FlagError(str(exc)) from None


def load_network_config(net_config_path: str | None, registry: SubnetRegistry,
                        stop: threading.Event | None = None) -> NetworkConfig:
    """The network config from --net-config-path, else from etcd <prefix>/config (waiting for it
    to appear, as flanneld does). Raises ConfigError for a bad config."""
    if net_config_path:
        return load_network_config_file(net_config_path)
    return registry.wait_for_network_config(stop)


def renew_margin_seconds(args: argparse.Namespace) -> int:
    return int(args.subnet_lease_renew_margin) * 60
