"""The whole single-machine lab: topology + etcd + one flannel-bpf agent per host + pods.

`up(LabSpec)` builds it in this order: namespaces (lab.topology), etcd in the underlay namespace,
the network config in etcd, one agent per host started detached (they outlive `lab up`), each
host's lease (its subnet.env), pods addressed from that subnet with FLANNEL_MTU, and finally
every agent's /readyz. Everything a later command needs (etcd endpoints, agent pids, healthz
ports, log paths) goes into the lab's state file, so `status`, `ping` and `down` work from any
process, and `down` (topology.destroy) cleans up after a crash as well.

Files of a lab live in /run/flannel-bpf/lab/NAME/: etcd/ (data and logs) and hI/ (agent.log,
subnet.env) per host.
"""
from __future__ import annotations

import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from ipaddress import IPv4Interface, IPv4Network
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sequence

from pyroute2 import IPRoute

from flannel_bpf.controller.subnet_env import read_subnet_env
from flannel_bpf.lab import kube
from flannel_bpf.lab.cni_pods import CNI_DEVICES, add_cni_pod
from flannel_bpf.lab.etcd import EtcdCluster, EtcdLaunchError, EtcdMember
from flannel_bpf.lab.nshttp import EtcdGateway, GatewayError, http_get
from flannel_bpf.lab.run import PingResult, nsenter_argv, ping
from flannel_bpf.lab.topology import (DEFAULT_LAB, MAX_HOSTS, POD_NETWORK, UNDERLAY_BRIDGE_ADDRESS,
                                      UNDERLAY_BRIDGES, AgentState, DestroyReport,
                                      EtcdMemberState, EtcdState, Host, Lab, LabError, Pod,
                                      destroy, list_labs, read_state, run_dir)
from flannel_bpf.loader.bpf.attach import default_pin_dir, list_tc
from flannel_bpf.loader.bpf.maps import DataPlaneMaps
from flannel_bpf.loader.netdefs import DEFAULT_ETCD_PREFIX, DEFAULT_VNI, check_vni
from flannel_bpf.loader.netns import in_netns

log = logging.getLogger(__name__)

BACKENDS = ("bpf", "vxlan", "host-gw")
ETCD_CLIENT_PORT = 2379
ETCD_PEER_PORT = 2380
# One member listens on the underlay bridge's own address; three on extra addresses of it.
ETCD_ADDRESSES = {1: ("198.18.0.254",), 3: ("198.18.0.251", "198.18.0.252", "198.18.0.253")}
HEALTHZ_BASE_PORT = 9100          # host I serves /healthz, /readyz, /metrics on 9100+I
AGENT_START_TIMEOUT = 60.0        # lease + BPF compile of every agent, on a busy 2-core machine
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0


# ---------------------------------------------------------------------------- what to build


POD_DEVICES = ("veth", *CNI_DEVICES)


@dataclass(frozen=True)
class LabSpec:
    name: str = DEFAULT_LAB
    hosts: int = 3
    pods: int = 2
    backend: str = "bpf"
    backends: tuple[str, ...] = ()          # one per host; overrides `backend`
    etcd_members: int = 1
    second_subnet: tuple[int, ...] = ()     # hosts behind the router, on 198.18.1.0/24
    direct_routing: bool = False
    decap: str | None = None                # --decap for bpf agents
    vni: int = DEFAULT_VNI
    agent_args: tuple[str, ...] = ()        # extra `attach` flags for every agent
    pod_devices: tuple[str, ...] = ("veth",)  # pod n of every host gets pod_devices[(n - 1) % len]
    kube: bool = False                      # the Kubernetes API stand-in instead of etcd

    def host_backends(self) -> list[str]:
        backends = list(self.backends) or [self.backend] * self.hosts
        if len(backends) != self.hosts:
            raise LabError(f"--backends names {len(backends)} backends for {self.hosts} hosts; "
                           "give one per host")
        for b in backends:
            if b not in BACKENDS:
                raise LabError(f"unknown backend {b!r}: use one of {', '.join(BACKENDS)}")
        return backends

    def validate(self) -> None:
        if not 1 <= self.hosts <= 50:
            raise LabError(f"--hosts must be 1..50, got {self.hosts}")
        if not 0 <= self.pods <= 20:
            raise LabError(f"--pods must be 0..20, got {self.pods}")
        if self.etcd_members not in ETCD_ADDRESSES:
            raise LabError(f"--etcd must be 1 or 3, got {self.etcd_members}")
        try:
            check_vni(self.vni, "--vni")
        except ValueError as err:
            raise LabError(str(err)) from None
        unknown = [d for d in self.pod_devices if d not in POD_DEVICES]
        if unknown or not self.pod_devices:
            raise LabError(f"--pod-device {unknown[0] if unknown else ''!r}: use one or more of "
                           f"{', '.join(POD_DEVICES)}")
        if self.decap not in (None, "auto", "xdp", "tc"):
            raise LabError(f"--decap must be auto, xdp or tc, got {self.decap!r}")
        network_config(self.host_backends(), self.vni, self.direct_routing)


