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
import stat
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
    write_atomically(path, render_subnet_env(network, subnet, mtu, ip_masq).encode())


def check_subnet_file(path: str | os.PathLike) -> None:
    """Make sure subnet.env can be written at `path` (making its directory) before a lease is
    taken for it; SubnetEnvError says why not."""
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    except OSError as exc:
        raise SubnetEnvError(f"cannot write subnet.env to {path}: {exc.strerror} ({exc.filename})") from None
    if target.is_dir():
        raise SubnetEnvError(f"cannot write subnet.env to {path}: it is a directory")
    if not os.access(target.parent, os.W_OK):
        raise SubnetEnvError(f"cannot write subnet.env to {path}: {target.parent} is not writable")


def write_atomically(path: str | os.PathLike, content: bytes, mode: int = 0o644) -> None:
    """Readers see the old file or the new one, never a part: temp file in the same directory,
    fsync, rename."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    _warn_if_others_can_replace(target.parent)
    fd, temp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as temp_file:
            temp_file.write(content)
            temp_file.flush()
            os.fsync(temp_file.fileno())
        os.chmod(temp_name, mode)
        os.replace(temp_name, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp_name)
        raise


def _warn_if_others_can_replace(directory: Path) -> None:
    """A directory others may write to (and not sticky) lets them swap our file for theirs:
    said, not changed (the directory is not ours to change)."""
    mode = directory.stat().st_mode
    if mode & 0o022 and not mode & stat.S_ISVTX:
        log.warning("%s is writable by users other than its owner (mode %o): any of them can replace the "
                    "files written there", directory, stat.S_IMODE(mode))


def read_subnet_env(path: str | os.PathLike) -> dict[str, str]:
    """The KEY=VALUE pairs of a subnet.env; {} when the file does not exist."""
    try:
        return _parse(Path(path).read_text(errors="replace"))
    except FileNotFoundError:
        return {}


def _parse(text: str) -> dict[str, str]:
    values = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition("=")
        if sep and key:
            values[key] = value
    return values


class SubnetEnvError(ValueError):
    """A subnet.env that is missing or not a whole one (one line naming the file and the fault)."""


SUBNET_ENV_KEYS = ("FLANNEL_NETWORK", "FLANNEL_SUBNET", "FLANNEL_MTU", "FLANNEL_IPMASQ")


def load_complete_subnet_env(path: str | os.PathLike) -> dict[str, str]:
    """The variables of a subnet.env that holds all four of flanneld's, each well-formed, and
    ends with its last line's newline; SubnetEnvError otherwise. For readers that hand the
    values on (docker-opts): a half-written file must stop them, not give Docker half a config."""
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        raise SubnetEnvError(f"{path}: no such file (flannel-bpf attach writes it once it holds a lease)") from None
    except OSError as exc:
        raise SubnetEnvError(f"{path}: {exc.strerror}") from None
    if not text.endswith("\n"):
        raise SubnetEnvError(f"{path}: {'empty' if not text else 'ends mid-line'}: not a whole subnet.env")
    values = _parse(text)
    missing = [key for key in SUBNET_ENV_KEYS if not values.get(key)]
    if missing:
        raise SubnetEnvError(f"{path}: half-written subnet.env, no {', '.join(missing)}")
    for key in SUBNET_ENV_KEYS:
        if not _well_formed(key, values[key]):
            raise SubnetEnvError(f"{path}: {key}={values[key]!r} is not what flanneld writes")
    return values


def _well_formed(key: str, value: str) -> bool:
    try:
        if key == "FLANNEL_NETWORK":
            IPv4Network(value)
        elif key == "FLANNEL_SUBNET":
            IPv4Interface(value)
        elif key == "FLANNEL_MTU":
            return 68 <= int(value) <= 65535
        else:
            return value in ("true", "false")
    except ValueError:
        return False
    return True


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

