"""Address management delegated to the real `host-local` IPAM plugin, as flannel's CNI plugin
does: the range is this node's flannel subnet from subnet.env, the gateway its first address
(cni0's, which host-local never hands out).

host-local keeps its allocations in <dataDir>/<network name>/. Its default dataDir is ours too,
so a node that moves pod by pod shares one pool with flannel's bridge pods when both
configurations carry the same network name (flannel's is usually "cbr0")."""
from __future__ import annotations

import json
import os
import subprocess
from ipaddress import IPv4Address, IPv4Interface

from flannel_bpf.cni.spec import IO_FAILURE, CniError, Invocation

IPAM_PLUGIN = "host-local"
IPAM_TIMEOUT = 30.0
DEFAULT_DATA_DIR = "/var/lib/cni/networks"  # host-local's own default


def find_plugin(name: str, path: tuple[str, ...]) -> str:
    for folder in path:
        candidate = os.path.join(folder, name)
        if os.access(candidate, os.X_OK):
            return candidate
    raise CniError(IO_FAILURE, f"IPAM plugin {name} not found in CNI_PATH ({':'.join(path) or 'empty'})")


def ipam_config(inv: Invocation, subnet: IPv4Interface) -> dict:
    pool = {"subnet": str(subnet.network), "gateway": str(subnet.ip)}
    for key in ("rangeStart", "rangeEnd"):  # part of the subnet only (host-local checks them)
        if key in inv.config:
            pool[key] = inv.config[key]
    return {"cniVersion": inv.version, "name": inv.config.get("name", "flannel-bpf"),
            "ipam": {"type": IPAM_PLUGIN, "ranges": [[pool]],
                     "dataDir": inv.config.get("dataDir", DEFAULT_DATA_DIR)}}


def delegate(inv: Invocation, command: str, subnet: IPv4Interface, prev_result: dict | None = None) -> dict:
    """Runs host-local for `command` with our environment; its result (ADD) or {}. Its
    error is passed on as ours, code and message unchanged."""
    plugin = find_plugin(IPAM_PLUGIN, inv.path)
    config = ipam_config(inv, subnet)
    if prev_result is not None:
        config["prevResult"] = prev_result
    env = {**os.environ, "CNI_COMMAND": command, "CNI_CONTAINERID": inv.container_id,
           "CNI_NETNS": inv.netns, "CNI_IFNAME": inv.ifname, "CNI_PATH": os.pathsep.join(inv.path)}
    try:
        done = subprocess.run([plugin], input=json.dumps(config), capture_output=True, text=True,
                              env=env, timeout=IPAM_TIMEOUT, check=False)
    except subprocess.TimeoutExpired:
        raise CniError(IO_FAILURE, f"{IPAM_PLUGIN} {command} took over {IPAM_TIMEOUT:g} s") from None
    try:
        out = json.loads(done.stdout) if done.stdout.strip() else {}
    except json.JSONDecodeError:
        out = None
    if done.returncode != 0:
        if isinstance(out, dict) and "code" in out:
            raise CniError(int(out["code"]), f"{IPAM_PLUGIN}: {out.get('msg', '')}", out.get("details", ""))
        raise CniError(IO_FAILURE, f"{IPAM_PLUGIN} {command} failed (exit {done.returncode})",
                       (done.stderr or done.stdout).strip()[-300:])
    if out is None:
        raise CniError(IO_FAILURE, f"{IPAM_PLUGIN} {command} printed no JSON", done.stdout[:300])
    return out


def allocated_ip(result: dict) -> IPv4Address:
    for entry in result.get("ips", []):
        address = IPv4Interface(entry["address"])
        if address.version == 4:
            return address.ip
    raise CniError(IO_FAILURE, f"{IPAM_PLUGIN} returned no IPv4 address", json.dumps(result)[:300])

