"""Pod-to-pod benchmark between the VMs of the Vagrant lab (`vagrant/run.sh bench`, or
`flannel-bpf lab bench --vms`): the netns bench's figures, measured by the same code
(bench/net.py) between a pod on node1 and a pod on node2, and reported by the same report.

The host drives the VMs over ssh (one multiplexed connection per VM, from `vagrant ssh-config`).
Every path runs on the same two VMs, switched in place: every agent stops, `flannel-bpf detach`
removes its data plane, flannel's network config for the next path goes to etcd, and the agents
start again (they keep their subnet leases; the pods stay). Paths: bpf with XDP decap, bpf with
tc decap, kernel vxlan as flanneld sets it up, host-gw, and the underlay (VM to VM, measured
while kernel vxlan or host-gw runs, so no program sits on the uplink).

Rounds are interleaved: every path once per round, the order reversed every other round, so
drift hits all paths alike and a round starts on the path the last one ended with (a switch to
bpf costs a compile of the programs in the VM). Under software emulation (TCG) the run is one
short round: a functional check of every path, whose figures are not performance.
"""
from __future__ import annotations

import json
import logging
import shlex
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from ipaddress import IPv4Network

from flannel_bpf.bench.net import (MEASUREMENTS, TARGETS, UNITS, Endpoints, busy_seconds, measure_into,
                                   start_servers, summarize)
from flannel_bpf.lab.node import pod_addresses, pod_netns

log = logging.getLogger(__name__)

NODES = ("node1", "node2")          # the client's VM, the server's VM
UPLINK = "eth1"
# As vagrant/provision.sh sets them up.
ETCD_ENDPOINT = "http://198.18.2.11:2379"
CONFIG_KEY = "/coreos.com/network/config"
READYZ = "http://127.0.0.1:8471/readyz"
VENV_PYTHON = "/opt/flannel-bpf/venv/bin/python"
SUBNET_FILE = "/run/flannel/subnet.env"
VXLAN = {"VNI": 1, "Port": 8472, "DirectRouting": False}

SWITCH_TIMEOUT = 1500.0     # a bpf start compiles the programs in the VM: minutes under TCG
SERVER_LIFETIME = 7200      # seconds; the servers are also killed at the end of the run
EMULATED_ROUNDS, EMULATED_SECONDS = 1, 2.0
NOTICE = ("SOFTWARE EMULATION (TCG): THESE FIGURES ARE NOT PERFORMANCE. This run is a functional "
          "check of every path; set FBPF_LIBVIRT_DRIVER=kvm on a host with working KVM to measure.")


class VmError(RuntimeError):
    """A command in a VM failed; the message names the VM, the command and its complaint."""


@dataclass(frozen=True)
class VmPath:
    name: str
    backend: dict | None    # flannel's Backend; None: the underlay, measured under the current one


PATHS = (
    VmPath("bpf-xdp", {"Type": "bpf", **VXLAN, "Decap": "xdp"}),
    VmPath("bpf-tc", {"Type": "bpf", **VXLAN, "Decap": "tc"}),
    VmPath("vxlan", {"Type": "vxlan", **VXLAN}),
    VmPath("underlay", None),
    VmPath("host-gw", {"Type": "host-gw"}),
)


def network_config(backend: dict) -> dict:
    return {"Network": "10.244.0.0/16", "SubnetLen": 24, "Backend": backend}


def round_order(paths: tuple[VmPath, ...], round_index: int) -> tuple[VmPath, ...]:
    return paths if round_index % 2 == 0 else tuple(reversed(paths))


