"""Lab pods made by flannel-bpf-cni, called as a container runtime calls it: the console script
run in the host's namespace, CNI_* in the environment, the network configuration on stdin.

A lab pod keeps the address its index gives it (hosts[n] of the host's subnet, as bridge pods
get): host-local is given that one address as its whole range, in a data directory of the
host's run directory, so `lab down` takes its allocations with it.
"""
from __future__ import annotations

import json
import os
import sys
from ipaddress import IPv4Interface
from pathlib import Path

from flannel_bpf.lab.netns import remove_netns
from flannel_bpf.lab.run import run_in_netns
from flannel_bpf.lab.topology import POD_IFNAME, Lab, LabError, Pod, new_namespace, pod_netns_name
from flannel_bpf.loader.netns import netns_path

CNI_PLUGIN = str(Path(sys.executable).with_name("flannel-bpf-cni"))
CNI_BIN_DIR = "/usr/lib/cni"  # Debian's containernetworking-plugins: host-local
CNI_DEVICES = {"netkit": "netkit", "routed-veth": "veth"}  # lab pod device -> the plugin's podDevice
CNI_TIMEOUT = 60.0


def cni_config(device: str, subnet_file: str, data_dir: Path, pin_dir: str | None, address: str) -> dict:
    conf = {"cniVersion": "1.0.0", "name": "fbpf-lab", "type": "flannel-bpf-cni",
            "podDevice": CNI_DEVICES[device], "subnetFile": subnet_file, "dataDir": str(data_dir),
            "rangeStart": address, "rangeEnd": address}
    if pin_dir:
        conf["bpfPinDir"] = pin_dir
    return conf


def call_cni(host_netns: str, command: str, config: dict, container_id: str, pod_netns: str | None) -> dict | None:
    """One plugin call; its JSON result (ADD) or None. LabError with the plugin's message."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CNI_COMMAND": command,
           "CNI_CONTAINERID": container_id, "CNI_IFNAME": POD_IFNAME, "CNI_PATH": CNI_BIN_DIR}
    if pod_netns:
        env["CNI_NETNS"] = str(netns_path(pod_netns))
    argv = ["env", "-i", *[f"{k}={v}" for k, v in env.items()], CNI_PLUGIN]
    done = run_in_netns(host_netns, argv, input=json.dumps(config), check=False, timeout=CNI_TIMEOUT)
    out = json.loads(done.stdout) if done.stdout.strip() else None
    if done.returncode != 0:
        msg = out.get("msg") if isinstance(out, dict) else done.stderr.strip()[-300:]
        raise LabError(f"flannel-bpf-cni {command} in {host_netns}: {msg}")
    return out


def add_cni_pod(lab: Lab, host_index: int, index: int, device: str, address: IPv4Interface, mtu: int,
                subnet_file: str, data_dir: Path, pin_dir: str | None) -> Pod:
    """Pod `index` of host `host_index`, made by the plugin, holding `address` (its index's)."""
    host = lab.host(host_index)
    netns = pod_netns_name(lab.name, host_index, index)
    new_namespace(netns, forwarding=False)
    config = cni_config(device, subnet_file, data_dir, pin_dir, str(address.ip))
    try:
        result = call_cni(host.netns, "ADD", config, container_id=netns, pod_netns=netns)
    except BaseException:
        remove_netns(netns)
        raise
    gateway = result["ips"][0].get("gateway", "")
    pod = Pod(host=host_index, index=index, netns=netns, host_veth=result["interfaces"][0]["name"],
              address=result["ips"][0]["address"], gateway=gateway, mtu=mtu, device=device)
    host.pods.append(pod)
    lab.save()
    return pod