def network_config(backends: Iterable[str], vni: int = DEFAULT_VNI, direct_routing: bool = False) -> dict:
    """flannel's net-conf for a lab whose hosts run `backends`. All bpf: Type bpf. bpf and
    vxlan mixed: Type vxlan (what stock nodes need), the bpf hosts run with --backend bpf.
    host-gw only on its own: stock flannel cannot mix it with vxlan."""
    kinds = set(backends)
    if "host-gw" in kinds:
        if kinds != {"host-gw"}:
            raise LabError("host-gw cannot share a lab with vxlan or bpf hosts: flannel runs one "
                           "backend type per network (its config's Backend.Type)")
        return {"Network": str(POD_NETWORK), "Backend": {"Type": "host-gw"}}
    kind = "bpf" if kinds == {"bpf"} else "vxlan"
    return {"Network": str(POD_NETWORK),
            "Backend": {"Type": kind, "VNI": vni, "DirectRouting": direct_routing}}


class Progress(Protocol):
    """What `up` reports while it builds (the CLI draws rich progress bars from it)."""

    def stage(self, name: str, total: int) -> None: ...
    def advance(self, name: str) -> None: ...


class NoProgress:
    def stage(self, name: str, total: int) -> None:
        pass

    def advance(self, name: str) -> None:
        pass


# ---------------------------------------------------------------------------- processes


_PF_KTHREAD = 0x00200000
_exit_statuses: dict[int, int] = {}  # pid -> wait status, of our children reaped by process_running


def process_running(pid: int | None, marker: str = "") -> bool:
    """True while `pid` runs (a zombie does not count) and its command line holds `marker`,
    so a recycled pid is never taken for ours. A process in the middle of an exec (nsenter
    becoming the agent) shows an empty command line for a moment: it counts as running."""
    if not pid:
        return False
    try:
        reaped, status = os.waitpid(pid, os.WNOHANG)  # reap it if it is our child
        if reaped:
            _exit_statuses[pid] = status
    except ChildProcessError:
        pass
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    if fields[0] in ("Z", "X"):
        return False
    return marker in cmdline or (not cmdline and not int(fields[6]) & _PF_KTHREAD)


def exit_description(pid: int | None) -> str:
    """How our child `pid` ended, as far as this process saw it reaped."""
    status = _exit_statuses.get(pid) if pid else None
    if status is None:
        return "exit status unknown (not reaped by this process)"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        why = " (the kernel's OOM killer, or someone's kill -9?)" if sig == signal.SIGKILL else ""
        return f"killed by {signal.Signals(sig).name}{why}"
    return f"exit code {os.waitstatus_to_exitcode(status)}"


def end_process(pid: int | None, marker: str, sig: int | None = signal.SIGTERM,
                timeout: float = STOP_TIMEOUT) -> bool:
    """Send `sig` (None: it was sent already) and wait until the process is gone, SIGKILL
    after `timeout`. False if it was not running."""
    if not process_running(pid, marker):
        return False
    if sig is not None:
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while process_running(pid, marker):
        if time.monotonic() > deadline:
            log.warning("pid %d did not exit %.0f s after the signal: killing it", pid, timeout)
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 5.0
        time.sleep(0.02)
    return True


def log_tail(path: str | Path, lines: int = 12) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


# ---------------------------------------------------------------------------- etcd