class VmShell:
    """Commands in one VM, as root, over a multiplexed ssh connection, each bounded in the VM
    (`timeout`) and on the host. Servers it starts are killed by stop()."""
    slack = 90.0  # ssh and process start-up in an emulated guest take seconds

    def __init__(self, name: str, ssh_config: str, control_dir: str):
        self.name = name
        self._ssh = ["ssh", "-F", ssh_config, "-o", "BatchMode=yes", "-o", "ControlMaster=auto",
                     "-o", f"ControlPath={control_dir}/{name}", "-o", "ControlPersist=600", name]
        self._servers: list[int] = []

    def sh(self, command: str, timeout: float, *, check: bool = True) -> subprocess.CompletedProcess:
        remote = f"sudo timeout -k 5 {max(1, round(timeout))} sh -c {shlex.quote(command)}"
        done = subprocess.run([*self._ssh, remote], capture_output=True, text=True, errors="replace",
                              stdin=subprocess.DEVNULL, timeout=timeout + 30)
        if check and done.returncode != 0:
            raise VmError(f"{self.name}: `{command}` failed ({done.returncode}): "
                          f"{(done.stderr.strip() or done.stdout.strip())[-400:]}")
        return done

    @staticmethod
    def _in(netns: str | None, argv: list[str]) -> str:
        return shlex.join((["ip", "netns", "exec", netns] if netns else []) + list(argv))

    def run(self, netns: str | None, argv: list[str], timeout: float) -> subprocess.CompletedProcess:
        return self.sh(self._in(netns, argv), timeout, check=False)

    def start(self, netns: str | None, argv: list[str]) -> None:
        done = self.sh(f"setsid timeout {SERVER_LIFETIME} {self._in(netns, argv)} >/dev/null 2>&1 </dev/null "
                       "& echo $!", 60)
        self._servers.append(int(done.stdout.split()[-1]))

    def busy_cpu_seconds(self) -> float:
        stat_line, ticks = self.sh("head -n1 /proc/stat; getconf CLK_TCK", 60).stdout.splitlines()[:2]
        return busy_seconds(stat_line, int(ticks))

    def stop(self) -> None:
        """Kill the servers this shell started and close the ssh connection."""
        if self._servers:
            self.sh(f"kill {' '.join(map(str, self._servers))} 2>/dev/null; true", 60, check=False)
            self._servers.clear()
        subprocess.run([*self._ssh[:-1], "-O", "exit", self.name], capture_output=True, timeout=30)


def on_each(shells, action) -> list:
    """`action(shell)` on every VM at once; the first failure is raised once all are done."""
    with ThreadPoolExecutor(len(shells)) as pool:
        futures = [pool.submit(action, shell) for shell in shells]
    return [future.result() for future in futures]


def node_python(shell: VmShell, args: str, timeout: float = 120) -> dict | list:
    """`python -m flannel_bpf.lab.node ARGS` in the VM; its JSON output."""
    done = shell.sh(f"{VENV_PYTHON} -m flannel_bpf.lab.node {args}", timeout)
    return json.loads(done.stdout.strip().splitlines()[-1])


def subnet(shell: VmShell) -> IPv4Network:
    text = shell.sh(f"cat {SUBNET_FILE}", 60).stdout
    for line in text.splitlines():
        if line.startswith("FLANNEL_SUBNET="):
            return IPv4Network(line.split("=", 1)[1].strip(), strict=False)
    raise VmError(f"{shell.name}: no FLANNEL_SUBNET in {SUBNET_FILE}")


def current_backend(shell: VmShell) -> dict | None:
    done = shell.sh(f"ETCDCTL_API=3 etcdctl --endpoints {ETCD_ENDPOINT} get --print-value-only {CONFIG_KEY}", 60)
    try:
        return json.loads(done.stdout).get("Backend")
    except ValueError:
        return None


def switch(shells: list[VmShell], backend: dict) -> None:
    """Every agent stopped and detached, the network config of `backend` put, the agents started
    again and ready, pods re-announced to them."""
    config = json.dumps(network_config(backend))
    on_each(shells, lambda s: s.sh(f"systemctl stop flannel-bpf && flannel-bpf detach --iface {UPLINK}", 300))
    shells[0].sh(f"ETCDCTL_API=3 etcdctl --endpoints {ETCD_ENDPOINT} put {CONFIG_KEY} {shlex.quote(config)}", 60)
    on_each(shells, lambda s: s.sh("systemctl start flannel-bpf", 120))
    # The agents learn local pods from the bridge's neighbours: `pods` pings each gateway.
    on_each(shells, lambda s: s.sh(f"until curl -sf {READYZ} >/dev/null; do sleep 2; done; "
                                   f"{VENV_PYTHON} -m flannel_bpf.lab.node pods --count 1 >/dev/null",
                                   SWITCH_TIMEOUT))


def wait_reachable(ep: Endpoints, timeout: float = 120) -> bool:
    """Until the client's pings reach the server (ARP and the peers' first programming)."""
    done = ep.client.sh(f"until {VmShell._in(ep.client_ns, ['ping', '-c', '1', '-W', '2', ep.server_ip])} "
                        ">/dev/null; do sleep 1; done", timeout, check=False)
    return done.returncode == 0


