"""subnet.env, the file CNI's flannel plugin reads: written atomically as flanneld writes it.

    FLANNEL_NETWORK=10.5.0.0/16
    FLANNEL_SUBNET=10.5.72.1/24
    FLANNEL_MTU=1450
    FLANNEL_IPMASQ=false
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path

log = logging.getLogger(__name__)


def render_subnet_env(network: IPv4Network, subnet: IPv4Network, mtu: int, ip_masq: bool) -> str:
    # FLANNEL_SUBNET is the subnet's first host address with the subnet's prefix length.
    first_host = IPv4Interface((subnet.network_address + 1, subnet.prefixlen))
    return (f"FLANNEL_NETWORK={network}\n"
            f"FLANNEL_SUBNET={first_host}\n"
            f"FLANNEL_MTU={mtu}\n"
            f"FLANNEL_IPMASQ={'true' if ip_masq else 'false'}\n")


def write_subnet_env(path: str | os.PathLike, network: IPv4Network, subnet: IPv4Network, mtu: int,
                     ip_masq: bool) -> None:
    """Write subnet.env atomically (temp file in the same directory, fsync, rename), mode 0644."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    content = render_subnet_env(network, subnet, mtu, ip_masq).encode()
    fd, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as temp_file:
            temp_file.write(content)
            temp_file.flush()
            os.fsync(temp_file.fileno())
        os.chmod(temp_name, 0o644)
        os.replace(temp_name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise


def read_subnet_env(path: str | os.PathLike) -> dict[str, str]:
    """The KEY=VALUE pairs of a subnet.env; {} when the file does not exist."""
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return {}
    values = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key:
            values[key] = value
    return values


def read_previous_subnet(path: str | os.PathLike) -> IPv4Network | None:
    """The subnet a previous run leased, from FLANNEL_SUBNET in its subnet.env (as flanneld does on
    start). None when there is no file or it does not say; a bad value is logged and ignored."""
    try:
        value = read_subnet_env(path).get("FLANNEL_SUBNET")
    except OSError as exc:
        log.warning("cannot read the previous subnet file %s: %s", path, exc.strerror)
        return None
    if not value:
        return None
    try:
        return IPv4Interface(value).network
    except ValueError:
        log.warning("ignoring FLANNEL_SUBNET=%s in %s: not an IPv4 address/prefix", value, path)
        return None