def _etcd_cluster(lab: Lab) -> EtcdCluster:
    """The lab's etcd as an EtcdCluster object (also from a process that did not start it)."""
    etcd = lab.state.etcd
    members = []
    for m in etcd.members:
        client, peer = urllib.parse.urlsplit(m.client_url), urllib.parse.urlsplit(m.peer_url)
        members.append(EtcdMember(name=m.name, host=client.hostname, client_port=client.port,
                                  peer_port=peer.port, netns=m.netns, data_dir=Path(m.data_dir)))
    return EtcdCluster(members, base_dir=run_dir(lab.name) / "etcd", token=etcd.token)


def start_etcd(lab: Lab, members: int = 1) -> EtcdState:
    """etcd in the underlay namespace: 1 member on the bridge address, or 3 on extra ones."""
    ul = lab.state.underlay_netns
    addresses = ETCD_ADDRESSES[members]
    with in_netns(ul), IPRoute() as ipr:
        bridge = ipr.link_lookup(ifname=UNDERLAY_BRIDGES[0])[0]
        for address in addresses:
            if address != str(UNDERLAY_BRIDGE_ADDRESS.ip):
                ipr.addr("add", index=bridge, address=address,
                         prefixlen=UNDERLAY_BRIDGE_ADDRESS.network.prefixlen)
    base = run_dir(lab.name) / "etcd"
    cluster = EtcdCluster([EtcdMember(name=f"etcd{i}", host=a, client_port=ETCD_CLIENT_PORT,
                                      peer_port=ETCD_PEER_PORT, netns=ul)
                           for i, a in enumerate(addresses, 1)],
                          base_dir=base, token=f"fbpf-{lab.name}")
    cluster.start()
    lab.state.etcd = EtcdState(prefix=DEFAULT_ETCD_PREFIX, token=cluster.token, members=[
        EtcdMemberState(name=m.name, client_url=m.client_url, peer_url=m.peer_url, netns=ul,
                        pid=m.process.pid, data_dir=str(m.data_dir), log_path=str(m.log_path))
        for m in cluster.members])
    lab.save()
    return lab.state.etcd


def stop_etcd(lab: Lab, sig: int = signal.SIGTERM) -> None:
    """Stop every etcd member (an outage); start_etcd_again() brings them back with their data."""
    for m in lab.state.etcd.members:
        end_process(m.pid, m.data_dir, sig)
        m.pid = None
    lab.save()


def start_etcd_again(lab: Lab, timeout: float = 20.0) -> None:
    cluster = _etcd_cluster(lab)
    for member, state in zip(cluster.members, lab.state.etcd.members):
        if not process_running(state.pid, state.data_dir):
            cluster.start_member(member)
            state.pid = member.process.pid
    lab.save()
    cluster.wait_healthy(timeout=timeout)


def etcd_client(lab: Lab) -> EtcdGateway:
    """A client of the lab's etcd (it works from the underlay namespace)."""
    if lab.state.etcd is None:
        raise LabError(f"lab {lab.name} has no etcd")
    return EtcdGateway(lab.state.etcd.endpoints, lab.state.underlay_netns)


def write_network_config(lab: Lab, config: dict) -> None:
    etcd_client(lab).put(f"{lab.state.etcd.prefix}/config", json.dumps(config))
    lab.state.network_config = config
    lab.save()


def lease_key(lab: Lab, subnet: str | IPv4Network) -> str:
    net = IPv4Network(subnet)
    return f"{lab.state.etcd.prefix}/subnets/{net.network_address}-{net.prefixlen}"


# ---------------------------------------------------------------------------- agents


def host_dir(lab: Lab, host: Host) -> Path:
    return run_dir(lab.name) / f"h{host.index}"


def agent_argv(lab: Lab, host: Host, agent: AgentState, config_type: str, decap: str | None,
               extra: Iterable[str] = ()) -> list[str]:
    argv = [sys.executable, "-m", "flannel_bpf", "attach", "--iface", host.uplink]
    if lab.state.kube is not None:
        argv += kube.agent_flags(lab)
    else:
        argv += ["--etcd-endpoints", ",".join(lab.state.etcd.endpoints), "--etcd-prefix", lab.state.etcd.prefix]
    argv += ["--subnet-file", agent.subnet_file, "--healthz-port", str(agent.healthz_port)]
    if agent.backend != config_type:
        argv += ["--backend", agent.backend]
    if decap and agent.backend == "bpf":
        argv += ["--decap", decap]
    return argv + list(extra)


