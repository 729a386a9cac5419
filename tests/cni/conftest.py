"""The CNI plugin called as containerd calls it: the console script, CNI_* in the environment,
the network configuration on stdin, inside a throwaway node namespace with real pod namespaces,
the real host-local IPAM plugin and the data plane's real pinned maps."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from flannel_bpf.lab.netns import create_netns, remove_netns
from flannel_bpf.loader.bpf.attach import unlink_pins
from flannel_bpf.loader.bpf.program import load_programs

PLUGIN = str(Path(sys.executable).with_name("flannel-bpf-cni"))
CNI_PATH = "/usr/lib/cni"
NODE_SUBNET = "10.244.77.1/24"
NODE_MTU = 1410


@dataclass
class Node:
    """A node namespace, its subnet.env and host-local data dir, and the pods made so far."""

    netns: str
    tmp: Path
    pin_dir: str
    pods: list[str] = field(default_factory=list)

    @property
    def subnet_file(self) -> Path:
        return self.tmp / "subnet.env"

    @property
    def data_dir(self) -> Path:
        return self.tmp / "ipam"

    def config(self, device: str = "veth", **overrides) -> dict:
        conf = {"cniVersion": "1.0.0", "name": "fbpf-test", "type": "flannel-bpf-cni", "podDevice": device,
                "subnetFile": str(self.subnet_file), "dataDir": str(self.data_dir), "bpfPinDir": self.pin_dir}
        conf.update(overrides)
        return {k: v for k, v in conf.items() if v is not None}

    def new_pod(self) -> str:
        name = f"{self.netns}-p{len(self.pods)}"
        create_netns(name)
        self.pods.append(name)
        return name

    def allocations(self) -> list[str]:
        """Addresses host-local holds (one file per address in its network's folder)."""
        folder = self.data_dir / "fbpf-test"
        return sorted(p.name for p in folder.iterdir() if p.name[0].isdigit()) if folder.exists() else []

    def call(self, command: str, config: dict | str | None, *, container: str | None = "c1",
             netns: str | None = None, ifname: str | None = "eth0", env: dict | None = None):
        """(exit status, parsed stdout or None, stderr)."""
        environ = {"PATH": os.environ["PATH"], "CNI_COMMAND": command, "CNI_PATH": CNI_PATH}
        for key, value in (("CNI_CONTAINERID", container), ("CNI_IFNAME", ifname),
                           ("CNI_NETNS", f"/run/netns/{netns}" if netns and "/" not in netns else netns)):
            if value is not None:
                environ[key] = value
        environ.update(env or {})
        stdin = config if isinstance(config, str) else json.dumps(config) if config is not None else ""
        done = subprocess.run(["nsenter", f"--net=/run/netns/{self.netns}", "--", PLUGIN], input=stdin,
                              capture_output=True, text=True, env=environ, timeout=60, check=False)
        out = json.loads(done.stdout) if done.stdout.strip() else None
        return done.returncode, out, done.stderr


@pytest.fixture(scope="session")
def cni_maps_dir():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    root = f"/sys/fs/bpf/flannel-bpf-test-cni-{os.getpid()}"
    try:
        load_programs(f"{root}/maps").close()  # the maps stay pinned
        yield f"{root}/maps"
    finally:
        unlink_pins(root)


@pytest.fixture
def node(tmp_path, cni_maps_dir):
    name = f"fbcni{secrets.token_hex(3)}"
    create_netns(name)
    n = Node(name, tmp_path, cni_maps_dir)
    try:
        for argv in (["ip", "link", "set", "lo", "up"],
                     ["ip", "link", "add", "eth0", "type", "veth", "peer", "name", "eth0p"],
                     ["ip", "addr", "add", "198.18.77.1/24", "dev", "eth0"], ["ip", "link", "set", "eth0", "up"]):
            subprocess.run(["nsenter", f"--net=/run/netns/{name}", *argv], check=True)  # an uplink, as a node has
        n.subnet_file.write_text(f"FLANNEL_NETWORK=10.244.0.0/16\nFLANNEL_SUBNET={NODE_SUBNET}\n"
                                 f"FLANNEL_MTU={NODE_MTU}\nFLANNEL_IPMASQ=false\n")
        yield n
    finally:
        for pod in n.pods:
            remove_netns(pod)
        remove_netns(name)