def describe_nics(shells: list[VmShell]) -> list[dict]:
    return on_each(shells, lambda s: {"vm": s.name, **node_python(s, f"nic --iface {UPLINK}")})


def nic_line(nic: dict) -> str:
    xdp = nic.get("xdp_mode") or "none"
    if nic.get("xdp_prog"):
        xdp += f" ({nic['xdp_prog']})"
    return (f"{nic['vm']} {nic['iface']}: driver {nic['driver']}, XDP {xdp}, {nic['queues_max']} queue pairs "
            f"({nic['queues_in_use']} in use) for {nic['vcpus']} vCPU: XDP_TX/REDIRECT {nic['xdp_tx_queues']}; "
            f"{nic['virtualization']}")


def run(ssh_config: str, *, rounds: int = 3, seconds: float = 5.0, paths: tuple[VmPath, ...] = PATHS,
        progress=None, console=None) -> tuple[list[dict], dict]:
    """Measure every path between node1's and node2's first pods; returns (results, params)."""
    def say(text: str) -> None:  # whole lines: they are grepped for
        if console is not None:
            console.print(text, soft_wrap=True)
        else:
            log.info("%s", text)
    with tempfile.TemporaryDirectory(prefix="fbpf-vmbench-") as control_dir:
        shells = [VmShell(name, ssh_config, control_dir) for name in NODES]
        try:
            return _run(shells, rounds, seconds, paths, progress, say)
        finally:
            for shell in shells:
                shell.stop()


def _run(shells, rounds, seconds, paths, progress, say) -> tuple[list[dict], dict]:
    client, server = shells
    virtualization = on_each(shells, lambda s: s.sh("systemd-detect-virt || true", 60).stdout.strip())
    emulated = any(v != "kvm" for v in virtualization)
    if emulated:
        say(f"[bold red]{NOTICE}[/]")
        rounds, seconds = EMULATED_ROUNDS, min(seconds, EMULATED_SECONDS)
    subnets = on_each(shells, subnet)
    pods = [str(pod_addresses(s, 1)[0].ip) for s in subnets]
    underlay_ips = on_each(shells, lambda s: node_python(s, f"nic --iface {UPLINK}")["address"])
    pod_ns = pod_netns(1)
    eps = {p.name: (Endpoints(None, None, underlay_ips[1], client, server, 0, 0) if p.backend is None
                    else Endpoints(pod_ns, pod_ns, pods[1], client, server, 0, 0)) for p in paths}
    # One set of servers in the pod, one on the VM: the same for every path.
    servers = {(ep.server_ns, ep.server_ip): ep for ep in eps.values()}
    for ep in servers.values():
        start_servers(ep)
    initial = current = current_backend(client)
    samples: dict[str, dict[str, list[float]]] = {}
    nics: dict[str, list[dict]] = {}
    if progress:
        progress.stage("measuring", rounds * len(MEASUREMENTS) * len(paths))
    for index in range(rounds):
        for path in round_order(paths, index):
            if path.backend is not None and path.backend != current:
                say(f"switching both VMs to {path.name} (agents stop, detach, start with {path.backend})")
                switch(shells, path.backend)
                current = path.backend
                now = on_each(shells, subnet)
                if now != subnets:
                    raise VmError(f"the subnets changed from {subnets} to {now}: the pods are off-subnet")
            if not wait_reachable(eps[path.name]):
                say(f"[red]{path.name}: {eps[path.name].server_ip} does not answer pings; measuring anyway[/]")
            nics[path.name] = describe_nics(shells)
            for nic in nics[path.name]:
                say(f"  {path.name}: {nic_line(nic)}")
            for kind in MEASUREMENTS:
                measure_into(samples, path.name, kind, eps[path.name], seconds)
                if progress:
                    progress.advance("measuring")
    if initial is not None and current != initial:
        # As the lab was: `run.sh test` after a bench checks the data plane the lab came up with.
        say(f"switching both VMs back to {initial.get('Type')}")
        switch(shells, initial)
        current = initial
    missing = [f"{p.name}.{name}" for p in paths for name in UNITS if name not in samples.get(p.name, {})]
    params = {"where": "vms", "vms": list(NODES), "virtualization": virtualization, "emulated": emulated,
              "rounds": rounds, "seconds": seconds, "paths": [p.name for p in paths],
              "subnets": [str(s) for s in subnets], "nics": nics, "missing": missing,
              "backend_after": current}
    return summarize(samples, targets=() if emulated else TARGETS), params