def start_agent(lab: Lab, index: int, backend: str, *, decap: str | None = None,
                extra_args: Iterable[str] = (), wrapper: Sequence[str] = ()) -> AgentState:
    """Start host `index`'s agent detached (own session, log file), record it, return at once.
    `wrapper`: a command that runs the agent's command line given as its last argument (e.g.
    capsh with fewer capabilities)."""
    host = lab.host(index)
    if host.agent is not None and process_running(host.agent.pid, host.agent.subnet_file):
        raise LabError(f"host {index} already runs an agent (pid {host.agent.pid})")
    config = lab.state.network_config or {}
    directory = host_dir(lab, host)
    directory.mkdir(parents=True, exist_ok=True)
    pin_dir = None
    if backend == "bpf":
        with in_netns(host.netns):
            pin_dir = str(default_pin_dir(host.uplink))
    agent = AgentState(backend=backend, pid=None, healthz_port=HEALTHZ_BASE_PORT + index,
                       log_path=str(directory / "agent.log"),
                       subnet_file=str(directory / "subnet.env"), pin_dir=pin_dir,
                       subnet=host.agent.subnet if host.agent else None)
    argv = agent_argv(lab, host, agent, config.get("Backend", {}).get("Type", ""), decap, extra_args)
    # FLANNELD_* from the caller's environment would silently change every lab agent.
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLANNELD_")}
    if lab.state.kube is not None:
        kube.register_node(lab, host)
        env["NODE_NAME"] = kube.node_name(host)
    with open(agent.log_path, "ab") as log_file:
        log_file.write(f"--- {time.strftime('%H:%M:%S')} {' '.join(argv)}\n".encode())
        log_file.flush()
        command = [*wrapper, shlex.join(argv)] if wrapper else argv
        process = subprocess.Popen(nsenter_argv(host.netns, command), stdin=subprocess.DEVNULL,
                                   stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                   start_new_session=True)
    agent.pid = process.pid
    host.agent = agent
    lab.save()
    return agent


def agent_running(host: Host) -> bool:
    return host.agent is not None and process_running(host.agent.pid, host.agent.subnet_file)


def stop_agent(lab: Lab, index: int, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT) -> bool:
    """Signal host `index`'s agent and wait until it is gone. SIGTERM leaves its data plane
    forwarding (unless it runs with --cleanup-on-exit); SIGKILL is a crash."""
    host = lab.host(index)
    if host.agent is None:
        return False
    ended = end_process(host.agent.pid, host.agent.subnet_file, sig, timeout)
    host.agent.pid = None
    lab.save()
    return ended


def _agent_failed(host: Host, what: str) -> LabError:
    if not agent_running(host):
        what = f"{what} ({exit_description(host.agent.pid)})"
    return LabError(f"host {host.index} ({host.netns}): {what}; agent log {host.agent.log_path}:\n"
                    f"{log_tail(host.agent.log_path)}")


def wait_for_subnet(lab: Lab, index: int, timeout: float = AGENT_START_TIMEOUT) -> IPv4Interface:
    """Wait for the agent's subnet.env; returns FLANNEL_SUBNET (the gateway address/prefix)."""
    host = lab.host(index)
    path = Path(host.agent.subnet_file)
    deadline = time.monotonic() + timeout
    while True:
        if path.exists():
            env = read_subnet_env(path)
            subnet = IPv4Interface(env["FLANNEL_SUBNET"])
            if host.agent.subnet != str(subnet.network):
                host.agent.subnet = str(subnet.network)
                lab.save()
            return subnet
        if not agent_running(host):
            raise _agent_failed(host, "the agent exited before writing subnet.env")
        if time.monotonic() > deadline:
            raise _agent_failed(host, f"no subnet.env after {timeout:.0f} s")
        time.sleep(0.05)


def add_pods(lab: Lab, index: int, count: int, progress: Progress = NoProgress(),
             devices: tuple[str, ...] = ("veth",)) -> list[Pod]:
    """Pods 1..count on host `index`: .2, .3, ... of its subnet, gateway .1 (flannel's cni0
    address), MTU from FLANNEL_MTU. Pod n is a `devices[(n - 1) % len]` pod: veth on the
    bridge, or netkit / routed-veth through flannel-bpf-cni."""
    host = lab.host(index)
    env = read_subnet_env(host.agent.subnet_file)
    gateway = IPv4Interface(env["FLANNEL_SUBNET"])
    mtu = int(env["FLANNEL_MTU"])
    hosts = list(gateway.network.hosts())  # hosts[0] is the gateway; pod n gets hosts[n]
    first = max((p.index for p in host.pods), default=0) + 1
    if first + count > len(hosts):
        raise LabError(f"host {index}'s subnet {gateway.network} has room for {len(hosts) - 1} pods")
    pods = []
    for n in range(first, first + count):
        address = f"{hosts[n]}/{gateway.network.prefixlen}"
        device = devices[(n - 1) % len(devices)]
        if device != "veth":
            add_cni_pod(lab, index, n, device, IPv4Interface(address), mtu, host.agent.subnet_file,
                        host_dir(lab, host) / "ipam", host.agent.pin_dir)
            progress.advance("pods")
            continue
        pod = lab.add_pod(index, n, address, str(gateway.ip), mtu)
        # As a CNI's gratuitous ARP would: the host learns the pod's MAC and port now, so the
        # bpf decap can hand it packets from the first one on (not only after it spoke).
        ping(pod.netns, pod.gateway, count=1, wait=1.0)
        pods.append(pod)
        progress.advance("pods")
    return pods


def readyz(host: Host, timeout: float = 2.0) -> int:
    """HTTP status of the agent's /readyz (0: nothing answered)."""
    return http_get(host.netns, f"http://127.0.0.1:{host.agent.healthz_port}/readyz", timeout)[0]


def metrics_text(host: Host, timeout: float = 2.0) -> str:
    status, body = http_get(host.netns, f"http://127.0.0.1:{host.agent.healthz_port}/metrics", timeout)
    if status != 200:
        raise LabError(f"host {host.index}: /metrics answered {status or 'nothing'}")
    return body


def pods_attached(host: Host) -> bool:
    """On a bpf host, whether every pod's device carries its program (the agent attaches it at
    its next reconcile after the pod appears); until then that pod's traffic takes the kernel
    path, which would blur what a test or a benchmark sees. Always true on other backends."""
    if host.agent is None or host.agent.backend != "bpf" or not host.pods:
        return True
    with in_netns(host.netns):
        for pod in host.pods:
            if pod.device == "netkit":
                attached = Path(host.agent.pin_dir, f"link_{pod.host_veth}").exists()
            else:
                program = "tc_encap_from_pods" if pod.device == "veth" else "tc_from_routed_pod"
                attached = any(f.name == program for f in list_tc(pod.host_veth))
            if not attached:
                return False
    return True


def wait_ready(lab: Lab, indices: Iterable[int], timeout: float = READY_TIMEOUT,
               progress: Progress = NoProgress()) -> None:
    pending = [lab.host(i) for i in indices]
    deadline = time.monotonic() + timeout
    while pending:
        for host in list(pending):
            if readyz(host, timeout=1.0) == 200 and pods_attached(host):
                pending.remove(host)
                progress.advance("ready")
            elif not agent_running(host):
                raise _agent_failed(host, "the agent exited before it was ready")
        if pending and time.monotonic() > deadline:
            raise _agent_failed(pending[0], f"/readyz not 200 after {timeout:.0f} s")
        if pending:
            time.sleep(0.1)


# ---------------------------------------------------------------------------- the whole lab


def up(spec: LabSpec, progress: Progress = NoProgress(), keep_on_failure: bool = False) -> Lab:
    """Build and start the lab `spec` describes; on failure remove it again (unless asked not
    to) and raise LabError naming the step, with the log tail of the agent that failed."""
    spec.validate()
    backends = spec.host_backends()
    config = network_config(backends, spec.vni, spec.direct_routing)
    if spec.name in list_labs():
        raise LabError(f"lab {spec.name} is already up (see: flannel-bpf lab status --name {spec.name}); "
                       f"remove it first with: flannel-bpf lab down --name {spec.name}")
    progress.stage("topology", 1)
    lab = Lab.create(spec.name, spec.hosts, spec.second_subnet)
    progress.advance("topology")
    try:
        if spec.kube:
            progress.stage("kube-api", 1)
            kube.start_kube_api(lab)
            kube.write_net_conf(lab, config)
            progress.advance("kube-api")
        else:
            progress.stage("etcd", 1)
            try:
                start_etcd(lab, spec.etcd_members)
                write_network_config(lab, config)
            except (EtcdLaunchError, GatewayError) as err:
                raise LabError(f"etcd: {err}") from None
            progress.advance("etcd")

        progress.stage("leases", spec.hosts)
        for host, backend in zip(lab.hosts, backends):
            start_agent(lab, host.index, backend, decap=spec.decap, extra_args=spec.agent_args)
        for host in lab.hosts:
            wait_for_subnet(lab, host.index)
            progress.advance("leases")

        progress.stage("pods", spec.hosts * spec.pods)
        for host in lab.hosts:
            add_pods(lab, host.index, spec.pods, progress, spec.pod_devices)

        progress.stage("ready", spec.hosts)
        wait_ready(lab, [h.index for h in lab.hosts], progress=progress)
    except BaseException:
        if not keep_on_failure:
            destroy(spec.name)
        raise
    return lab


def join_host(lab: Lab, backend: str, pods: int = 1, *, on_second_subnet: bool = False,
              extra_args: Iterable[str] = (), decap: str | None = None, wait: bool = True) -> Host:
    """A node joining a running lab: new host namespace, its agent, its pods; with `wait`,
    returns once its agent is ready."""
    host = lab.add_host(on_second_subnet)
    try:
        start_agent(lab, host.index, backend, decap=decap, extra_args=extra_args)
        wait_for_subnet(lab, host.index)
        add_pods(lab, host.index, pods)
        if wait:
            wait_ready(lab, [host.index])
    except BaseException:
        lab.remove_host(host.index)
        raise
    return host


def down(name: str = DEFAULT_LAB) -> DestroyReport:
    """Remove the lab: agents and etcd (they run inside its namespaces), namespaces, pins,
    the run directory (etcd data, logs, subnet.env) and the state file. Works after a crash
    (topology.destroy finds everything by name); with a state file it first stops the agents,
    then the etcd members one at a time: SIGTERMed together, a 3-member cluster's leader waits
    ~7 s for a leadership transfer nobody can take."""
    try:
        state = read_state(name)
    except LabError:
        state = None
    stopped = []
    if state is not None:
        agents = [(h.agent.pid, h.agent.subnet_file) for h in state.hosts
                  if h.agent and process_running(h.agent.pid, h.agent.subnet_file)]
        for pid, _ in agents:  # all at once, then wait for each
            os.kill(pid, signal.SIGTERM)
        for pid, marker in agents:
            end_process(pid, marker, None, timeout=5.0)
        members = [(m.pid, m.data_dir) for m in state.etcd.members] if state.etcd else []
        stopped = [pid for pid, _ in agents] + [
            pid for pid, marker in members if end_process(pid, marker, signal.SIGTERM, timeout=5.0)]
    report = destroy(name)
    report.killed_pids = sorted(set(stopped) | set(report.killed_pids))
    return report


# ---------------------------------------------------------------------------- reachability


@dataclass
class PingMatrix:
    pods: list[Pod]
    results: dict[tuple[str, str], PingResult] = field(default_factory=dict)  # (src netns, dst netns)

    def result(self, src: Pod, dst: Pod) -> PingResult:
        return self.results[(src.netns, dst.netns)]

    @property
    def failures(self) -> list[tuple[Pod, Pod, PingResult]]:
        by_ns = {p.netns: p for p in self.pods}
        return [(by_ns[s], by_ns[d], r) for (s, d), r in self.results.items() if not r.ok]

    @property
    def ok(self) -> bool:
        return bool(self.results) and not self.failures


def all_pods(lab: Lab) -> list[Pod]:
    return [p for h in lab.hosts for p in h.pods]


def pod_label(pod: Pod) -> str:
    return f"h{pod.host}p{pod.index}"


def ping_matrix(lab: Lab, count: int = 2, wait: float = 1.0, interval: float = 0.2,
                workers: int = 8, on_result: Callable[[], None] | None = None) -> PingMatrix:
    """Every pod pings every other pod (`count` probes, `wait` s each), `workers` at a time."""
    pods = all_pods(lab)
    matrix = PingMatrix(pods)
    pairs = [(s, d) for s in pods for d in pods if s is not d]

    def one(pair):
        src, dst = pair
        result = ping(src.netns, dst.ip, count=count, wait=wait, interval=interval)
        if on_result:
            on_result()
        return pair, result

    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(pairs)))) as pool:
        for (src, dst), result in pool.map(one, pairs):
            matrix.results[(src.netns, dst.netns)] = result
    return matrix


def read_counters(host: Host) -> dict[str, tuple[int, int]]:
    """The bpf data plane's counters of a host ({} for kernel backends or no pinned maps)."""
    if host.agent is None or host.agent.backend != "bpf" or not host.agent.pin_dir:
        return {}
    try:
        with DataPlaneMaps(host.agent.pin_dir) as maps:
            return maps.read_counters()
    except (OSError, ValueError):
        return {}


def counter_deltas(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> dict[str, int]:
    """Packets per counter that grew between two readings."""
    return {name: after[name][0] - before.get(name, (0, 0))[0] for name in after
            if after[name][0] > before.get(name, (0, 0))[0]}


# ---------------------------------------------------------------------------- status


def describe(lab: Lab, probe: bool = True) -> dict:
    """The running lab, as `lab status --json` prints it: enough to plug one more host of
    your own into it (underlay bridge and its namespace, free addresses, etcd endpoints and
    prefix, the network config)."""
    st = lab.state
    used = {IPv4Interface(h.address).ip for h in st.hosts}
    hosts = []
    for h in st.hosts:
        agent = None
        if h.agent is not None:
            running = agent_running(h)
            agent = {"backend": h.agent.backend, "pid": h.agent.pid if running else None,
                     "running": running, "healthz_port": h.agent.healthz_port,
                     "ready": (readyz(h, 1.0) == 200) if probe and running else None,
                     "log": h.agent.log_path, "subnet_file": h.agent.subnet_file,
                     "pin_dir": h.agent.pin_dir}
        hosts.append({"index": h.index, "netns": h.netns, "uplink": h.uplink, "address": h.address,
                      "underlay_bridge": h.underlay_bridge, "subnet": h.agent.subnet if h.agent else None,
                      "pod_bridge": h.pod_bridge, "pod_gateway": h.pod_gateway,
                      "agent": agent,
                      "pods": [{"netns": p.netns, "address": p.address, "gateway": p.gateway,
                                "mtu": p.mtu, "ifname": p.ifname, "device": p.device,
                                "host_device": p.host_veth} for p in h.pods]})
    etcd = None
    if st.etcd is not None:
        etcd = {"endpoints": st.etcd.endpoints, "prefix": st.etcd.prefix, "netns": st.underlay_netns,
                "members": [{"name": m.name, "client_url": m.client_url,
                             "running": process_running(m.pid, m.data_dir), "log": m.log_path}
                            for m in st.etcd.members]}
    # Host addresses as the lab hands them out (.11 upwards); .1 (router) and .25x (etcd) stay clear.
    underlay = UNDERLAY_BRIDGE_ADDRESS.network
    candidates = (underlay.network_address + 10 + i for i in range(1, MAX_HOSTS + 1))
    free = [f"{ip}/{underlay.prefixlen}" for ip in candidates if ip not in used][:3]
    return {
        "name": st.name,
        "underlay": {"netns": st.underlay_netns,
                     "bridges": [{"name": b.name, "address": b.address} for b in st.bridges],
                     "router": ({"netns": st.router.netns,
                                 "legs": [{"ifname": l.ifname, "address": l.address, "bridge": l.bridge}
                                          for l in st.router.legs]} if st.router else None)},
        "etcd": etcd,
        "kube_api": ({"url": st.kube.url, "netns": st.underlay_netns, "log": st.kube.log_path,
                      "running": process_running(st.kube.pid, "kube_standin"),
                      "net_config_path": st.kube.net_config_path} if st.kube else None),
        "network_config": st.network_config,
        "backends": {h.netns: h.agent.backend for h in st.hosts if h.agent},
        "hosts": hosts,
        "join": {"underlay_netns": st.underlay_netns, "bridge": UNDERLAY_BRIDGES[0],
                 "free_addresses": free,
                 "etcd_endpoints": ",".join(st.etcd.endpoints) if st.etcd else None,
                 "etcd_prefix": st.etcd.prefix if st.etcd else None,
                 "how": "veth from your namespace into the underlay namespace, enslave the peer to "
                        "the bridge, give your end a free address, then run `flannel-bpf attach "
                        "--iface <it> --etcd-endpoints <etcd_endpoints>` inside your namespace "
                        "(nsenter --net=..., not ip netns exec, so bpffs stays visible)"},
    }
